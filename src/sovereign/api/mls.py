"""MLS Delivery Service handlers (SPEC §3 types 40-49, §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sovereign.api.messaging import later, now
from sovereign.protocol.types import MessageType as T
from sovereign.v1 import sovereign_pb2 as pb

if TYPE_CHECKING:
    from sovereign.server import App


def install(app: App) -> None:
    svc = app.mls
    h = app.handlers
    h[T.MLS_KEY_PACKAGE_UPLOAD] = later(app, pb.MLSKeyPackageUpload, svc.upload)
    h[T.MLS_KEY_PACKAGE_FETCH] = later(app, pb.MLSKeyPackageFetch, svc.fetch)
    h[T.MLS_WELCOME] = now(pb.MLSWelcome, svc.welcome)
    h[T.MLS_COMMIT] = now(pb.MLSCommit, svc.commit)
    h[T.MLS_GROUP_INFO_FETCH] = now(pb.GroupInfoFetch, svc.group_info)
