"""The idempotency key filter: the compiled ``sovereign._fast.keyfilter`` and its twin
``services/keyfilter.py`` give the same answers and hold the same state (the same bits
in the same arrays) after the same calls. The behaviour itself is tested through
``SendRequests`` in test_idempotency.py."""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest

from sovereign import implementations
from sovereign.services import idempotency
from tests.helpers.twins import impl_fixture, impls_fixture

mod = impl_fixture("keyfilter")
mods = impls_fixture("keyfilter")

PERIOD = 1_000_000
T0 = 1_900_000_000_000_000


def state(f: Any) -> dict[str, Any]:
    return {
        "pending": dict(f.pending),
        "recent": list(f.recent.items()),
        "periods": {p: bytes(b) for p, b in f._periods.items()},
        "filters": [bytes(b) for b in f._filters],
        "newest": (f._newest_p, bytes(f._newest)),
        "counts": dict(f._counts),
        "committed": dict(f._committed),
        "unfolded": dict(f.unfolded),
        "folding": f.folding,
    }


def test_the_same_calls_give_the_same_answers_and_state(mods: list[ModuleType]) -> None:
    if len(mods) < 2:
        pytest.skip("the compiled filter is not built (SOVEREIGN_ALLOW_PURE=1)")
    rng = random.Random(11)
    filters = [m.KeyFilter(5, 1 << 12, PERIOD, 4) for m in mods]
    for f in filters:
        f.fold = True
    # Keys of every hash sign and size; a few reused, so retries, undos and re-commits
    # of the same key happen too.
    keys = [(f"u{rng.randrange(50)}", f"{rng.getrandbits(64):x}") for _ in range(300)]
    op = object()
    folds = 0
    for step in range(4_000):
        k = rng.choice(keys)
        ts = T0 + rng.randrange(-3, 12) * PERIOD + rng.randrange(PERIOD)  # some step back
        action = rng.choice(("begin", "begin", "add", "committed", "undo", "maybe", "watch"))
        fold_done = rng.random() < 0.3  # drawn once: both filters see the same calls
        answers = []
        for f in filters:
            if action == "begin":
                answers.append(f.begin(k, op, ts))
            elif action == "add":
                answers.append(f.add(k, ts))
            elif action == "committed":
                due = f.committed(k, f"e{step}")
                if due:  # what SendRequests.start_fold and fold_done do
                    f.folding, f.unfolded = f.unfolded, {}
                    folds += f is filters[0]
                elif f.folding is not None and fold_done:
                    f.folding = None
                answers.append(due)
            elif action == "undo":
                answers.append(f.undo(k))
            elif action == "maybe":
                answers.append(f.maybe_stored(k))
            else:
                f._watching[k] = 1
                answers.append(None)
        assert answers[0] == answers[1], (step, action)
        assert state(filters[0]) == state(filters[1]), (step, action)
    assert len(filters[0]._periods) > 3  # the periods, the newest array and its lookups
    assert any(filters[0]._committed.values()) and folds > 10
    assert any(hash(k) < 0 for k in keys) and any(hash(k) > 0 for k in keys)


def test_a_key_is_found_in_every_period_it_was_added_to(mod: ModuleType) -> None:
    f = mod.KeyFilter(10, 1 << 16, PERIOD, 8)
    rng = random.Random(5)
    added = [((f"u{i}", f"{rng.getrandbits(80):x}"), T0 + i * PERIOD // 7) for i in range(500)]
    for k, ts in added:
        f.add(k, ts)
    assert all(f.maybe_stored(k) for k, _ in added)
    fresh = sum(f.maybe_stored((f"u{i}", f"new{i}")) for i in range(5_000))
    assert fresh < 50  # 500 keys in 8 KiB-bit arrays: a false positive is rare


def test_bad_sizes_are_refused(mod: ModuleType) -> None:
    for args in ((5, 1000, PERIOD, 4), (5, 4, PERIOD, 4), (-1, 64, PERIOD, 4), (5, 64, 0, 4)):
        with pytest.raises(ValueError):
            mod.KeyFilter(*args)


def test_send_requests_are_built_on_the_selected_filter() -> None:
    selected = implementations.load("keyfilter").KeyFilter
    assert issubclass(idempotency.SendRequests, selected)
    r = idempotency.SendRequests(filter_bits=1 << 10)
    r.begin(("u", "r"), object(), T0)
    assert r.maybe_stored(("u", "r")) and r.filter_bytes == (1 << 10) // 8
