"""Shared pieces of the HTTP layer: the registry handle, URLs, request bodies, spec headers."""

from __future__ import annotations

import asyncio
import bisect
import re
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import StreamReader, web

from .. import metrics
from ..config import Config
from ..errors import BlobUploadInvalid, PaginationInvalid
from ..proxy.cache import PullThrough
from ..receiver import BadFraming, BodyReceiver
from ..reference import Digest
from ..registry import Registry, Repository
from ..registry.uploads import ChunkRange

REGISTRY_KEY = web.AppKey("registry", Registry)
BODY_KEY = web.RequestKey("body", object)  # the RequestBody being read, for the watchdog
CONFIG_KEY = web.AppKey("config", Config)
PROXY_KEY = web.AppKey("proxy", PullThrough)  # in a pull-through cache
API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
# Offsets of 19 digits and fewer (a signed 64-bit number, as distribution parses them)
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[= ])?(\d{1,19})-(\d{1,19})(?:/(?:\d{1,19}|\*))?")
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


class RequestBody:
    """The request body as it arrives: the pieces received by each wake-up; never buffered
    whole. A consumer that holds resources for the stream (staging buffers) may set `on_idle`:
    the connection's watchdog calls `idle()` once the client has sent nothing for a while, and
    the consumer gives them back until more arrives (connections.py)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._content = request.content
        self.on_idle: Callable[[], Awaitable[None]] | None = None
        self._signalled = False
        self.received = 0
        self._receiver: BodyReceiver | None = None
        request[BODY_KEY] = self

    # -- received straight into the consumer's buffers (receiver.py) ----------------------------

    def receive_directly(self) -> bool:
        """Whether the rest of the body can come through fill() instead of iteration (a large
        or chunked upload body on a plain connection: connections.py, receive_body); if so it
        comes that way only."""
        if self._receiver is None:
            take = getattr(self._request.protocol, "receive_body", None)
            self._receiver = take(self._request) if take is not None else None
            if self._receiver is None:
                return False
            metrics.upload_started()
        return True

    @property
    def ended(self) -> bool:
        assert self._receiver is not None
        return self._receiver.ended

    async def fill(self, view: memoryview) -> int:
        """Receive into `view` until it is full or the body ends; fewer bytes also when the
        client went quiet (idle()) or away (the next call raises)."""
        assert self._receiver is not None
        try:
            n = await self._receiver.fill(view)
        except BadFraming as e:
            raise BlobUploadInvalid(None, f"malformed chunked request body: {e}") from None
        if n == len(view):
            self._signalled = False
        self.received += n
        return n

    def pending(self) -> bool:
        """Whether more of the body is here to take without waiting for the client."""
        assert self._receiver is not None
        return self._receiver.pending()

    async def wait_data(self) -> None:
        """After a fill() cut short: wait, holding no buffer, for the client's next bytes."""
        assert self._receiver is not None
        await self._receiver.wait_data()
        self._signalled = False

    def done(self) -> None:
        """The consumer of fill() is finished."""
        if self._receiver is not None:
            metrics.upload_ended()
            metrics.pushed(self.received)

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[list[bytes]]:
        release = getattr(self._request.protocol, "release_body", None)
        if release is not None:  # a body held back for receive_directly() goes to aiohttp after all
            release()
        content = self._content
        metrics.upload_started()
        try:
            if not _TAKES_PIECES:
                while data := await content.readany():
                    self._signalled = False
                    self.received += len(data)
                    yield [data]
                    data = b""  # not kept while waiting for more
                return
            while first := await _first_piece(content):
                self._signalled = False
                pieces = [first]
                first = b""
                while content._buffer:  # what readany() would join
                    pieces.append(content._read_nowait_chunk(-1))
                self.received += sum(map(len, pieces))
                yield pieces
                pieces = []  # the consumer has them: not kept while waiting for more
        finally:
            metrics.upload_ended()
            metrics.pushed(self.received)

    def idle(self) -> bool:
        """The client has sent nothing for a while: tell the consumer, once per such pause.
        Whether it was told now."""
        if self._signalled or (self.on_idle is None and self._receiver is None):
            return False
        self._signalled = True
        if self._receiver is not None:
            self._receiver.interrupt()
        else:
            assert self.on_idle is not None
            asyncio.ensure_future(self.on_idle())
        return True


def body_pieces(request: web.Request) -> RequestBody:
    return RequestBody(request)


async def _first_piece(content: StreamReader) -> bytes:
    """The first buffered piece, waiting for one; b"" at the end."""
    while True:
        data, end_of_chunk = await content.readchunk()
        # (b"", True) only marks a chunk boundary, except at the end: aiohttp's reader of empty
        # bodies is one object for the whole process, and after its first use it answers
        # (b"", True) forever, without waiting (a second bodiless PATCH spun the event loop).
        if data or not end_of_chunk or content.at_eof():
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


_PAGE_SIZE_RE = re.compile(r"\d{1,18}")


def page_request(request: web.Request, max_entries: int | None = None) -> tuple[int | None, str | None]:
    """The `n` (None: all; capped at `max_entries` where the list has a page size) and `last`
    of a paginated list request."""
    n_param = request.query.get("n")
    n: int | None = None
    if n_param is not None and n_param != "":
        if not _PAGE_SIZE_RE.fullmatch(n_param):
            raise PaginationInvalid({"n": n_param[:64]})
        n = int(n_param)
    if max_entries:
        n = max_entries if n is None else min(n, max_entries)
    return n, request.query.get("last") or None


def page(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """A page of a sorted list: up to `n` items after `last`, and whether more follow."""
    if last is not None:
        items = items[bisect.bisect_right(items, last):]
    if n is None or len(items) <= n:
        return items, False
    return items[:n], True


def page_headers(path: str, names: list[str], n: int | None, more: bool) -> dict[str, str]:
    """The RFC 5988 Link to the next page, when there is one (never for n=0: the spec)."""
    if not more or not n or not names:
        return {}
    return {"Link": f'<{path}?n={n}&last={names[-1]}>; rel="next"'}
