"""Load the bundled web client once at start-up (SPEC §12.30): the thin I/O shell around
``protocol/static.py``. The files are small (one page, one script, one stylesheet), so
they live in memory and serving one costs no disk I/O."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from sovereign.protocol.static import StaticSite

log = logging.getLogger("sovereign.webclient")

#: Files of the bundle directory that are not served.
_SKIP_PREFIXES = (".", "_")


def bundled_directory() -> Traversable:
    """``sovereign/webclient`` inside the installed package (built by ``make web``)."""
    return resources.files("sovereign").joinpath("webclient")


def read_files(directory: Traversable | Path) -> dict[str, bytes]:
    """Every regular file directly in ``directory`` (no recursion), by name."""
    if not directory.is_dir():
        return {}
    return {
        entry.name: entry.read_bytes()
        for entry in directory.iterdir()
        if entry.is_file() and not entry.name.startswith(_SKIP_PREFIXES)
    }


def load_site(directory: str, origins: Iterable[str]) -> StaticSite | None:
    """The site to serve, or None (and one log line) when there is no bundle.

    ``directory`` is ``web_client_dir`` from the config; empty means the bundle shipped
    in the package. A bundle that is present but broken stops start-up (ValueError).
    """
    where: Traversable | Path = Path(directory) if directory else bundled_directory()
    files = read_files(where)
    if not files:
        log.warning("web client: no files in %s; GET / will answer 404", where)
        return None
    site = StaticSite(files, origins)
    log.info("web client: serving %d files (%d bytes)", len(files), sum(map(len, files.values())))
    return site
