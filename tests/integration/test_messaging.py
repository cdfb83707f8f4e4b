"""Durable messaging over real sockets: fan-out, multi-device delivery, offline sync,
acks, MESSAGE_DELIVERED, idempotency, history (SPEC §4 READY, §5, §12.1-§12.4, §12.12-14)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.flows import Account, login, register, resume
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]


@dataclass
class World:
    srv: RunningServer
    accounts: dict[str, Account]
    clients: dict[str, WsClient]


async def make_users(srv: RunningServer, *names: str) -> World:
    accounts, clients = {}, {}
    for name in names:
        c = await WsClient.connect(srv.url)
        accounts[name] = await register(c, name)
        clients[name] = c
    return World(srv, accounts, clients)


async def device(srv: RunningServer, acct: Account, *, sync: bool = True) -> WsClient:
    """Another connection of the same device (resume with its token)."""
    c = await WsClient.connect(srv.url)
    await resume(c, acct.token, sync=sync)
    return c


async def new_device(srv: RunningServer, acct: Account) -> tuple[WsClient, pb.AuthSuccess]:
    """A second device: a fresh passkey login is a new session (SPEC §4)."""
    c = await WsClient.connect(srv.url)
    ok = await login(c, acct)
    return c, ok


async def create_group(c: WsClient, title: str, *member_ids: str) -> pb.GroupCreated:
    created: pb.GroupCreated = await c.request(
        T.GROUP_CREATE, pb.GroupCreate(title=title, member_ids=list(member_ids)), T.GROUP_CREATED
    )
    return created


async def send(c: WsClient, conv: str, body: bytes, rid: str | None = None) -> pb.MessageReceive:
    rid = c.send(
        T.MESSAGE_SEND,
        pb.MessageSend(conversation_id=conv, encrypted_payload=body, message_type="text"),
        request_id=rid,
    )
    got = await c.response(rid)
    assert got.type == T.MESSAGE_RECEIVE, got
    return got.message


async def pushes(c: WsClient, n: int, msg_type: int) -> list[object]:
    """The next ``n`` pushes of ``msg_type``; other pushes (presence...) stay queued."""
    return [await c.wait_for(msg_type, "") for _ in range(n)]


async def drain(*clients: WsClient, within: float = 0.15) -> None:
    """Drop whatever has been pushed so far (membership events, presence)."""
    for c in clients:
        c.backlog.clear()
        while True:
            try:
                await c.recv(within)
            except TimeoutError:
                break


async def ack(c: WsClient, *ids: str) -> int:
    a = await c.request(T.MESSAGE_ACK, pb.MessageAck(message_id=ids[0], message_ids=ids[1:]), T.ACK)
    return int(a.count)


# -- fan-out and echo --------------------------------------------------------------------


async def test_group_create_membership_events_in_order(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "carol")
    a, b, c = (w.clients[n] for n in ("alice", "bob", "carol"))
    ids = {n: w.accounts[n].user_id for n in w.accounts}
    created = await create_group(a, "trio", ids["carol"], ids["bob"], ids["carol"])
    assert [(m.user_id, m.role, m.username) for m in created.members] == [
        (ids["alice"], "admin", "alice"),
        (ids["carol"], "member", "carol"),
        (ids["bob"], "member", "bob"),
    ]
    expected = [
        (ids["alice"], 1, ids["alice"]),
        (ids["carol"], 2, ids["alice"]),
        (ids["bob"], 3, ids["alice"]),
    ]
    # Requester included (§12.2); creator first, then member_ids order. Each member sees
    # from its own GROUP_MEMBER_ADDED on, as its cursor starts there (§5, §12.13).
    for client, first in ((a, 0), (c, 1), (b, 2)):
        added = await pushes(client, 3 - first, T.GROUP_MEMBER_ADDED)
        assert [(e.user_id, e.seq, e.added_by) for e in added] == expected[first:]  # type: ignore[attr-defined]
        ts = [e.server_timestamp for e in added]  # type: ignore[attr-defined]
        assert ts == sorted(ts) and len(set(ts)) == len(ts)
        await client.nothing(0.1, ignore=(T.PRESENCE_NOTIFY,))


async def test_send_echo_and_fanout_to_every_device(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a1, b = w.clients["alice"], w.clients["bob"]
    a2 = await device(server, w.accounts["alice"])  # same device, second connection
    a3, _ = await new_device(server, w.accounts["alice"])  # a second device
    conv = (await create_group(a1, "pair", w.accounts["bob"].user_id)).conversation_id
    for c in (a1, a2, a3):
        await pushes(c, 2, T.GROUP_MEMBER_ADDED)
    await pushes(b, 1, T.GROUP_MEMBER_ADDED)
    echo = await send(a1, conv, b"ciphertext-1")
    assert (echo.seq, echo.sender_id, echo.encrypted_payload, echo.message_type) == (
        3,
        w.accounts["alice"].user_id,
        b"ciphertext-1",
        "text",
    )
    for c in (a2, a3, b):
        (got,) = await pushes(c, 1, T.MESSAGE_RECEIVE)
        assert got == echo
    await a1.nothing(0.2, ignore=(T.PRESENCE_NOTIFY,))  # no second copy for the sender (§12.1)


async def test_unknown_conversation_and_non_member(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "eve")
    conv = (await create_group(w.clients["alice"], "x", w.accounts["bob"].user_id)).conversation_id
    e = w.clients["eve"]
    code, _ = await e.error(T.MESSAGE_SEND, pb.MessageSend(conversation_id=conv))
    assert code == 2002
    code, _ = await e.error(T.MESSAGE_SEND, pb.MessageSend(conversation_id="nope"))
    assert code == 4001


async def test_payload_over_max_message_size_is_3003(server_with: ServerWith) -> None:
    async with server_with(max_message_size_bytes=100) as srv:
        w = await make_users(srv, "alice")
        conv = (await create_group(w.clients["alice"], "solo")).conversation_id
        code, _ = await w.clients["alice"].error(
            T.MESSAGE_SEND, pb.MessageSend(conversation_id=conv, encrypted_payload=b"x" * 101)
        )
        assert code == 3003


# -- offline delivery, cursors, acks -------------------------------------------------------


async def test_offline_then_online_gets_everything_in_order_then_sync_complete(
    server: RunningServer,
) -> None:
    w = await make_users(server, "alice", "bob")
    a = w.clients["alice"]
    conv = (await create_group(a, "pair", w.accounts["bob"].user_id)).conversation_id
    await w.clients["bob"].close()
    sent = [await send(a, conv, f"m{i}".encode()) for i in range(5)]
    b = await WsClient.connect(server.url)
    await resume(b, w.accounts["bob"].token, sync=False)
    backlog, done = await b.until_sync()
    assert [e.type for e in backlog] == [T.GROUP_MEMBER_ADDED] + [T.MESSAGE_RECEIVE] * 5
    assert [e.message.seq for e in backlog] == [2, 3, 4, 5, 6, 7]  # from its own ADDED on
    assert [e.message for e in backlog[1:]] == sent
    assert done.delivered == 6 and list(done.truncated_conversation_ids) == []


async def test_unacked_events_are_redelivered_and_acks_are_cumulative(
    server: RunningServer,
) -> None:
    w = await make_users(server, "alice", "bob")
    a = w.clients["alice"]
    conv = (await create_group(a, "pair", w.accounts["bob"].user_id)).conversation_id
    await w.clients["bob"].close()
    sent = [await send(a, conv, f"m{i}".encode()) for i in range(4)]  # seq 3..6
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, _ = await b.until_sync()
    assert len(backlog) == 5
    assert await ack(b, sent[1].message_id) == 1  # cumulative: acks seq 2..4
    await b.close()
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, done = await b.until_sync()
    assert [e.message.seq for e in backlog] == [5, 6] and done.delivered == 2
    # Acking an older id again moves nothing; unknown ids are ignored (§12.14).
    assert await ack(b, sent[0].message_id, "01UNKNOWNUNKNOWNUNKNOWN000") == 0
    assert await ack(b, sent[3].message_id) == 1
    await b.close()
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, done = await b.until_sync()
    assert backlog == [] and done.delivered == 0


async def test_cursor_is_per_device(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b1 = w.clients["alice"], w.clients["bob"]
    conv = (await create_group(a, "pair", w.accounts["bob"].user_id)).conversation_id
    # A device created after bob joined starts at the last seq (2), not at 1 (§12.12).
    b2, ok2 = await new_device(server, w.accounts["bob"])
    m = await send(a, conv, b"hello")  # seq 3
    for c in (b1, b2):
        assert (await c.wait_for(T.MESSAGE_RECEIVE)) == m
    assert await ack(b1, m.message_id) == 1
    await b1.close()
    await b2.close()
    b1 = await device(server, w.accounts["bob"], sync=False)
    backlog, done = await b1.until_sync()
    assert backlog == [] and done.delivered == 0  # device 1 acked
    b2 = await WsClient.connect(server.url)
    await resume(b2, ok2.session_token, sync=False)
    backlog, done = await b2.until_sync()
    assert [e.message for e in backlog] == [m] and done.delivered == 1  # device 2 did not


async def test_message_delivered_once_per_recipient_user(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b1 = w.clients["alice"], w.clients["bob"]
    a2 = await device(server, w.accounts["alice"])
    conv = (await create_group(a, "pair", w.accounts["bob"].user_id)).conversation_id
    b2, _ = await new_device(server, w.accounts["bob"])
    for c in (a, a2):
        await pushes(c, 2, T.GROUP_MEMBER_ADDED)
    await pushes(b1, 1, T.GROUP_MEMBER_ADDED)
    m1 = await send(a, conv, b"1")
    m2 = await send(a, conv, b"2")
    for c in (a2, b1, b2):
        await pushes(c, 2, T.MESSAGE_RECEIVE)
    assert await ack(b1, m2.message_id) == 1
    for c in (a, a2):  # every connection of the sender
        d = await c.wait_for(T.MESSAGE_DELIVERED)
        assert (d.message_id, d.delivered_to, d.conversation_id, d.up_to_seq) == (
            m2.message_id,
            w.accounts["bob"].user_id,
            conv,
            4,
        )
    await drain(a, a2)
    assert await ack(b2, m1.message_id, m2.message_id) == 2  # its own cursor moves ...
    await a.nothing(0.3)  # ... but bob's delivered position does not: no second DELIVERED
    assert await ack(a2, m2.message_id) == 1  # the sender's own devices send none
    await a.nothing(0.3)


async def test_idempotent_send_returns_original_and_stores_nothing(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b = w.clients["alice"], w.clients["bob"]
    conv = (await create_group(a, "pair", w.accounts["bob"].user_id)).conversation_id
    await pushes(b, 1, T.GROUP_MEMBER_ADDED)
    first = await send(a, conv, b"once", rid="retry-1")
    again = await send(a, conv, b"twice?", rid="retry-1")
    assert again == first
    (got,) = await pushes(b, 1, T.MESSAGE_RECEIVE)
    assert got == first
    await b.nothing(0.2, ignore=(T.PRESENCE_NOTIFY,))
    assert server.app.services.state.convs[conv].last_seq == 3
    # Two copies in flight at once: still one event.
    rid = "retry-2"
    await drain(a)
    body = pb.MessageSend(conversation_id=conv, encrypted_payload=b"x")
    a.send(T.MESSAGE_SEND, body, request_id=rid)
    a.send(T.MESSAGE_SEND, body, request_id=rid)
    r1, r2 = await a.recv(), await a.recv()
    assert r1.message == r2.message and r1.request_id == r2.request_id == rid
    assert server.app.services.state.convs[conv].last_seq == 4


async def test_idempotency_survives_restart(server_with: ServerWith, tmp_path: object) -> None:
    async with server_with() as srv:
        w = await make_users(srv, "alice")
        conv = (await create_group(w.clients["alice"], "solo")).conversation_id
        first = await send(w.clients["alice"], conv, b"x", rid="r-restart")
        data_dir = srv.config.data_dir
    from tests.helpers.server import running_server

    async with running_server(__import__("pathlib").Path(data_dir)) as srv2:
        c = await device(srv2, w.accounts["alice"])
        assert await send(c, conv, b"x", rid="r-restart") == first
        nxt = await send(c, conv, b"y")
        assert nxt.seq == first.seq + 1  # dense across restarts, no reuse
        second = await send(c, conv, b"z", rid="r-second")  # a new generation of keys
        await c.close()
    # Once more. On SQLite fewer keys than a generation were used, so none was folded
    # into send_requests (migration 0009): each start reads them back from their event
    # rows. PostgreSQL stores each key as a row, and each retry is one storage read.
    async with running_server(__import__("pathlib").Path(data_dir)) as srv3:
        requests = srv3.app.services.delivery.requests
        db = srv3.app.storage.db
        alice = w.accounts["alice"].user_id
        folds = db.engine_name == "sqlite"
        in_memory = {(alice, "r-restart"), (alice, "r-second")} & set(requests.unfolded)
        assert len(in_memory) == (2 if folds else 0)
        c = await device(srv3, w.accounts["alice"])
        assert await send(c, conv, b"z", rid="r-second") == second
        assert await send(c, conv, b"x", rid="r-restart") == first
        assert (await send(c, conv, b"w")).seq == second.seq + 1
        assert requests.storage_checks == (0 if folds else 2)
        await c.close()
        stored = await db.read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM send_requests"
                " WHERE request_id = 'r-restart' OR request_id = 'r-second'"
            ).fetchone()[0]
        )
        assert stored == (0 if folds else 2)


async def test_sends_without_request_id_are_still_echoed(server: RunningServer) -> None:
    w = await make_users(server, "alice")
    conv = (await create_group(w.clients["alice"], "solo")).conversation_id
    await drain(w.clients["alice"])
    echo = await send(w.clients["alice"], conv, b"x", rid="")
    assert echo.seq == 2


# -- groups (SPEC §6) ---------------------------------------------------------------------


async def test_group_errors(server_with: ServerWith) -> None:
    async with server_with(max_group_members=3) as srv:
        w = await make_users(srv, "alice", "bob", "carol", "dave")
        a, b = w.clients["alice"], w.clients["bob"]
        ids = {n: w.accounts[n].user_id for n in w.accounts}
        code, _ = await a.error(T.GROUP_CREATE, pb.GroupCreate(title="x", member_ids=["nobody"]))
        assert code == 4006
        code, _ = await a.error(
            T.GROUP_CREATE,
            pb.GroupCreate(title="x", member_ids=[ids["bob"], ids["carol"], ids["dave"]]),
        )
        assert code == 4005
        conv = (await create_group(a, "g", ids["bob"])).conversation_id
        code, _ = await b.error(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["carol"])
        )
        assert code == 2001
        code, _ = await a.error(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["bob"])
        )
        assert code == 4002
        code, _ = await a.error(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id="nobody")
        )
        assert code == 4006
        code, _ = await a.error(
            T.GROUP_REMOVE, pb.GroupRemove(conversation_id=conv, user_id=ids["carol"])
        )
        assert code == 4003
        code, _ = await a.error(
            T.GROUP_REMOVE, pb.GroupRemove(conversation_id=conv, user_id=ids["alice"])
        )
        assert code == 4004
        code, _ = await b.error(
            T.GROUP_REMOVE, pb.GroupRemove(conversation_id=conv, user_id=ids["alice"])
        )
        assert code == 2001
        code, _ = await w.clients["carol"].error(T.GROUP_LEAVE, pb.GroupLeave(conversation_id=conv))
        assert code == 2002
        code, _ = await a.error(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id="nope", user_id=ids["bob"])
        )
        assert code == 4001
        await a.request(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["carol"]), T.ACK
        )
        code, _ = await a.error(
            T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["dave"])
        )
        assert code == 4005


async def test_invite_remove_and_visibility(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "carol")
    a, b, c = (w.clients[n] for n in ("alice", "bob", "carol"))
    ids = {n: w.accounts[n].user_id for n in w.accounts}
    conv = (await create_group(a, "g", ids["bob"])).conversation_id
    await drain(a, b, c)
    await send(a, conv, b"before carol")  # seq 3
    await a.request(
        T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["carol"]), T.ACK
    )  # seq 4
    (added,) = await pushes(c, 1, T.GROUP_MEMBER_ADDED)
    assert (added.seq, added.user_id, added.added_by) == (4, ids["carol"], ids["alice"])
    # carol pages history only from her own GROUP_MEMBER_ADDED (§12.13)
    h = await c.request(
        T.MESSAGE_HISTORY_REQUEST,
        pb.HistoryRequest(conversation_id=conv),
        T.MESSAGE_HISTORY_RESPONSE,
    )
    assert [e.type for e in h.events] == [T.GROUP_MEMBER_ADDED]
    await a.request(
        T.GROUP_REMOVE, pb.GroupRemove(conversation_id=conv, user_id=ids["bob"]), T.ACK
    )  # seq 5
    got = await b.wait_for(T.GROUP_MEMBER_REMOVED)
    assert (got.user_id, got.removed_by, got.seq) == (ids["bob"], ids["alice"], 5)
    await drain(b)
    await send(a, conv, b"after bob")  # seq 6: bob gets nothing more
    await c.wait_for(T.MESSAGE_RECEIVE)
    await b.nothing(0.3)
    code, _ = await b.error(T.MESSAGE_HISTORY_REQUEST, pb.HistoryRequest(conversation_id=conv))
    assert code == 2002
    code, _ = await b.error(T.MESSAGE_SEND, pb.MessageSend(conversation_id=conv))
    assert code == 2002


async def test_removed_member_sync_stops_at_its_removal(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a = w.clients["alice"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    await w.clients["bob"].close()
    await send(a, conv, b"m")  # 3
    await a.request(
        T.GROUP_REMOVE,
        pb.GroupRemove(conversation_id=conv, user_id=w.accounts["bob"].user_id),
        T.ACK,
    )  # 4
    await send(a, conv, b"after")  # 5
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, _ = await b.until_sync()
    assert [e.message.seq for e in backlog] == [2, 3, 4]
    assert backlog[-1].type == T.GROUP_MEMBER_REMOVED
    assert await ack(b, backlog[-1].message.event_id) == 1  # may ack up to its removal
    await b.close()
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, _ = await b.until_sync()
    assert backlog == []


async def test_last_admin_leaving_promotes_longest_standing(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "carol")
    a = w.clients["alice"]
    ids = {n: w.accounts[n].user_id for n in w.accounts}
    conv = (await create_group(a, "g", ids["carol"], ids["bob"])).conversation_id
    await a.request(T.GROUP_LEAVE, pb.GroupLeave(conversation_id=conv), T.ACK)
    lst = await w.clients["carol"].request(
        T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest(), T.CONVERSATION_LIST
    )
    (c,) = lst.conversations
    assert {m.user_id: m.role for m in c.members} == {ids["carol"]: "admin", ids["bob"]: "member"}
    assert c.last_seq == 4 and c.title == "g" and c.mls_epoch == 0
    # the new admin can invite
    await w.clients["carol"].request(
        T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["alice"]), T.ACK
    )


# -- history (SPEC §5, §12.4) -------------------------------------------------------------


async def test_history_paging_both_directions(server: RunningServer) -> None:
    w = await make_users(server, "alice")
    a = w.clients["alice"]
    conv = (await create_group(a, "solo")).conversation_id  # seq 1
    for i in range(9):
        await send(a, conv, f"{i}".encode())  # seq 2..10

    async def page(cursor: int, limit: int, forward: bool) -> pb.HistoryResponse:
        r: pb.HistoryResponse = await a.request(
            T.MESSAGE_HISTORY_REQUEST,
            pb.HistoryRequest(
                conversation_id=conv,
                cursor_seq=cursor,
                limit=limit,
                direction=pb.HISTORY_FORWARD if forward else pb.HISTORY_BACKWARD,
            ),
            T.MESSAGE_HISTORY_RESPONSE,
        )
        return r

    def seqs(r: pb.HistoryResponse) -> list[int]:
        out = []
        for e in r.events:
            cls = pb.MessageReceive if e.type == T.MESSAGE_RECEIVE else pb.GroupMemberAdded
            out.append(cls.FromString(e.payload).seq)
        return out

    r = await page(0, 4, False)
    assert (seqs(r), r.next_cursor_seq, r.has_more) == ([7, 8, 9, 10], 7, True)
    r = await page(7, 4, False)
    assert (seqs(r), r.next_cursor_seq, r.has_more) == ([3, 4, 5, 6], 3, True)
    r = await page(3, 4, False)
    assert (seqs(r), r.has_more) == ([1, 2], False)
    r = await page(0, 4, True)
    assert (seqs(r), r.next_cursor_seq, r.has_more) == ([1, 2, 3, 4], 4, True)
    r = await page(8, 4, True)
    assert (seqs(r), r.has_more) == ([9, 10], False)
    r = await page(0, 0, True)  # limit 0 means 50
    assert seqs(r) == list(range(1, 11)) and not r.has_more
    assert r.events[0].type == T.GROUP_MEMBER_ADDED and r.events[0].request_id == ""


async def test_history_limit_is_capped_at_200(server: RunningServer) -> None:
    w = await make_users(server, "alice")
    a = w.clients["alice"]
    conv = (await create_group(a, "solo")).conversation_id
    await drain(a)
    for i in range(205):
        a.send(
            T.MESSAGE_SEND,
            pb.MessageSend(conversation_id=conv, encrypted_payload=b"x"),
            request_id=f"r{i}",
        )
    for _ in range(205):
        await a.recv()
    r = await a.request(
        T.MESSAGE_HISTORY_REQUEST,
        pb.HistoryRequest(conversation_id=conv, limit=1000, direction=pb.HISTORY_FORWARD),
        T.MESSAGE_HISTORY_RESPONSE,
    )
    assert len(r.events) == 200 and r.has_more


# -- receipts, typing, presence ------------------------------------------------------------


async def test_read_receipts(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b = w.clients["alice"], w.clients["bob"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    m = await send(a, conv, b"x")
    assert (
        await b.request(T.MESSAGE_READ, pb.ReadMarker(conversation_id=conv, up_to_seq=m.seq), T.ACK)
    ).count == 1
    r = await a.wait_for(T.MESSAGE_READ_RECEIPT)
    assert (r.conversation_id, r.user_id, r.up_to_seq) == (conv, w.accounts["bob"].user_id, 3)
    # an older marker does not move the stored one
    assert (
        await b.request(T.MESSAGE_READ, pb.ReadMarker(conversation_id=conv, up_to_seq=1), T.ACK)
    ).count == 0
    code, _ = await w.clients["alice"].error(T.MESSAGE_READ, pb.ReadMarker(conversation_id="nope"))
    assert code == 4001


async def test_typing_is_forwarded_and_rate_limited(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b = w.clients["alice"], w.clients["bob"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    assert (
        await a.request(T.TYPING, pb.Typing(conversation_id=conv, typing=True), T.ACK)
    ).count == 1
    t = await b.wait_for(T.TYPING_NOTIFY)
    assert (t.conversation_id, t.user_id, t.typing) == (conv, w.accounts["alice"].user_id, True)
    assert (
        await a.request(T.TYPING, pb.Typing(conversation_id=conv, typing=True), T.ACK)
    ).count == 0  # repeated within the interval: not forwarded
    assert (
        await a.request(T.TYPING, pb.Typing(conversation_id=conv, typing=False), T.ACK)
    ).count == 1
    t = await b.wait_for(T.TYPING_NOTIFY)
    assert t.typing is False


async def test_presence_aggregated_and_only_to_contacts(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "stranger")
    a = w.clients["alice"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    assert conv
    bob_id = w.accounts["bob"].user_id
    await drain(a, w.clients["bob"])
    await w.clients["bob"].close()
    p = await a.wait_for(T.PRESENCE_NOTIFY)
    assert (p.user_id, p.status) == (bob_id, "offline")
    b1 = await device(server, w.accounts["bob"])
    p = await a.wait_for(T.PRESENCE_NOTIFY)
    assert (p.user_id, p.status) == (bob_id, "online")
    b2 = await device(server, w.accounts["bob"])
    await drain(a)
    await b2.request(T.PRESENCE_UPDATE, pb.PresenceUpdate(status="away"), T.ACK)
    await a.nothing(0.3)  # aggregate still online (online > away): no notification
    await b1.request(T.PRESENCE_UPDATE, pb.PresenceUpdate(status="away"), T.ACK)
    p = await a.wait_for(T.PRESENCE_NOTIFY)
    assert p.status == "away"
    code, _ = await b1.error(T.PRESENCE_UPDATE, pb.PresenceUpdate(status="busy"))
    assert code == 3001
    await w.clients["stranger"].nothing(0.2)  # shares no conversation
    # a new connection of alice learns bob's presence after SYNC_COMPLETE
    a2 = await WsClient.connect(server.url)
    await resume(a2, w.accounts["alice"].token, sync=False)
    await a2.until_sync()
    p = await a2.wait_for(T.PRESENCE_NOTIFY)
    assert (p.user_id, p.status) == (bob_id, "away")


# -- retention (SPEC §5) ----------------------------------------------------------------


async def test_retention_truncation_is_reported(server: RunningServer) -> None:
    import time

    w = await make_users(server, "alice", "bob")
    a = w.clients["alice"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    await w.clients["bob"].close()
    await send(a, conv, b"old")
    purged = await server.app.services.history.run_retention(int(time.time() * 1000) + 1)
    assert purged == {conv: 3}
    await send(a, conv, b"new")
    b = await device(server, w.accounts["bob"], sync=False)
    backlog, done = await b.until_sync()
    assert [e.message.seq for e in backlog] == [4]
    assert list(done.truncated_conversation_ids) == [conv]


async def test_slow_reader_is_dropped_and_keeps_its_events(server_with: ServerWith) -> None:
    async with server_with(send_buffer_limit=64 * 1024) as srv:
        w = await make_users(srv, "alice", "bob")
        a, b = w.clients["alice"], w.clients["bob"]
        conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
        await drain(b)
        b.transport.underlying_transport.pause_reading()  # bob stops reading
        body = b"z" * 60_000
        sent = 0
        bob_id = w.accounts["bob"].user_id

        def dropped() -> bool:
            return all(s.closed for s in srv.app.outbox.sessions(bob_id))

        for _ in range(400):  # ~24 MB: far past the kernel buffers and the 64 KiB limit
            await send(a, conv, body)
            sent += 1
            if dropped():
                break
        assert dropped(), "slow reader kept"
        # Server memory did not grow without bound, and nothing was lost: a fresh
        # connection of bob's device gets every message above its cursor.
        b2 = await device(srv, w.accounts["bob"], sync=False)
        backlog, done = await b2.until_sync(timeout=20)
        msgs = [e for e in backlog if e.type == T.MESSAGE_RECEIVE]
        assert len(msgs) == sent and done.delivered == sent + 1
        await b2.close()
        # SPEC §12.31: the close frame (1013) follows what was already queued for it.
        b.transport.underlying_transport.resume_reading()
        assert await b.closed(10) == 1013


async def test_idempotent_retry_wins_over_a_later_removal(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob")
    a, b = w.clients["alice"], w.clients["bob"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    await drain(b)
    original = await send(b, conv, b"sent before removal", rid="r-removed")
    await a.request(
        T.GROUP_REMOVE,
        pb.GroupRemove(conversation_id=conv, user_id=w.accounts["bob"].user_id),
        T.ACK,
    )
    # bob lost the echo and retries: he gets the original, nothing new is stored
    assert await send(b, conv, b"sent before removal", rid="r-removed") == original
    code, _ = await b.error(T.MESSAGE_SEND, pb.MessageSend(conversation_id=conv))
    assert code == 2002  # a new send is refused


async def test_new_contacts_are_introduced_by_presence(server: RunningServer) -> None:
    w = await make_users(server, "alice", "bob", "carol")
    a, b, c = (w.clients[n] for n in ("alice", "bob", "carol"))
    ids = {n: w.accounts[n].user_id for n in w.accounts}
    await c.request(T.PRESENCE_UPDATE, pb.PresenceUpdate(status="away"), T.ACK)
    conv = (await create_group(a, "g", ids["bob"])).conversation_id
    pa = await a.wait_for(T.PRESENCE_NOTIFY)
    pb_ = await b.wait_for(T.PRESENCE_NOTIFY)
    assert (pa.user_id, pa.status) == (ids["bob"], "online")
    assert (pb_.user_id, pb_.status) == (ids["alice"], "online")
    await a.request(
        T.GROUP_INVITE, pb.GroupInvite(conversation_id=conv, user_id=ids["carol"]), T.ACK
    )
    seen_by_carol = {(await c.wait_for(T.PRESENCE_NOTIFY)).user_id for _ in range(2)}
    assert seen_by_carol == {ids["alice"], ids["bob"]}
    pa = await a.wait_for(T.PRESENCE_NOTIFY)
    assert (pa.user_id, pa.status) == (ids["carol"], "away")


async def test_live_events_during_a_long_sync_arrive_once_and_in_order(
    server: RunningServer,
) -> None:
    w = await make_users(server, "alice", "bob")
    a = w.clients["alice"]
    conv = (await create_group(a, "g", w.accounts["bob"].user_id)).conversation_id
    await w.clients["bob"].close()
    for i in range(400):  # a backlog that takes a while to stream
        a.send(
            T.MESSAGE_SEND,
            pb.MessageSend(conversation_id=conv, encrypted_payload=b"x" * 500),
            request_id=f"b{i}",
        )
    for _ in range(400):
        await a.wait_for(T.MESSAGE_RECEIVE)

    async def keep_sending() -> None:
        for i in range(60):
            a.send(
                T.MESSAGE_SEND,
                pb.MessageSend(conversation_id=conv, encrypted_payload=b"y"),
                request_id=f"live{i}",
            )
            await asyncio.sleep(0.001)

    sender = asyncio.ensure_future(keep_sending())
    b = await WsClient.connect(server.url)
    await resume(b, w.accounts["bob"].token, sync=False)
    await sender
    seqs = []
    while len(seqs) < 1 + 400 + 60:  # his ADDED, the backlog, the live ones
        got = await b.recv()
        if got.type in (T.MESSAGE_RECEIVE, T.GROUP_MEMBER_ADDED):
            seqs.append(got.message.seq)
    assert seqs == list(range(2, 2 + 461))  # each once, in order, backlog before live
    await b.nothing(0.2, ignore=(T.PRESENCE_NOTIFY, T.SYNC_COMPLETE))
