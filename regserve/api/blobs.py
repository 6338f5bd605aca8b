"""GET, HEAD and DELETE /v2/<name>/blobs/<digest>."""

from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator

from aiohttp import web

from .. import metrics
from ..errors import BlobUnknown, RangeNotSatisfiable
from ..proxy.cache import FetchFailed, Growing, PullThrough
from ..reference import Digest, UnknownAlgorithm, parse_digest
from ..storage import PathNotFound
from . import events
from .auth import requires
from .common import CONFIG_KEY, PROXY_KEY, registry, repository
from .sendfile import hang_up, send_file, send_spans

_RANGE_RE = re.compile(r"bytes=(\d{0,30})-(\d{0,30})")  # longer numbers: malformed, so ignored


def blob_digest(request: web.Request) -> Digest:
    """The digest in a blob path: DIGEST_INVALID when malformed; a well-formed digest of an
    algorithm not stored here names no blob (404)."""
    value = request.match_info["digest"]
    try:
        return parse_digest(value)
    except UnknownAlgorithm:
        raise BlobUnknown({"digest": value}) from None


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single-range request; None to serve the whole blob.
    Raises ValueError when unsatisfiable."""
    m = _RANGE_RE.fullmatch(header.strip())
    if not m:
        return None  # multiple or malformed ranges: RFC 9110 lets us ignore the header
    first, last = m.groups()
    if first == "" and last == "":
        return None
    if first == "":
        length = int(last)
        if length == 0:
            raise ValueError("empty suffix range")
        return max(size - length, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise ValueError("unsatisfiable range")
    return start, min(end, size - 1)


@requires("pull")
async def get_blob(request: web.Request) -> web.StreamResponse:
    repo = repository(request)
    d = blob_digest(request)
    proxy = request.app.get(PROXY_KEY)
    etag = f'"{d}"'
    headers = {"Docker-Content-Digest": str(d), "ETag": etag, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream",
               "Cache-Control": "max-age=31536000"}
    if proxy is None:
        info = await repo.blobs.stat(d)
    else:
        found = await proxy.blob(repo, d, head=request.method == "HEAD")
        if isinstance(found, int):  # a HEAD the upstream answered: nothing is fetched for it
            return web.Response(status=200, headers={**headers, "Content-Length": str(found)})
        if isinstance(found, Growing):
            return await _send_growing(request, proxy, found, headers)
        info = found
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    config = request.app[CONFIG_KEY]
    store = repo.blobs.store
    local = store.local_path(info)
    if local is None and request.method == "GET" and config.redirect:  # an object store sends it (S3)
        url = await store.redirect_url(info)
        if url is not None:
            events.emit(request, "pull", events.blob(request, repo.name, d, info.size))
            return web.Response(status=307, headers={"Location": url, "Docker-Content-Digest": str(d)})
    start, end, status = _requested(request, info.size, headers)
    response = web.StreamResponse(status=status, headers=headers)
    if request.method != "HEAD":
        events.emit(request, "pull", events.blob(request, repo.name, d, info.size))
    count = end - start + 1 if info.size else 0
    tls = request.transport is not None and request.transport.get_extra_info("sslcontext")
    try:
        if local is not None and not tls:  # TLS: the bytes must pass through us, no sendfile
            return await send_file(request, response, local, start, count, config.sendfile,
                                   config.write_timeout)
        return await _stream(request, response, store.reader(info, start, count), count,
                             config.write_timeout)
    except (FileNotFoundError, PathNotFound):  # gone since stat: nothing was sent yet
        store.forget(d)
        raise BlobUnknown({"digest": str(d)}) from None


async def _cut_off_if_failed(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A failed fetch, as what it is to a download under way: the connection is dropped."""
    try:
        async for item in items:
            yield item
    except FetchFailed as e:
        raise ConnectionAbortedError(str(e)) from None
    finally:
        await items.aclose()  # type: ignore[attr-defined]  # its file, now, not when collected


def _requested(request: web.Request, size: int, headers: dict[str, str]) -> tuple[int, int, int]:
    """(start, end inclusive, status) of what a GET asks for: its Range, if any and if its
    If-Range still holds; Content-Range is added to `headers` for a partial answer."""
    range_header = request.headers.get("Range")
    if range_header and request.headers.get("If-Range", headers["ETag"]) == headers["ETag"]:
        try:
            chosen = _byte_range(range_header, size)
        except ValueError:
            raise RangeNotSatisfiable({"range": range_header, "size": size},
                                      headers={"Content-Range": f"bytes */{size}"}) from None
        if chosen is not None:
            headers["Content-Range"] = f"bytes {chosen[0]}-{chosen[1]}/{size}"
            return chosen[0], chosen[1], 206
    return 0, size - 1, 200


async def _send_growing(request: web.Request, proxy: PullThrough, blob: Growing,
                        headers: dict[str, str]) -> web.StreamResponse:
    """A blob a pull-through cache is fetching: its bytes as they land (Range included). If the
    fetch fails, a download already under way is cut short of its length."""
    start, end, status = _requested(request, blob.size, headers)
    count = end - start + 1 if blob.size else 0
    name = request.match_info["name"]
    if request.method != "HEAD":
        events.emit(request, "pull", events.blob(request, name, blob.digest, blob.size))

    config = request.app[CONFIG_KEY]
    response = web.StreamResponse(status=status, headers=headers)
    tls = request.transport is not None and request.transport.get_extra_info("sslcontext")
    spans = None if tls else proxy.spans(blob, start, count)
    items = _cut_off_if_failed(spans if spans is not None else proxy.reader(blob, start, count))
    try:
        if spans is not None:
            return await send_spans(request, response, items, count, config.sendfile, config.write_timeout)
        return await _stream(request, response, items, count, config.write_timeout)
    except ConnectionAbortedError:  # before anything was sent
        raise BlobUnknown({"digest": str(blob.digest)}) from None
    finally:
        await items.aclose()


async def _stream(request: web.Request, response: web.StreamResponse, chunks: AsyncIterator[bytes],
                  count: int, write_timeout: float) -> web.StreamResponse:
    """Send a blob from the storage driver's ranged reader. The first chunk is read before the
    headers go out, so a missing object still answers 404. A client that takes nothing of a
    chunk for `write_timeout` is dropped."""
    first = await anext(chunks, b"") if count and request.method != "HEAD" else b""
    response.content_length = count
    await response.prepare(request)
    if first:
        try:
            async with asyncio.timeout(write_timeout):
                await response.write(first)
            async for chunk in chunks:
                async with asyncio.timeout(write_timeout):
                    await response.write(chunk)
        except OSError as err:  # TimeoutError included
            return hang_up(request, response, err)
        metrics.pulled(count)
    await response.write_eof()
    return response


@requires("delete")
async def delete_blob(request: web.Request) -> web.Response:
    registry(request).check_deletable()
    repo = repository(request)
    d = blob_digest(request)
    await repo.blobs.unlink(d)
    events.emit(request, "delete", events.blob(request, repo.name, d))
    return web.Response(status=202, headers={"Docker-Content-Digest": str(d), "Content-Length": "0"})


def setup_routes(app: web.Application) -> None:
    path = "/v2/{name:.+}/blobs/{digest:[^/]+}"
    app.router.add_get(path, get_blob)  # also answers HEAD
    app.router.add_delete(path, delete_blob)
