"""MLS Delivery Service handlers (SPEC §3 types 40-49, §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.parsing import Handler, later, now
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.services import Services


def install(table: dict[int, Handler], svc: Services) -> None:
    out, tasks, mls = svc.outbox, svc.tasks, svc.mls
    table[T.MLS_KEY_PACKAGE_UPLOAD] = later(out, tasks, pb.MLSKeyPackageUpload, mls.upload)
    table[T.MLS_KEY_PACKAGE_FETCH] = later(out, tasks, pb.MLSKeyPackageFetch, mls.fetch)
    table[T.MLS_WELCOME] = now(out, pb.MLSWelcome, mls.welcome)
    table[T.MLS_COMMIT] = now(out, pb.MLSCommit, mls.commit)
    table[T.MLS_GROUP_INFO_FETCH] = now(out, pb.GroupInfoFetch, mls.group_info)
