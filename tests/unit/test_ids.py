"""Event ids are real ULIDs: 26 Crockford characters, time-ordered, monotonic."""

from __future__ import annotations

import random
import time

import pytest
from ulid import ULID

from sovereign.services import ids


def test_ids_parse_as_ulids_with_the_right_time() -> None:
    before = time.time()
    u = ids.new_ulid()
    parsed = ULID.from_str(u)
    assert str(parsed) == u and len(u) == 26
    assert before - 0.002 <= parsed.timestamp <= time.time() + 0.002


def test_ids_are_unique_and_sorted_in_creation_order() -> None:
    many = [ids.new_ulid() for _ in range(50_000)]
    assert many == sorted(many) and len(set(many)) == len(many)


def test_encoding_matches_the_reference_for_random_values() -> None:
    rng = random.Random(7)
    for _ in range(5_000):
        ms, rand = rng.getrandbits(48), rng.getrandbits(80)
        assert ids._time_prefix(ms) + ids._random_part(rand) == str(
            ULID.from_int((ms << 80) | rand)
        )
        assert ids.encode((ms << 80) | rand) == str(ULID.from_int((ms << 80) | rand))


def test_floor_sorts_before_every_id_of_that_millisecond() -> None:
    ms = int(time.time() * 1000) + 10_000  # in the future: new_ulid(ms) starts a fresh ms
    assert ids.ulid_floor(ms) < ids.new_ulid(ms) < ids.ulid_floor(ms + 1)


def test_ids_start_after_a_stored_id_even_with_the_clock_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ids, "_state", [0, 0])  # this process's state, restored after
    now_ms = int(time.time() * 1000)
    stored = str(ULID.from_timestamp((now_ms + 60_000) / 1000))  # a minute ahead
    ids.start_after(stored)
    behind = ids.new_ulid(now_ms)
    assert behind > stored and ULID.from_str(behind).milliseconds == now_ms + 60_000
    ids.start_after(ids.encode(0))  # an older id moves nothing back
    assert ids.new_ulid(now_ms) > behind
    ids.start_after("")  # an empty database
    assert ids.new_ulid() > behind
