"""Event-id microbenchmarks: compiled ``sovereign._fast.ids`` vs its twin.

Run: ``python -m pytest benchmarks/test_bench_ids.py -q --benchmark-only``.
``new_millisecond`` is the everyday case (nearly every event starts a new millisecond,
so its id takes new random bits); ``same_millisecond`` increments the last random part.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from tests.helpers.twins import KINDS, load_twin

IDS = 1_000  # per round: divide the mean by this for one id


@pytest.fixture(params=KINDS)
def gen(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    mod = load_twin("ids", request.param)
    saved = mod.state()
    yield mod
    mod.set_state(*saved)


def test_new_millisecond(benchmark: Any, gen: ModuleType) -> None:
    ms = itertools.count(4_000_000_000_000)  # after any real clock: every call is new
    new_ulid = gen.new_ulid

    def ids() -> str:
        for _ in range(IDS - 1):
            new_ulid(next(ms))
        return new_ulid(next(ms))

    last = benchmark.pedantic(ids, rounds=200, warmup_rounds=5)
    assert len(last) == 26


def test_same_millisecond(benchmark: Any, gen: ModuleType) -> None:
    new_ulid = gen.new_ulid

    def ids() -> str:
        for _ in range(IDS - 1):
            new_ulid(0)
        return new_ulid(0)

    first = new_ulid(0)
    last = benchmark.pedantic(ids, rounds=200, warmup_rounds=5)
    assert last > first
