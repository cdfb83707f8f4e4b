"""``python -m sovereign.bench`` is ``sovereign-bench``."""

from sovereign.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
