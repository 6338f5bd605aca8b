"""GET, HEAD, PUT and DELETE /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import web

from ..errors import ManifestTooBig
from ..reference import is_digest, parse_digest
from ..registry.manifests import MAX_MANIFEST_BYTES
from . import events
from .auth import requires
from .common import PROXY_KEY, registry, repository, url_for


@requires("pull")
async def get_manifest(request: web.Request) -> web.Response:
    repo = repository(request)
    reference = request.match_info["reference"]
    proxy = request.app.get(PROXY_KEY)
    if proxy is not None:
        d, payload, media_type = await proxy.manifest(repo, reference)
    else:
        d, payload, media_type = await repo.manifests.get(reference)
    etag = f'"{d}"'
    headers = {"Docker-Content-Digest": str(d), "ETag": etag, "Content-Type": media_type}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(payload))
        return web.Response(status=200, headers=headers)
    events.emit(request, "pull", events.manifest(request, repo.name, d, media_type, len(payload),
                                                 None if is_digest(reference) else reference))
    return web.Response(status=200, body=payload, headers=headers)


async def _read_manifest(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_MANIFEST_BYTES:
        raise ManifestTooBig({"size": request.content_length, "limit": MAX_MANIFEST_BYTES})
    parts, total = [], 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > MAX_MANIFEST_BYTES:
            raise ManifestTooBig({"limit": MAX_MANIFEST_BYTES})
        parts.append(chunk)


@requires("pull", "push")
async def put_manifest(request: web.Request) -> web.Response:
    registry(request).check_writable()
    repo = repository(request)
    payload = await _read_manifest(request)
    reference = request.match_info["reference"]
    m = await repo.manifests.put(reference, payload, request.headers.get("Content-Type"))
    notifier = request.app.get(events.NOTIFIER_KEY)
    refs = {"references": [{"mediaType": x.media_type, "digest": str(x.digest), "size": x.size}
                           for x in m.blobs + m.manifests]} if notifier and notifier.include_references else {}
    events.emit(request, "push", events.manifest(request, repo.name, m.digest, m.media_type, len(payload),
                                                 None if is_digest(reference) else reference, **refs))
    headers = {"Location": url_for(request, f"/v2/{repo.name}/manifests/{m.digest}"),
               "Docker-Content-Digest": str(m.digest), "Content-Length": "0"}
    if m.subject is not None:
        headers["OCI-Subject"] = str(m.subject.digest)
    return web.Response(status=201, headers=headers)


@requires("delete")
async def delete_manifest(request: web.Request) -> web.Response:
    registry(request).check_deletable()
    repo = repository(request)
    reference = request.match_info["reference"]
    await repo.manifests.delete(reference)
    if is_digest(reference):
        events.emit(request, "delete", events.manifest(request, repo.name, parse_digest(reference)))
    else:
        events.emit(request, "delete", {"repository": repo.name, "tag": reference})
    return web.Response(status=202, headers={"Content-Length": "0"})


def setup_routes(app: web.Application) -> None:
    path = "/v2/{name:.+}/manifests/{reference:[^/]+}"
    app.router.add_get(path, get_manifest)
    app.router.add_put(path, put_manifest)
    app.router.add_delete(path, delete_manifest)
