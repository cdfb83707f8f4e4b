"""RFC 9420 (MLS) wire format for the Delivery and Authentication Service: no I/O.

The server never decrypts; it reads the clear-text parts it needs (KeyPackages,
PublicMessage/PrivateMessage headers, Welcome, GroupInfo) and checks KeyPackages.

* :mod:`sovereign.mls.wire` — TLS presentation language ``Reader``/``Writer`` (§2.1),
  :class:`MLSDecodeError`.
* :mod:`sovereign.mls.structs` — the structures, each decodable and re-encodable
  byte for byte.
* :mod:`sovereign.mls.api` — the parse helpers the server calls.
* :mod:`sovereign.mls.validate` — strict KeyPackage checks (signatures via
  ``cryptography``).
* :mod:`sovereign.mls.testing` — signed KeyPackages for tests and bots (not imported here).
"""

from sovereign.mls.api import (
    CommitInfo,
    parse_commit_message,
    parse_group_info_message,
    parse_key_package,
    parse_mls_message,
    parse_welcome_message,
)
from sovereign.mls.structs import (
    CONTENT_APPLICATION,
    CONTENT_COMMIT,
    CONTENT_PROPOSAL,
    WIRE_FORMAT_GROUP_INFO,
    WIRE_FORMAT_KEY_PACKAGE,
    WIRE_FORMAT_PRIVATE_MESSAGE,
    WIRE_FORMAT_PUBLIC_MESSAGE,
    WIRE_FORMAT_WELCOME,
    GroupInfo,
    KeyPackage,
    MLSMessage,
    Welcome,
)
from sovereign.mls.validate import (
    EXTENSION_LAST_RESORT,
    KeyPackageInvalid,
    has_last_resort_extension,
    validate_key_package,
)
from sovereign.mls.wire import MLSDecodeError

__all__ = [
    "CONTENT_APPLICATION",
    "CONTENT_COMMIT",
    "CONTENT_PROPOSAL",
    "EXTENSION_LAST_RESORT",
    "WIRE_FORMAT_GROUP_INFO",
    "WIRE_FORMAT_KEY_PACKAGE",
    "WIRE_FORMAT_PRIVATE_MESSAGE",
    "WIRE_FORMAT_PUBLIC_MESSAGE",
    "WIRE_FORMAT_WELCOME",
    "CommitInfo",
    "GroupInfo",
    "KeyPackage",
    "KeyPackageInvalid",
    "MLSDecodeError",
    "MLSMessage",
    "Welcome",
    "has_last_resort_extension",
    "parse_commit_message",
    "parse_group_info_message",
    "parse_key_package",
    "parse_mls_message",
    "parse_welcome_message",
    "validate_key_package",
]
