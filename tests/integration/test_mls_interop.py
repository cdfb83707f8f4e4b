"""Proof with real MLS clients: three RFC 9420 clients (Node.js, npm ``ts-mls`` 1.6.4)
drive the real server over sovereign.v1 (issue 4, SPEC §7).

The server runs in-process with ``mls_validation = strict``; alice, bob and carol register
with real WebAuthn ceremonies (software authenticator), then ``interop/ts-mls/scenario.mjs``
resumes their sessions and runs the scenario: real KeyPackages (and forged ones that must
be refused with 5001), a group built with commit + Welcome + GroupInfo bundles, application
messages every member decrypts, a two-client commit race (exactly one 5004, the loser
processes the winner and retries), a three-client commit storm, an external rejoin from
the stored GroupInfo, and a consistent final epoch. Here we check its JSON result against
what the server itself says (CONVERSATION_LIST, MLS_GROUP_INFO, history) and that no
plaintext ever reached the database.

Needs Node.js 20+ and ``make interop`` (npm ci in interop/ts-mls). Missing either fails
the test, it does not skip: CI installs both.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers import pg
from tests.helpers.flows import Account, register, resume
from tests.helpers.server import running_server
from tests.helpers.wsclient import WsClient

ROOT = Path(__file__).resolve().parents[2]
INTEROP = ROOT / "interop" / "ts-mls"
SCENARIO_TIMEOUT = 50.0  # seconds; the scenario itself takes ~2 s

pytestmark = pytest.mark.timeout(90)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js (20+) is required for the MLS interop test; install it")
    if not (INTEROP / "node_modules" / "ts-mls").is_dir():
        pytest.fail(
            f"{INTEROP / 'node_modules'} is missing: run `make interop` "
            "(npm ci in interop/ts-mls) before the test suite"
        )
    return node


async def _run_scenario(
    node: str, url: str, accounts: dict[str, Account], outsider_id: str
) -> dict[str, Any]:
    # --opt=value: a base64url token may start with "-", which a separate argument
    # would make look like an option.
    cmd = [node, "scenario.mjs", f"--url={url}", f"--timeout={int(SCENARIO_TIMEOUT) - 5}"]
    cmd += [f"--outsider-user-id={outsider_id}"]
    for name, acct in accounts.items():
        cmd += [f"--{name}-token={acct.token}", f"--{name}-user-id={acct.user_id}"]
        cmd += [f"--{name}-username={acct.username}"]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=INTEROP,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SCENARIO_TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"scenario did not finish in {SCENARIO_TIMEOUT} s:\n{err.decode()}")
    lines = out.decode().strip().splitlines()
    assert lines, f"scenario printed nothing (exit {proc.returncode}):\n{err.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0 and result["ok"], (
        f"scenario failed (exit {proc.returncode}): {result.get('error')}\n"
        f"steps: {result.get('steps')}\n--- stderr ---\n{err.decode()}"
    )
    return result


async def _history(client: WsClient, conversation_id: str) -> list[Any]:
    """Every event of the conversation the client may see, ascending (forward pages)."""
    events: list[Any] = []
    cursor = 0
    while True:
        page = await client.request(
            T.MESSAGE_HISTORY_REQUEST,
            pb.HistoryRequest(
                conversation_id=conversation_id,
                cursor_seq=cursor,
                limit=200,
                direction=pb.HISTORY_FORWARD,
            ),
            T.MESSAGE_HISTORY_RESPONSE,
        )
        events.extend(page.events)
        if not page.has_more:
            return events
        cursor = page.next_cursor_seq


async def test_ts_mls_clients_interoperate(tmp_path: Path) -> None:
    node = _node()
    data_dir = tmp_path / "data"
    async with running_server(data_dir, mls_validation="strict") as srv:
        # Three accounts, each from a real WebAuthn registration ceremony.
        accounts: dict[str, Account] = {}
        for name in ("alice", "bob", "carol"):
            client = await WsClient.connect(srv.url)
            accounts[name] = await register(client, name)
            await client.close()
        ids = {name: a.user_id for name, a in accounts.items()}
        # dave is registered but never joins the conversation (a Welcome to him: 4003).
        outsider = await WsClient.connect(srv.url)
        dave = await register(outsider, "dave")
        await outsider.close()

        result = await _run_scenario(node, srv.url, accounts, dave.user_id)
        members = result["members"]
        conversation_id = result["conversation_id"]

        # KeyPackages: real ones accepted under strict validation, forged ones refused.
        for name in ids:
            assert result["key_packages"][name] == {"batch": 5, "last_resort": 1}
        for check, refusal in result["negative"].items():
            assert refusal["ok"] is False and refusal["code"] == 5001, check
        assert "identity" in result["negative"]["identity_other_user_id"]["message"]
        assert "signature" in result["negative"]["bad_signature"]["message"]
        for suite, outcome in result["key_packages"]["extra_suites"].items():
            assert outcome["uncompressed_key"] == {"ok": True, "count": 1}, suite
            assert outcome["ts_mls_default_compressed_key"]["code"] == 5001, suite

        # Every application message was decrypted by every other member.
        rounds = {r["label"]: r for r in result["messages"]}
        assert set(rounds) == {"round1", "round2", "round3"}
        for name, m in members.items():
            got = {(r["from"], r["text"].split(":")[0]) for r in m["received"]}
            for other, uid in ids.items():
                if other != name:
                    for label in rounds:
                        assert (uid, label) in got, f"{name} missed {other}'s {label}"
            assert m["sent"] == 3

        # The race: exactly one 5004, the loser retried at the next epoch.
        race = result["race"]
        assert race["epoch_errors"] == 1
        assert {race["winner"], race["loser"]} == {"bob", "carol"}
        assert race["winner_result"]["ok"] and race["winner_result"]["epoch"] == race["epoch"]
        assert race["loser_error"]["code"] == 5004
        assert race["retry"] == {
            "ok": True,
            "seq": race["winner_result"]["seq"] + 1,
            "epoch": race["epoch"] + 1,
        }
        assert race["replay_error"]["code"] == 5004
        storm = result["storm"]
        assert sorted(storm["accepted_epochs"].values()) == [
            storm["from_epoch"] + i for i in range(3)
        ]

        # Commit bundles: every bad part refused the whole commit (epoch and GroupInfo kept).
        assert {k: v["code"] for k, v in result["bundles"]["refused"].items()} == {
            "group_info_for_old_epoch": 5002,
            "group_info_not_group_info": 5002,
            "welcome_other_conversation": 5003,
            "welcome_not_welcome": 5003,
            "welcome_non_member": 4003,
            "application_message_as_commit": 5002,
        }
        assert result["bundles"]["public_message_commit"]["ok"] is True

        # External join from the stored GroupInfo.
        ext = result["external_join"]
        assert ext["supported"] is True
        assert ext["group_info_epoch"] == ext["commit_epoch"] == ext["rejoined_epoch"] - 1

        # What the server says: the conversation's epoch, its GroupInfo, its history.
        alice = await WsClient.connect(srv.url)
        await resume(alice, accounts["alice"].token)
        listing = await alice.request(
            T.CONVERSATION_LIST_REQUEST, pb.ConversationListRequest(), T.CONVERSATION_LIST
        )
        (conv,) = [c for c in listing.conversations if c.conversation_id == conversation_id]
        assert {m.user_id for m in conv.members} == set(ids.values())
        server_epoch = conv.mls_epoch
        assert server_epoch == result["server_epoch"] == ext["rejoined_epoch"]
        for name, m in members.items():
            assert m["epoch"] == server_epoch, name
            assert sorted(m["members_in_tree"]) == sorted(ids.values()), name
        assert len({m["epoch_authenticator"] for m in members.values()}) == 1

        info = await alice.request(
            T.MLS_GROUP_INFO_FETCH,
            pb.GroupInfoFetch(conversation_id=conversation_id),
            T.MLS_GROUP_INFO,
        )
        assert info.epoch == server_epoch and info.group_info

        # One commit per epoch, in seq order; each member applied exactly that sequence
        # from its join on (earlier ones it skipped as "before join").
        events = await _history(alice, conversation_id)
        assert [e.seq for e in _decoded(events)] == list(range(1, len(events) + 1))
        commits = [e for e in _decoded(events) if isinstance(e, pb.MLSCommitBroadcast)]
        assert [c.epoch for c in commits] == list(range(server_epoch))
        order = [(c.seq, c.epoch, c.sender_id) for c in commits]
        for name, m in members.items():
            first = m["joined_epochs"][0]
            applied = [(c["seq"], c["epoch"], c["sender_id"]) for c in m["commits_applied"]]
            assert applied == [o for o in order if o[1] >= first], name
            skipped = [(s["seq"], s["epoch"]) for s in m["skipped"]]
            assert skipped == [(s, e) for s, e, _ in order if e < first], name
        assert members["carol"]["joined_epochs"] == [2, server_epoch]
        assert members["carol"]["commits_applied"][-1]["external"] is True
        messages = [e for e in _decoded(events) if isinstance(e, pb.MessageReceive)]
        assert len(messages) == 9
        assert all(e.message_type == "mls" for e in messages)
        await alice.close()

    # The server stored only ciphertext: no plaintext anywhere in the database.
    if pg.STORAGE == "postgres":
        stored = pg.stored_bytes(pg.database_for(data_dir))
    else:
        stored = b"".join(p.read_bytes() for p in data_dir.glob("sovereign.db*"))
    assert stored, "no database files found"
    assert b"hello from" not in stored


def _decoded(events: list[pb.Envelope]) -> list[Any]:
    kinds: dict[int, Any] = {
        T.MESSAGE_RECEIVE: pb.MessageReceive,
        T.MLS_COMMIT_BROADCAST: pb.MLSCommitBroadcast,
        T.GROUP_MEMBER_ADDED: pb.GroupMemberAdded,
        T.GROUP_MEMBER_REMOVED: pb.GroupMemberRemoved,
    }
    return [kinds[e.type].FromString(e.payload) for e in events]
