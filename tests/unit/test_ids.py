"""Event ids are real ULIDs: 26 Crockford characters, time-ordered, monotonic; the
compiled generator and its twin make the same id from the same state."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
from ulid import ULID

from sovereign import implementations
from sovereign.services import ids
from tests.helpers.twins import impl_fixture, impls_fixture

mod = impl_fixture("ids")
mods = impls_fixture("ids")

MASK80 = (1 << 80) - 1


@pytest.fixture(autouse=True)
def _keep_state(mods: list[ModuleType]) -> Iterator[None]:
    """Each generator's state is its process's: put it back after a test moves it."""
    saved = [m.state() for m in mods]
    yield
    for m, state in zip(mods, saved, strict=True):
        m.set_state(*state)


def test_ids_parse_as_ulids_with_the_right_time(mod: ModuleType) -> None:
    mod.set_state(0, 0)
    before = time.time()
    u = mod.new_ulid()
    parsed = ULID.from_str(u)
    assert str(parsed) == u and len(u) == 26
    assert before - 0.002 <= parsed.timestamp <= time.time() + 0.002


def test_ids_are_unique_and_sorted_in_creation_order(mod: ModuleType) -> None:
    many = [mod.new_ulid() for _ in range(50_000)]
    assert many == sorted(many) and len(set(many)) == len(many)


def test_a_new_millisecond_takes_new_random_bits(mod: ModuleType) -> None:
    mod.set_state(0, 0)
    ms = int(time.time() * 1000)
    parts = set()
    for i in range(200):
        u = ULID.from_str(mod.new_ulid(ms + i))
        assert u.milliseconds == ms + i
        parts.add(int(u) & MASK80)
    assert len(parts) == 200
    # Spread over all 80 bits, the high 16 included (the compiled generator takes them
    # from a second draw): 200 draws leave a bit constant with chance 2^-199.
    assert all(0 < sum(p >> b & 1 for p in parts) < 200 for b in range(80))


def test_the_same_state_gives_the_same_id_in_both(mods: list[ModuleType]) -> None:
    """Every character position, and the increments that carry across the random
    part's two words in the compiled generator (64 low bits, 16 high) and wrap at 80."""
    rng = random.Random(7)
    cases = [(rng.getrandbits(48), rng.getrandbits(80)) for _ in range(5_000)]
    cases += [(1, (1 << 64) - 1), (2, MASK80), ((1 << 48) - 1, (1 << 79) - 1)]
    for ms, rand in cases:
        made = set()
        for m in mods:
            m.set_state(ms, rand)
            made.add(m.new_ulid(ms))  # the same millisecond: the random part + 1
            assert m.state() == (ms, (rand + 1) & MASK80)
        assert made == {str(ULID.from_int((ms << 80) | ((rand + 1) & MASK80)))}


def test_the_twins_helpers_match_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(5_000):
        ms, rand = rng.getrandbits(48), rng.getrandbits(80)
        assert ids._time_prefix(ms) + ids._random_part(rand) == str(
            ULID.from_int((ms << 80) | rand)
        )
        assert ids.encode((ms << 80) | rand) == str(ULID.from_int((ms << 80) | rand))


def test_floor_sorts_before_every_id_of_that_millisecond(mod: ModuleType) -> None:
    ms = int(time.time() * 1000) + 10_000  # in the future: new_ulid(ms) starts a fresh ms
    assert ids.ulid_floor(ms) < mod.new_ulid(ms) < ids.ulid_floor(ms + 1)


def test_ids_start_after_a_stored_id_even_with_the_clock_behind(mod: ModuleType) -> None:
    mod.set_state(0, 0)
    now_ms = int(time.time() * 1000)
    stored = str(ULID.from_timestamp((now_ms + 60_000) / 1000))  # a minute ahead
    ids.start_after(stored, mod)
    behind = mod.new_ulid(now_ms)
    assert behind > stored and ULID.from_str(behind).milliseconds == now_ms + 60_000
    ids.start_after(ids.encode(0), mod)  # an older id moves nothing back
    assert mod.new_ulid(now_ms) > behind
    ids.start_after("", mod)  # an empty database
    assert mod.new_ulid() > behind


def test_a_forked_child_does_not_repeat_its_parents_ids(mod: ModuleType) -> None:
    """Each side of a fork draws its own random bits for a new millisecond."""
    ms = int(time.time() * 1000) + 20_000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its id of millisecond ms, to the parent, and out
        try:
            os.write(write, mod.new_ulid(ms).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = mod.new_ulid(ms)
    assert len(child) == 26 and ULID.from_str(child).milliseconds == ms
    assert child != mine


def test_the_server_makes_ids_with_the_selected_generator() -> None:
    from sovereign.services import eventlog

    assert eventlog.new_ulid is implementations.load("ids").new_ulid
