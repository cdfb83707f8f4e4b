"""RFC 9420 structures: decode from and re-encode to the exact wire bytes.

Each structure is a frozen dataclass with ``read(Reader)``/``write(Writer)`` and the
conveniences ``decode(data)`` (whole buffer, trailing bytes rejected) and ``encode()``.
Decoding is strict (minimal lengths, known enum values where the layout depends on
them, presence bytes 0/1), so the encoding of a decoded value is byte-identical to its
input. Section numbers refer to RFC 9420.

Enum values whose layout is fixed (cipher suites, extension types, capabilities lists,
``ProtocolVersion`` inside a KeyPackage) are kept as integers and not judged here: that
is :mod:`sovereign.mls.validate`'s job. Values that select a layout (wire_format,
content_type, sender_type, leaf_node_source, credential_type, proposal_type, psktype,
node_type, ProposalOrRef type) must be known, or decoding fails with ``bad enum value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

from sovereign.mls.wire import (
    BAD_ENUM,
    UNKNOWN_WIRE_FORMAT,
    UNSUPPORTED_VERSION,
    MLSDecodeError,
    Reader,
    Writer,
)

__all__ = [
    "CONTENT_APPLICATION",
    "CONTENT_COMMIT",
    "CONTENT_PROPOSAL",
    "CREDENTIAL_BASIC",
    "CREDENTIAL_X509",
    "LEAF_SOURCE_COMMIT",
    "LEAF_SOURCE_KEY_PACKAGE",
    "LEAF_SOURCE_UPDATE",
    "MLS10",
    "PROPOSAL_ADD",
    "PROPOSAL_EXTERNAL_INIT",
    "PROPOSAL_GROUP_CONTEXT_EXTENSIONS",
    "PROPOSAL_PSK",
    "PROPOSAL_REINIT",
    "PROPOSAL_REMOVE",
    "PROPOSAL_UPDATE",
    "SENDER_EXTERNAL",
    "SENDER_MEMBER",
    "SENDER_NEW_MEMBER_COMMIT",
    "SENDER_NEW_MEMBER_PROPOSAL",
    "WIRE_FORMAT_GROUP_INFO",
    "WIRE_FORMAT_KEY_PACKAGE",
    "WIRE_FORMAT_PRIVATE_MESSAGE",
    "WIRE_FORMAT_PUBLIC_MESSAGE",
    "WIRE_FORMAT_WELCOME",
    "Add",
    "Capabilities",
    "Commit",
    "Credential",
    "EncryptedGroupSecrets",
    "Extension",
    "ExternalInit",
    "FramedContent",
    "FramedContentAuthData",
    "GroupContext",
    "GroupContextExtensions",
    "GroupInfo",
    "GroupSecrets",
    "HPKECiphertext",
    "KeyPackage",
    "LeafNode",
    "Lifetime",
    "MLSMessage",
    "Node",
    "ParentNode",
    "PreSharedKey",
    "PreSharedKeyID",
    "PrivateMessage",
    "Proposal",
    "ProposalBody",
    "ProposalOrRef",
    "PublicMessage",
    "RatchetTree",
    "ReInit",
    "Remove",
    "Sender",
    "Update",
    "UpdatePath",
    "UpdatePathNode",
    "Welcome",
]

# ProtocolVersion (§6): mls10 = 1.
MLS10 = 1
# WireFormat (§6, §17.2).
WIRE_FORMAT_PUBLIC_MESSAGE = 1
WIRE_FORMAT_PRIVATE_MESSAGE = 2
WIRE_FORMAT_WELCOME = 3
WIRE_FORMAT_GROUP_INFO = 4
WIRE_FORMAT_KEY_PACKAGE = 5
# ContentType (§6).
CONTENT_APPLICATION = 1
CONTENT_PROPOSAL = 2
CONTENT_COMMIT = 3
# SenderType (§6).
SENDER_MEMBER = 1
SENDER_EXTERNAL = 2
SENDER_NEW_MEMBER_PROPOSAL = 3
SENDER_NEW_MEMBER_COMMIT = 4
# CredentialType (§5.3, §17.5).
CREDENTIAL_BASIC = 1
CREDENTIAL_X509 = 2
# LeafNodeSource (§7.2).
LEAF_SOURCE_KEY_PACKAGE = 1
LEAF_SOURCE_UPDATE = 2
LEAF_SOURCE_COMMIT = 3
# ProposalType (§12.1, §17.4).
PROPOSAL_ADD = 1
PROPOSAL_UPDATE = 2
PROPOSAL_REMOVE = 3
PROPOSAL_PSK = 4
PROPOSAL_REINIT = 5
PROPOSAL_EXTERNAL_INIT = 6
PROPOSAL_GROUP_CONTEXT_EXTENSIONS = 7
# PSKType (§8.4), ProposalOrRefType (§12.4), NodeType (§7.8).
_PSK_EXTERNAL, _PSK_RESUMPTION = 1, 2
_POR_PROPOSAL, _POR_REFERENCE = 1, 2
_NODE_LEAF, _NODE_PARENT = 1, 2


def _bad_enum(field: str, value: int) -> MLSDecodeError:
    return MLSDecodeError(field, BAD_ENUM, str(value))


class _Struct:
    """Shared ``decode``/``encode`` on top of each structure's ``read``/``write``."""

    __slots__ = ()

    @classmethod
    def read(cls, r: Reader) -> Self:
        raise NotImplementedError

    def write(self, w: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        """Decode exactly one structure from the whole of ``data``."""
        r = Reader(data)
        value = cls.read(r)
        r.finish(cls.__name__)
        return value

    def encode(self) -> bytes:
        w = Writer()
        self.write(w)
        return w.getvalue()


def _write(w: Writer, s: _Struct) -> None:
    s.write(w)


# --- common pieces ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extension(_Struct):
    """``struct { ExtensionType extension_type; opaque extension_data<V>; }`` (§7.2)."""

    extension_type: int
    extension_data: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.uint16("Extension.extension_type"), r.opaque("Extension.extension_data"))

    def write(self, w: Writer) -> None:
        w.uint16(self.extension_type)
        w.opaque(self.extension_data)


