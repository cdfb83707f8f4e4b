"""Admin state stays coherent across cluster nodes (SPEC §12.23, §12.27; issue 10): real
PostgreSQL, real ``redis-server``, real ``sovereign serve`` processes, the admin API over
HTTP and clients over the wire protocol.

What an admin changes on one node takes effect on the others within 1 s, with no
restart: runtime settings (set and reset), promotion and demotion of server admins,
display names (cached per node), whether a user is online, and retention's cut of a
conversation (reported by the other node's offline sync).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from sovereign.config import load
from sovereign.protocol.types import MessageType as T
from sovereign.server import App, create_app
from sovereign.services.ports import NullBus
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.admin import AdminApi
from tests.helpers.cluster import Account, Cluster, Node, cluster
from tests.helpers.flows import resume
from tests.helpers.wsclient import WsClient

WITHIN_S = 1.0  # the bound: another node's change takes effect within 1 s
_ADMIN = re.compile(r"admin listener on (http://[\d.]+:\d+)")


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(tmp_path, nodes=2) as c:
        yield c


def admin_base(node: Node, timeout: float = 10.0) -> str:
    """The node's admin listener (``--admin-listen 127.0.0.1:0``), from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _ADMIN.search(node.output())
        if m is not None:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"node {node.name} logged no admin listener:\n{node.output()}")


@asynccontextmanager
async def in_process_node(c: Cluster, name: str, *, bus: bool) -> AsyncIterator[App]:
    """A node of the cluster in the test's process, built as ``serve`` builds one (with
    the cluster's Redis when ``bus``), for what no API triggers (a retention pass) and
    for writing accounts straight into the database."""
    env = {k: v for k, v in c.node_env().items() if k.startswith("SOVEREIGN_")}
    data = c.tmp / name
    data.mkdir(parents=True, exist_ok=True)
    cfg = load(None, {"data_dir": str(data), "listen": "127.0.0.1:0"}, environ=env)
    app = await create_app(cfg, bus=None if bus else NullBus())
    try:
        yield app
    finally:
        await app.shutdown(timeout=5)


async def accounts(c: Cluster, *names: str, admin: tuple[str, ...] = ()) -> dict[str, Account]:
    """Users with one session each (as ``sovereign user create --print-token`` does)."""
    out: dict[str, Account] = {}
    async with in_process_node(c, "provision", bus=False) as app:
        for name in names:
            user = await app.auth.create_user(name, is_admin=name in admin)
            _session, token = await app.auth.create_session(user.user_id, None, "test")
            out[name] = Account(user.user_id, name, token)
    return out


