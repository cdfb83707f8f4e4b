"""Directory, device and profile handlers (SPEC §3 types 54-59, §12.29)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import Handler, later
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services import Services


def install(table: dict[int, Handler], svc: Services) -> None:
    out, tasks, d = svc.outbox, svc.tasks, svc.directory
    table[T.USER_LOOKUP] = later(out, tasks, pb.UserLookup, d.lookup)
    table[T.DEVICE_LIST_REQUEST] = later(out, tasks, pb.DeviceListRequest, d.list_devices)
    table[T.DEVICE_REVOKE] = later(out, tasks, pb.DeviceRevoke, d.revoke_device)
    table[T.PROFILE_UPDATE] = later(out, tasks, pb.ProfileUpdate, d.update_profile)