def _read_extensions(r: Reader, field: str) -> tuple[Extension, ...]:
    return r.vector(field, Extension.read)


@dataclass(frozen=True, slots=True)
class HPKECiphertext(_Struct):
    """``struct { opaque kem_output<V>; opaque ciphertext<V>; }`` (§7.6)."""

    kem_output: bytes
    ciphertext: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.opaque("HPKECiphertext.kem_output"), r.opaque("HPKECiphertext.ciphertext"))

    def write(self, w: Writer) -> None:
        w.opaque(self.kem_output)
        w.opaque(self.ciphertext)


@dataclass(frozen=True, slots=True)
class Credential(_Struct):
    """§5.3: ``basic`` carries ``opaque identity<V>``, ``x509`` a vector of
    ``Certificate { opaque cert_data<V>; }``. Exactly one of the two is set."""

    credential_type: int
    identity: bytes | None = None
    certificates: tuple[bytes, ...] | None = None

    @classmethod
    def read(cls, r: Reader) -> Self:
        ctype = r.uint16("Credential.credential_type")
        if ctype == CREDENTIAL_BASIC:
            return cls(ctype, identity=r.opaque("Credential.identity"))
        if ctype == CREDENTIAL_X509:
            certs = r.vector("Credential.certificates", lambda s: s.opaque("Certificate"))
            return cls(ctype, certificates=certs)
        raise _bad_enum("Credential.credential_type", ctype)

    def write(self, w: Writer) -> None:
        w.uint16(self.credential_type)
        if self.credential_type == CREDENTIAL_BASIC and self.identity is not None:
            w.opaque(self.identity)
        elif self.credential_type == CREDENTIAL_X509 and self.certificates is not None:
            w.vector(self.certificates, Writer.opaque)
        else:
            raise ValueError(f"Credential type {self.credential_type} without its body")


