"""Receiving the rest of a request body straight into the consumer's buffers.

aiohttp hands a handler its body as bytes objects: uvloop copies each read out of its receive
buffer into one, aiohttp's parser copies the body out of that into another, and the upload
pipeline then copies those into its aligned staging buffers. Three copies of every byte pushed,
on the event loop, plus the objects' churn: a quarter of a push's CPU (perf, 1 GiB pushes).

A BodyReceiver takes the connection's transport over for the rest of an upload's body: a
buffered protocol, whose reads (recv_into) land in the buffer the consumer hands to `fill()`,
the staging buffer itself. A Content-Length body is read exactly. A chunked one (docker's and
podman's streamed PATCH) is read in large pieces too, and its framing taken out in place: each
chunk's data moved down over the few bytes of framing before it, one move within the buffer
instead of three copies (docker frames 32 KiB: a read per frame would cost more). Reading stops
whenever no buffer is waiting, so a slow writer slows the client (TCP flow control), as before.

aiohttp's parser, left without the rest of the body, never sees the connection again: the
response closes it (`Connection: close`), and the client opens another for its next request.
Whatever the client sends behind the body (a pipelined request) is read and dropped until then:
closing a socket with unread bytes resets the connection, and the client could lose the response.
"""

from __future__ import annotations

import asyncio
import fcntl
import re
import struct
import termios
from typing import Any

SCRATCH = 4096  # what a quiet body's next read takes, while no buffer is held for it
SINK = 64 << 10  # what is read behind the body goes here, and is dropped
MAX_LINE = 4096  # a chunk-size or trailer line longer than this is refused
MAX_TRAILER = 16 << 10
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
_BETWEEN_CHUNKS_RE = re.compile(rb"\r\n([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")  # data's end, next size
WINDOW = 64  # framing is looked for in this many bytes at a time (a size line is ~6)
# Framing costs Python work per chunk (~2 us: 170 ms for a 512 KiB read of 1-byte chunks, which
# would stall every other client of the loop): where chunks average under DENSE_CHUNK bytes,
# reads are cut to DENSE_READ, so a client sending tiny chunks costs time in small slices.
DENSE_CHUNK = 4096
DENSE_READ = 16 << 10


class BadFraming(Exception):
    """A chunked body that breaks HTTP/1.1's grammar."""


class Length:
    """A body of known length: `left` bytes still to come, no framing."""

    dense = False

    def __init__(self, left: int) -> None:
        self.left = left

    @property
    def done(self) -> bool:
        return not self.left

    def room(self, n: int) -> int:
        """How many of `n` bytes offered may be read now: never past the body's end."""
        return min(n, self.left)

    def unframe(self, view: memoryview, start: int, end: int) -> int:
        self.left -= end - start
        return end


class Chunked:
    """Chunked transfer-coding, taken out in place: `unframe` moves the data of bytes received
    into [start, end) down to `start`, and returns where it ends. Strict: CRLF line ends, a
    chunk size of hex digits, the CRLF after each chunk's data; trailers are read and dropped."""

    def __init__(self) -> None:
        self.left = 0            # data bytes of the current chunk still to come
        self._line = b""         # a framing line received in part
        self._state = "size"     # size, data, data-end, trailer, done
        self._trailer = 0
        self._chunks = 0         # chunks begun
        self.dense = False       # the last bytes unframed held chunks of DENSE_CHUNK or less on average

    @property
    def done(self) -> bool:
        return self._state == "done"

    def room(self, n: int) -> int:
        return n  # where the body ends is known only from its framing

    def unframe(self, view: memoryview, start: int, end: int) -> int:
        chunks = self._chunks
        try:
            return self._unframe(view, start, end)
        finally:
            self.dense = (self._chunks - chunks) * DENSE_CHUNK > end - start

    def _unframe(self, view: memoryview, start: int, end: int) -> int:
        out = pos = start
        while pos < end and self._state != "done":
            if self._state == "data":
                n = min(self.left, end - pos)
                if out != pos:
                    view[out:out + n] = view[pos:pos + n]
                out, pos, self.left = out + n, pos + n, self.left - n
                if not self.left:
                    self._state = "data-end"
                continue
            piece = bytes(view[pos:min(end, pos + WINDOW)])
            if self._state == "data-end" and not self._line:  # nearly always: both lines at once
                m = _BETWEEN_CHUNKS_RE.match(piece)
                if m is not None:
                    pos += m.end()
                    self._chunk(m.group(1))
                    continue
            newline = piece.find(b"\n")
            if newline < 0:
                self._line += piece
                pos += len(piece)
                if len(self._line) > MAX_LINE:
                    raise BadFraming("chunked framing line too long")
                continue
            line, self._line = self._line + piece[:newline + 1], b""
            pos += newline + 1
            self._on_line(line)
        return out

    def _chunk(self, size: bytes) -> None:
        self._chunks += 1
        self.left = int(size, 16)
        self._state = "data" if self.left else "trailer"

    def _on_line(self, line: bytes) -> None:
        if self._state == "size":
            m = _CHUNK_SIZE_RE.fullmatch(line)
            if m is None:
                raise BadFraming("malformed chunk size")
            self._chunk(m.group(1))
        elif self._state == "data-end":
            if line != b"\r\n":
                raise BadFraming("chunk data longer than its size")
            self._state = "size"
        else:  # trailer fields, dropped, until the empty line
            self._trailer += len(line)
            if not line.endswith(b"\r\n") or self._trailer > MAX_TRAILER:
                raise BadFraming("malformed trailer")
            if line == b"\r\n":
                self._state = "done"


