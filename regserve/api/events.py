"""Events for notifications (notifications.py), in distribution's shape, from the handlers."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..logs import REQUEST_ID_KEY
from ..notifications import Notifier
from ..reference import Digest
from .auth import identity
from .common import blob_location, url_for

NOTIFIER_KEY = web.AppKey("notifier", Notifier)
BLOB_MEDIA_TYPE = "application/octet-stream"


def emit(request: web.Request, action: str, target: dict[str, Any]) -> None:
    notifier = request.app.get(NOTIFIER_KEY)
    if notifier is None:
        return
    who = identity(request)
    notifier.emit(action, target, {"id": request.get(REQUEST_ID_KEY, ""), "addr": request.remote or "",
                                   "host": request.host, "method": request.method,
                                   "useragent": request.headers.get("User-Agent", "")},
                  who.user if who is not None else None)


def blob(request: web.Request, name: str, d: Digest, size: int | None = None, **extra: Any) -> dict[str, Any]:
    target: dict[str, Any] = {"mediaType": BLOB_MEDIA_TYPE, "digest": str(d), "repository": name,
                              "url": blob_location(request, name, d), **extra}
    if size is not None:
        target["size"] = target["length"] = size
    return target


def manifest(request: web.Request, name: str, d: Digest, media_type: str | None = None,
             size: int | None = None, tag: str | None = None, **extra: Any) -> dict[str, Any]:
    target: dict[str, Any] = {"digest": str(d), "repository": name,
                              "url": url_for(request, f"/v2/{name}/manifests/{d}"), **extra}
    if media_type is not None:
        target["mediaType"] = media_type
    if size is not None:
        target["size"] = target["length"] = size
    if tag is not None:
        target["tag"] = tag
    return target
