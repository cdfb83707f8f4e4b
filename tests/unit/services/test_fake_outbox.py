"""The fake outbox keeps the rules the services rely on, and renders errors exactly as
the real one: otherwise the service tests would test the fake."""

from __future__ import annotations

import pytest

from sovereign.codec import decode_envelope
from sovereign.errors import REGISTRY
from sovereign.protocol.types import MessageType as T
from sovereign.services.session import Session
from sovereign.transport.outbox import LocalOutbox
from sovereign.v1 import sovereign_pb2 as pb
from tests.helpers.fakes import FakeOutbox, decode


class RecordingLink:
    """Just enough of a transport Connection for LocalOutbox.send_error."""

    def __init__(self) -> None:
        self.transport = self
        self.sent: list[bytes] = []
        self.closed_with: int | None = None

    def send(self, _msg_type: object, envelope: bytes) -> None:
        self.sent.append(envelope)

    def close(self, code: int, _reason: str = "") -> None:
        self.closed_with = code


def ready_session(outbox: object, user_id: str = "u", link: object = None) -> Session:
    s = Session(1, link, outbox, None)  # type: ignore[arg-type]
    s.state.upgraded(0.0)
    s.state.authenticated()
    s.user_id = user_id
    return s


@pytest.mark.parametrize("code", sorted(REGISTRY))
def test_errors_render_and_close_as_the_real_outbox(code: int) -> None:
    link = RecordingLink()
    real = ready_session(None, link=link)
    LocalOutbox(1 << 20).send_error(real, code, "rid", "why", 7)
    fake_outbox = FakeOutbox()
    fake = ready_session(fake_outbox)
    fake_outbox.send_error(fake, code, "rid", "why", 7)
    [envelope] = link.sent
    assert fake_outbox.frames(fake) == [decode(envelope)]
    assert fake.state.close_code == link.closed_with == REGISTRY[code].close_code
    assert decode_envelope(envelope)[0] == (T.AUTH_ERROR if REGISTRY[code].auth else T.ERROR)


def test_corked_frames_leave_at_uncork_in_order_as_one_write_per_session() -> None:
    out = FakeOutbox()
    a, b = ready_session(out, "a"), ready_session(out, "b")
    for s in (a, b):
        out.attach(s)
        out.go_live(s)
    out.cork()
    out.send(a, T.ACK, "1", pb.Ack(count=1))
    out.publish_message(["a", "b"], T.TYPING_NOTIFY, pb.TypingNotify(user_id="x"))
    out.send(a, T.ACK, "2", pb.Ack(count=2))
    assert out.writes(a) == out.writes(b) == []
    out.uncork()
    [wa], [wb] = out.writes(a), out.writes(b)
    assert wa.via == wb.via == "flush"
    assert [(f.type, f.request_id) for f in wa.frames()] == [
        (T.ACK, "1"),
        (T.TYPING_NOTIFY, ""),
        (T.ACK, "2"),
    ]
    assert [f.type for f in wb.frames()] == [T.TYPING_NOTIFY]


def test_publish_reaches_attached_live_sessions_except_the_excluded_one() -> None:
    out = FakeOutbox()
    attached_not_live, live, excluded, detached = (ready_session(out, "u") for _ in range(4))
    for s in (attached_not_live, live, excluded):
        out.attach(s)
    for s in (live, excluded, detached):
        out.go_live(s)
    out.publish_message(["u"], T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id="v"), excluded)
    assert [len(out.frames(s)) for s in (attached_not_live, live, excluded, detached)] == [
        0,
        1,
        0,
        0,
    ]
    out.close(live, 4008)
    out.publish_message(["u"], T.PRESENCE_NOTIFY, pb.PresenceNotify(user_id="v"))
    out.send(live, T.ACK, "", pb.Ack())
    assert len(out.frames(live)) == 1 and live.state.close_code == 4008
