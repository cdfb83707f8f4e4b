"""Generated structures (any field values, long vectors) survive encode → decode."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign.mls import structs as s
from sovereign.mls.api import parse_commit_message, parse_key_package

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
blob = st.binary(max_size=80) | st.binary(min_size=60, max_size=20_000)
small = st.binary(max_size=40)

extensions = st.lists(st.builds(s.Extension, u16, small), max_size=4).map(tuple)
credentials = st.builds(lambda i: s.Credential(s.CREDENTIAL_BASIC, identity=i), small) | st.builds(
    lambda c: s.Credential(s.CREDENTIAL_X509, certificates=tuple(c)),
    st.lists(small, max_size=3),
)
ints16 = st.lists(u16, max_size=6).map(tuple)
capabilities = st.builds(s.Capabilities, ints16, ints16, ints16, ints16, ints16)


@st.composite
def leaf_nodes(draw: st.DrawFn) -> s.LeafNode:
    source = draw(st.sampled_from([1, 2, 3]))
    return s.LeafNode(
        encryption_key=draw(small),
        signature_key=draw(small),
        credential=draw(credentials),
        capabilities=draw(capabilities),
        leaf_node_source=source,
        lifetime=s.Lifetime(draw(u64), draw(u64)) if source == 1 else None,
        parent_hash=draw(small) if source == 3 else None,
        extensions=draw(extensions),
        signature=draw(blob),
    )


key_packages = st.builds(s.KeyPackage, u16, u16, small, leaf_nodes(), extensions, blob)
senders = st.builds(s.Sender, st.sampled_from([1, 2]), u32) | st.builds(
    s.Sender, st.sampled_from([3, 4])
)


@st.composite
def public_messages(draw: st.DrawFn) -> s.PublicMessage:
    ctype = draw(st.sampled_from([1, 2, 3]))
    body: bytes | s.Proposal | s.Commit
    if ctype == 1:
        body = draw(blob)
    elif ctype == 2:
        body = s.Proposal(s.PROPOSAL_REMOVE, s.Remove(draw(u32)))
    else:
        refs = draw(st.lists(small.map(lambda r: s.ProposalOrRef(reference=r)), max_size=3))
        body = s.Commit(tuple(refs), None)
    sender = draw(senders)
    content = s.FramedContent(draw(small), draw(u64), sender, draw(small), ctype, body)
    auth = s.FramedContentAuthData(draw(small), draw(small) if ctype == 3 else None)
    tag = draw(small) if sender.sender_type == s.SENDER_MEMBER else None
    return s.PublicMessage(content, auth, tag)


@settings(max_examples=150, deadline=None)
@given(key_packages)
def test_key_package_roundtrip(kp: s.KeyPackage) -> None:
    data = kp.encode()
    assert s.KeyPackage.decode(data) == kp
    wrapped = s.MLSMessage(1, s.WIRE_FORMAT_KEY_PACKAGE, kp).encode()
    assert parse_key_package(wrapped) == kp
    assert parse_key_package(data) == kp  # the bare form (suite 5 looks like a header)


@settings(max_examples=150, deadline=None)
@given(public_messages())
def test_public_message_roundtrip(msg: s.PublicMessage) -> None:
    data = s.MLSMessage(1, s.WIRE_FORMAT_PUBLIC_MESSAGE, msg).encode()
    assert s.MLSMessage.decode(data).body == msg
    info = parse_commit_message(data)
    assert (info.group_id, info.epoch, info.content_type) == (
        msg.content.group_id,
        msg.content.epoch,
        msg.content.content_type,
    )


@settings(max_examples=100, deadline=None)
@given(small, u64, st.sampled_from([1, 2, 3]), small, small, blob)
def test_private_message_roundtrip(
    gid: bytes, epoch: int, ctype: int, aad: bytes, esd: bytes, ct: bytes
) -> None:
    msg = s.PrivateMessage(gid, epoch, ctype, aad, esd, ct)
    data = s.MLSMessage(1, s.WIRE_FORMAT_PRIVATE_MESSAGE, msg).encode()
    info = parse_commit_message(data)
    assert (info.group_id, info.epoch, info.content_type, info.wire_format) == (
        gid,
        epoch,
        ctype,
        2,
    )
