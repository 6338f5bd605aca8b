"""HTTP connections: timeouts, a connection limit, and spec answers to what the parser rejects.

aiohttp gives each connection a RequestHandler; ours adds what a registry facing hostile and
careless clients needs, in the spirit of Go's http.Server:

* `readheader`: a request's headers must be complete within this many seconds of its first
  byte, or the connection is closed (a slowloris holds nothing for long);
* `idle`: a keep-alive connection without a request, or one that never sends a byte, is closed
  after this long (aiohttp's keep-alive timeout);
* `bodyidle`: a request whose handler waits for body bytes that do not come for this long is cut
  off; the handler sees a disconnect, and an upload keeps what arrived, as after any other.
  Silent for STAGING_IDLE already, an upload writes out what it holds and gives back its staging
  buffers until more arrives, so a stalled upload holds neither a thread nor buffers;
* `maxconnections`: past this many connections in one process, the idle ones that waited
  longest are closed to make room, and a new connection is closed at once if none is idle. So
  idle and stalled clients cost bounded descriptors and memory, and never lock others out.

An upload's body may bypass aiohttp's parser, received straight into the upload's buffers
(receiver.py): a chunked upload's body is held back from the parser at the end of its head for
that, and given to the parser after all if the upload does not take it (receive_body).

Requests the HTTP parser rejects (a broken request line, raw non-ASCII in the path, a header
line over 8 KiB, TLS on the plain port) get the spec's JSON error body and a debug log line:
they are the internet's noise, not errors of ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from .api.common import BODY_KEY, RequestBody
from .api.errors import error_body, internal_error
from .receiver import BodyReceiver, Chunked, Length

log = logging.getLogger("regserve.connections")
EVICT_BATCH = 16  # idle connections closed at once when the limit is reached (amortises the scan)
STAGING_IDLE = 2.0  # a body silent this long: its upload gives back its staging buffers
RECEIVE_MIN = 1 << 20  # smaller bodies go through aiohttp's parser, and keep their connection


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc


_malloc_trim = _load_malloc_trim()


@dataclass(frozen=True)
class Limits:
    read_header: float = 30.0
    idle: float = 120.0
    body_idle: float = 60.0
    max_connections: int = 10000

    @classmethod
    def of(cls, config: Any) -> "Limits":
        return cls(config.read_header_timeout, config.idle_timeout, config.body_idle_timeout,
                   config.max_connections)


class RegistryConnection(RequestHandler):
    def __init__(self, manager: "RegistryServer", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._header_timer: Any = None
        self.last_data = self._loop.time()  # last time bytes arrived (or reading resumed)
        self._receiver: BodyReceiver | None = None
        self._held: bytes | None = None  # a chunked upload's body, not given to the parser (yet)

    # -- timeouts -----------------------------------------------------------------------------

    def _in_request(self) -> bool:
        return self._current_request is not None or bool(self._messages) or self._request_in_progress

    def data_received(self, data: bytes) -> None:
        self.last_data = self._loop.time()
        if data and self._header_timer is None and not self._in_request():
            self._header_timer = self._loop.call_later(self._limits.read_header, self._headers_late)
        self._feed(data)
        if self._header_timer is not None and self._in_request():
            self._header_timer.cancel()
            self._header_timer = None

    # -- upload bodies past aiohttp's parser (receiver.py) ---------------------------------------

    def _feed(self, data: bytes) -> None:
        """aiohttp's parser gets `data`, except the body of a chunked upload request whose head
        ends in it: that is held back, unparsed, and the connection paused, for the upload to
        receive in place (receive_body) or, if it does not, to give to the parser after all
        (release_body). Its chunk framing is then known to start with the held bytes, which is
        what the receiver needs; where aiohttp's parser got them, it is somewhere inside."""
        if self._held is not None:  # read meanwhile (reading resumed by someone): held too
            self._held += data
            return
        if data.startswith((b"PATCH ", b"PUT ")) and not self._in_request() and self._may_receive():
            end = data.find(b"\r\n\r\n")
            if end >= 0 and b"\n\n" not in data[:end]:  # the head ends at the first CRLF CRLF
                queued = len(self._messages)
                super().data_received(data[:end + 4])
                if len(self._messages) == queued + 1 and _chunked_upload(*self._messages[-1]):
                    self._held = data[end + 4:]
                    self.transport.pause_reading()
                    return
                data = data[end + 4:]
        super().data_received(data)

    def release_body(self) -> None:
        """The held body goes to aiohttp's parser after all (the handler reads it as aiohttp
        gives it, or answers without it)."""
        if self._held is None:
            return
        held, self._held = self._held, None
        super().data_received(held)
        if self.transport is not None and not self._reading_paused:
            self.transport.resume_reading()

    async def finish_response(self, request: Any, resp: Any, start_time: float | None) -> Any:
        # Answered without taking a held body (an error, a route outside the API): aiohttp's
        # parser gets it, and reads (or lingers over) it as for any request. A body that came
        # through a BodyReceiver left the parser mid-body: no next request on this connection.
        self.release_body()
        if self._receiver is not None and not resp.prepared:
            resp.force_close()
        return await super().finish_response(request, resp, start_time)

    def _may_receive(self) -> bool:
        transport = self.transport
        return transport is not None and hasattr(transport, "set_protocol") \
            and transport.get_extra_info("sslcontext") is None and self._receiver is None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self._in_request() and self.transport is not None:
            log.debug("closing a connection whose request headers took over %ss", self._limits.read_header)
            self.force_close()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # We paused the client (the handler was busy); its silence meanwhile is ours.
        self.last_data = self._loop.time()
        super().resume_reading(resume_parser)

    def body_wait(self, now: float) -> float:
        """How long the handler has waited for body bytes that do not come (0: it is not)."""
        request = self._current_request
        if request is None:
            return 0.0
        if getattr(request.content, "_waiter", None) is None \
                and (self._receiver is None or not self._receiver.waiting):
            return 0.0
        return now - self.last_data

    def receive_body(self, request: web.BaseRequest) -> BodyReceiver | None:
        """Hand the rest of `request`'s body to a BodyReceiver (receiver.py), if it can take it:
        on a plain TCP connection, a chunked body held back from the parser (_feed), or a
        Content-Length body with at least RECEIVE_MIN bytes still to come; nothing else of the
        client's read ahead of the parser. Else the held body goes to the parser, and None. The
        response then closes the connection (finish_response)."""
        content = request.content
        if request is not self._current_request or not self._may_receive() or self._messages \
                or self._buffer_paused or content.exception() is not None or content.is_eof():
            self.release_body()
            return None
        framing: Length | Chunked
        if self._held is not None:
            framing, carry, self._held = Chunked(), self._held, None
        elif request.content_length is not None and "Transfer-Encoding" not in request.headers \
                and request.content_length - content.total_bytes >= RECEIVE_MIN:
            carry = content.read_nowait(-1)  # what aiohttp read already, and nobody took yet
            framing = Length(request.content_length - content.total_bytes + len(carry))
        else:
            return None
        content.feed_eof()  # for aiohttp: no body left to read (or to drain after the response)
        self._receiver = BodyReceiver(self, framing, carry)
        return self._receiver

    def idle_since(self) -> float | None:
        """When this connection last did anything, if it is idle between requests."""
        return None if self._in_request() else self.last_data

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    # -- what the parser rejects --------------------------------------------------------------

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response already began: nothing to add
            raise ConnectionError("response already started; cannot send an error body")
        if isinstance(exc, HttpProcessingError) or (exc is None and 400 <= status < 500):
            log.debug("malformed request from %s: %s", request.remote, exc or message)
            reason = type(exc).__name__ if exc is not None else "BadRequest"
            resp = web.Response(status=431 if isinstance(exc, LineTooLong) else 400,
                                body=error_body("UNSUPPORTED", "malformed HTTP request", {"reason": reason}),
                                content_type="application/json")
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            resp = internal_error()
        resp.force_close()
        return resp


