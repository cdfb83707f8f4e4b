"""What the server keeps per message must not burden the cyclic collector.

Every message leaves records in long-lived caches: the conversation's recent events and
the recent-event index (acks and MESSAGE_DELIVERED without a disk read), and the
idempotency key of its send. A GC-tracked record stays in the young generation until a
collection runs; at a steady rate a full cache frees one record per message it takes,
CPython's allocation count stays flat, no collection runs and the young generation
fills with every record kept, up to the caches' contents (~133,000 objects measured),
so the next collection walks all of it (measured: 8-54 ms).

The event records are ``EventInfo`` (never tracked, one shared by both caches); the
idempotency keys are tuples of strings, which the collector untracks on its first pass.
An ``EventInfo`` holding the ``MessageType`` member instead of an int, or a tuple
holding one, would be tracked for life. Real services, real SQLite.
"""

from __future__ import annotations

import gc

from sovereign.services.eventlog import EventInfo
from tests.helpers.services import Harness, World


async def test_per_message_records_are_not_tracked(h: Harness, world: World) -> None:
    w = world
    ids = []
    for _ in range(20):  # each with its own request_id: an idempotency key
        ids.append((await h.send(w.a1, w.conv)).message_id)
    await h.ack(w.b1, *ids)

    conv = h.state.convs[w.conv]
    recent = {r.event_id: r for r in conv.recent}
    for event_id in ids:
        info = h.state.event_index[event_id]
        assert type(info) is EventInfo and not gc.is_tracked(info)
        assert recent[event_id] is info  # one record, not one per cache
        assert type(info.type) is int and type(info.seq) is int  # not the IntEnum member

    gc.collect()  # the collector's own pass untracks tuples of atomic values
    keys = list(h.delivery.requests.recent)  # (user_id, request_id)
    assert len(keys) >= 20
    for key in keys:
        assert not gc.is_tracked(key), key


async def test_acks_of_events_loaded_from_storage_index_them_untracked(
    h: Harness, world: World
) -> None:
    """An ack naming an event the index let go reads it back (one storage read) and
    indexes it again: as an ``EventInfo`` too."""
    w = world
    sent = await h.send(w.a1, w.conv)
    h.state.event_index.clear()
    await h.ack(w.b1, sent.message_id)
    info = h.state.event_index[sent.message_id]
    assert type(info) is EventInfo and not gc.is_tracked(info)
    assert (info.conv_id, info.seq, info.event_id) == (w.conv, sent.seq, sent.message_id)
    assert type(info.type) is int
