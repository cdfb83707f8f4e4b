"""Fuzz target: everything that reads bytes a client chose, before any storage.

``make fuzz`` runs it under atheris (libFuzzer, coverage-guided) for FUZZ_SECONDS;
``tests/unit/test_fuzz_target.py`` runs :func:`one_input` over hypothesis inputs in
the normal suite. The first byte picks a target:

0. frame rules (``protocol/frames.py``): a sequence of frames (opcode, FIN, RSV,
   payload) through one FrameAssembler with a pre-READY fragment cap; the buffer
   never exceeds its cap, a delivered message never exceeds the limit;
1. Envelope decoding: the compiled codec and its pure twin agree (value or error);
2. dispatch: both dispatchers, over the real pre-auth gate, size limit and rate
   bucket, with every client-to-server type's payload parsed by the API's own
   ``parse`` (3001 / 1006 on failure); both must reject with the same code;
3. the MLS reader (RFC 9420 wire format): MLSMessage, KeyPackage, commit, welcome and
   GroupInfo parsers raise only ``ValueError`` subclasses (MLSDecodeError and kin).

Anything else raised is a finding.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Any

from google.protobuf.message import Message

from sovereign import mls
from sovereign.api.parsing import parse
from sovereign.codec.envelope import EnvelopeError
from sovereign.protocol import frames
from sovereign.protocol.types import PRE_AUTH_TYPES
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

MAX_MESSAGE = 4096
FRAGMENT_CAP = 512


def _twins(component: str) -> list[Any]:
    mods = [importlib.import_module(f"sovereign.{p}") for p in _PATHS[component]]
    return mods


_PATHS = {
    "envelope": ("_fast.envelope", "codec.envelope"),
    "dispatch": ("_fast.dispatch", "protocol.dispatch"),
}
ENVELOPES = _twins("envelope")
DISPATCHERS = _twins("dispatch")

#: client-to-server request types and their payload messages (SPEC §3)
REQUESTS: dict[int, type[Message]] = {
    T.AUTH_REQUEST: pb.AuthRequest,
    T.AUTH_RESPONSE: pb.AuthResponse,
    T.AUTH_REGISTER_REQUEST: pb.AuthRegisterRequest,
    T.AUTH_REGISTER_RESPONSE: pb.AuthRegisterResponse,
    T.MESSAGE_SEND: pb.MessageSend,
    T.MESSAGE_ACK: pb.MessageAck,
    T.MESSAGE_HISTORY_REQUEST: pb.HistoryRequest,
    T.MESSAGE_READ: pb.ReadMarker,
    T.GROUP_CREATE: pb.GroupCreate,
    T.GROUP_INVITE: pb.GroupInvite,
    T.GROUP_LEAVE: pb.GroupLeave,
    T.GROUP_REMOVE: pb.GroupRemove,
    T.MLS_KEY_PACKAGE_UPLOAD: pb.MLSKeyPackageUpload,
    T.MLS_KEY_PACKAGE_FETCH: pb.MLSKeyPackageFetch,
    T.MLS_WELCOME: pb.MLSWelcome,
    T.MLS_COMMIT: pb.MLSCommit,
    T.MLS_GROUP_INFO_FETCH: pb.GroupInfoFetch,
    T.PRESENCE_UPDATE: pb.PresenceUpdate,
    T.TYPING: pb.Typing,
    T.PING: pb.Ping,
}


class _Conn:
    """What the dispatcher and ``parse`` call back: records refusals and errors."""

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self.codes: list[int] = []

    def reject(self, code: int, request_id: str, retry_after_ms: int) -> None:
        self.codes.append(code)

    def send_error(self, s: Any, code: int, rid: str = "", msg: str = "", retry: int = 0) -> None:
        self.codes.append(code)


def _handlers(out: _Conn) -> dict[int, Any]:
    def make(cls: type[Message]) -> Any:
        def handler(s: Any, _t: int, rid: str, payload: memoryview) -> None:
            msg = parse(out, s, cls, payload, rid)  # type: ignore[arg-type]
            if msg is not None:
                msg.SerializeToString()  # parsed: it must re-encode

        return handler

    return {int(t): make(cls) for t, cls in REQUESTS.items()}


def fuzz_frames(data: bytes) -> None:
    fa = frames.FrameAssembler(MAX_MESSAGE, FRAGMENT_CAP)
    i = 0
    while i + 2 <= len(data):
        head, size = data[i], data[i + 1] * 24
        i += 2
        payload = data[i : i + size]
        i += size
        opcode, fin, rsv = head & 0x0F, bool(head & 0x80), bool(head & 0x70)
        verdict = fa.receive(opcode, fin, rsv, memoryview(payload), len(payload))
        assert 0 <= verdict < len(frames.VERDICT_NAMES)
        assert fa.buffered <= FRAGMENT_CAP
        if verdict == frames.DELIVER:
            assert len(fa.message) <= MAX_MESSAGE
        if verdict in (frames.FAIL, frames.ECHO_CLOSE):
            assert frames.sendable_close_code(fa.close_code)
            assert fa.ended
        if head == 0xFF:
            fa.set_fragment_limit(MAX_MESSAGE)  # READY mid-stream


def fuzz_envelope(data: bytes) -> None:
    results = []
    for mod in ENVELOPES:
        try:
            t, rid, payload = mod.decode_envelope(data)
            results.append((t, rid, bytes(payload)))
        except EnvelopeError as exc:
            results.append(("error", str(exc)))
    assert all(r == results[0] for r in results), results


def fuzz_dispatch(data: bytes) -> None:
    ready = bool(data[:1]) and data[0] & 1 == 1
    body = data[1:]
    seen = []
    for mod in DISPATCHERS:
        out = _Conn(ready)
        d = mod.Dispatcher(_handlers(out), [int(t) for t in PRE_AUTH_TYPES], MAX_MESSAGE)
        bucket = mod.TokenBucket(1000.0, 1000, 0.0)

        class S:
            pass

        s = S()
        s.ready = ready  # type: ignore[attr-defined]
        s.reject = out.reject  # type: ignore[attr-defined]
        d.dispatch(s, bucket, body, ready, 0.0)
        seen.append(out.codes)
    assert all(c == seen[0] for c in seen), seen


MLS_PARSERS = (
    mls.parse_mls_message,
    mls.parse_key_package,
    mls.parse_commit_message,
    mls.parse_welcome_message,
    mls.parse_group_info_message,
)


def fuzz_mls(data: bytes) -> None:
    for parser in MLS_PARSERS:
        with contextlib.suppress(ValueError):  # MLSDecodeError and the documented refusals
            parser(data)


TARGETS = (fuzz_frames, fuzz_envelope, fuzz_dispatch, fuzz_mls)


def one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    import atheris  # the dev extras; ``make fuzz``

    atheris.instrument_all()  # coverage guidance over every module loaded above
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
