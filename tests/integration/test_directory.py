"""Directory, devices and profile over real sockets (SPEC §3 types 54-59 and 64, §12.29):
the raw test client for the wire facts and errors, the SDK for its helpers. Real
passkey ceremonies, real SQLite files, really signed KeyPackages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sovereign.client import Client, DeviceAdded, MessageType, SovereignClientError
from sovereign.client.authenticator import SoftwareAuthenticator
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import mls
from tests.helpers.flows import Account, login, register, resume
from tests.helpers.server import RunningServer
from tests.helpers.wsclient import WsClient

T = MessageType
#: Pushes unrelated to what a test checks with ``nothing``.
NOISE = (T.PRESENCE_NOTIFY, T.GROUP_MEMBER_ADDED)


async def users(srv: RunningServer, *names: str) -> tuple[dict[str, Account], dict[str, WsClient]]:
    accounts, clients = {}, {}
    for n in names:
        c = await WsClient.connect(srv.url)
        accounts[n] = await register(c, n, display_name=f"{n.title()} Example")
        clients[n] = c
    return accounts, clients


async def second_device(srv: RunningServer, acct: Account) -> tuple[WsClient, pb.AuthSuccess]:
    c = await WsClient.connect(srv.url)
    return c, await login(c, acct)


async def device_list(c: WsClient) -> list[pb.Device]:
    got = await c.request(T.DEVICE_LIST_REQUEST, pb.DeviceListRequest(), T.DEVICE_LIST)
    return list(got.devices)


async def query(
    srv: RunningServer, sql: str, params: tuple[Any, ...] = ()
) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read through the server's own storage (any engine)."""
    return await srv.app.storage.db.read(lambda c: [tuple(r) for r in c.execute(sql, params)])


# -- USER_LOOKUP ----------------------------------------------------------------------


async def test_lookup_exact_username_case_insensitive(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "Bob")
    for spelling in ("Bob", "bob", "BOB"):
        info = await cl["alice"].request(
            T.USER_LOOKUP, pb.UserLookup(username=spelling), T.USER_INFO
        )
        assert (info.user_id, info.username, info.display_name) == (
            acc["Bob"].user_id,
            "Bob",
            "Bob Example",
        )


async def test_lookup_never_enumerates(server: RunningServer) -> None:
    """Prefixes, wildcards, unknown, malformed and disabled users all get the same 4006."""
    acc, cl = await users(server, "alice", "bobby", "carol")
    await server.app.set_user_enabled(acc["carol"].user_id, False)
    for probe in ("bob", "bobb", "bobby%", "b*", "%", "", "x" * 33, "bobby ", "nobody", "carol"):
        code, err = await cl["alice"].error(T.USER_LOOKUP, pb.UserLookup(username=probe))
        assert code == 4006, probe
        assert err.message == "no such user" and not err.fatal
    code, _ = await cl["alice"].error(T.USER_LOOKUP, b"\xff\xff")  # not a UserLookup
    assert code == 3001


async def test_directory_requests_need_ready(server: RunningServer) -> None:
    c = await WsClient.connect(server.url)
    code, err = await c.error(T.USER_LOOKUP, pb.UserLookup(username="x"))
    assert code == 1006 and err.fatal
    assert await c.closed() == 4007


# -- DEVICE_LIST ----------------------------------------------------------------------


async def test_device_list_shows_own_devices_current_and_online(server: RunningServer) -> None:
    before_ms = int(time.time() * 1000)
    acc, cl = await users(server, "alice", "bob")
    a2, _ = await second_device(server, acc["alice"])
    a3, _ = await second_device(server, acc["alice"])
    await a3.close()
    await asyncio.sleep(0.1)
    devices = await device_list(cl["alice"])
    assert len(devices) == 3  # bob's device is not listed
    current = [d for d in devices if d.current]
    assert len(current) == 1 and current[0].online
    online = {d.device_id for d in devices if d.online}
    assert len(online) == 2  # alice's first device and a2; a3 is closed
    after_ms = int(time.time() * 1000) + 1
    for d in devices:
        assert before_ms <= d.created_at <= after_ms
        assert d.created_at <= d.last_seen_at <= after_ms
    # Newest first; the second device sees itself as current.
    assert [d.created_at for d in devices] == sorted((d.created_at for d in devices), reverse=True)
    seen_by_a2 = await device_list(a2)
    assert {d.device_id for d in seen_by_a2} == {d.device_id for d in devices}
    assert [d.current for d in seen_by_a2].count(True) == 1
    assert next(d for d in seen_by_a2 if d.current).device_id != current[0].device_id
    assert len(await device_list(cl["bob"])) == 1


