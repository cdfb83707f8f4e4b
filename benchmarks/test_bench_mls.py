"""MLS (RFC 9420) reader and KeyPackage validation microbenchmarks (SPEC §7).

Run: ``python -m pytest benchmarks/test_bench_mls.py -q --benchmark-only``.
The KeyPackages are made once per session by ``sovereign.mls.testing`` (MLSMessage
form, basic credential, 30-day lifetime); validation includes both signature checks
(LeafNodeTBS and KeyPackageTBS), so its cost is mostly two verifications.
"""

from __future__ import annotations

from typing import Any

import pytest

from sovereign.mls import (
    CONTENT_COMMIT,
    KeyPackage,
    MLSMessage,
    parse_commit_message,
    parse_key_package,
    validate_key_package,
)
from sovereign.mls import structs as s
from sovereign.mls.testing import build_key_package

NOW = 1_760_000_000
IDENTITY = b"01J9ZK3Q6V0000000000000000"
SUITES = {1: "Ed25519", 2: "P-256"}
BENCH = {"min_time": 0.0002, "warmup": True}
PACKAGES = {
    suite: build_key_package(suite, IDENTITY, not_before=NOW - 3600, not_after=NOW + 30 * 86400)
    for suite in SUITES
}


def _commit_message() -> bytes:
    """A PublicMessage commit from a member: 32-byte group_id, two Remove proposals."""
    remove = s.ProposalOrRef(proposal=s.Proposal(s.PROPOSAL_REMOVE, s.Remove(3)))
    content = s.FramedContent(
        group_id=bytes(range(32)),
        epoch=41,
        sender=s.Sender(s.SENDER_MEMBER, 0),
        authenticated_data=b"",
        content_type=CONTENT_COMMIT,
        body=s.Commit((remove, remove), None),
    )
    auth = s.FramedContentAuthData(signature=b"\x55" * 64, confirmation_tag=b"\x66" * 32)
    msg = s.PublicMessage(content, auth, membership_tag=b"\x77" * 32)
    return MLSMessage(1, 1, msg).encode()


@pytest.mark.benchmark(group="mls: parse a KeyPackage (MLSMessage form)", **BENCH)
@pytest.mark.parametrize("suite", sorted(SUITES), ids=lambda x: SUITES[x])
def test_parse_key_package(benchmark: Any, suite: int) -> None:
    kp = benchmark(parse_key_package, PACKAGES[suite])
    assert isinstance(kp, KeyPackage)
    assert kp.cipher_suite == suite and kp.leaf_node.credential.identity == IDENTITY


@pytest.mark.benchmark(group="mls: parse + validate a KeyPackage (2 signatures)", **BENCH)
@pytest.mark.parametrize("suite", sorted(SUITES), ids=lambda x: SUITES[x])
def test_validate_key_package(benchmark: Any, suite: int) -> None:
    def parse_and_validate(data: bytes) -> KeyPackage:
        kp = parse_key_package(data)
        validate_key_package(kp, allowed_identities={IDENTITY}, now=NOW)
        return kp

    kp = benchmark(parse_and_validate, PACKAGES[suite])
    assert kp.cipher_suite == suite


@pytest.mark.benchmark(group="mls: commit header (PublicMessage)", **BENCH)
def test_parse_commit_message(benchmark: Any) -> None:
    data = _commit_message()
    info = benchmark(parse_commit_message, data)
    assert (info.epoch, info.content_type, info.group_id) == (41, CONTENT_COMMIT, bytes(range(32)))
