"""Compiled fan-out: encode once, write many (SPEC §5). Twin: ``sovereign.transport.fanout``.

Same API and results as the twin; see its docstring for the connection contract and
the snapshot rule. The loops here allocate nothing per connection: ``live`` / ``out``
are plain attribute reads, ``get_write_buffer_size`` / ``write`` are vectorcall method
calls (no bound-method object), and ``by_user`` (an exact dict) is probed in C.

Snapshot rule, as implemented: a tuple is walked as is; any other iterable except an
exact list is copied to a tuple first; an exact list is walked in place (no copy) and
only when ``overflow()`` is about to be called are the connections after the current
one copied into a private list, so whatever ``overflow()`` does to the caller's list
cannot skip or repeat anyone. That equals the twin's "snapshot when the user is
reached" because only ``overflow()`` may change ``by_user``. Bounds are rechecked on
every step, so even a contract breach cannot read out of range.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_Check,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.dict cimport PyDict_CheckExact, PyDict_GetItemWithError
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE, PyList_GetSlice
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memcpy

cdef tuple _EMPTY = ()

# The _try_write outcomes (SKIPPED, WRITTEN, OVER) and the header helpers
# (_header_len, _put_header) are in fanout.pxd.

# ---------------------------------------------------------------- framing

cdef int _acquire(object buf, Py_buffer* view) except -1:
    """Exact bytes are read in place (0); anything else via PyBUF_SIMPLE (1: release)."""
    if PyBytes_CheckExact(buf):
        view.buf = PyBytes_AS_STRING(buf)
        view.len = PyBytes_GET_SIZE(buf)
        return 0
    PyObject_GetBuffer(buf, view, PyBUF_SIMPLE)  # BufferError if not C-contiguous
    return 1


def ws_frame(envelope):
    """One complete server->client binary WebSocket frame carrying ``envelope``."""
    cdef Py_buffer view
    cdef int acquired = _acquire(envelope, &view)
    cdef Py_ssize_t n = view.len
    cdef Py_ssize_t h = _header_len(n)
    cdef bytes frame
    cdef unsigned char* p
    try:
        frame = PyBytes_FromStringAndSize(NULL, h + n)
        p = <unsigned char*>PyBytes_AS_STRING(frame)
        _put_header(p, n)
        memcpy(p + h, view.buf, <size_t>n)
    finally:
        if acquired:
            PyBuffer_Release(&view)
    return frame


def append_ws_frame(out, envelope):
    """Append one frame to ``out`` (batch a backlog, then write ``out`` once)."""
    if not PyByteArray_Check(out):
        raise TypeError(f"out must be a bytearray, not {type(out).__name__}")
    cdef Py_buffer view
    cdef int acquired = _acquire(envelope, &view)
    cdef Py_ssize_t n = view.len
    cdef Py_ssize_t h = _header_len(n)
    cdef Py_ssize_t start
    cdef unsigned char* p
    try:
        start = PyByteArray_GET_SIZE(out)
        # BufferError if out is exported (e.g. envelope is a view of it): nothing appended.
        PyByteArray_Resize(out, start + h + n)
        p = <unsigned char*>PyByteArray_AS_STRING(out) + start
        _put_header(p, n)
        memcpy(p + h, view.buf, <size_t>n)
    finally:
        if acquired:
            PyBuffer_Release(&view)


# ---------------------------------------------------------------- writing

cdef inline bytes _check_frame(object frame):
    # Immutable bytes only: transports keep a reference to it, shared by every
    # connection, until it is sent.
    if not PyBytes_CheckExact(frame):
        raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
    return <bytes>frame


cdef int _try_write(object conn, bytes frame, Py_ssize_t n, Py_ssize_t limit) except -1:
    """SKIPPED (not live / closed), WRITTEN, or OVER (caller calls conn.overflow())."""
    cdef Py_ssize_t size
    if not conn.live:
        return SKIPPED
    out = conn.out
    if out is None:
        return SKIPPED
    size = out.get_write_buffer_size()
    # size + n > limit, without overflowing Py_ssize_t
    if n > limit or size > limit - n:
        return OVER
    out.write(frame)
    return WRITTEN


cdef Py_ssize_t _fan(
    bytes frame, Py_ssize_t n, object conns, object exclude, Py_ssize_t limit
) except -1:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t written = 0
    cdef bint private = False
    cdef int st
    cdef object conn
    cdef object seq = conns
    if PyList_CheckExact(seq):
        while i < PyList_GET_SIZE(seq):
            conn = <object>PyList_GET_ITEM(seq, i)
            i += 1
            if conn is exclude:
                continue
            st = _try_write(conn, frame, n, limit)
            if st == WRITTEN:
                written += 1
            elif st == OVER:
                if not private:
                    # the rest of the snapshot, out of overflow()'s reach
                    seq = PyList_GetSlice(seq, i, PyList_GET_SIZE(seq))
                    i = 0
                    private = True
                conn.overflow()
        return written
    if not PyTuple_CheckExact(seq):
        seq = tuple(seq)
    while i < PyTuple_GET_SIZE(seq):
        conn = <object>PyTuple_GET_ITEM(seq, i)
        i += 1
        if conn is exclude:
            continue
        st = _try_write(conn, frame, n, limit)
        if st == WRITTEN:
            written += 1
        elif st == OVER:
            conn.overflow()
    return written


def write_frame(conn, frame, Py_ssize_t buffer_limit):
    """Write ``frame`` to a live connection unless that would pass ``buffer_limit``.

    Past the limit, ``conn.overflow()`` is called instead. Returns True if written.
    """
    cdef bytes f = _check_frame(frame)
    cdef int st = _try_write(conn, f, PyBytes_GET_SIZE(f), buffer_limit)
    if st == OVER:
        conn.overflow()
    return st == WRITTEN


def fanout(frame, by_user, user_ids, exclude, Py_ssize_t buffer_limit):
    """Write ``frame`` to every live connection of every user in ``user_ids``.

    ``exclude`` (compared by identity) is skipped: the sending connection gets its echo
    instead, while the sender's other connections receive the frame. Unknown user ids
    are ignored; pass each id once. Returns the number of connections written to.
    """
    cdef bytes f = _check_frame(frame)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(f)
    cdef Py_ssize_t written = 0
    cdef bint exact = PyDict_CheckExact(by_user)
    cdef PyObject* found
    cdef object conns
    get = None if exact else by_user.get
    for uid in user_ids:
        if exact:
            found = PyDict_GetItemWithError(by_user, uid)  # borrowed
            if found is NULL:
                continue
            conns = <object>found  # strong from here on
        else:
            conns = get(uid, _EMPTY)
        written += _fan(f, n, conns, exclude, buffer_limit)
    return written


def fanout_conns(frame, conns, exclude, Py_ssize_t buffer_limit):
    """``fanout`` over a flat iterable of connections (walked as a snapshot)."""
    cdef bytes f = _check_frame(frame)
    return _fan(f, PyBytes_GET_SIZE(f), conns, exclude, buffer_limit)


def collect(frame, by_user, user_ids, exclude, dict pending):
    """Like ``fanout`` but append ``frame`` to ``pending[conn]`` (a bytearray per
    connection) instead of writing: the caller writes each buffer once (App.uncork).
    Nothing here can call ``overflow()``, so the lists are walked in place."""
    cdef bytes f = _check_frame(frame)
    cdef Py_ssize_t collected = 0
    cdef Py_ssize_t i
    cdef PyObject* found
    cdef PyObject* slot
    cdef object conns, conn, buf
    for uid in user_ids:
        found = PyDict_GetItemWithError(by_user, uid)
        if found is NULL:
            continue
        conns = <object>found
        if not PyList_CheckExact(conns):
            conns = list(conns)
        for i in range(PyList_GET_SIZE(conns)):
            conn = <object>PyList_GET_ITEM(conns, i)
            if conn is exclude or not conn.live:
                continue
            slot = PyDict_GetItemWithError(pending, conn)
            if slot is NULL:
                pending[conn] = bytearray(f)
            else:
                buf = <object>slot
                buf += f
            collected += 1
    return collected
