"""GET, HEAD, PUT and DELETE /v2/<name>/manifests/<reference>."""

from __future__ import annotations

from aiohttp import web

from ..errors import ManifestTooBig
from ..registry.manifests import MAX_MANIFEST_BYTES
from .auth import requires
from .common import registry, repository, url_for


@requires("pull")
async def get_manifest(request: web.Request) -> web.Response:
    repo = repository(request)
    d, payload, media_type = await repo.manifests.get(request.match_info["reference"])
    etag = f'"{d}"'
    headers = {"Docker-Content-Digest": str(d), "ETag": etag, "Content-Type": media_type}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(payload))
        return web.Response(status=200, headers=headers)
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
    m = await repo.manifests.put(request.match_info["reference"], payload,
                                 request.headers.get("Content-Type"))
    headers = {"Location": url_for(request, f"/v2/{repo.name}/manifests/{m.digest}"),
               "Docker-Content-Digest": str(m.digest), "Content-Length": "0"}
    if m.subject is not None:
        headers["OCI-Subject"] = str(m.subject.digest)
    return web.Response(status=201, headers=headers)


@requires("delete")
async def delete_manifest(request: web.Request) -> web.Response:
    registry(request).check_deletable()
    repo = repository(request)
    await repo.manifests.delete(request.match_info["reference"])
    return web.Response(status=202, headers={"Content-Length": "0"})


def setup_routes(app: web.Application) -> None:
    path = "/v2/{name:.+}/manifests/{reference:[^/]+}"
    app.router.add_get(path, get_manifest)
    app.router.add_put(path, put_manifest)
    app.router.add_delete(path, delete_manifest)
