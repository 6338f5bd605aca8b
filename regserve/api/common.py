"""Shared pieces of the HTTP layer: the registry handle, URLs, request bodies, spec headers."""

from __future__ import annotations

import re
from typing import AsyncIterator

from aiohttp import StreamReader, web

from ..config import Config
from ..errors import BlobUploadInvalid, PaginationInvalid
from ..reference import Digest
from ..registry import Registry, Repository
from ..registry.uploads import ChunkRange

REGISTRY_KEY = web.AppKey("registry", Registry)
CONFIG_KEY = web.AppKey("config", Config)
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[= ])?(\d+)-(\d+)(?:/(?:\d+|\*))?")
READ_CHUNK = 1 << 20


def registry(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def repository(request: web.Request) -> Repository:
    return registry(request).repository(request.match_info["name"])


def url_for(request: web.Request, path: str, absolute: bool = False) -> str:
    """Location URLs: relative when configured, else absolute on the host the client used
    (or http.host), honouring a proxy's X-Forwarded-* headers as distribution does."""
    config = request.app[CONFIG_KEY]
    path = config.prefix + path
    if config.relative_urls and not absolute:
        return path
    if config.host:
        return config.host.rstrip("/") + path
    proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{proto}://{host}{path}"


def blob_location(request: web.Request, name: str, d: Digest) -> str:
    return url_for(request, f"/v2/{name}/blobs/{d}")


# aiohttp's readany() joins the pieces buffered when it is called (a frame each of a chunked
# body, docker's are 32 KiB) into one new bytes object: a copy of most of a large upload, made on
# the event loop. The upload pipeline copies the pieces anyway (into aligned buffers, for direct
# I/O), so it takes them as they are, from the StreamReader's buffer, when this aiohttp has it.
_TAKES_PIECES = all(hasattr(StreamReader, name) for name in ("_buffer", "_read_nowait_chunk"))


async def body_pieces(request: web.Request) -> AsyncIterator[list[bytes]]:
    """The request body as it arrives: the pieces received by each wake-up; never buffered
    whole."""
    content = request.content
    if not _TAKES_PIECES:
        while data := await content.readany():
            yield [data]
        return
    while first := await _first_piece(content):
        pieces = [first]
        while content._buffer:  # what readany() would join
            pieces.append(content._read_nowait_chunk(-1))
        yield pieces


async def _first_piece(content: StreamReader) -> bytes:
    """The first buffered piece, waiting for one; b"" at the end."""
    while True:
        data, end_of_chunk = await content.readchunk()
        if data or not end_of_chunk:  # (b"", True) only marks a chunk boundary
            return data


def content_range(request: web.Request) -> ChunkRange | None:
    value = request.headers.get("Content-Range")
    if value is None:
        return None
    m = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if not m:
        raise BlobUploadInvalid({"Content-Range": value}, "malformed Content-Range")
    start, end = int(m.group(1)), int(m.group(2))
    if end < start:
        raise BlobUploadInvalid({"Content-Range": value}, "Content-Range ends before it starts")
    return ChunkRange(start, end)


def paginate(items: list[str], request: web.Request, path: str,
             max_entries: int | None = None) -> tuple[list[str], dict[str, str]]:
    """`n`/`last` pagination with the RFC 5988 Link header, over a sorted list."""
    last = request.query.get("last")
    n_param = request.query.get("n")
    if last:
        items = [i for i in items if i > last]
    headers: dict[str, str] = {}
    n: int | None = None
    if n_param is not None and n_param != "":
        try:
            n = int(n_param)
        except ValueError:
            raise PaginationInvalid({"n": n_param}) from None
        if n < 0:
            raise PaginationInvalid({"n": n_param})
    if n is None and max_entries:
        n = max_entries if len(items) > max_entries else None
    if n is not None:
        if len(items) > n and n > 0:
            page = items[:n]
            headers["Link"] = f'<{path}?n={n}&last={page[-1]}>; rel="next"'
            return page, headers
        return items[:n], headers
    return items, headers