@dataclass(frozen=True, slots=True)
class Capabilities(_Struct):
    """§7.2: the versions, cipher suites, extension/proposal/credential types supported."""

    versions: tuple[int, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    proposals: tuple[int, ...]
    credentials: tuple[int, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.uint16_vector("Capabilities.versions"),
            r.uint16_vector("Capabilities.cipher_suites"),
            r.uint16_vector("Capabilities.extensions"),
            r.uint16_vector("Capabilities.proposals"),
            r.uint16_vector("Capabilities.credentials"),
        )

    def write(self, w: Writer) -> None:
        w.uint16_vector(self.versions)
        w.uint16_vector(self.cipher_suites)
        w.uint16_vector(self.extensions)
        w.uint16_vector(self.proposals)
        w.uint16_vector(self.credentials)


@dataclass(frozen=True, slots=True)
class Lifetime(_Struct):
    """``struct { uint64 not_before; uint64 not_after; }`` (§7.2), seconds since the epoch."""

    not_before: int
    not_after: int

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.uint64("Lifetime.not_before"), r.uint64("Lifetime.not_after"))

    def write(self, w: Writer) -> None:
        w.uint64(self.not_before)
        w.uint64(self.not_after)


@dataclass(frozen=True, slots=True)
class LeafNode(_Struct):
    """§7.2. ``lifetime`` is set iff the source is key_package, ``parent_hash`` iff commit."""

    encryption_key: bytes
    signature_key: bytes
    credential: Credential
    capabilities: Capabilities
    leaf_node_source: int
    lifetime: Lifetime | None
    parent_hash: bytes | None
    extensions: tuple[Extension, ...]
    signature: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        encryption_key = r.opaque("LeafNode.encryption_key")
        signature_key = r.opaque("LeafNode.signature_key")
        credential = Credential.read(r)
        capabilities = Capabilities.read(r)
        source = r.uint8("LeafNode.leaf_node_source")
        lifetime: Lifetime | None = None
        parent_hash: bytes | None = None
        if source == LEAF_SOURCE_KEY_PACKAGE:
            lifetime = Lifetime.read(r)
        elif source == LEAF_SOURCE_COMMIT:
            parent_hash = r.opaque("LeafNode.parent_hash")
        elif source != LEAF_SOURCE_UPDATE:
            raise _bad_enum("LeafNode.leaf_node_source", source)
        extensions = _read_extensions(r, "LeafNode.extensions")
        signature = r.opaque("LeafNode.signature")
        return cls(
            encryption_key,
            signature_key,
            credential,
            capabilities,
            source,
            lifetime,
            parent_hash,
            extensions,
            signature,
        )

    def write_tbs_content(self, w: Writer) -> None:
        """Everything but the signature: the start of LeafNodeTBS (§7.2)."""
        w.opaque(self.encryption_key)
        w.opaque(self.signature_key)
        self.credential.write(w)
        self.capabilities.write(w)
        w.uint8(self.leaf_node_source)
        if self.leaf_node_source == LEAF_SOURCE_KEY_PACKAGE:
            if self.lifetime is None:
                raise ValueError("key_package LeafNode without lifetime")
            self.lifetime.write(w)
        elif self.leaf_node_source == LEAF_SOURCE_COMMIT:
            if self.parent_hash is None:
                raise ValueError("commit LeafNode without parent_hash")
            w.opaque(self.parent_hash)
        w.vector(self.extensions, _write)

    def tbs(self, group_id: bytes | None = None, leaf_index: int | None = None) -> bytes:
        """LeafNodeTBS (§7.2): the content, then for update/commit sources the group_id
        and leaf_index the leaf is bound to; nothing more for key_package."""
        w = Writer()
        self.write_tbs_content(w)
        if self.leaf_node_source in (LEAF_SOURCE_UPDATE, LEAF_SOURCE_COMMIT):
            if group_id is None or leaf_index is None:
                raise ValueError("LeafNodeTBS of an update/commit leaf needs group_id and index")
            w.opaque(group_id)
            w.uint32(leaf_index)
        return w.getvalue()

    def write(self, w: Writer) -> None:
        self.write_tbs_content(w)
        w.opaque(self.signature)