async def within(what: str, check: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until ``check()`` holds; fails if it does not within ``WITHIN_S``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > WITHIN_S:
            raise AssertionError(f"{what}: not seen within {WITHIN_S} s")
        await asyncio.sleep(0.02)


async def registration_refused(node: Node) -> int:
    """The error code of AUTH_REGISTER_REQUEST on ``node`` (0: a challenge, accepted)."""
    c = await WsClient.connect(node.url)
    try:
        rid = c.send(T.AUTH_REGISTER_REQUEST, pb.AuthRegisterRequest(username="probe"))
        got = await c.response(rid)
        if got.type == T.AUTH_REGISTER_CHALLENGE:
            return 0
        assert got.type == T.AUTH_ERROR, got
        return int(got.message.error_code)
    finally:
        await c.close()


async def test_a_setting_changed_on_one_node_applies_on_the_other(two_nodes: Cluster) -> None:
    c = two_nodes
    a, b = c.nodes
    root = (await accounts(c, "root", admin=("root",)))["root"]
    api_a = AdminApi(admin_base(a), root.token)
    api_b = AdminApi(admin_base(b), root.token)
    try:
        assert await registration_refused(b) == 0  # open (TEST_ENV)
        r = await api_a.put("/admin/api/settings", {"registration": "closed"})
        assert r.status == 200, r.body
        # SPEC §12.19: registration closed answers 1003 RegistrationFailed.
        took = await within("closed on node b", lambda: _is(registration_refused(b), 1003))
        print(f"registration closed on node b after {took * 1000:.0f} ms")
        r = await api_b.get("/admin/api/settings")
        shown = {s["key"]: (s["value"], s["source"]) for s in r.body["data"]}
        assert shown["registration"] == ("closed", "admin")
        # A reset on node b returns node a to its start-up value.
        r = await api_b.delete("/admin/api/settings/registration")
        assert r.status == 200, r.body
        await within("reset on node a", lambda: _is(registration_refused(a), 0))
        # A limit, read at each use: envelopes over the new bound are refused on b.
        r = await api_a.put("/admin/api/settings", {"max_message_size_bytes": 1000})
        assert r.status == 200, r.body

        async def bound_on_b() -> bool:
            got = await api_b.get("/admin/api/settings")
            shown = {s["key"]: s["value"] for s in got.body["data"]}
            return bool(shown["max_message_size_bytes"] == 1000)

        await within("max_message_size_bytes on node b", bound_on_b)
    finally:
        await api_a.session.close()
        await api_b.session.close()


async def _is(got: Awaitable[int], want: int) -> bool:
    return await got == want


async def test_promotion_and_demotion_on_one_node_hold_on_the_other(two_nodes: Cluster) -> None:
    c = two_nodes
    a, b = c.nodes
    acc = await accounts(c, "root", "carol", admin=("root",))
    root_a = AdminApi(admin_base(a), acc["root"].token)
    root_b = AdminApi(admin_base(b), acc["root"].token)
    carol_a = AdminApi(admin_base(a), acc["carol"].token)
    carol_b = AdminApi(admin_base(b), acc["carol"].token)
    carol = acc["carol"].user_id

    async def carol_b_status() -> int:
        return (await carol_b.get("/admin/api/info")).status

    try:
        r = await carol_b.get("/admin/api/info")
        assert (r.status, r.code) == (403, 2003)  # SPEC §10: NotAdmin
        r = await root_a.put(f"/admin/api/users/{carol}", {"is_admin": True})
        assert r.status == 200 and r.body["is_admin"] is True, r.body
        await within("promotion on node b", lambda: _is(carol_b_status(), 200))
        r = await root_b.get(f"/admin/api/users/{carol}")
        assert r.body["is_admin"] is True
        # Demoted on b: a refuses her at once.
        r = await root_b.put(f"/admin/api/users/{carol}", {"is_admin": False})
        assert r.status == 200, r.body
        r = await carol_a.get("/admin/api/info")
        assert (r.status, r.code) == (403, 2003)
    finally:
        for api in (root_a, root_b, carol_a, carol_b):
            await api.session.close()


async def test_a_display_name_changed_by_an_admin_reaches_the_other_nodes_cache(
    two_nodes: Cluster,
) -> None:
    c = two_nodes
    a, b = c.nodes
    acc = await accounts(c, "root", "alice", "bob", admin=("root",))
    api_a = AdminApi(admin_base(a), acc["root"].token)
    api_b = AdminApi(admin_base(b), acc["root"].token)
    alice, bob, conv = await alice_and_bob_in_a_group(c, acc)
    try:

        async def alice_seen_by_bob() -> str:
            listed = await bob.request(T.CONVERSATION_LIST_REQUEST, None, T.CONVERSATION_LIST)
            (one,) = [x for x in listed.conversations if x.conversation_id == conv]
            return str(next(m.display_name for m in one.members if m.username == "alice"))

        async def renamed() -> bool:
            return await alice_seen_by_bob() == "Alice A."

        await within("the group on node b", lambda: _ne(alice_seen_by_bob(), ""))
        assert await alice_seen_by_bob() == "alice"  # node b has cached her profile
        alice_id = acc["alice"].user_id
        r = await api_a.put(f"/admin/api/users/{alice_id}", {"display_name": "Alice A."})
        assert r.status == 200, r.body
        await within("the new name on node b", renamed)
        # Node b's admin API sees her online: her connection is on node a.
        r = await api_b.get(f"/admin/api/users/{alice_id}")
        assert (r.body["display_name"], r.body["online"]) == ("Alice A.", True)
    finally:
        await alice.close()
        await bob.close()
        await api_a.session.close()
        await api_b.session.close()


async def alice_and_bob_in_a_group(
    c: Cluster, acc: dict[str, Account]
) -> tuple[WsClient, WsClient, str]:
    """alice connected to node a, bob to node b, in a group alice created on a."""
    a, b = c.nodes
    alice = await WsClient.connect(a.url)
    bob = await WsClient.connect(b.url)
    await resume(alice, acc["alice"].token)
    await resume(bob, acc["bob"].token)
    got = await alice.request(
        T.GROUP_CREATE,
        pb.GroupCreate(title="g", member_ids=[acc["bob"].user_id]),
        T.GROUP_CREATED,
    )
    return alice, bob, str(got.conversation_id)


async def _ne(got: Awaitable[str], other: str) -> bool:
    try:
        return await got != other
    except ValueError:
        return False  # the conversation has not reached that node yet


async def test_retention_on_one_node_is_reported_by_the_other_nodes_sync(
    two_nodes: Cluster,
) -> None:
    """SPEC §5: a device that had not acked purged events sees the conversation in
    SYNC_COMPLETE.truncated_conversation_ids — on every node, not only the one whose
    retention pass removed them."""
    c = two_nodes
    _a, b = c.nodes
    acc = await accounts(c, "alice", "bob")
    alice, bob, conv = await alice_and_bob_in_a_group(c, acc)
    try:
        await bob.wait_for(T.GROUP_MEMBER_ADDED)  # node b knows the conversation
        await bob.close()
        old = await alice.request(
            T.MESSAGE_SEND,
            pb.MessageSend(conversation_id=conv, encrypted_payload=b"old"),
            T.MESSAGE_RECEIVE,
        )
        # Retention runs on a third node of the cluster (no API starts a pass).
        async with in_process_node(c, "retention", bus=True) as n:
            purged = await n.services.history.run_retention(int(time.time() * 1000) + 1)
            assert purged == {conv: old.seq}
            await asyncio.sleep(WITHIN_S)
        new = await alice.request(
            T.MESSAGE_SEND,
            pb.MessageSend(conversation_id=conv, encrypted_payload=b"new"),
            T.MESSAGE_RECEIVE,
        )
        bob = await WsClient.connect(b.url)
        await bob.request(
            T.AUTH_REQUEST, pb.AuthRequest(session_token=acc["bob"].token), T.AUTH_SUCCESS
        )
        backlog, done = await bob.until_sync()
        assert [x.message.seq for x in backlog if x.type == T.MESSAGE_RECEIVE] == [new.seq]
        assert list(done.truncated_conversation_ids) == [conv]
    finally:
        await alice.close()
        await bob.close()


async def test_the_cli_disabling_a_user_closes_her_sockets_on_every_node(
    two_nodes: Cluster,
) -> None:
    """``sovereign user disable`` on a host where no node holds the data dir works on
    the database directly, joining the cluster's bus for the moment: its close
    notification reaches the node holding her socket (SPEC §4: 4005 at once)."""
    c = two_nodes
    _a, b = c.nodes
    bob_acc = (await accounts(c, "bob"))["bob"]
    bob = await WsClient.connect(b.url)
    try:
        await resume(bob, bob_acc.token)
        data = c.tmp / "cli"
        data.mkdir()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sovereign", "user", "disable", "bob",
            "--data-dir", str(data),
            env=c.node_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        exited = time.monotonic()
        assert await bob.closed(timeout=5) == 4005
        assert time.monotonic() - exited < WITHIN_S
    finally:
        await bob.close()


async def test_a_device_on_another_node_is_online_in_device_list_and_admin_api(
    two_nodes: Cluster,
) -> None:
    c = two_nodes
    a, b = c.nodes
    acc = await accounts(c, "root", "alice", admin=("root",))
    alice_id = acc["alice"].user_id
    async with in_process_node(c, "second-device", bus=False) as app:
        _session, phone_token = await app.auth.create_session(alice_id, None, "test")
    api_b = AdminApi(admin_base(b), acc["root"].token)
    laptop = await WsClient.connect(a.url)
    phone = await WsClient.connect(b.url)
    try:
        await resume(laptop, acc["alice"].token)
        await resume(phone, phone_token)

        async def online_in_device_list() -> list[bool]:
            got = await phone.request(T.DEVICE_LIST_REQUEST, pb.DeviceListRequest(), T.DEVICE_LIST)
            return sorted(d.online for d in got.devices)

        async def online_in_admin_api() -> list[bool]:
            r = await api_b.get(f"/admin/api/users/{alice_id}")
            assert r.status == 200, r.body
            return sorted(s["online"] for s in r.body["sessions"])

        # The laptop's connection is on node a; node b answers both.
        await within(
            "both devices online on node b", lambda: _eq(online_in_device_list(), [True, True])
        )
        assert await online_in_admin_api() == [True, True]
        await laptop.close()
        await within(
            "the laptop offline on node b", lambda: _eq(online_in_device_list(), [False, True])
        )
        assert await online_in_admin_api() == [False, True]
    finally:
        await laptop.close()
        await phone.close()
        await api_b.session.close()


async def _eq(got: Awaitable[list[bool]], want: list[bool]) -> bool:
    return await got == want
