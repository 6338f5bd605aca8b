"""Blob downloads from worker threads: zero-copy sendfile, or a copy for a peer on this host.

uvloop has no loop.sendfile, and aiohttp's fallback copies the file through Python. Instead a
worker thread sends on a dup of the connection's socket (the dup keeps the socket alive even if
the event loop closes its own descriptor), in bursts: a burst sends until the download is done or
the socket's buffer is full, and then the thread goes back to the pool. The event loop waits for
the socket to take more (add_writer on the dup), holding no thread, for at most the write timeout
(http.timeouts.write): a client that takes nothing for that long is dropped. So clients that never
read cost a descriptor and a little memory each, never a thread: the pool stays free for the
downloads that move bytes. The event loop does nothing per byte.

How a download is sent depends on the peer (`http.sendfile` forces either way):
* A remote peer gets sendfile: the NIC reads the page cache and the server copies nothing.
* A peer on this host (a proxy or a client: a loopback address, or our own address on the
  connection) gets pread+write in 4 MiB steps. There the receiver's copy out of the socket is
  the bottleneck. After sendfile it copies cold page-cache pages alone; after a write it copies
  warm socket buffers, and the cold read is done by our thread on the other core. Measured with
  the benchmarks against distribution 2.8.2: pull_large 0.83-0.95x with sendfile, 1.21-1.33x
  copying. (Through a veth pair, MTU 1500, both ways pulled at 2.7-2.9 GB/s.)
* Only COPY_SLOTS downloads per process copy at once; the others use sendfile. With many
  concurrent downloads every core is busy and the saved copy is worth more (pull_concurrent,
  16 clients: 1.40x with sendfile, 1.19x all copying), and the slots bound the buffers' memory.
* Bodies under COPY_MIN use sendfile too: a copy's setup is not repaid on them (range_get, 16
  concurrent 1 MiB ranges: 3.60x with sendfile, 2.81x when they could take the copy slots).

The socket is corked (TCP_CORK) while the download is sent, so that the kernel sends only full
segments; uncorking at the end sends the rest. Without it the page-by-page splicing of sendfile
leaves partial segments: on loopback here 1.9-2.0 GB/s uncorked, 2.6-2.9 GB/s corked
(a bare sendfile loop, 256 MiB cached file, 8 transfers each).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mmap
import os
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator

from aiohttp import web

from .. import metrics
from ..storage import pagecache

log = logging.getLogger("regserve.download")
SMALL = 64 << 10           # below this a read+write beats a thread handoff
SENDFILE_STEP = 4 << 20     # per sendfile call, as Go does
COPY_STEP = 4 << 20         # per pread+write when copying: 1 MiB steps were 15% slower
COPY_SLOTS = 2              # copying downloads per process at once
COPY_MIN = 8 << 20          # smaller bodies go by sendfile even to a local peer (see below)
# Threads only run while bytes move (or the disk is read), so a few per core serve any number
# of downloads.
_pool = ThreadPoolExecutor(max_workers=max(16, 4 * (os.cpu_count() or 1)), thread_name_prefix="sendfile")
_copying = 0                # downloads copying now (changed on the event loop only)
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


class BlobTruncated(OSError):
    """The blob's file ended before the bytes promised in Content-Length."""


READ_AHEAD = 32 << 20       # kept asked of the disk ahead of what is sent (posix_fadvise WILLNEED)
COLD_STEP = 256 << 10       # read when the page cache has nothing yet: sent as soon as it is there
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # a read that takes only what is cached (0: any)
_CAN_ADVISE = hasattr(os, "posix_fadvise")
# Asking the disk costs the asker time (the kernel allocates the pages and queues their reads):
# threads of their own do it, beside the one sending.
_readahead = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readahead")