class BodyReceiver(asyncio.BufferedProtocol):
    def __init__(self, connection: Any, framing: Length | Chunked, carry: bytes) -> None:
        """Take over `connection`'s transport (an aiohttp RequestHandler) for the rest of a
        body; `carry`: its bytes already read from the socket, framing included."""
        self._connection = connection
        self._transport = connection.transport
        self._loop = asyncio.get_running_loop()
        self._framing = framing
        self._carry = carry
        self._target: memoryview | None = None  # the buffer being filled
        self._filled = self._want = 0           # body bytes in it so far; and wanted there
        self._scratch: bytearray | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._sink: memoryview | None = None  # set once the body is complete
        sock = self._transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._transport.pause_reading()
        self._transport.set_protocol(self)

    @property
    def ended(self) -> bool:
        """Every byte of the body was handed out."""
        return self._framing.done

    @property
    def waiting(self) -> bool:
        """The consumer waits for the client's bytes."""
        return self._waiter is not None

    # -- the consumer -------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether body bytes are here to take without waiting for the client."""
        if self._carry or self._framing.done or self._fd < 0:
            return True
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"))[0] > 0
        except OSError:  # closed meanwhile: the next fill says so
            return True

    async def fill(self, view: memoryview) -> int:
        """Receive body bytes into `view` until it is full or the body ends. Returns how many;
        fewer also when interrupt() cut the wait short, or when the client went away after
        sending some (the next call raises ConnectionResetError). BadFraming for a malformed
        chunked body."""
        filled = 0
        while self._carry and filled < len(view) and not self._framing.done:
            n = self._room(min(len(self._carry), len(view) - filled))
            view[filled:filled + n] = self._carry[:n]
            self._carry = self._carry[n:]
            filled = self._unframe(view, filled, filled + n)
            if self._framing.dense:
                await asyncio.sleep(0)  # the others' turn
        if filled == len(view) or self._framing.done:
            return filled
        self._target, self._filled, self._want = view, filled, len(view)
        try:
            await self._wait()
        except ConnectionResetError:
            if self._filled == filled:
                raise
        finally:
            self._target = None
        return self._filled

    async def wait_data(self) -> None:
        """Wait, holding no buffer, until the client sends more of the body."""
        while not self._carry and not self._framing.done:
            await self._wait()

    def interrupt(self) -> None:
        """End a fill() now: it returns what it has."""
        if self._target is not None:
            self._wake()

    def _unframe(self, view: memoryview, start: int, end: int) -> int:
        try:
            data_end = self._framing.unframe(view, start, end)
        except BadFraming as e:  # nothing more is read: the answer closes the connection
            self._fail(e)
            raise
        if self._framing.done:
            self._carry = b""  # behind the body: dropped
            self._drop_the_rest()
        return data_end

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        self._transport.resume_reading()
        try:
            await self._waiter
        finally:
            self._waiter = None
            if not self._closed and self._sink is None:
                self._transport.pause_reading()
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _read_on(self) -> None:
        if self._target is not None and not self._closed and self._error is None:
            self._transport.resume_reading()

    def _room(self, n: int) -> int:
        """How many of `n` bytes to read (or take from the carry) now."""
        n = self._framing.room(n)
        return min(n, DENSE_READ) if self._framing.dense else n

    def _drop_the_rest(self) -> None:
        if self._sink is None and not self._closed:
            self._sink = memoryview(bytearray(SINK))
            self._transport.resume_reading()

    # -- the transport ------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink
        if self._target is not None:
            return self._target[self._filled:self._filled + self._room(self._want - self._filled)]
        self._scratch = bytearray(self._framing.room(SCRATCH))
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            return  # behind the body: dropped
        self._connection.last_data = self._loop.time()
        if self._target is not None:
            try:
                self._filled = self._unframe(self._target, self._filled, self._filled + nbytes)
            except BadFraming:
                self._transport.pause_reading()
                return
            if self._filled < self._want and not self._framing.done:
                if self._framing.dense:  # libuv would read on at once: let the loop turn first
                    self._transport.pause_reading()
                    self._loop.call_soon(self._read_on)
                return
        elif self._scratch is not None:
            self._carry += self._scratch[:nbytes]
            self._scratch = None
        if self._sink is None:
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        if self._framing.done:
            return True  # the client is done sending: the response still goes out
        self._fail(ConnectionResetError("the client ended its request body short"))
        return None  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._fail(ConnectionResetError("Connection lost"))
        self._connection.connection_lost(exc)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # The response goes out through aiohttp's writer, whose flow control is its protocol's.
    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()
