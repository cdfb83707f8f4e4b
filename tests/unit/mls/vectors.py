"""Loading the MLS working-group vectors copied into ``tests/vectors`` (see its README).

``SOVEREIGN_MLS_VECTORS`` may name a directory holding the full upstream
``messages.json`` (300 entries) to run the vector tests over all of it instead of the
60-entry subset kept in the repository.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parents[2] / "vectors"

# messages.json field → what it holds.
MLS_MESSAGE_FIELDS = (
    "mls_welcome",
    "mls_group_info",
    "mls_key_package",
    "public_message_application",
    "public_message_proposal",
    "public_message_commit",
    "private_message",
)
BARE_FIELDS = (
    "ratchet_tree",
    "group_secrets",
    "add_proposal",
    "update_proposal",
    "remove_proposal",
    "pre_shared_key_proposal",
    "re_init_proposal",
    "external_init_proposal",
    "group_context_extensions_proposal",
    "commit",
)


def _load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


@cache
def messages() -> list[dict[str, bytes]]:
    full = os.environ.get("SOVEREIGN_MLS_VECTORS")
    path = Path(full) / "messages.json" if full else VECTORS / "mls_messages.json"
    raw = json.loads(path.read_text())
    return [{k: bytes.fromhex(v) for k, v in entry.items()} for entry in raw]


@cache
def deserialization() -> list[dict[str, Any]]:
    return list(_load("mls_deserialization.json"))


@cache
def welcomes() -> list[dict[str, Any]]:
    return list(_load("mls_welcome.json"))
