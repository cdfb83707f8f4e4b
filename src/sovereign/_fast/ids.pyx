# cython: language_level=3
"""Event ids (ULIDs), compiled. Twin: ``sovereign.services.ids`` (same ids for the same
state; the parity tests in tests/unit/test_ids.py hold them to it).

An id is 48 bits of millisecond time and 80 random bits, in 26 Crockford base32
characters. Within one millisecond, or with the clock behind the last id, the random
part is incremented instead, so ids sort in creation order. The random bits come from
xoshiro256** seeded by ``os.urandom`` (the twin uses ``random.Random`` seeded by the
system's generator: neither is meant to be unguessable, only unique and spread).
The state is this process's, as the twin's; a forked child reseeds.
"""

import os

from libc.stdint cimport uint16_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

cdef const char* _ALPHABET = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"

# The last id: its millisecond, and its 80 random bits as 16 high + 64 low.
cdef uint64_t _last_ms = 0
cdef uint16_t _last_hi = 0
cdef uint64_t _last_lo = 0

cdef char _text[26]

cdef uint64_t _s[4]


cdef inline uint64_t _rotl(uint64_t x, int k) nogil:
    return (x << k) | (x >> (64 - k))


cdef uint64_t _next() nogil:
    cdef uint64_t result = _rotl(_s[1] * 5, 7) * 9
    cdef uint64_t t = _s[1] << 17
    _s[2] ^= _s[0]
    _s[3] ^= _s[1]
    _s[1] ^= _s[2]
    _s[0] ^= _s[3]
    _s[2] ^= t
    _s[3] = _rotl(_s[3], 45)
    return result


def _reseed():
    """A new random stream (at import, and in a forked child)."""
    cdef bytes seed = os.urandom(32)
    memcpy(_s, <const char*>seed, 32)
    if _s[0] == 0 and _s[1] == 0 and _s[2] == 0 and _s[3] == 0:
        _s[0] = 1


_reseed()
os.register_at_fork(after_in_child=_reseed)


cdef inline void _time_text(uint64_t ms):
    cdef int i
    _text[0] = _ALPHABET[(ms >> 45) & 0x7]
    for i in range(1, 10):
        _text[i] = _ALPHABET[(ms >> (45 - 5 * i)) & 0x1F]


cdef inline void _random_text(uint16_t hi, uint64_t lo):
    # 80 bits = 16 characters: the first 12 from hi:lo's top 60 bits, the last 4 from
    # lo's low 20 (bit positions 75..0 in steps of 5).
    _text[10] = _ALPHABET[(hi >> 11) & 0x1F]
    _text[11] = _ALPHABET[(hi >> 6) & 0x1F]
    _text[12] = _ALPHABET[(hi >> 1) & 0x1F]
    _text[13] = _ALPHABET[((hi & 0x1) << 4) | (lo >> 60)]
    cdef int i
    for i in range(14, 26):
        _text[i] = _ALPHABET[(lo >> (55 - 5 * (i - 14))) & 0x1F]


def new_ulid(now_ms=None):
    """A new id, after every id this process made before (``now_ms``: the time to use,
    else the wall clock)."""
    global _last_ms, _last_hi, _last_lo
    cdef uint64_t ms
    cdef timespec ts
    if now_ms is None:
        clock_gettime(CLOCK_REALTIME, &ts)
        ms = <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1_000_000)
    else:
        ms = <uint64_t>now_ms
    if ms <= _last_ms:
        ms = _last_ms
        _last_lo += 1
        if _last_lo == 0:  # the carry into the high 16 bits (80-bit wrap, as the twin)
            _last_hi += 1
    else:
        _last_ms = ms
        _last_lo = _next()
        _last_hi = <uint16_t>(_next() >> 48)
    _time_text(ms)
    _random_text(_last_hi, _last_lo)
    return _text[:26].decode("ascii")


def state():
    """(millisecond, 80-bit random part) of the last id."""
    return _last_ms, (<object>_last_hi << 64) | _last_lo


def set_state(ms, rand):
    """Make the next id follow (``ms``, ``rand``) as if it were the last one made."""
    global _last_ms, _last_hi, _last_lo
    _last_ms = <uint64_t>ms
    _last_hi = <uint16_t>((rand >> 64) & 0xFFFF)
    _last_lo = <uint64_t>(rand & 0xFFFFFFFFFFFFFFFF)