class Transfer:
    """One download's progress, across the bursts that send it. It owns `conn` and `file_fd`
    (duplicates made for it) and releases them, on the event loop, only when no burst runs:
    were they closed under a thread still sending, their numbers, reused by new connections or
    files, would receive this blob's bytes."""

    def __init__(self, conn: socket.socket, file_fd: int, offset: int, count: int, copy: bool) -> None:
        self.conn, self.file_fd, self.offset, self.count, self.copy = conn, file_fd, offset, count, copy
        self._mapping: mmap.mmap | None = None
        self._buffer: memoryview | None = None
        self._pending = 0  # bytes read into the buffer and not sent yet (copying)
        self._sent_from = 0
        self._asked = offset  # the disk has been asked for the file up to here
        self._asking: Future[None] | None = None

    def read_ahead(self) -> None:
        """Keep READ_AHEAD of what is still to be sent asked of the disk, by another thread: the
        disk's reads then run while the socket takes what was read before (pages already cached
        cost nothing)."""
        end = self.offset + min(self.count, READ_AHEAD)
        if not _CAN_ADVISE or end - self._asked < SENDFILE_STEP and self._asked > self.offset:
            return
        if self._asking is not None and not self._asking.done():
            return  # the last request is still being queued
        start, self._asked = self._asked, end
        # A descriptor of its own: the transfer may close its own before this runs.
        self._asking = _readahead.submit(_advise, os.dup(self.file_fd), start, end - start)

    def burst(self) -> bool:
        """In a worker thread: send until done (True) or the socket is full (False)."""
        return (_copy_blocking if self.copy else _sendfile_blocking)(self)

    def release(self) -> None:
        try:
            self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # sends the last segment
        except OSError:
            pass  # the connection is gone
        self.conn.close()
        os.close(self.file_fd)
        if self._mapping is not None:
            # A mapping of its own, unmapped at the end: a heap buffer this large would stay in
            # the process after the download (server.tune_malloc keeps freed memory for reuse).
            self._buffer.release()  # type: ignore[union-attr]
            self._mapping.close()


def _advise(fd: int, offset: int, length: int) -> None:
    try:
        pagecache.read_ahead(fd, offset, length)
    except OSError:
        pass  # only a hint
    finally:
        os.close(fd)


def _sendfile_blocking(t: Transfer) -> bool:
    sock_fd = t.conn.fileno()
    while t.count > 0:
        t.read_ahead()
        try:
            sent = os.sendfile(sock_fd, t.file_fd, t.offset, min(t.count, SENDFILE_STEP))
        except BlockingIOError:
            return False
        if sent == 0:
            raise BlobTruncated("blob shorter than expected")
        t.offset += sent
        t.count -= sent
    return True


def _copy_blocking(t: Transfer) -> bool:
    sock_fd = t.conn.fileno()
    if t._buffer is None:
        t._mapping = mmap.mmap(-1, min(COPY_STEP, t.count), flags=_MAP_FLAGS)
        t._buffer = memoryview(t._mapping)
    buffer = t._buffer
    while t.count > 0 or t._pending:
        if not t._pending:
            t.read_ahead()
            want = min(t.count, len(buffer))
            try:  # what the page cache holds, at once; else a little from the disk, so the
                # socket always has something while the disk reads on (1 GiB cold: +10%)
                read = os.preadv(t.file_fd, [buffer[:want]], t.offset, _RWF_NOWAIT)
            except BlockingIOError:
                read = os.preadv(t.file_fd, [buffer[:min(want, COLD_STEP)]], t.offset)
            if read == 0:
                raise BlobTruncated("blob shorter than expected")
            t.offset += read
            t.count -= read
            t._pending, t._sent_from = read, 0
        try:
            sent = os.write(sock_fd, buffer[t._sent_from:t._sent_from + t._pending])
        except BlockingIOError:
            return False
        t._sent_from += sent
        t._pending -= sent
    return True