# -- DEVICE_REVOKE --------------------------------------------------------------------


async def test_revoke_device_closes_it_4004_and_deletes_its_key_packages(
    server: RunningServer,
) -> None:
    acc, cl = await users(server, "alice", "bob")
    alice = acc["alice"]
    a2, ok2 = await second_device(server, alice)
    a2_again = await WsClient.connect(server.url)
    await resume(a2_again, ok2.session_token)  # two connections of the revoked device
    kp_a2 = mls.key_package(alice.user_id)
    ack = await a2.request(
        T.MLS_KEY_PACKAGE_UPLOAD, pb.MLSKeyPackageUpload(key_packages=[kp_a2]), T.ACK
    )
    assert ack.count == 1
    kp_a1 = mls.key_package(alice.user_id)
    await cl["alice"].request(
        T.MLS_KEY_PACKAGE_UPLOAD, pb.MLSKeyPackageUpload(key_packages=[kp_a1]), T.ACK
    )
    await cl["alice"].nothing(0.2, ignore=(T.DEVICE_ADDED, *NOISE))
    victim = next(d for d in await device_list(a2) if d.current).device_id
    ack = await cl["alice"].request(T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=victim), T.ACK)
    assert ack.count == 1
    assert await a2.closed() == 4004
    assert await a2_again.closed() == 4004
    # Its session cannot resume (revoked), its KeyPackage is gone from storage...
    c = await WsClient.connect(server.url)
    code, _ = await c.error(T.AUTH_REQUEST, pb.AuthRequest(session_token=ok2.session_token))
    assert code == 1005
    assert await query(server, "SELECT data FROM key_packages WHERE device_id = ?", (victim,)) == []
    # ...so a fetch hands out only the remaining device's package.
    r = await cl["bob"].request(
        T.MLS_KEY_PACKAGE_FETCH,
        pb.MLSKeyPackageFetch(user_id=alice.user_id),
        T.MLS_KEY_PACKAGE_RESPONSE,
    )
    assert [p.key_package_data for p in r.key_packages] == [kp_a1]
    assert victim not in {d.device_id for d in await device_list(cl["alice"])}
    # Revoking it again: it is no longer one of the caller's devices.
    code, _ = await cl["alice"].error(T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=victim))
    assert code == 4006


async def test_revoke_foreign_or_unknown_device_is_4006_and_changes_nothing(
    server: RunningServer,
) -> None:
    _acc, cl = await users(server, "alice", "mallory")
    alice_dev = next(d for d in await device_list(cl["alice"]) if d.current).device_id
    for bad in (alice_dev, "no-such-device", ""):
        code, err = await cl["mallory"].error(T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=bad))
        assert code == 4006 and not err.fatal
    # alice's device is untouched and still connected.
    await cl["alice"].request(T.PING, pb.Ping(timestamp=1), T.PONG)
    assert [d.device_id for d in await device_list(cl["alice"])] == [alice_dev]
    revoked = await query(server, "SELECT COUNT(*) FROM sessions WHERE revoked_at_us IS NOT NULL")
    assert revoked[0][0] == 0


