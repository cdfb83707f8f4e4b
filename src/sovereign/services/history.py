"""History paging and retention (SPEC §5, §9, §12.4, §12.13)."""

from __future__ import annotations

import logging
from typing import Any, cast

from sovereign.clock import Clock
from sovereign.config import Config
from sovereign.errors import ErrorCode, SovereignError
from sovereign.protocol.types import MessageType as T
from sovereign.services.ids import ulid_floor
from sovereign.services.ports import NullPeers, Outbox, Peers
from sovereign.services.session import Session
from sovereign.services.state import ConversationState
from sovereign.storage import messaging as sql
from sovereign.storage.database import Database
from sovereign.v1 import sovereign_pb2 as pb

log = logging.getLogger("sovereign.history")

HISTORY_DEFAULT, HISTORY_MAX = 50, 200


class HistoryService:
    def __init__(
        self,
        config: Config,
        db: Database,
        state: ConversationState,
        outbox: Outbox,
        clock: Clock,
        peers: Peers | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.state = state
        self.outbox = outbox
        self.clock = clock
        self.peers: Peers = peers if peers is not None else NullPeers()

    async def history(self, s: Session, rid: str, req: pb.HistoryRequest) -> None:
        conv = self.state.convs.get(req.conversation_id)
        if conv is None:
            raise SovereignError(ErrorCode.GROUP_NOT_FOUND, "unknown conversation")
        m = conv.members.get(s.user_id)
        if m is None:
            raise SovereignError(ErrorCode.NOT_GROUP_MEMBER, "not a member of this conversation")
        limit = min(req.limit or HISTORY_DEFAULT, HISTORY_MAX)
        first, last = m.joined_seq, conv.committed_seq  # visible range (§12.13)
        conv_id, cursor = conv.conversation_id, req.cursor_seq
        if req.direction == pb.HISTORY_FORWARD:
            after = max(cursor, first - 1)
            rows = await self.db.read(
                lambda c: sql.events_after_txn(c, conv_id, after, last, limit)
            )
            next_cursor = rows[-1][0] if rows else cursor
            has_more = len(rows) == limit and next_cursor < last
        else:
            before = last + 1 if cursor == 0 else min(cursor, last + 1)
            rows = await self.db.read(
                lambda c: sql.events_before_txn(c, conv_id, before, first, limit)
            )
            next_cursor = rows[0][0] if rows else cursor
            has_more = len(rows) == limit and next_cursor > first
        events = [
            pb.Envelope(type=cast(Any, type_), request_id="", payload=payload)
            for _seq, _eid, type_, _s, _ts, payload in rows
        ]
        self.outbox.send(
            s,
            T.MESSAGE_HISTORY_RESPONSE,
            rid,
            pb.HistoryResponse(events=events, next_cursor_seq=next_cursor, has_more=has_more),
        )

    async def retention_pass(self) -> dict[str, int]:
        """Apply ``retention_days`` now (0 keeps everything)."""
        days = self.config.retention_days
        if days <= 0:
            return {}
        return await self.run_retention(self.clock.now_ms() - days * 86_400_000)

    async def run_retention(self, cutoff_ms: int) -> dict[str, int]:
        """Delete events older than ``cutoff_ms``; devices that had not acked them see the
        conversation in SYNC_COMPLETE.truncated_conversation_ids."""
        floor = ulid_floor(cutoff_ms)
        purged = await self.db.write(lambda c: sql.purge_events_txn(c, floor))
        for conv_id, seq in purged.items():
            conv = self.state.convs.get(conv_id)
            if conv is not None and seq > conv.purged_seq:
                conv.purged_seq = seq
        if purged:
            # SPEC §12.27: the other nodes' SYNC_COMPLETE must report the same truncation.
            self.peers.purged(sorted(purged))
            log.info("retention removed events from %d conversations", len(purged))
        return purged
