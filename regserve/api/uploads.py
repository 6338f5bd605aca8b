"""Blob uploads: POST/PATCH/PUT/GET/DELETE /v2/<name>/blobs/uploads/[<id>]."""

from __future__ import annotations

from aiohttp import web

from ..errors import DigestInvalid, NameInvalid, UploadRangeInvalid
from ..reference import parse_digest
from ..registry.uploads import UploadSession
from . import events
from .auth import may, requires
from .common import blob_location, body_pieces, content_range, registry, repository, url_for

CHUNK_MIN_LENGTH = 1 << 20  # a hint: smaller chunks are accepted, but cost a request each


def _status_headers(request: web.Request, session: UploadSession, size: int) -> dict[str, str]:
    return {
        "Location": url_for(request, f"/v2/{session.name}/blobs/uploads/{session.id}"),
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": session.id,
        "Content-Length": "0",
    }


def _created(request: web.Request, name: str, digest: str) -> web.Response:
    d = parse_digest(digest)
    return web.Response(status=201, headers={"Location": blob_location(request, name, d),
                                             "Docker-Content-Digest": str(d),
                                             "Content-Length": "0"})


@requires("pull", "push")
async def start_upload(request: web.Request) -> web.Response:
    registry(request).check_writable()
    repo = repository(request)
    query = request.query
    if "mount" in query:
        d = parse_digest(query["mount"])
        source_name = query.get("from")
        if source_name and may(request, source_name, "pull"):  # no mounting what one may not read
            try:
                source = registry(request).repository(source_name)
            except NameInvalid:
                source = None
            if source is not None and (info := await repo.blobs.mount(d, source.blobs)) is not None:
                events.emit(request, "mount", events.blob(request, repo.name, d, info.size,
                                                           fromRepository=source_name))
                return _created(request, repo.name, str(d))
        # Not mountable: fall back to a regular upload session, as the spec says.
    if "digest" in query:
        d = parse_digest(query["digest"])
        info = await repo.uploads.put_whole(d, body_pieces(request), repo.blobs)
        events.emit(request, "push", events.blob(request, repo.name, info.digest, info.size))
        return _created(request, repo.name, str(info.digest))
    session = await repo.uploads.create()
    headers = _status_headers(request, session, 0)
    headers["OCI-Chunk-Min-Length"] = str(CHUNK_MIN_LENGTH)
    return web.Response(status=202, headers=headers)


@requires("pull", "push")
async def patch_upload(request: web.Request) -> web.Response:
    registry(request).check_writable()
    repo = repository(request)
    session = await repo.uploads.open(request.match_info["upload_id"])
    chunk = content_range(request)
    if chunk is not None and request.content_length is not None \
            and request.content_length != chunk.length:
        raise UploadRangeInvalid(await session.size(), {"Content-Range": request.headers["Content-Range"],
                                                        "Content-Length": request.content_length})
    size = await session.append(body_pieces(request), chunk)
    return web.Response(status=202, headers=_status_headers(request, session, size))


@requires("pull", "push")
async def finish_upload(request: web.Request) -> web.Response:
    registry(request).check_writable()
    repo = repository(request)
    session = await repo.uploads.open(request.match_info["upload_id"])
    if "digest" not in request.query:
        raise DigestInvalid(None, "digest parameter missing")
    d = parse_digest(request.query["digest"])
    chunk = content_range(request)
    body = body_pieces(request) if request.body_exists else None
    if chunk is not None and body is not None and request.content_length is not None \
            and request.content_length != chunk.length:
        raise UploadRangeInvalid(await session.size(), {"Content-Range": request.headers["Content-Range"],
                                                        "Content-Length": request.content_length})
    info = await session.finish(d, body, chunk if body is not None else None, repo.blobs)
    events.emit(request, "push", events.blob(request, repo.name, info.digest, info.size))
    return _created(request, repo.name, str(info.digest))


@requires("pull", "push")
async def upload_status(request: web.Request) -> web.Response:
    repo = repository(request)
    session = await repo.uploads.open(request.match_info["upload_id"])
    return web.Response(status=204, headers=_status_headers(request, session, await session.size()))


@requires("pull", "push")
async def cancel_upload(request: web.Request) -> web.Response:
    registry(request).check_writable()
    repo = repository(request)
    session = await repo.uploads.open(request.match_info["upload_id"])
    await session.cancel()
    return web.Response(status=204, headers={"Content-Length": "0"})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v2/{name:.+}/blobs/uploads/", start_upload)
    app.router.add_post("/v2/{name:.+}/blobs/uploads", start_upload)
    path = "/v2/{name:.+}/blobs/uploads/{upload_id:[^/]+}"
    app.router.add_patch(path, patch_upload)
    app.router.add_put(path, finish_upload)
    app.router.add_get(path, upload_status)
    app.router.add_delete(path, cancel_upload)
