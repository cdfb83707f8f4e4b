"""Compiled WAL write coalescing for SQLite: one write per 4 KiB page of a commit
instead of two per frame, and durable commits aligned to 4 KiB pages of the WAL (the C
is in walvfs.h, which explains the rules). Twin: ``sovereign.storage.walvfs``
(there is nothing to coalesce without C: the twin reports the shim as unavailable and
connections keep SQLite's default VFS, which writes the same bytes).

``install`` takes the addresses of ``sqlite3_vfs_find`` and ``sqlite3_vfs_register``
from the SQLite library that the ``sqlite3`` module uses (``storage/walvfs.py`` finds
them), so this extension needs neither SQLite's header nor its library to build.
"""

cdef extern from "walvfs.h":
    ctypedef long long sov_i64
    int sov_install(void *find_addr, void *register_addr, const char *name, int buffer_bytes,
                    int sector_bytes) nogil
    sov_i64 sov_stat_writes
    sov_i64 sov_stat_calls

# The name's bytes must outlive the registration: a module-level object does.
cdef bytes _registered_name = b""


def install(
    size_t find_addr, size_t register_addr, str name, int buffer_bytes, int sector_bytes
) -> int:
    """Register the shim as VFS ``name`` over the default VFS (the first call only;
    later calls return 0 and change nothing): appends gathered up to ``buffer_bytes``,
    synced commits padded to ``sector_bytes`` of the WAL (0: not). 0 on success, else
    SQLite's error code (-1: no default VFS of a known layout)."""
    global _registered_name
    if _registered_name:
        return 0
    cdef bytes raw = name.encode()
    cdef int rc = sov_install(
        <void *>find_addr, <void *>register_addr, raw, buffer_bytes, sector_bytes
    )
    if rc == 0:
        _registered_name = raw
    return rc


def counters() -> tuple[int, int]:
    """(WAL writes SQLite asked for, writes passed on to the file) since start-up."""
    return sov_stat_writes, sov_stat_calls
