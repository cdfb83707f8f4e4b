# C-level API of the compiled Envelope codec (SPEC §2), cimported by dispatch.pyx.

cdef struct EnvelopeView:
    int msg_type
    Py_ssize_t rid_off
    Py_ssize_t rid_len      # -1: absent
    Py_ssize_t pay_off
    Py_ssize_t pay_len

# Status codes index envelope.REASONS (same order as the twin's REASONS).
cdef enum:
    ENV_OK = 0
    ENV_TRUNCATED_VARINT = 1
    ENV_VARINT_TOO_LONG = 2
    ENV_TAG_TOO_LONG = 3
    ENV_FIELD_ZERO = 4
    ENV_GROUP = 5
    ENV_BAD_WIRE_TYPE = 6
    ENV_LENGTH_TOO_LONG = 7
    ENV_TRUNCATED_FIELD = 8
    ENV_BAD_UTF8 = 9
    ENV_RID_TOO_LONG = 10
    ENV_BAD_UTF8_FIELD = 11

# Scan a whole message; no Python objects, no exceptions. Superseded request_id
# occurrences are UTF-8-checked here; the winning one is left to the caller.
cdef int parse_envelope(const unsigned char* p, Py_ssize_t n, EnvelopeView* v) noexcept nogil

# Pin ``buf``'s bytes into view.buf/view.len: exact bytes are read in place (returns 0),
# anything else goes through PyObject_GetBuffer(PyBUF_SIMPLE) (returns 1). Pass the
# result to release_bytes().
cdef int acquire_bytes(object buf, Py_buffer* view) except -1
cdef void release_bytes(Py_buffer* view, int acquired) noexcept

# Zero-copy ``memoryview`` of buf[off:off+length] (1-D, format 'B').
cdef object payload_slice(object buf, Py_ssize_t off, Py_ssize_t length)
