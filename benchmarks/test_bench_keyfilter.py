"""Idempotency key filter microbenchmarks: compiled ``sovereign._fast.keyfilter`` vs its
twin, through ``SendRequests``' per-send calls.

Run: ``python -m pytest benchmarks/test_bench_keyfilter.py -q --benchmark-only``.
One round is what 1,000 new sends cost the filter: ``maybe_stored`` (no), ``begin``,
``committed``, with full-size filters (2 MiB per period: most probes miss the CPU
caches, as in the server). Divide the mean by 1,000 for one send.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import pytest
from tests.helpers.twins import KINDS, load_twin

from sovereign.services.idempotency import FILTER_BITS, GEN_KEYS, PERIOD_US, RECENT_MAX

SENDS = 1_000
T0 = 1_900_000_000_000_000


@pytest.fixture(params=KINDS)
def filt(request: pytest.FixtureRequest) -> Any:
    mod: ModuleType = load_twin("keyfilter", request.param)
    f = mod.KeyFilter(RECENT_MAX, FILTER_BITS, PERIOD_US, GEN_KEYS)
    f.fold = True
    return f


def test_new_sends(benchmark: Any, filt: Any) -> None:
    n = itertools.count()
    op = object()

    def sends() -> int:
        due = 0
        for _ in range(SENDS):
            i = next(n)
            key = (f"user{i % 200}", f"request-{i}")
            if filt.maybe_stored(key):
                continue
            filt.begin(key, op, T0 + i)
            due += filt.committed(key, "01JXXXXXXXXXXXXXXXXXXXXXXX")
            if due:  # a fold, as SendRequests does it (not what is measured)
                filt.folding, filt.unfolded = None, {}
        return due

    benchmark.pedantic(sends, rounds=100, warmup_rounds=3)
    assert len(filt.recent) == min(RECENT_MAX, next(n))  # every send was new