@dataclass(frozen=True, slots=True)
class KeyPackage(_Struct):
    """§10: version, cipher_suite, init_key, leaf_node, extensions, signature."""

    version: int
    cipher_suite: int
    init_key: bytes
    leaf_node: LeafNode
    extensions: tuple[Extension, ...]
    signature: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        version = r.uint16("KeyPackage.version")
        cipher_suite = r.uint16("KeyPackage.cipher_suite")
        init_key = r.opaque("KeyPackage.init_key")
        leaf_node = LeafNode.read(r)
        extensions = _read_extensions(r, "KeyPackage.extensions")
        signature = r.opaque("KeyPackage.signature")
        return cls(version, cipher_suite, init_key, leaf_node, extensions, signature)

    def tbs(self) -> bytes:
        """KeyPackageTBS (§10): everything but the signature."""
        w = Writer()
        self.write_tbs(w)
        return w.getvalue()

    def write_tbs(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        w.opaque(self.init_key)
        self.leaf_node.write(w)
        w.vector(self.extensions, _write)

    def write(self, w: Writer) -> None:
        self.write_tbs(w)
        w.opaque(self.signature)


# --- proposals (§12.1) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Add(_Struct):
    key_package: KeyPackage

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(KeyPackage.read(r))

    def write(self, w: Writer) -> None:
        self.key_package.write(w)


@dataclass(frozen=True, slots=True)
class Update(_Struct):
    leaf_node: LeafNode

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(LeafNode.read(r))

    def write(self, w: Writer) -> None:
        self.leaf_node.write(w)


@dataclass(frozen=True, slots=True)
class Remove(_Struct):
    removed: int

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.uint32("Remove.removed"))

    def write(self, w: Writer) -> None:
        w.uint32(self.removed)


@dataclass(frozen=True, slots=True)
class PreSharedKeyID(_Struct):
    """§8.4: external (psk_id) or resumption (usage, psk_group_id, psk_epoch), then nonce."""

    psktype: int
    psk_id: bytes | None
    usage: int | None
    psk_group_id: bytes | None
    psk_epoch: int | None
    psk_nonce: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        psktype = r.uint8("PreSharedKeyID.psktype")
        if psktype == _PSK_EXTERNAL:
            psk_id = r.opaque("PreSharedKeyID.psk_id")
            return cls(psktype, psk_id, None, None, None, r.opaque("PreSharedKeyID.psk_nonce"))
        if psktype == _PSK_RESUMPTION:
            usage = r.uint8("PreSharedKeyID.usage")
            group_id = r.opaque("PreSharedKeyID.psk_group_id")
            epoch = r.uint64("PreSharedKeyID.psk_epoch")
            nonce = r.opaque("PreSharedKeyID.psk_nonce")
            return cls(psktype, None, usage, group_id, epoch, nonce)
        raise _bad_enum("PreSharedKeyID.psktype", psktype)

    def write(self, w: Writer) -> None:
        w.uint8(self.psktype)
        if self.psktype == _PSK_EXTERNAL and self.psk_id is not None:
            w.opaque(self.psk_id)
        elif (
            self.psktype == _PSK_RESUMPTION
            and self.usage is not None
            and self.psk_group_id is not None
            and self.psk_epoch is not None
        ):
            w.uint8(self.usage)
            w.opaque(self.psk_group_id)
            w.uint64(self.psk_epoch)
        else:
            raise ValueError(f"PreSharedKeyID type {self.psktype} without its fields")
        w.opaque(self.psk_nonce)


@dataclass(frozen=True, slots=True)
class PreSharedKey(_Struct):
    psk: PreSharedKeyID

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(PreSharedKeyID.read(r))

    def write(self, w: Writer) -> None:
        self.psk.write(w)


@dataclass(frozen=True, slots=True)
class ReInit(_Struct):
    group_id: bytes
    version: int
    cipher_suite: int
    extensions: tuple[Extension, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.opaque("ReInit.group_id"),
            r.uint16("ReInit.version"),
            r.uint16("ReInit.cipher_suite"),
            _read_extensions(r, "ReInit.extensions"),
        )

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        w.vector(self.extensions, _write)


@dataclass(frozen=True, slots=True)
class ExternalInit(_Struct):
    kem_output: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.opaque("ExternalInit.kem_output"))

    def write(self, w: Writer) -> None:
        w.opaque(self.kem_output)


