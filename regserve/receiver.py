"""Receiving the rest of a request body straight into the consumer's buffers.

aiohttp hands a handler its body as bytes objects: uvloop copies each read out of its receive
buffer into one, aiohttp's parser copies the body out of that into another, and the upload
pipeline then copies those into its aligned staging buffers. Three copies of every byte pushed,
on the event loop, plus the objects' churn: a quarter of a push's CPU (perf, 1 GiB pushes).

A BodyReceiver takes the connection's transport over for the rest of a body whose length is
known (Content-Length): a buffered protocol, whose reads (recv_into) land in the buffer the
consumer hands to `fill()`, the staging buffer itself. Reading stops whenever no buffer is
waiting, so a slow writer slows the client (TCP flow control), as before. aiohttp's parser,
left in the middle of the body, never sees the connection again: the response closes it
(`Connection: close`), and the client opens another for its next request. Whatever the client
sends behind the body (a pipelined request) is read and dropped until then: closing a socket
with unread bytes resets the connection, and the client could lose the response.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import Any

SCRATCH = 4096  # what a quiet body's next read takes, while no buffer is held for it
SINK = 64 << 10  # what is read behind the body goes here, and is dropped


class BodyReceiver(asyncio.BufferedProtocol):
    def __init__(self, connection: Any, remaining: int, carry: bytes) -> None:
        """Take over `connection`'s transport (an aiohttp RequestHandler) for the `remaining`
        body bytes not yet read from the socket; `carry`: those aiohttp already read."""
        self._connection = connection
        self._transport = connection.transport
        self._loop = asyncio.get_running_loop()
        self.remaining = remaining
        self._carry = carry
        self._target: memoryview | None = None  # the buffer being filled
        self._filled = self._want = 0           # bytes in it so far; and wanted there
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
        return not self.remaining and not self._carry

    @property
    def waiting(self) -> bool:
        """The consumer waits for the client's bytes."""
        return self._waiter is not None

    # -- the consumer -------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether body bytes are here to take without waiting for the client."""
        if self._carry or not self.remaining or self._fd < 0:
            return bool(self._carry) or self._fd < 0
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"))[0] > 0
        except OSError:  # closed meanwhile: the next fill says so
            return True

    async def fill(self, view: memoryview) -> int:
        """Receive body bytes into `view` until it is full or the body ends. Returns how many;
        fewer also when interrupt() cut the wait short, or when the client went away after
        sending some (the next call raises ConnectionResetError)."""
        n = min(len(self._carry), len(view))
        if n:
            view[:n] = self._carry[:n]
            self._carry = self._carry[n:]
        want = min(len(view), n + self.remaining)
        if n == want:
            return n
        self._target, self._filled, self._want = view, n, want
        try:
            await self._wait()
        except ConnectionResetError:
            if self._filled == n:
                raise
        finally:
            self._target = None
        return self._filled

    async def wait_data(self) -> None:
        """Wait, holding no buffer, until the client sends more of the body."""
        while not self._carry and self.remaining:
            await self._wait()

    def interrupt(self) -> None:
        """End a fill() now: it returns what it has."""
        if self._target is not None:
            self._wake()

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

    # -- the transport ------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink
        if self._target is not None:
            return self._target[self._filled:self._want]
        self._scratch = bytearray(min(SCRATCH, self.remaining))
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            return  # behind the body: dropped
        self.remaining -= nbytes
        self._connection.last_data = self._loop.time()
        if self._target is not None:
            self._filled += nbytes
            if self._filled < self._want:
                return
        elif self._scratch is not None:
            self._carry += self._scratch[:nbytes]
            self._scratch = None
        if self.remaining:
            self._transport.pause_reading()
        else:  # the body is all here: read on, and drop what follows it
            self._sink = memoryview(bytearray(SINK))
        self._wake()

    def eof_received(self) -> bool | None:
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
