"""The MLS Delivery/Authentication Service over real sockets (SPEC §7, §12.5, §12.6,
§12.15, §12.17, §12.18, §12.22). KeyPackages are really signed; commits, GroupInfo
and Welcomes carry real RFC 9420 framing (the DS reads only clear text)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls
from tests.helpers.flows import Account, login, register, resume
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

ServerWith = Callable[..., AbstractAsyncContextManager[RunningServer]]
GID = b"mls-group-0001"


async def users(srv: RunningServer, *names: str) -> tuple[dict[str, Account], dict[str, WsClient]]:
    accounts, clients = {}, {}
    for n in names:
        c = await WsClient.connect(srv.url)
        accounts[n] = await register(c, n)
        clients[n] = c
    return accounts, clients


async def upload(c: WsClient, *packages: bytes, last_resort: bool = False) -> int:
    ack = await c.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(key_packages=list(packages), last_resort=last_resort),
        T.ACK,
    )
    return int(ack.count)


async def upload_error(c: WsClient, upload: pb.MLSKeyPackageUpload) -> tuple[int, str]:
    code, err = await c.error(T.MLS_KEY_PACKAGE_UPLOAD, upload)
    return code, err.message


async def group(c: WsClient, *members: str) -> str:
    created = await c.request(
        T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=list(members)), T.GROUP_CREATED
    )
    return str(created.conversation_id)


# -- KeyPackages ----------------------------------------------------------------------


async def test_upload_and_fetch_one_per_device_oldest_first(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    bob = acc["bob"]
    b2, _ = await _second_device(server, bob)
    kp1, kp2, kp3 = (mls.key_package(bob.user_id) for _ in range(3))
    assert await upload(cl["bob"], kp1, kp2) == 2
    assert await upload(b2, kp3) == 1
    r = await cl["alice"].request(
        T.MLS_KEY_PACKAGE_FETCH,
        pb.MLSKeyPackageFetch(user_id=bob.user_id),
        T.MLS_KEY_PACKAGE_RESPONSE,
    )
    got = {p.key_package_data for p in r.key_packages}
    assert got == {kp1, kp3} and len({p.device_id for p in r.key_packages}) == 2
    assert r.key_package_data == r.key_packages[0].key_package_data and r.user_id == bob.user_id
    r = await cl["alice"].request(
        T.MLS_KEY_PACKAGE_FETCH,
        pb.MLSKeyPackageFetch(user_id=bob.user_id),
        T.MLS_KEY_PACKAGE_RESPONSE,
    )
    assert [p.key_package_data for p in r.key_packages] == [kp2]  # consumed; device 2 empty
    code, _ = await cl["alice"].error(
        T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=bob.user_id)
    )
    assert code == 5005
    code, _ = await cl["alice"].error(
        T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id="nobody")
    )
    assert code == 4006


async def _second_device(srv: RunningServer, acct: Account) -> tuple[WsClient, pb.AuthSuccess]:
    c = await WsClient.connect(srv.url)
    ok = await login(c, acct)
    return c, ok


async def test_username_is_an_accepted_identity(server: RunningServer) -> None:
    _acc, cl = await users(server, "alice")
    assert await upload(cl["alice"], mls.key_package("alice")) == 1


async def test_strict_validation_rejects_with_named_check(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    c = cl["alice"]
    good = mls.key_package(acc["alice"].user_id)
    code, msg = await upload_error(
        c, pb.MLSKeyPackageUpload(key_packages=[good, mls.key_package(acc["bob"].user_id)])
    )
    assert code == 5001 and msg.startswith("package 1:") and "identity" in msg
    code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=[b"\x00\x01junk"]))
    assert code == 5001 and "package 0" in msg and "malformed" in msg
    tampered = bytearray(mls.key_package(acc["alice"].user_id))
    tampered[-1] ^= 1
    code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=[bytes(tampered)]))
    assert code == 5001 and "signature" in msg
    expired = mls.key_package(acc["alice"].user_id, lifetime=-7200)
    code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=[expired]))
    assert code == 5001 and "lifetime" in msg
    # all or nothing: the good package of the refused batch was not stored
    code, _ = await cl["bob"].error(
        T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=acc["alice"].user_id)
    )
    assert code == 5005


async def test_opaque_validation_skips_checks(server_with: ServerWith) -> None:
    async with server_with(mls_validation="opaque") as srv:
        _acc, cl = await users(srv, "alice")
        assert await upload(cl["alice"], b"anything goes", mls.key_package("someone-else")) == 2


async def test_pool_limit_duplicates_and_index_order(server_with: ServerWith) -> None:
    async with server_with(max_key_packages=3) as srv:
        acc, cl = await users(srv, "alice")
        uid = acc["alice"].user_id
        c = cl["alice"]
        kps = [mls.key_package(uid) for _ in range(4)]
        code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=kps))
        assert code == 5001 and "pool full" in msg
        assert await upload(c, *kps[:2]) == 2
        code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=kps[2:4]))
        assert code == 5001 and "pool full" in msg
        code, msg = await upload_error(c, pb.MLSKeyPackageUpload(key_packages=[kps[0]]))
        assert code == 5001 and "duplicate" in msg
        # key_package_data comes first, then key_packages (index 0, 1, ...) (§12.22)
        code, msg = await upload_error(
            c, pb.MLSKeyPackageUpload(key_package_data=kps[2], key_packages=[b"bad"])
        )
        assert code == 5001 and msg.startswith("package 1:")
        # the last-resort package does not count toward the limit
        assert await upload(c, mls.key_package(uid), last_resort=True) == 1
        assert await upload(c, kps[2]) == 1


async def test_last_resort_is_returned_and_kept(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    uid = acc["bob"].user_id
    ordinary, lr1, lr2 = mls.key_package(uid), mls.key_package(uid), mls.key_package(uid)
    code, _ = await upload_error(cl["bob"], pb.MLSKeyPackageUpload(last_resort=True))
    assert code == 5001
    code, _ = await upload_error(
        cl["bob"], pb.MLSKeyPackageUpload(key_packages=[lr1, lr2], last_resort=True)
    )
    assert code == 5001
    assert await upload(cl["bob"], lr1, last_resort=True) == 1
    assert await upload(cl["bob"], lr2, last_resort=True) == 1  # replaces lr1
    assert await upload(cl["bob"], ordinary) == 1

    async def fetch() -> bytes:
        r = await cl["alice"].request(
            T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=uid), T.MLS_KEY_PACKAGE_RESPONSE
        )
        return bytes(r.key_package_data)

    assert await fetch() == ordinary  # ordinary ones first (§12.6)
    assert await fetch() == lr2
    assert await fetch() == lr2  # kept


async def test_rfc_last_resort_extension_marks_a_package(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    uid = acc["bob"].user_id
    lr = mls.key_package(uid, last_resort=True)
    assert await upload(cl["bob"], lr) == 1
    for _ in range(2):
        r = await cl["alice"].request(
            T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=uid), T.MLS_KEY_PACKAGE_RESPONSE
        )
        assert r.key_package_data == lr


async def test_key_package_low_live_and_on_ready(server_with: ServerWith) -> None:
    async with server_with(min_key_packages=2) as srv:
        acc, cl = await users(srv, "alice", "bob")
        uid = acc["bob"].user_id
        assert await upload(cl["bob"], *(mls.key_package(uid) for _ in range(3))) == 3
        await cl["bob"].wait_for(T.MLS_KEY_PACKAGE_LOW)  # the one sent on READY (pool 0)
        await cl["alice"].request(
            T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=uid), T.MLS_KEY_PACKAGE_RESPONSE
        )  # 2 left: not below 2
        await cl["bob"].nothing(0.2)
        await cl["alice"].request(
            T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=uid), T.MLS_KEY_PACKAGE_RESPONSE
        )  # 1 left: LOW, live
        low = await cl["bob"].wait_for(T.MLS_KEY_PACKAGE_LOW)
        assert (low.remaining, low.minimum) == (1, 2)
        await cl["bob"].close()
        b = await WsClient.connect(srv.url)
        await resume(b, acc["bob"].token, sync=False)
        await b.until_sync()
        low = await b.wait_for(T.MLS_KEY_PACKAGE_LOW)  # again on its next READY
        assert (low.remaining, low.minimum) == (1, 2)


async def test_concurrent_fetches_never_hand_out_a_package_twice(server: RunningServer) -> None:
    acc, cl = await users(server, "bob", "f1", "f2", "f3")
    uid = acc["bob"].user_id
    kps = [mls.key_package(uid) for _ in range(6)]
    assert await upload(cl["bob"], *kps) == 6
    fetchers = [cl["f1"], cl["f2"], cl["f3"]]
    for c in fetchers:  # three fetches in flight per client, three clients at once
        for _ in range(3):
            c.send(T.MLS_KEY_PACKAGE_FETCH, pb.MLSKeyPackageFetch(user_id=uid))
    got, errors = [], 0
    for c in fetchers:
        for _ in range(3):
            r = await c.recv()
            while r.request_id == "":
                r = await c.recv()
            if r.type == T.ERROR:
                assert r.message.code == 5005
                errors += 1
            else:
                got.append(r.message.key_package_data)
    assert sorted(got) == sorted(kps) and errors == 3


# -- welcomes --------------------------------------------------------------------------


async def test_welcome_is_durable_per_device_and_acked_per_device(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob", "eve")
    conv = await group(cl["alice"], acc["bob"].user_id)
    await cl["bob"].close()
    ack = await cl["alice"].request(
        T.MLS_WELCOME,
        pb.MLSWelcome(
            conversation_id=conv, recipient_id=acc["bob"].user_id, welcome_data=mls.welcome()
        ),
        T.ACK,
    )
    assert ack.count == 1
    b = await WsClient.connect(server.url)
    await resume(b, acc["bob"].token, sync=False)
    backlog, _done = await b.until_sync()
    welcomes = [e for e in backlog if e.type == T.MLS_WELCOME_RECEIVE]
    assert len(welcomes) == 1 and backlog[-1].type == T.MLS_WELCOME_RECEIVE  # after events
    w = welcomes[0].message
    assert (w.conversation_id, w.sender_id, w.welcome_data) == (
        conv,
        acc["alice"].user_id,
        mls.welcome(),
    )
    assert await b.request(T.MESSAGE_ACK, pb.MessageAck(message_id=w.event_id), T.ACK) == pb.Ack(
        count=1
    )
    await b.close()
    b = await WsClient.connect(server.url)
    await resume(b, acc["bob"].token, sync=False)
    backlog, _ = await b.until_sync()
    assert [e for e in backlog if e.type == T.MLS_WELCOME_RECEIVE] == []
    # errors: non-Welcome 5003, non-member recipient 4003, non-member sender 2002
    code, _ = await cl["alice"].error(
        T.MLS_WELCOME,
        pb.MLSWelcome(conversation_id=conv, recipient_id=acc["bob"].user_id, welcome_data=b"nope"),
    )
    assert code == 5003
    code, _ = await cl["alice"].error(
        T.MLS_WELCOME,
        pb.MLSWelcome(
            conversation_id=conv, recipient_id=acc["eve"].user_id, welcome_data=mls.welcome()
        ),
    )
    assert code == 4003
    code, _ = await cl["eve"].error(
        T.MLS_WELCOME,
        pb.MLSWelcome(
            conversation_id=conv, recipient_id=acc["bob"].user_id, welcome_data=mls.welcome()
        ),
    )
    assert code == 2002


# -- commits and GroupInfo ----------------------------------------------------------------


async def test_commit_ordering_group_binding_and_epochs(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    a, b = cl["alice"], cl["bob"]
    conv = await group(a, acc["bob"].user_id)
    await asyncio.sleep(0.05)
    b.backlog.clear()
    bc = await a.request(
        T.MLS_COMMIT,
        pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 0)),
        T.MLS_COMMIT_BROADCAST,
    )
    assert (bc.epoch, bc.seq, bc.sender_id) == (0, 3, acc["alice"].user_id)
    pushed = await b.wait_for(T.MLS_COMMIT_BROADCAST)
    assert pushed == bc
    code, _ = await b.error(
        T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 0))
    )
    assert code == 5004  # past epoch
    code, _ = await b.error(
        T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 5))
    )
    assert code == 5004  # future epoch
    code, _ = await b.error(
        T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(b"other", 1))
    )
    assert code == 5002  # the first commit bound the group_id
    code, _ = await b.error(
        T.MLS_COMMIT,
        pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 1, content_type=1)),
    )
    assert code == 5002  # not a commit
    code, _ = await b.error(
        T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.welcome())
    )
    assert code == 5002  # not a handshake message
    bc2 = await b.request(
        T.MLS_COMMIT,
        pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 1, private=True)),
        T.MLS_COMMIT_BROADCAST,
    )
    assert bc2.epoch == 1 and bc2.seq == 4
    lst = await a.request(
        T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest(), T.CONVERSATION_LIST
    )
    assert lst.conversations[0].mls_epoch == 2


async def test_racing_commits_exactly_one_wins(server: RunningServer) -> None:
    names = [f"u{i}" for i in range(6)]
    acc, cl = await users(server, *names)
    conv = await group(cl["u0"], *(acc[n].user_id for n in names[1:]))
    await asyncio.sleep(0.05)
    rids = [
        (
            n,
            cl[n].send(
                T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 0))
            ),
        )
        for n in names
    ]
    outcomes = {n: await cl[n].response(rid) for n, rid in rids}
    winners = [n for n, r in outcomes.items() if r.type == T.MLS_COMMIT_BROADCAST]
    losers = [n for n, r in outcomes.items() if r.type == T.ERROR]
    assert len(winners) == 1 and len(losers) == 5
    assert all(outcomes[n].message.code == 5004 for n in losers)
    # every member sees the same single commit at that epoch
    for n in losers:
        got = await cl[n].wait_for(T.MLS_COMMIT_BROADCAST)
        assert got == outcomes[winners[0]].message


async def test_commit_bundle_is_atomic_and_group_info_served(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob", "carol", "eve")
    a = cl["alice"]
    conv = await group(a, acc["bob"].user_id, acc["carol"].user_id)
    good_w = pb.MLSWelcome(
        conversation_id=conv, recipient_id=acc["bob"].user_id, welcome_data=mls.welcome()
    )
    code, _ = await a.error(T.MLS_GROUP_INFO_FETCH, pb.GroupInfoFetch(conversation_id=conv))
    assert code == 5006
    bad_bundles = [
        (
            pb.MLSCommit(
                conversation_id=conv, commit_data=mls.commit(GID, 0), group_info=mls.welcome()
            ),
            5002,
        ),
        (
            pb.MLSCommit(
                conversation_id=conv,
                commit_data=mls.commit(GID, 0),
                group_info=mls.group_info(GID, 0),
            ),
            5002,
        ),  # must be the epoch after
        (
            pb.MLSCommit(
                conversation_id=conv,
                commit_data=mls.commit(GID, 0),
                group_info=mls.group_info(b"other", 1),
            ),
            5002,
        ),
        (
            pb.MLSCommit(
                conversation_id=conv,
                commit_data=mls.commit(GID, 0),
                welcomes=[
                    good_w,
                    pb.MLSWelcome(
                        conversation_id="elsewhere",
                        recipient_id=acc["bob"].user_id,
                        welcome_data=mls.welcome(),
                    ),
                ],
            ),
            5003,
        ),
        (
            pb.MLSCommit(
                conversation_id=conv,
                commit_data=mls.commit(GID, 0),
                welcomes=[
                    pb.MLSWelcome(
                        conversation_id=conv,
                        recipient_id=acc["eve"].user_id,
                        welcome_data=mls.welcome(),
                    )
                ],
            ),
            4003,
        ),
    ]
    for bundle, expected in bad_bundles:
        code, _ = await a.error(T.MLS_COMMIT, bundle)
        assert code == expected, bundle
    lst = await a.request(
        T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest(), T.CONVERSATION_LIST
    )
    assert lst.conversations[0].mls_epoch == 0 and lst.conversations[0].last_seq == 3
    cl["bob"].backlog.clear()
    await a.request(
        T.MLS_COMMIT,
        pb.MLSCommit(
            conversation_id=conv,
            commit_data=mls.commit(GID, 0),
            group_info=mls.group_info(GID, 1),
            welcomes=[good_w],
        ),
        T.MLS_COMMIT_BROADCAST,
    )
    w = await cl["bob"].wait_for(T.MLS_WELCOME_RECEIVE)
    assert w.welcome_data == mls.welcome() and w.conversation_id == conv
    gi = await cl["carol"].request(
        T.MLS_GROUP_INFO_FETCH, pb.GroupInfoFetch(conversation_id=conv), T.MLS_GROUP_INFO
    )
    assert (gi.epoch, gi.group_info) == (1, mls.group_info(GID, 1))
    code, _ = await cl["eve"].error(T.MLS_GROUP_INFO_FETCH, pb.GroupInfoFetch(conversation_id=conv))
    assert code == 2002
    # a commit without group_info clears the stored one: never serve a stale GroupInfo
    await a.request(
        T.MLS_COMMIT,
        pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 1)),
        T.MLS_COMMIT_BROADCAST,
    )
    code, _ = await cl["carol"].error(
        T.MLS_GROUP_INFO_FETCH, pb.GroupInfoFetch(conversation_id=conv)
    )
    assert code == 5006


async def test_mls_state_survives_restart(server_with: ServerWith) -> None:
    from pathlib import Path

    from tests.helpers.server import running_server

    async with server_with() as srv:
        acc, cl = await users(srv, "alice")
        conv = await group(cl["alice"])
        await cl["alice"].request(
            T.MLS_COMMIT,
            pb.MLSCommit(
                conversation_id=conv,
                commit_data=mls.commit(GID, 0),
                group_info=mls.group_info(GID, 1),
            ),
            T.MLS_COMMIT_BROADCAST,
        )
        data_dir = Path(srv.config.data_dir)
    async with running_server(data_dir) as srv2:
        c = await WsClient.connect(srv2.url)
        await resume(c, acc["alice"].token)
        code, _ = await c.error(
            T.MLS_COMMIT, pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 0))
        )
        assert code == 5004
        gi = await c.request(
            T.MLS_GROUP_INFO_FETCH, pb.GroupInfoFetch(conversation_id=conv), T.MLS_GROUP_INFO
        )
        assert gi.epoch == 1
        await c.request(
            T.MLS_COMMIT,
            pb.MLSCommit(conversation_id=conv, commit_data=mls.commit(GID, 1)),
            T.MLS_COMMIT_BROADCAST,
        )
        await c.close()
