"""WAL write shaping for the SQLite writer: one write per page, not two per frame, and
durable commits that start on a fresh page of the WAL.

SQLite appends each WAL frame with two writes (the frame's 24-byte header, then its
page), so a commit of ~12 one-KiB frames at everyday load is ~24 ``pwrite`` calls,
each a system call that, after the previous commit's fsync, costs the kernel a few
microseconds. The compiled shim (``sovereign._fast.walvfs``, rules in ``walvfs.h``)
registers a VFS that wraps SQLite's default one and, for WAL files only, gathers a
commit's appended frames and writes them out, one write per 4 KiB page of the file,
when the commit frame is complete — before SQLite publishes the commit to other
connections and before the fsync that makes it durable. Same bytes, same order, same
durability.

It also has SQLite pad each synced commit to the next 4 KiB of the WAL with copies of
its last frame (SQLite's own mechanism for storage without power-safe overwrite): a
commit otherwise ends inside a page of the file, which the next commit dirties again
after the fsync, so every durable commit sent one 4 KiB page to the disk twice. What
each part bought is in docs/performance.md.

This module is the loader; ``sovereign.implementations`` picks the compiled module or
its twin (``storage/walvfs_twin.py``), as for every compiled component. Without C there
is nothing to coalesce: :func:`install` then returns None and the writer opens its
connection on SQLite's default VFS. The shim registers with the SQLite library the ``sqlite3``
module is linked to (found in this process's memory map); where that library cannot
be found (``sqlite3`` linked statically, not Linux), the writer uses the default VFS
and says why once in the log. The same happens if the registration does not reach
the ``sqlite3`` module's SQLite: opening with the VFS then fails with "no such vfs",
and :func:`writer_uri` is only used after a test connection succeeded.
"""

from __future__ import annotations

import ctypes
import logging
import sqlite3
import threading
from pathlib import Path

from sovereign import implementations

log = logging.getLogger("sovereign.storage")

#: The name the shim registers under (``?vfs=`` in the writer's URI).
VFS_NAME = "sovereign-wal"
#: Appended WAL bytes gathered before a write even without a commit (a large batch).
BUFFER_BYTES = 256 * 1024
#: Synced commits end on a boundary of this many bytes of the WAL: a memory page, the
#: unit in which the kernel writes the file back (and SQLite's default sector size).
SECTOR_BYTES = 4096

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "name": the VFS name once installed, or None


def _sqlite_library() -> str | None:
    """Path of the shared SQLite library mapped into this process (by ``sqlite3``)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(" ")[-1]
                if "/libsqlite3" in path and ".so" in path:
                    return path
    except OSError:
        return None
    return None


def _install() -> tuple[str | None, str]:
    impl = implementations.select("walvfs")
    if impl.kind == implementations.PYTHON:
        return None, "the pure-Python twin runs (SOVEREIGN_PURE=1, or the module is not built)"
    lib_path = _sqlite_library()
    if lib_path is None:
        return None, "the sqlite3 module's SQLite library is not a shared library found here"
    try:
        lib = ctypes.CDLL(lib_path)
        version = lib.sqlite3_libversion
        version.restype = ctypes.c_char_p
        if version().decode() != sqlite3.sqlite_version:
            return None, f"{lib_path} is not the SQLite the sqlite3 module runs"
        find = ctypes.cast(lib.sqlite3_vfs_find, ctypes.c_void_p).value
        register = ctypes.cast(lib.sqlite3_vfs_register, ctypes.c_void_p).value
    except (OSError, AttributeError) as exc:
        return None, f"cannot use {lib_path}: {exc}"
    if not find or not register:
        return None, f"{lib_path} lacks sqlite3_vfs_find / sqlite3_vfs_register"
    rc = impl.module.install(find, register, VFS_NAME, BUFFER_BYTES, SECTOR_BYTES)
    if rc != 0:
        return None, f"registering the VFS failed (SQLite code {rc})"
    try:  # the registration must have reached the sqlite3 module's SQLite
        sqlite3.connect(f"file:walvfs-probe?mode=memory&vfs={VFS_NAME}", uri=True).close()
    except sqlite3.Error as exc:
        return None, f"the sqlite3 module does not see the registered VFS ({exc})"
    return VFS_NAME, ""


def install() -> str | None:
    """Register the shim once per process; the VFS name, or None where it cannot run
    (the reason is logged once)."""
    with _lock:
        if "name" not in _state:
            name, why = _install()
            _state["name"] = name
            if name is None:
                log.info("WAL writes are not coalesced: %s", why)
        return _state["name"]


def writer_uri(path: Path, coalesce: bool) -> tuple[str, bool]:
    """What the writer passes to ``sqlite3.connect`` (with ``uri=``): the shim's VFS
    when ``coalesce`` and it can run, else the plain path."""
    name = install() if coalesce else None
    if name is None:
        return str(path), False
    return f"{path.resolve().as_uri()}?vfs={name}", True


def counters() -> tuple[int, int]:
    """(WAL writes SQLite asked for, writes that reached the file) in this process;
    (0, 0) without the shim."""
    result: tuple[int, int] = implementations.load("walvfs").counters()
    return result