@dataclass(frozen=True, slots=True)
class GroupContextExtensions(_Struct):
    extensions: tuple[Extension, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(_read_extensions(r, "GroupContextExtensions.extensions"))

    def write(self, w: Writer) -> None:
        w.vector(self.extensions, _write)


ProposalBody = Add | Update | Remove | PreSharedKey | ReInit | ExternalInit | GroupContextExtensions

_PROPOSAL_BODIES: dict[int, type[ProposalBody]] = {
    PROPOSAL_ADD: Add,
    PROPOSAL_UPDATE: Update,
    PROPOSAL_REMOVE: Remove,
    PROPOSAL_PSK: PreSharedKey,
    PROPOSAL_REINIT: ReInit,
    PROPOSAL_EXTERNAL_INIT: ExternalInit,
    PROPOSAL_GROUP_CONTEXT_EXTENSIONS: GroupContextExtensions,
}


@dataclass(frozen=True, slots=True)
class Proposal(_Struct):
    """``struct { ProposalType proposal_type; select (...) { ... }; }`` (§12.1)."""

    proposal_type: int
    body: ProposalBody

    @classmethod
    def read(cls, r: Reader) -> Self:
        ptype = r.uint16("Proposal.proposal_type")
        body_cls = _PROPOSAL_BODIES.get(ptype)
        if body_cls is None:
            raise _bad_enum("Proposal.proposal_type", ptype)
        return cls(ptype, body_cls.read(r))

    def write(self, w: Writer) -> None:
        if _PROPOSAL_BODIES.get(self.proposal_type) is not type(self.body):
            raise ValueError(f"Proposal type {self.proposal_type} with a {type(self.body)}")
        w.uint16(self.proposal_type)
        self.body.write(w)


# --- commit (§12.4) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposalOrRef(_Struct):
    """A proposal by value (type 1) or by reference (type 2, ``opaque ProposalRef<V>``)."""

    proposal: Proposal | None = None
    reference: bytes | None = None

    @classmethod
    def read(cls, r: Reader) -> Self:
        t = r.uint8("ProposalOrRef.type")
        if t == _POR_PROPOSAL:
            return cls(proposal=Proposal.read(r))
        if t == _POR_REFERENCE:
            return cls(reference=r.opaque("ProposalOrRef.reference"))
        raise _bad_enum("ProposalOrRef.type", t)

    def write(self, w: Writer) -> None:
        if self.proposal is not None:
            w.uint8(_POR_PROPOSAL)
            self.proposal.write(w)
        elif self.reference is not None:
            w.uint8(_POR_REFERENCE)
            w.opaque(self.reference)
        else:
            raise ValueError("ProposalOrRef without proposal or reference")


@dataclass(frozen=True, slots=True)
class UpdatePathNode(_Struct):
    encryption_key: bytes
    encrypted_path_secret: tuple[HPKECiphertext, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.opaque("UpdatePathNode.encryption_key"),
            r.vector("UpdatePathNode.encrypted_path_secret", HPKECiphertext.read),
        )

    def write(self, w: Writer) -> None:
        w.opaque(self.encryption_key)
        w.vector(self.encrypted_path_secret, _write)


@dataclass(frozen=True, slots=True)
class UpdatePath(_Struct):
    leaf_node: LeafNode
    nodes: tuple[UpdatePathNode, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(LeafNode.read(r), r.vector("UpdatePath.nodes", UpdatePathNode.read))

    def write(self, w: Writer) -> None:
        self.leaf_node.write(w)
        w.vector(self.nodes, _write)


@dataclass(frozen=True, slots=True)
class Commit(_Struct):
    """``struct { ProposalOrRef proposals<V>; optional<UpdatePath> path; }``."""

    proposals: tuple[ProposalOrRef, ...]
    path: UpdatePath | None

    @classmethod
    def read(cls, r: Reader) -> Self:
        proposals = r.vector("Commit.proposals", ProposalOrRef.read)
        path = UpdatePath.read(r) if r.present("Commit.path") else None
        return cls(proposals, path)

    def write(self, w: Writer) -> None:
        w.vector(self.proposals, _write)
        w.present(self.path is not None)
        if self.path is not None:
            self.path.write(w)


# --- ratchet tree (§7.8, §12.4.3.3) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParentNode(_Struct):
    encryption_key: bytes
    parent_hash: bytes
    unmerged_leaves: tuple[int, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.opaque("ParentNode.encryption_key"),
            r.opaque("ParentNode.parent_hash"),
            r.uint32_vector("ParentNode.unmerged_leaves"),
        )

    def write(self, w: Writer) -> None:
        w.opaque(self.encryption_key)
        w.opaque(self.parent_hash)
        w.uint32_vector(self.unmerged_leaves)


@dataclass(frozen=True, slots=True)
class Node(_Struct):
    """``struct { NodeType node_type; select { leaf: LeafNode; parent: ParentNode } }``."""

    node: LeafNode | ParentNode

    @classmethod
    def read(cls, r: Reader) -> Self:
        t = r.uint8("Node.node_type")
        if t == _NODE_LEAF:
            return cls(LeafNode.read(r))
        if t == _NODE_PARENT:
            return cls(ParentNode.read(r))
        raise _bad_enum("Node.node_type", t)

    def write(self, w: Writer) -> None:
        w.uint8(_NODE_LEAF if isinstance(self.node, LeafNode) else _NODE_PARENT)
        self.node.write(w)


def _read_optional_node(r: Reader) -> Node | None:
    return Node.read(r) if r.present("ratchet_tree.node") else None


def _write_optional_node(w: Writer, node: Node | None) -> None:
    w.present(node is not None)
    if node is not None:
        node.write(w)


@dataclass(frozen=True, slots=True)
class RatchetTree(_Struct):
    """``optional<Node> ratchet_tree<V>`` (the ``ratchet_tree`` extension's data)."""

    nodes: tuple[Node | None, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.vector("RatchetTree.nodes", _read_optional_node))

    def write(self, w: Writer) -> None:
        w.vector(self.nodes, _write_optional_node)


# --- welcome, group info (§12.4.3) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupSecrets(_Struct):
    joiner_secret: bytes
    path_secret: bytes | None
    psks: tuple[PreSharedKeyID, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        joiner_secret = r.opaque("GroupSecrets.joiner_secret")
        path_secret = r.opaque("PathSecret") if r.present("GroupSecrets.path_secret") else None
        return cls(joiner_secret, path_secret, r.vector("GroupSecrets.psks", PreSharedKeyID.read))

    def write(self, w: Writer) -> None:
        w.opaque(self.joiner_secret)
        w.present(self.path_secret is not None)
        if self.path_secret is not None:
            w.opaque(self.path_secret)
        w.vector(self.psks, _write)


@dataclass(frozen=True, slots=True)
class EncryptedGroupSecrets(_Struct):
    new_member: bytes  # KeyPackageRef: opaque HashReference<V>
    encrypted_group_secrets: HPKECiphertext

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.opaque("EncryptedGroupSecrets.new_member"), HPKECiphertext.read(r))

    def write(self, w: Writer) -> None:
        w.opaque(self.new_member)
        self.encrypted_group_secrets.write(w)


@dataclass(frozen=True, slots=True)
class Welcome(_Struct):
    cipher_suite: int
    secrets: tuple[EncryptedGroupSecrets, ...]
    encrypted_group_info: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.uint16("Welcome.cipher_suite"),
            r.vector("Welcome.secrets", EncryptedGroupSecrets.read),
            r.opaque("Welcome.encrypted_group_info"),
        )

    def write(self, w: Writer) -> None:
        w.uint16(self.cipher_suite)
        w.vector(self.secrets, _write)
        w.opaque(self.encrypted_group_info)


@dataclass(frozen=True, slots=True)
class GroupContext(_Struct):
    version: int
    cipher_suite: int
    group_id: bytes
    epoch: int
    tree_hash: bytes
    confirmed_transcript_hash: bytes
    extensions: tuple[Extension, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            r.uint16("GroupContext.version"),
            r.uint16("GroupContext.cipher_suite"),
            r.opaque("GroupContext.group_id"),
            r.uint64("GroupContext.epoch"),
            r.opaque("GroupContext.tree_hash"),
            r.opaque("GroupContext.confirmed_transcript_hash"),
            _read_extensions(r, "GroupContext.extensions"),
        )

    def write(self, w: Writer) -> None:
        w.uint16(self.version)
        w.uint16(self.cipher_suite)
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.opaque(self.tree_hash)
        w.opaque(self.confirmed_transcript_hash)
        w.vector(self.extensions, _write)


@dataclass(frozen=True, slots=True)
class GroupInfo(_Struct):
    group_context: GroupContext
    extensions: tuple[Extension, ...]
    confirmation_tag: bytes
    signer: int
    signature: bytes

    @property
    def group_id(self) -> bytes:
        return self.group_context.group_id

    @property
    def epoch(self) -> int:
        return self.group_context.epoch

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(
            GroupContext.read(r),
            _read_extensions(r, "GroupInfo.extensions"),
            r.opaque("GroupInfo.confirmation_tag"),
            r.uint32("GroupInfo.signer"),
            r.opaque("GroupInfo.signature"),
        )

    def write(self, w: Writer) -> None:
        self.group_context.write(w)
        w.vector(self.extensions, _write)
        w.opaque(self.confirmation_tag)
        w.uint32(self.signer)
        w.opaque(self.signature)


# --- framing (§6) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sender(_Struct):
    """member → leaf_index, external → sender_index, new_member_* → no index."""

    sender_type: int
    index: int | None = None

    @classmethod
    def read(cls, r: Reader) -> Self:
        t = r.uint8("Sender.sender_type")
        if t == SENDER_MEMBER:
            return cls(t, r.uint32("Sender.leaf_index"))
        if t == SENDER_EXTERNAL:
            return cls(t, r.uint32("Sender.sender_index"))
        if t in (SENDER_NEW_MEMBER_PROPOSAL, SENDER_NEW_MEMBER_COMMIT):
            return cls(t)
        raise _bad_enum("Sender.sender_type", t)

    def write(self, w: Writer) -> None:
        w.uint8(self.sender_type)
        if self.sender_type in (SENDER_MEMBER, SENDER_EXTERNAL):
            if self.index is None:
                raise ValueError("member/external Sender without an index")
            w.uint32(self.index)


@dataclass(frozen=True, slots=True)
class FramedContent(_Struct):
    """group_id, epoch, sender, authenticated_data, content_type and its body:
    ``bytes`` (application_data), :class:`Proposal` or :class:`Commit`."""

    group_id: bytes
    epoch: int
    sender: Sender
    authenticated_data: bytes
    content_type: int
    body: bytes | Proposal | Commit

    @classmethod
    def read(cls, r: Reader) -> Self:
        group_id = r.opaque("FramedContent.group_id")
        epoch = r.uint64("FramedContent.epoch")
        sender = Sender.read(r)
        authenticated_data = r.opaque("FramedContent.authenticated_data")
        ctype = r.uint8("FramedContent.content_type")
        body: bytes | Proposal | Commit
        if ctype == CONTENT_APPLICATION:
            body = r.opaque("FramedContent.application_data")
        elif ctype == CONTENT_PROPOSAL:
            body = Proposal.read(r)
        elif ctype == CONTENT_COMMIT:
            body = Commit.read(r)
        else:
            raise _bad_enum("FramedContent.content_type", ctype)
        return cls(group_id, epoch, sender, authenticated_data, ctype, body)

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        self.sender.write(w)
        w.opaque(self.authenticated_data)
        w.uint8(self.content_type)
        body = self.body
        if self.content_type == CONTENT_APPLICATION and isinstance(body, bytes):
            w.opaque(body)
        elif (self.content_type == CONTENT_PROPOSAL and isinstance(body, Proposal)) or (
            self.content_type == CONTENT_COMMIT and isinstance(body, Commit)
        ):
            body.write(w)
        else:
            raise ValueError(f"content_type {self.content_type} with a {type(body)} body")


@dataclass(frozen=True, slots=True)
class FramedContentAuthData:
    """``opaque signature<V>``, then ``MAC confirmation_tag`` (``opaque<V>``) for commits."""

    signature: bytes
    confirmation_tag: bytes | None

    @classmethod
    def read(cls, r: Reader, content_type: int) -> Self:
        signature = r.opaque("FramedContentAuthData.signature")
        tag = (
            r.opaque("FramedContentAuthData.confirmation_tag")
            if content_type == CONTENT_COMMIT
            else None
        )
        return cls(signature, tag)

    def write(self, w: Writer, content_type: int) -> None:
        w.opaque(self.signature)
        if content_type == CONTENT_COMMIT:
            if self.confirmation_tag is None:
                raise ValueError("commit auth data without confirmation_tag")
            w.opaque(self.confirmation_tag)


@dataclass(frozen=True, slots=True)
class PublicMessage(_Struct):
    """FramedContent, FramedContentAuthData, and ``membership_tag`` iff sender is member."""

    content: FramedContent
    auth: FramedContentAuthData
    membership_tag: bytes | None

    @classmethod
    def read(cls, r: Reader) -> Self:
        content = FramedContent.read(r)
        auth = FramedContentAuthData.read(r, content.content_type)
        tag = (
            r.opaque("PublicMessage.membership_tag")
            if content.sender.sender_type == SENDER_MEMBER
            else None
        )
        return cls(content, auth, tag)

    def write(self, w: Writer) -> None:
        self.content.write(w)
        self.auth.write(w, self.content.content_type)
        if self.content.sender.sender_type == SENDER_MEMBER:
            if self.membership_tag is None:
                raise ValueError("member PublicMessage without membership_tag")
            w.opaque(self.membership_tag)


@dataclass(frozen=True, slots=True)
class PrivateMessage(_Struct):
    """The clear-text header of a PrivateMessage; sender and content stay encrypted."""

    group_id: bytes
    epoch: int
    content_type: int
    authenticated_data: bytes
    encrypted_sender_data: bytes
    ciphertext: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        group_id = r.opaque("PrivateMessage.group_id")
        epoch = r.uint64("PrivateMessage.epoch")
        ctype = r.uint8("PrivateMessage.content_type")
        if ctype not in (CONTENT_APPLICATION, CONTENT_PROPOSAL, CONTENT_COMMIT):
            raise _bad_enum("PrivateMessage.content_type", ctype)
        return cls(
            group_id,
            epoch,
            ctype,
            r.opaque("PrivateMessage.authenticated_data"),
            r.opaque("PrivateMessage.encrypted_sender_data"),
            r.opaque("PrivateMessage.ciphertext"),
        )

    def write(self, w: Writer) -> None:
        w.opaque(self.group_id)
        w.uint64(self.epoch)
        w.uint8(self.content_type)
        w.opaque(self.authenticated_data)
        w.opaque(self.encrypted_sender_data)
        w.opaque(self.ciphertext)


MessageBody = PublicMessage | PrivateMessage | Welcome | GroupInfo | KeyPackage

_MESSAGE_BODIES: dict[int, type[MessageBody]] = {
    WIRE_FORMAT_PUBLIC_MESSAGE: PublicMessage,
    WIRE_FORMAT_PRIVATE_MESSAGE: PrivateMessage,
    WIRE_FORMAT_WELCOME: Welcome,
    WIRE_FORMAT_GROUP_INFO: GroupInfo,
    WIRE_FORMAT_KEY_PACKAGE: KeyPackage,
}


@dataclass(frozen=True, slots=True)
class MLSMessage(_Struct):
    """``struct { ProtocolVersion version = mls10; WireFormat wire_format; select ... }``.

    Only mls10 is accepted (no other version's layout is defined)."""

    WIRE_FORMATS: ClassVar[dict[int, type[MessageBody]]] = _MESSAGE_BODIES

    version: int
    wire_format: int
    body: MessageBody

    @classmethod
    def read(cls, r: Reader) -> Self:
        version = r.uint16("MLSMessage.version")
        if version != MLS10:
            raise MLSDecodeError("MLSMessage.version", UNSUPPORTED_VERSION, str(version))
        wire_format = r.uint16("MLSMessage.wire_format")
        body_cls = _MESSAGE_BODIES.get(wire_format)
        if body_cls is None:
            raise MLSDecodeError("MLSMessage.wire_format", UNKNOWN_WIRE_FORMAT, str(wire_format))
        return cls(version, wire_format, body_cls.read(r))

    def write(self, w: Writer) -> None:
        if _MESSAGE_BODIES.get(self.wire_format) is not type(self.body):
            raise ValueError(f"wire_format {self.wire_format} with a {type(self.body)}")
        w.uint16(self.version)
        w.uint16(self.wire_format)
        self.body.write(w)