_UPLOAD_PATH = re.compile(r"/v2/.+/blobs/uploads/[^/?]+")  # the upload routes' (api/uploads.py)


def _chunked_upload(message: Any, payload: Any) -> bool:
    """A PATCH or PUT to an upload session with a chunked body, none of it parsed yet."""
    return isinstance(message, RawRequestMessage) and message.method in ("PATCH", "PUT") \
        and message.chunked and _UPLOAD_PATH.search(message.path) is not None \
        and payload.total_bytes == 0 and not payload.is_eof()


class RegistryServer(web.Server):
    """aiohttp's connection factory, with the connection policy above. Made by RegistryRunner
    from the server aiohttp builds, so that everything else about it stays aiohttp's."""

    limits: Limits
    _watchdog: Any

    def __call__(self) -> RequestHandler:
        if self._watchdog is None:
            self._schedule_watchdog()
        return RegistryConnection(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: Any) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) > self.limits.max_connections:
            self._make_room(handler)

    def _make_room(self, newcomer: RequestHandler) -> None:
        idle = sorted((since, id(conn), conn) for conn in self._connections
                      if conn is not newcomer and isinstance(conn, RegistryConnection)
                      and (since := conn.idle_since()) is not None)
        excess = len(self._connections) - self.limits.max_connections
        if not idle:
            log.warning("%d connections and none idle: refusing a new one", len(self._connections))
            newcomer.force_close()
            return
        for _, _, conn in idle[:max(excess, EVICT_BATCH)]:
            conn.force_close()

    def _schedule_watchdog(self) -> None:
        self._watchdog = self._loop.call_later(min(1.0, self.limits.body_idle / 4), self._watch)

    def _watch(self) -> None:
        now = self._loop.time()
        pause = min(STAGING_IDLE, self.limits.body_idle / 2)
        went_quiet = False
        for conn in list(self._connections):
            if not isinstance(conn, RegistryConnection):
                continue
            waited = conn.body_wait(now)
            if waited >= self.limits.body_idle:
                log.info("cutting off a request body idle for %ss", self.limits.body_idle)
                if conn.transport is not None:
                    conn.transport.abort()
            elif waited >= pause and conn._current_request is not None:
                body = conn._current_request.get(BODY_KEY)
                if isinstance(body, RequestBody) and body.idle():
                    went_quiet = True  # the upload gives back its buffers meanwhile
        if went_quiet and _malloc_trim is not None:
            # Body pieces of quiet uploads were freed, but the heap keeps freed memory for the
            # next busy stream (server.tune_malloc): with streams going quiet, hand it back.
            self._loop.call_later(pause, _malloc_trim, 0)
        self._schedule_watchdog()

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super().shutdown(timeout)


class RegistryRunner(web.AppRunner):
    """web.AppRunner whose server applies `limits` (and whose idle timeout is `limits.idle`)."""

    def __init__(self, app: web.Application, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.idle, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = RegistryServer
        assert isinstance(server, RegistryServer)
        server.limits = self._limits
        server._watchdog = None
        return server
