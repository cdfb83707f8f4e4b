"""Event ids: ULIDs (SPEC §5), generated fast and monotonic within this process.

python-ulid costs ~4 us per id; this costs 1.3 us, and 0.3 us for another id in the same
millisecond. Within one millisecond the random part is incremented, so ids sort in
creation order (retention deletes by id range).

This is the pure-Python twin of ``sovereign._fast.ids`` (the component "ids" in
``sovereign.implementations``): :func:`new_ulid`, :func:`state` and :func:`set_state`
are the component's API, and callers that make ids take them from
``implementations.load("ids")``, so that one generator (one state) serves the process.
The helpers here (:func:`start_after`, which takes the generator to move, :func:`encode`,
:func:`ulid_ms`, :func:`ulid_floor`) have no compiled twin.
"""

from __future__ import annotations

import os
import random
import time
from typing import Protocol

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> 2 chars
_rng = random.SystemRandom()
_fast = random.Random(_rng.getrandbits(128))
# A forked child must not repeat its parent's random parts (random.Random instances are
# not reseeded by the random module's own fork hook).
os.register_at_fork(after_in_child=lambda: _fast.seed(_rng.getrandbits(128)))
_state = [0, 0]  # last ms, last random part


def encode(value: int) -> str:
    """128-bit integer -> 26 Crockford base32 characters."""
    first = _ALPHABET[(value >> 125) & 0x7]
    pairs = _PAIRS
    middle = "".join([pairs[(value >> s) & 0x3FF] for s in range(115, 4, -10)])
    return first + middle + _ALPHABET[value & 0x1F]


_prefix_ms = -1  # ids of one millisecond share their first 10 characters
_prefix_text = ""


def _time_prefix(ms: int) -> str:
    """48-bit millisecond time -> the ULID's first 10 characters (3 + 4 x 10 + 5 bits).

    At everyday load nearly every id starts a new millisecond, so this runs per id:
    six lookups, not :func:`encode`'s 26 characters cut to 10 (0.9 us less)."""
    global _prefix_ms, _prefix_text
    if _prefix_ms != ms:
        a, p = _ALPHABET, _PAIRS
        _prefix_ms = ms
        _prefix_text = (
            a[(ms >> 45) & 0x7]
            + p[(ms >> 35) & 0x3FF]
            + p[(ms >> 25) & 0x3FF]
            + p[(ms >> 15) & 0x3FF]
            + p[(ms >> 5) & 0x3FF]
            + a[ms & 0x1F]
        )
    return _prefix_text


_rand_high = -1  # rand >> 10 of the last id ...
_rand_text = ""  # ... and its first 14 characters


def _random_part(rand: int) -> str:
    """80 bits -> the ULID's last 16 characters. Ids of one millisecond increment the
    random part, so usually only the last two characters are new."""
    global _rand_high, _rand_text
    p = _PAIRS
    high = rand >> 10
    if _rand_high != high:  # a new millisecond: a new random part
        _rand_high = high
        _rand_text = (
            p[(rand >> 70) & 0x3FF]
            + p[(rand >> 60) & 0x3FF]
            + p[(rand >> 50) & 0x3FF]
            + p[(rand >> 40) & 0x3FF]
            + p[(rand >> 30) & 0x3FF]
            + p[(rand >> 20) & 0x3FF]
            + p[(rand >> 10) & 0x3FF]
        )
    return _rand_text + p[rand & 0x3FF]


def new_ulid(now_ms: int | None = None) -> str:
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    last_ms, last_rand = _state
    if ms <= last_ms:
        ms = last_ms
        rand = (last_rand + 1) & ((1 << 80) - 1)
    else:
        rand = _fast.getrandbits(80)
    _state[0] = ms
    _state[1] = rand
    return _time_prefix(ms) + _random_part(rand)


def state() -> tuple[int, int]:
    """(millisecond, 80-bit random part) of the last id."""
    return _state[0], _state[1]


def set_state(ms: int, rand: int) -> None:
    """Make the next id follow (``ms``, ``rand``) as if it were the last one made."""
    _state[0] = ms
    _state[1] = rand


class Generator(Protocol):
    """The component "ids": this module, or ``sovereign._fast.ids``."""

    def state(self) -> tuple[int, int]: ...
    def set_state(self, ms: int, rand: int) -> None: ...


def start_after(ulid: str, generator: Generator) -> None:
    """Make every id ``generator`` makes from now on sort after ``ulid`` (the newest
    stored event id, at start-up), even if the clock is now behind it: idempotency
    keys not yet folded into ``send_requests`` are found as the events after a stored
    id (storage/messaging.py, fold_send_requests_txn). One function for both
    generators: it runs once per start."""
    if not ulid:
        return
    value = int(ulid.translate(_TO_BASE32), 32)
    ms, rand = value >> 80, value & ((1 << 80) - 1)
    if (ms, rand) > generator.state():
        generator.set_state(ms, rand)


def ulid_ms(ulid: str) -> int:
    """The millisecond time in a ULID's first 10 characters."""
    return int(ulid[:10].translate(_TO_BASE32), 32)


# Crockford's alphabet -> int(..., 32)'s digits 0-9a-v (ULIDs have no I, L, O, U).
_TO_BASE32 = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")


def ulid_floor(ms: int) -> str:
    """The smallest ULID of millisecond ``ms`` (for range deletes)."""
    return encode(ms << 80)
