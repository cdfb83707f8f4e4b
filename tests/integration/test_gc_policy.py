"""The server collects its young generation on a timer (``server.collection_due``).

With the serving thresholds (50,000 net allocations) and a steady or idle load, CPython
alone would not collect at all: the young generation would grow until some burst made
one long pause of it, and cyclic garbage would wait there. A real in-process server
(the collector policy of ``sovereign serve``, ``tests.helpers.server.serving_gc``).
"""

from __future__ import annotations

import asyncio
import gc
import weakref

from sovereign.server import MIDDLE_GC_EVERY, YOUNG_GC_INTERVAL, collection_due
from tests.helpers.server import RunningServer


def test_every_tenth_timed_collection_takes_the_middle_generation() -> None:
    due = [collection_due(t) for t in range(3 * MIDDLE_GC_EVERY)]
    assert due.count(1) == 3 and set(due) == {0, 1}
    assert [t for t, g in enumerate(due) if g == 1] == [
        MIDDLE_GC_EVERY - 1,
        2 * MIDDLE_GC_EVERY - 1,
        3 * MIDDLE_GC_EVERY - 1,
    ]


class _Node:
    def __init__(self) -> None:
        self.peer: _Node | None = None


async def test_the_running_server_collects_cyclic_garbage_without_cpythons_trigger(
    server: RunningServer,
) -> None:
    threshold = gc.get_threshold()[0]
    assert threshold >= 50_000  # the serving policy: CPython would wait for 50,000
    a, b = _Node(), _Node()
    a.peer, b.peer = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    start = gc.get_count()[0]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * YOUNG_GC_INTERVAL + 2
    while gone() is not None:
        assert loop.time() < deadline, "the cycle was never collected"
        await asyncio.sleep(0.05)
    # Not CPython's own trigger: nowhere near its threshold was allocated meanwhile.
    assert gc.get_count()[0] < threshold and start < threshold