async def test_revoke_drops_pending_welcomes_only_for_that_device(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    bob = acc["bob"]
    b2, _ = await second_device(server, bob)
    b2_id = next(d for d in await device_list(b2) if d.current).device_id
    await b2.close()
    created = await cl["alice"].request(
        T.GROUP_CREATE,
        pb.GroupCreate(title="g", member_ids=[bob.user_id]),
        T.GROUP_CREATED,
    )
    conv = created.conversation_id
    await cl["alice"].request(
        T.MLS_WELCOME,
        pb.MLSWelcome(conversation_id=conv, recipient_id=bob.user_id, welcome_data=mls.welcome()),
        T.ACK,
    )
    # bob's first device acks the welcome; b2 (offline) still waits for it.
    w = await cl["bob"].wait_for(T.MLS_WELCOME_RECEIVE)
    await cl["bob"].request(T.MESSAGE_ACK, pb.MessageAck(message_id=w.event_id), T.ACK)
    # A second welcome nobody has acked yet: both bob devices wait for it.
    await cl["alice"].request(
        T.MLS_WELCOME,
        pb.MLSWelcome(conversation_id=conv, recipient_id=bob.user_id, welcome_data=mls.welcome()),
        T.ACK,
    )
    await cl["bob"].wait_for(T.MLS_WELCOME_RECEIVE)
    await cl["bob"].request(T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=b2_id), T.ACK)
    left = [r[0] for r in await query(server, "SELECT event_id FROM welcomes ORDER BY event_id")]
    acks = await query(server, "SELECT COUNT(*) FROM welcome_acks WHERE device_id = ?", (b2_id,))
    assert acks[0][0] == 0
    # The first welcome was only pending for the revoked device: gone. The second is
    # still owed to bob's remaining device, which gets it on its next READY.
    assert w.event_id not in left and len(left) == 1
    again = await WsClient.connect(server.url)
    backlog, _ = await (await _relogin(again, bob)).until_sync()
    assert [b.message.event_id for b in backlog if b.type == T.MLS_WELCOME_RECEIVE] == []
    b1 = await WsClient.connect(server.url)
    await b1.request(T.AUTH_REQUEST, pb.AuthRequest(session_token=bob.token), T.AUTH_SUCCESS)
    backlog, _ = await b1.until_sync()
    assert [b.message.event_id for b in backlog if b.type == T.MLS_WELCOME_RECEIVE] == left


async def _relogin(c: WsClient, acct: Account) -> WsClient:
    await login(c, acct, sync=False)
    return c


async def test_revoking_the_asking_device_acks_then_closes(server: RunningServer) -> None:
    _acc, cl = await users(server, "alice")
    me = next(d for d in await device_list(cl["alice"]) if d.current).device_id
    rid = cl["alice"].send(T.DEVICE_REVOKE, pb.DeviceRevoke(device_id=me))
    got = await cl["alice"].response(rid)
    assert got.type == T.ACK and got.message.count == 1
    assert await cl["alice"].closed() == 4004


# -- PROFILE_UPDATE -------------------------------------------------------------------


async def test_profile_update_shows_in_groups_and_lookup(server: RunningServer) -> None:
    acc, cl = await users(server, "alice", "bob")
    created = await cl["alice"].request(
        T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[acc["bob"].user_id]), T.GROUP_CREATED
    )
    names = {m.user_id: m.display_name for m in created.members}
    assert names[acc["bob"].user_id] == "Bob Example"  # now in the profile cache
    ack = await cl["bob"].request(
        T.PROFILE_UPDATE, pb.ProfileUpdate(display_name="Robert 🎉"), T.ACK
    )
    assert ack.count == 1
    listed = await cl["alice"].request(
        T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest(), T.CONVERSATION_LIST
    )
    names = {m.user_id: m.display_name for m in listed.conversations[0].members}
    assert names[acc["bob"].user_id] == "Robert 🎉"
    created = await cl["alice"].request(
        T.GROUP_CREATE,
        pb.GroupCreate(title="h", member_ids=[acc["bob"].user_id]),
        T.GROUP_CREATED,
    )
    assert {m.display_name for m in created.members} == {"Alice Example", "Robert 🎉"}
    info = await cl["alice"].request(T.USER_LOOKUP, pb.UserLookup(username="bob"), T.USER_INFO)
    assert info.display_name == "Robert 🎉"
    again = await WsClient.connect(server.url)
    ok = await resume(again, acc["bob"].token)
    assert ok.display_name == "Robert 🎉"


async def test_profile_update_limits(server: RunningServer) -> None:
    _acc, cl = await users(server, "alice")
    for bad in ("", " ", "\t\n", "x" * 65, "bad\x00name", "line\nbreak"):
        code, err = await cl["alice"].error(T.PROFILE_UPDATE, pb.ProfileUpdate(display_name=bad))
        assert code == 3001 and not err.fatal, bad
    for good in ("x", "y" * 64, "Zoë Ünïcode"):
        await cl["alice"].request(T.PROFILE_UPDATE, pb.ProfileUpdate(display_name=good), T.ACK)
    rows = await query(server, "SELECT display_name FROM users")
    assert rows[0][0] == "Zoë Ünïcode"


# -- DEVICE_ADDED ---------------------------------------------------------------------


