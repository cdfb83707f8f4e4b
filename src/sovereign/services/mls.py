"""MLS Delivery Service and Authentication Service (SPEC §7, §12.5, §12.6, §12.15,
§12.17, §12.18, §12.22).

The server never decrypts. It checks KeyPackages (strict mode: RFC 9420 signatures,
lifetime, identity bound to the uploader), keeps per-device pools, routes Welcomes
durably, orders commits by epoch (exactly one commit wins an epoch: validation and the
epoch bump happen in one synchronous step on the event loop) and keeps the latest
GroupInfo so a member whose state forked can rejoin with an external commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from sovereign.clock import Clock
from sovereign.codec import encode_envelope
from sovereign.config import Config
from sovereign.errors import ErrorCode, SovereignError
from sovereign.mls.api import (
    parse_commit_message,
    parse_group_info_message,
    parse_key_package,
    parse_welcome_message,
)
from sovereign.mls.validate import (
    KeyPackageInvalid,
    has_last_resort_extension,
    validate_key_package,
)
from sovereign.mls.wire import MLSDecodeError
from sovereign.protocol.types import MessageType as T
from sovereign.services.delivery import DeliveryService
from sovereign.services.eventlog import Conv, EventLog, Op, new_ulid
from sovereign.services.ports import Outbox
from sovereign.services.session import Session, SyncState
from sovereign.services.state import ConversationState
from sovereign.stats import MlsStats
from sovereign.storage import cluster as csql
from sovereign.storage import keypackages as kpsql
from sovereign.storage import messaging as sql
from sovereign.storage.database import Conn, Database
from sovereign.v1 import sovereign_pb2 as pb

log = logging.getLogger("sovereign.mls")

CONTENT_TYPE_COMMIT = 3


class MlsService:
    def __init__(
        self,
        config: Config,
        db: Database,
        state: ConversationState,
        eventlog: EventLog,
        outbox: Outbox,
        clock: Clock,
        delivery: DeliveryService,
        stats: MlsStats | None = None,
    ) -> None:
        self.config = config
        #: 5004 refusals per conversation, for the admin MLS health view (SPEC §12.24).
        self.stats = stats if stats is not None else MlsStats()
        self.db = db
        self.state = state
        self.eventlog = eventlog
        self.outbox = outbox
        self.clock = clock
        self.delivery = delivery
        #: Called after a device's first KeyPackage upload ever: DEVICE_ADDED (§12.29).
        self.first_upload: list[Callable[[Session], None]] = []
        #: Counts this process's KeyPackage writes (uploads, fetches), each after its
        #: commit: a count read before the last of them may be stale (sync_read).
        self._kp_writes = 0

    # -- KeyPackages (SPEC §7, §12.6, §12.17, §12.22) --------------------------------
    def _check_package(self, s: Session, index: int, data: bytes) -> bool:
        """Validate one package; returns whether it carries the last_resort extension."""
        if not data:
            raise SovereignError(ErrorCode.INVALID_KEY_PACKAGE, f"package {index}: empty")
        if self.config.mls_validation == "opaque":
            try:  # best effort: honour the RFC last_resort extension if it parses
                return has_last_resort_extension(parse_key_package(data))
            except MLSDecodeError:
                return False
        try:
            kp = parse_key_package(data)
        except MLSDecodeError as exc:
            raise SovereignError(
                ErrorCode.INVALID_KEY_PACKAGE, f"package {index}: malformed: {exc}"
            ) from None
        try:
            validate_key_package(
                kp,
                allowed_identities={s.user_id.encode(), s.username.encode()},
                now=self.clock.now_s(),
            )
        except KeyPackageInvalid as exc:
            raise SovereignError(ErrorCode.INVALID_KEY_PACKAGE, f"package {index}: {exc}") from None
        return has_last_resort_extension(kp)

    async def upload(self, s: Session, rid: str, req: pb.MLSKeyPackageUpload) -> None:
        packages = ([req.key_package_data] if req.key_package_data else []) + list(req.key_packages)
        if req.last_resort and len(packages) != 1:
            raise SovereignError(
                ErrorCode.INVALID_KEY_PACKAGE, "a last_resort upload carries exactly one package"
            )
        if not packages:
            raise SovereignError(ErrorCode.INVALID_KEY_PACKAGE, "no package in the upload")
        ordinary: list[tuple[int, bytes]] = []
        last_resort: tuple[int, bytes] | None = None
        for index, data in enumerate(packages):
            flagged = self._check_package(s, index, data)
            if req.last_resort or flagged:
                if last_resort is not None:
                    raise SovereignError(
                        ErrorCode.INVALID_KEY_PACKAGE,
                        f"package {index}: a second last-resort package",
                    )
                last_resort = (index, bytes(data))
            else:
                ordinary.append((index, bytes(data)))
        try:
            uploaded = await self.db.write(
                partial(
                    kpsql.upload_txn,
                    device_id=s.device_id,
                    user_id=s.user_id,
                    ordinary=ordinary,
                    last_resort=last_resort,
                    max_per_device=self.config.max_key_packages,
                    now_us=self.clock.now_us(),
                )
            )
        except kpsql.PoolFull:
            raise SovereignError(
                ErrorCode.INVALID_KEY_PACKAGE,
                f"pool full: a device holds at most {self.config.max_key_packages}",
            ) from None
        except kpsql.DuplicatePackage as exc:
            raise SovereignError(
                ErrorCode.INVALID_KEY_PACKAGE, f"package {exc.index}: duplicate of a stored package"
            ) from None
        self._kp_writes += 1
        if rid:
            self.outbox.send(s, T.ACK, rid, pb.Ack(count=uploaded.stored))
        if uploaded.first:
            for hook in self.first_upload:
                hook(s)

    async def fetch(self, s: Session, rid: str, req: pb.MLSKeyPackageFetch) -> None:
        if await self.state.profile(req.user_id) is None:
            raise SovereignError(ErrorCode.USER_NOT_FOUND, "unknown user")
        fetched = await self.db.write(partial(kpsql.fetch_txn, user_id=req.user_id))
        self._kp_writes += 1
        if not fetched:
            raise SovereignError(
                ErrorCode.NO_KEY_PACKAGE_AVAILABLE, "no device of that user has a package"
            )
        self.outbox.send(
            s,
            T.MLS_KEY_PACKAGE_RESPONSE,
            rid,
            pb.MLSKeyPackageResponse(
                user_id=req.user_id,
                key_package_data=fetched[0].data,
                key_packages=[
                    pb.DeviceKeyPackage(device_id=f.device_id, key_package_data=f.data)
                    for f in fetched
                ],
            ),
        )
        minimum = self.config.min_key_packages
        for f in fetched:  # §12.6: live LOW when a fetch leaves fewer than the minimum
            if not f.last_resort and f.remaining < minimum:
                self._send_low(f.device_id, f.remaining)

    def _send_low(self, device_id: str, remaining: int) -> None:
        msg = pb.KeyPackageLow(remaining=remaining, minimum=self.config.min_key_packages)
        peers = self.delivery.peers
        if peers.clustered:  # the device may be connected to another node
            peers.push_device(
                device_id, encode_envelope(T.MLS_KEY_PACKAGE_LOW, "", msg.SerializeToString())
            )
        dev = self.state.devices.get(device_id)
        if dev is None:
            return
        for s in list(dev.sessions):
            self.outbox.send(s, T.MLS_KEY_PACKAGE_LOW, "", msg)

    def sync_read(self, sync: SyncState) -> Callable[[Conn, str], None]:
        """The device's KeyPackage count, read with the device's sync (one reader hop
        less per resume: ~20% more resumes per CPU-s, docs/performance.md); the read
        gets the device id."""
        writes = self._kp_writes

        def read(conn: Conn, device_id: str) -> None:
            sync.key_packages = (writes, kpsql.ordinary_count_txn(conn, device_id))

        return read

    def _count_read_with_device(self, sync: SyncState | None) -> int | None:
        """The count read with the device (:meth:`sync_read`, before the backlog), if it
        stands: only if no KeyPackage write of this process has completed since it was
        requested, and on a single node. A write that commits after that read but whose
        completion is not yet counted here sends its own live LOW (fetch) to this
        session, which is on the device by now; other nodes' writes are not counted,
        so a cluster node always reads again."""
        pre = sync.key_packages if sync is not None else None
        if pre is not None and pre[0] == self._kp_writes and not self.delivery.peers.clustered:
            return pre[1]
        return None

    def _low(self, remaining: int) -> pb.KeyPackageLow | None:
        if remaining < self.config.min_key_packages:
            return pb.KeyPackageLow(remaining=remaining, minimum=self.config.min_key_packages)
        return None

    def sync_tail(self, s: Session) -> bytes:
        """On READY, after presence, in the sync's own write (one socket write less per
        resume of a device low on KeyPackages): LOW if the count read with the device
        stands and is below the minimum. b"" otherwise; :meth:`on_sync_end` then reads
        the count, after that write."""
        sync = s.sync
        remaining = self._count_read_with_device(sync)
        if sync is None or remaining is None:
            return b""
        sync.low_checked = self._kp_writes
        low = self._low(remaining)
        if low is None:
            return b""
        return self.outbox.response_frame(T.MLS_KEY_PACKAGE_LOW, "", low)

    async def on_sync_end(self, s: Session) -> None:
        """On READY, after presence: LOW if the device's pool is below the minimum,
        unless :meth:`sync_tail` decided it and no KeyPackage write has completed since
        (one may, while the sync's write waits for the socket: then the count is read
        again, as it always was before)."""
        sync = s.sync
        if sync is not None and sync.low_checked == self._kp_writes:
            return
        remaining = self._count_read_with_device(sync)
        if remaining is None:
            remaining = await self.db.read(partial(kpsql.ordinary_count_txn, device_id=s.device_id))
        low = self._low(remaining)
        if low is not None:
            self.outbox.send(s, T.MLS_KEY_PACKAGE_LOW, "", low)

    # -- Welcomes (SPEC §7, §12.6, §12.15) ---------------------------------------------
    def _check_welcome(self, conv: Conv, w: pb.MLSWelcome) -> None:
        if w.conversation_id != conv.conversation_id:
            raise SovereignError(ErrorCode.INVALID_WELCOME, "welcome names another conversation")
        try:
            parse_welcome_message(w.welcome_data)
        except MLSDecodeError as exc:
            raise SovereignError(ErrorCode.INVALID_WELCOME, f"not an MLS Welcome: {exc}") from None
        if w.recipient_id not in conv.members:
            raise SovereignError(ErrorCode.NOT_MEMBER, "the recipient is not a member")

    def _add_welcome(
        self, op: Op, conv: Conv, sender_id: str, w: pb.MLSWelcome
    ) -> tuple[str, str, bytes, bytes]:
        """Store one welcome (one event per recipient user, §12.15) in ``op``; returns
        (recipient, event_id, frame, payload) for the push after the commit."""
        now = self.clock.now_us()
        event_id = new_ulid(now // 1000)
        payload = pb.MLSWelcomeReceive(
            conversation_id=conv.conversation_id,
            sender_id=sender_id,
            welcome_data=w.welcome_data,
            event_id=event_id,
            server_timestamp=now,
        ).SerializeToString()
        recipient, conv_id = w.recipient_id, conv.conversation_id
        op.txns.append(
            lambda c: sql.insert_welcome_txn(
                c, event_id, recipient, conv_id, sender_id, now, payload
            )
        )
        frame = self.outbox.frame(encode_envelope(T.MLS_WELCOME_RECEIVE, "", payload))
        return recipient, event_id, frame, payload

    def welcome(self, s: Session, rid: str, req: pb.MLSWelcome) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        self._check_welcome(conv, req)
        op = Op()
        recipient, event_id, frame, payload = self._add_welcome(op, conv, s.user_id, req)

        def finish() -> None:
            self.delivery.push_welcome(recipient, frame, event_id, payload)
            if rid:
                self.outbox.send(s, T.ACK, rid, pb.Ack(count=1))

        self.delivery.submit(s, rid, op, finish, "could not store the welcome")

    # -- Commits and GroupInfo (SPEC §7, §12.5, §12.18, §12.22) --------------------------
    def commit(self, s: Session, rid: str, req: pb.MLSCommit) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        try:
            info = parse_commit_message(req.commit_data)
        except MLSDecodeError as exc:
            raise SovereignError(
                ErrorCode.INVALID_COMMIT, f"not an MLS handshake message: {exc}"
            ) from None
        if info.content_type != CONTENT_TYPE_COMMIT:
            raise SovereignError(
                ErrorCode.INVALID_COMMIT, f"content_type {info.content_type} is not commit"
            )
        if conv.group_id is not None and info.group_id != conv.group_id:
            raise SovereignError(
                ErrorCode.INVALID_COMMIT, "group_id differs from the conversation's"
            )
        if info.epoch != conv.epoch:
            self.stats.refused(conv.conversation_id, self.clock.now_s())
            raise SovereignError(
                ErrorCode.EPOCH_MISMATCH,
                f"commit for epoch {info.epoch}, the conversation is at {conv.epoch}",
            )
        new_epoch = conv.epoch + 1
        group_info = bytes(req.group_info) if req.group_info else None
        if group_info is not None:
            try:
                gi = parse_group_info_message(group_info)
            except MLSDecodeError as exc:
                raise SovereignError(
                    ErrorCode.INVALID_COMMIT, f"group_info is not a GroupInfo: {exc}"
                ) from None
            if gi.group_id != info.group_id or gi.epoch != new_epoch:
                raise SovereignError(
                    ErrorCode.INVALID_COMMIT,
                    "group_info must name the group and the epoch after the commit",
                )
        for w in req.welcomes:
            self._check_welcome(conv, w)
        # Every part is valid: apply atomically (one Op, one transaction).
        op = Op()
        prev = (conv.group_id, conv.epoch, conv.group_info, conv.group_info_epoch)
        ev = op.allocate(conv, T.MLS_COMMIT_BROADCAST, s.user_id, self.clock.now_us())
        ev.recipients = conv.recipients
        ev.payload = pb.MLSCommitBroadcast(
            conversation_id=conv.conversation_id,
            sender_id=s.user_id,
            commit_data=req.commit_data,
            event_id=ev.event_id,
            seq=ev.seq,
            server_timestamp=ev.ts_us,
            epoch=conv.epoch,
        ).SerializeToString()
        conv.group_id = info.group_id
        conv.epoch = new_epoch
        # §12.18: a commit without group_info clears the stored one (never serve stale).
        conv.group_info = group_info
        conv.group_info_epoch = new_epoch if group_info is not None else None

        def undo() -> None:
            conv.group_id, conv.epoch, conv.group_info, conv.group_info_epoch = prev

        op.on_undo(undo)
        conv_id, gid, gi_epoch = conv.conversation_id, info.group_id, conv.group_info_epoch
        if self.eventlog.clustered:
            # One winner per epoch across nodes (SPEC §12.27): the database moves the
            # epoch only if it is still the one this commit was made in.
            old_epoch = new_epoch - 1

            def guard(c: Conn) -> object:
                if csql.advance_epoch_txn(c, conv_id, old_epoch, gid, group_info, gi_epoch):
                    return None
                return ErrorCode.EPOCH_MISMATCH

            def conflict(_verdict: object) -> None:
                self.stats.refused(conv_id, self.clock.now_s())
                self.outbox.send_error(
                    s,
                    ErrorCode.EPOCH_MISMATCH,
                    rid,
                    f"commit for epoch {old_epoch}, another commit won that epoch",
                )

            op.guard, op.conflict = guard, conflict
        else:
            op.txns.append(
                lambda c: sql.update_mls_txn(c, conv_id, gid, new_epoch, group_info, gi_epoch)
            )
        welcomes = [self._add_welcome(op, conv, s.user_id, w) for w in req.welcomes]

        def finish() -> None:
            self.state.index(ev)
            self.outbox.send_payload(s, T.MLS_COMMIT_BROADCAST, rid, ev.payload)  # echo, §12.1
            self.delivery.publish(ev, s)
            for recipient, event_id, frame, payload in welcomes:
                self.delivery.push_welcome(recipient, frame, event_id, payload)

        self.delivery.submit(s, rid, op, finish, "could not store the commit")

    def group_info(self, s: Session, rid: str, req: pb.GroupInfoFetch) -> None:
        conv = self.state.conv_for_member(req.conversation_id, s.user_id)
        if conv.group_info is None or conv.group_info_epoch is None:
            raise SovereignError(
                ErrorCode.NO_GROUP_INFO, "no GroupInfo stored for this conversation"
            )
        self.outbox.send(
            s,
            T.MLS_GROUP_INFO,
            rid,
            pb.GroupInfo(
                conversation_id=conv.conversation_id,
                epoch=conv.group_info_epoch,
                group_info=conv.group_info,
            ),
        )
