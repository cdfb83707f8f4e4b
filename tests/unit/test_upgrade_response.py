"""The prepared 101 answer (transport/ws.py) is byte for byte picows' own."""

from __future__ import annotations

import pytest
from picows import WSUpgradeResponse

from sovereign.protocol import upgrade
from sovereign.transport.ws import _SWITCHING_HEAD, _Switching


@pytest.mark.parametrize("subprotocol", [None, upgrade.SUBPROTOCOL])
def test_the_prepared_101_is_picows_create_101_response(subprotocol: str | None) -> None:
    extra = {"Sec-WebSocket-Protocol": subprotocol} if subprotocol else None
    theirs = WSUpgradeResponse.create_101_response(extra)
    ours = _Switching(_SWITCHING_HEAD[subprotocol])
    assert ours.status == theirs.status == 101
    for r in (theirs, ours):  # what picows does to the answer before writing it
        r.headers["Sec-WebSocket-Accept"] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert bytes(ours.to_bytes()) == bytes(theirs.to_bytes())


def test_the_prepared_101_takes_only_the_accept_header() -> None:
    with pytest.raises(KeyError):
        _Switching(_SWITCHING_HEAD[None]).headers["Connection"] = "close"
