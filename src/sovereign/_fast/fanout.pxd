# C-level API of the compiled fan-out (SPEC §5), cimportable: server->client frame
# headers (RFC 6455 §5.2) and the per-connection write step of a fan-out.
# Twin: sovereign.transport.fanout (see its docstring for the connection contract).

from libc.stdint cimport uint64_t

# _try_write outcomes
cdef enum:
    SKIPPED = 0  # not live, or closed (out is None)
    WRITTEN = 1
    OVER = 2     # the write would pass the limit: the caller must call conn.overflow()


cdef inline Py_ssize_t _header_len(Py_ssize_t n) noexcept nogil:
    """Bytes of a server frame header for an n-byte payload: 2, 4 or 10."""
    if n < 126:
        return 2
    if n <= 0xFFFF:
        return 4
    return 10


cdef inline void _put_header(unsigned char* p, Py_ssize_t n) noexcept nogil:
    """RFC 6455 §5.2 server frame header: FIN + binary, no mask, minimal length.
    ``p`` must have room for ``_header_len(n)`` bytes."""
    cdef uint64_t v = <uint64_t>n
    cdef int i
    p[0] = 0x82
    if n < 126:
        p[1] = <unsigned char>n
    elif n <= 0xFFFF:
        p[1] = 126
        p[2] = <unsigned char>(v >> 8)
        p[3] = <unsigned char>v
    else:
        p[1] = 127
        for i in range(8):
            p[2 + i] = <unsigned char>(v >> (56 - 8 * i))


# Write ``frame`` (n bytes) to ``conn.out`` unless that passes ``limit``:
# SKIPPED, WRITTEN or OVER (then the caller calls conn.overflow(); this never does).
cdef int _try_write(object conn, bytes frame, Py_ssize_t n, Py_ssize_t limit) except -1

# Write ``frame`` to every connection in ``conns`` but ``exclude`` (by identity), walked
# as a snapshot, calling overflow() on those over ``limit``; returns how many were written.
cdef Py_ssize_t _fan(
    bytes frame, Py_ssize_t n, object conns, object exclude, Py_ssize_t limit
) except -1
