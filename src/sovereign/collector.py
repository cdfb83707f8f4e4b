"""The cyclic garbage collector's policy while serving (``sovereign serve``).

A module of its own, with nothing to import, so that what measures the request path
(``benchmarks/instructions.py``) applies the same policy without importing the server
and everything it wires (the admin listener, aiohttp, the Redis bus).
"""

from __future__ import annotations

import gc

#: The collector's thresholds while serving (see :func:`tune_gc`).
GC_THRESHOLDS = (50_000, 50, 1_000)


def tune_gc() -> None:
    """Collect less often, and never scan what start-up loaded.

    Measured with py-spy (native frames) under the relay load: 36% of the event loop's
    busy time was CPython's cyclic collector, run every 700 allocations and walking the
    large, long-lived caches (conversations, event index, idempotency keys). The hot
    path makes little cyclic garbage, so a higher first threshold costs little memory.
    """
    gc.collect()
    gc.freeze()  # everything loaded so far: permanent generation, never traversed
    gc.set_threshold(*GC_THRESHOLDS)