def _address(name: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(name, tuple) or not name:
        return None
    try:
        address = ipaddress.ip_address(str(name[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def peer_is_local(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection's peer is on this host: a loopback address (IPv4-mapped too), or
    our own address on this connection (a client that dialled one of the host's addresses)."""
    peer = _address(transport.get_extra_info("peername"))
    if peer is None:
        return False
    return peer.is_loopback or peer == _address(transport.get_extra_info("sockname"))


async def send_file(request: web.Request, response: web.StreamResponse, path: str,
                    offset: int, count: int, use_sendfile: bool | None = None,
                    write_timeout: float = 60.0) -> web.StreamResponse:
    """Send `count` bytes of the file at `path` from `offset` as the response body. Raises
    FileNotFoundError before anything is sent if the file is gone. `use_sendfile` is the
    http.sendfile setting: None chooses by the peer (see the module's docstring)."""
    file_fd = os.open(path, os.O_RDONLY)
    try:
        return await send_spans(request, response, _one((file_fd, offset, count)), count, use_sendfile,
                                write_timeout)
    finally:
        os.close(file_fd)


async def _one(span: tuple[int, int, int]) -> AsyncIterator[tuple[int, int, int]]:
    yield span


def hang_up(request: web.Request, response: web.StreamResponse, err: OSError) -> web.StreamResponse:
    """A body that failed after its headers went out: the client must not take what it got for
    the whole, so the connection is dropped. A client that went away, or stopped reading, is no
    error of ours."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        log.debug("%s %s: the client went away or stopped reading mid-body: %r", request.method,
                  request.path, err)
    else:
        log.error("%s %s: body cut short: %s", request.method, request.path, err)
    response.force_close()
    if request.transport is not None:
        request.transport.abort()
    return response


async def send_spans(request: web.Request, response: web.StreamResponse,
                     spans: AsyncIterator[tuple[int, int, int]], count: int, use_sendfile: bool | None,
                     write_timeout: float) -> web.StreamResponse:
    """Send `count` bytes as the response body, from `spans`: (descriptor, offset, length) each,
    as they become available (one for a whole file; more for a pull-through cache's fetch, as
    its bytes land). The first span is had before the headers go out, so a failure before it
    is still an error answer; one after them drops the connection."""
    first = await anext(spans, None) if count and request.method != "HEAD" else None
    response.content_length = count
    await response.prepare(request)
    if first is not None:
        try:
            span: tuple[int, int, int] | None = first
            while span is not None:
                fd, offset, length = span
                if length <= SMALL:
                    async with asyncio.timeout(write_timeout):
                        await response.write(os.pread(fd, length, offset))
                else:
                    await _send_large(request, fd, offset, length, use_sendfile, write_timeout)
                span = await anext(spans, None)
        except (OSError, TimeoutError) as err:
            return hang_up(request, response, err)
        metrics.pulled(count)
    await response.write_eof()
    return response


async def _send_large(request: web.Request, file_fd: int, offset: int, count: int,
                      use_sendfile: bool | None, write_timeout: float) -> None:
    global _copying
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    while transport.get_write_buffer_size():  # headers must be on the wire before our bytes
        await asyncio.sleep(0.001)
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
    if use_sendfile is None:
        copy = count >= COPY_MIN and _copying < COPY_SLOTS and peer_is_local(transport)
    else:
        copy = not use_sendfile
    conn = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        transfer = Transfer(conn, os.dup(file_fd), offset, count, copy)
    except OSError:
        conn.close()
        raise
    loop = asyncio.get_running_loop()
    _copying += copy
    running: asyncio.Future[bool] | None = None
    try:
        while True:
            running = loop.run_in_executor(_pool, transfer.burst)
            if await asyncio.shield(running):
                break
            running = None
            await _writable(loop, conn.fileno(), write_timeout)
    except asyncio.CancelledError:
        if running is not None and not running.done():  # the burst goes on in its thread:
            try:
                transfer.conn.shutdown(socket.SHUT_RDWR)  # it ends promptly,
            except OSError:
                pass
            running.add_done_callback(lambda _: transfer.release())  # and releases after
            running = transfer = None  # type: ignore[assignment]
        raise
    finally:
        _copying -= copy
        if transfer is not None:
            transfer.release()


async def _writable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> None:
    """Until the socket takes more; TimeoutError after `timeout` seconds."""
    ready = loop.create_future()
    loop.add_writer(fd, _settle, ready)
    try:
        async with asyncio.timeout(timeout):
            await ready
    finally:
        loop.remove_writer(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