async def test_device_added_on_first_upload_to_own_devices_and_contacts(
    server: RunningServer,
) -> None:
    acc, cl = await users(server, "alice", "bob", "stranger")
    alice, bob = acc["alice"], acc["bob"]
    await cl["alice"].request(
        T.GROUP_CREATE, pb.GroupCreate(title="g", member_ids=[bob.user_id]), T.GROUP_CREATED
    )
    await cl["bob"].wait_for(T.GROUP_MEMBER_ADDED)
    a2, _ = await second_device(server, alice)
    a2_id = next(d for d in await device_list(a2) if d.current).device_id
    await a2.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(key_packages=[mls.key_package(alice.user_id)]),
        T.ACK,
    )
    for who in ("alice", "bob"):  # alice's other device, and bob who shares a conversation
        added = await cl[who].wait_for(T.DEVICE_ADDED)
        assert (added.user_id, added.device_id) == (alice.user_id, a2_id)
    await cl["stranger"].nothing(0.3, ignore=NOISE)  # shares no conversation with alice
    await a2.nothing(0.1, ignore=NOISE)  # not to the uploading connection
    # A top-up is not an announcement; nor is a last-resort package.
    await a2.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(key_packages=[mls.key_package(alice.user_id)]),
        T.ACK,
    )
    await a2.request(
        T.MLS_KEY_PACKAGE_UPLOAD,
        pb.MLSKeyPackageUpload(
            key_packages=[mls.key_package(alice.user_id, last_resort=True)], last_resort=True
        ),
        T.ACK,
    )
    await cl["bob"].nothing(0.3, ignore=NOISE)
    await cl["alice"].nothing(0.1, ignore=NOISE)
    # A failed upload announces nothing either.
    a3, _ = await second_device(server, alice)
    code, _ = await a3.error(
        T.MLS_KEY_PACKAGE_UPLOAD, pb.MLSKeyPackageUpload(key_packages=[b"garbage"])
    )
    assert code == 5001
    await cl["bob"].nothing(0.3, ignore=NOISE)


# -- the SDK ----------------------------------------------------------------------------


async def test_sdk_lookup_devices_revoke_profile_and_device_added(server: RunningServer) -> None:
    alice_auth, bob_auth = SoftwareAuthenticator(), SoftwareAuthenticator()
    async with (
        Client(server.url, authenticator=alice_auth) as alice,
        Client(server.url, authenticator=bob_auth) as bob,
    ):
        await alice.register("alice", "Alice")
        await bob.register("bob", "Bob")
        info = await alice.lookup_user("BOB")
        assert (info.user_id, info.username, info.display_name) == (bob.user_id, "bob", "Bob")
        try:
            await alice.lookup_user("bo")
        except SovereignClientError as exc:
            assert exc.code == 4006
        else:
            raise AssertionError("lookup of a prefix must fail")
        await alice.create_group("g", [bob.user_id])
        await bob.update_profile("Bobby")
        convs = await alice.list_conversations()
        assert {m.display_name for m in convs[0].members} == {"Alice", "Bobby"}
        try:
            await bob.update_profile("")
        except SovereignClientError as exc:
            assert exc.code == 3001
        else:
            raise AssertionError("an empty display name must fail")

        added: list[DeviceAdded] = []
        bob.on(T.DEVICE_ADDED, lambda ev: added.append(ev.expect(DeviceAdded)))
        async with Client(server.url, authenticator=alice_auth) as alice2:
            await alice2.login("alice")
            await alice2.upload_key_packages([mls.key_package(alice.user_id)])
            ev = await alice.wait_for(T.DEVICE_ADDED, timeout=5)
            assert ev.expect(DeviceAdded).user_id == alice.user_id
            devices = await alice.devices()
            assert len(devices) == 2 and sum(d.current for d in devices) == 1
            assert all(d.online for d in devices)
            other = next(d for d in devices if not d.current)
            assert ev.message.device_id == other.device_id
            for _ in range(50):
                if added:
                    break
                await asyncio.sleep(0.05)
            assert [(a.user_id, a.device_id) for a in added] == [(alice.user_id, other.device_id)]
            await alice.revoke_device(other.device_id)
            await asyncio.wait_for(alice2.wait_closed_quietly(), 5)
            assert alice2.last_close is not None and alice2.last_close[0] == 4004
            assert [d.device_id for d in await alice.devices()] == [
                d.device_id for d in devices if d.current
            ]
        try:
            await alice.revoke_device(other.device_id)
        except SovereignClientError as exc:
            assert exc.code == 4006
        else:
            raise AssertionError("revoking a revoked device must fail")
