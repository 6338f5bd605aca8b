"""Blob downloads from a worker thread: zero-copy sendfile, or a copy for a peer on this host.

uvloop has no loop.sendfile, and aiohttp's fallback copies the file through Python. Instead a
worker thread sends on a dup of the connection's socket (the dup keeps the socket alive even if
the event loop closes its own descriptor), waiting for writability with poll(2) when the socket
buffer is full. The event loop does nothing per byte.

How the thread sends depends on the peer (`http.sendfile` forces either way):
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

The socket is corked (TCP_CORK) while the thread sends, so that the kernel sends only full
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
import select
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiohttp import web

log = logging.getLogger("regserve.download")
STALL_TIMEOUT_MS = 120_000  # a client that takes nothing for this long is dropped
SMALL = 64 << 10           # below this a read+write beats a thread handoff
SENDFILE_STEP = 4 << 20     # per sendfile call, as Go does: the thread re-checks the socket often
COPY_STEP = 4 << 20         # per pread+write when copying: 1 MiB steps were 15% slower
COPY_SLOTS = 2              # copying downloads per process at once
COPY_MIN = 8 << 20          # smaller bodies go by sendfile even to a local peer (see below)
_pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix="sendfile")
_copying = 0                # downloads copying now (changed on the event loop only)
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)


class BlobTruncated(OSError):
    """The blob's file ended before the bytes promised in Content-Length."""


def _wait_writable(poller: select.poll) -> None:
    if not poller.poll(STALL_TIMEOUT_MS):
        raise ConnectionResetError("client stalled")


def _sendfile_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while count > 0:
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, min(count, SENDFILE_STEP))
        except BlockingIOError:
            _wait_writable(poller)
            continue
        if sent == 0:
            raise BlobTruncated("blob shorter than expected")
        offset += sent
        count -= sent


def _copy_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    # A mapping of its own, unmapped at the end: a heap buffer this large would stay in the
    # process after the download (server.tune_malloc keeps freed memory for reuse).
    with mmap.mmap(-1, min(COPY_STEP, count), flags=_MAP_FLAGS) as mapping, \
            memoryview(mapping) as buffer:
        while count > 0:
            read = os.preadv(file_fd, [buffer[:min(count, len(buffer))]], offset)
            if read == 0:
                raise BlobTruncated("blob shorter than expected")
            sent = 0
            while sent < read:
                try:
                    sent += os.write(sock_fd, buffer[sent:read])
                except BlockingIOError:
                    _wait_writable(poller)
            offset += read
            count -= read


def _send_and_release(send: Callable[[int, int, int, int], None], conn: socket.socket,
                      file_fd: int, offset: int, count: int) -> None:
    """Run `send` in the worker thread, which owns `conn` and `file_fd` (duplicates made for
    it): it uncorks and closes them when done. Were the event loop to close them, a cancelled
    request could close them under a thread still sending, and their numbers, reused by new
    connections or files, would receive this blob's bytes."""
    try:
        send(conn.fileno(), file_fd, offset, count)
    finally:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # sends the last segment
        except OSError:
            pass  # the connection is gone
        conn.close()
        os.close(file_fd)


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
                    offset: int, count: int, use_sendfile: bool | None = None) -> web.StreamResponse:
    """Send `count` bytes of the file at `path` from `offset` as the response body. Raises
    FileNotFoundError before anything is sent if the file is gone. `use_sendfile` is the
    http.sendfile setting: None chooses by the peer (see the module's docstring)."""
    file_fd = os.open(path, os.O_RDONLY)
    try:
        response.content_length = count
        await response.prepare(request)
        try:
            if request.method == "HEAD" or count == 0:
                pass
            elif count <= SMALL:
                await response.write(os.pread(file_fd, count, offset))
            else:
                await _send_large(request, file_fd, offset, count, use_sendfile)
        except OSError as err:
            return hang_up(request, response, err)
        await response.write_eof()
        return response
    finally:
        os.close(file_fd)


def hang_up(request: web.Request, response: web.StreamResponse, err: OSError) -> web.StreamResponse:
    """A body that failed after its headers went out: the client must not take what it got for
    the whole, so the connection is dropped. A client that went away is no error of ours."""
    if isinstance(err, ConnectionError):
        log.debug("%s %s: the client went away mid-body: %s", request.method, request.path, err)
    else:
        log.error("%s %s: body cut short: %s", request.method, request.path, err)
    response.force_close()
    if request.transport is not None:
        request.transport.abort()
    return response


async def _send_large(request: web.Request, file_fd: int, offset: int, count: int,
                      use_sendfile: bool | None) -> None:
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
        thread_file_fd = os.dup(file_fd)
    except OSError:
        conn.close()
        raise
    send = _copy_blocking if copy else _sendfile_blocking
    _copying += copy
    try:
        await asyncio.get_running_loop().run_in_executor(
            _pool, _send_and_release, send, conn, thread_file_fd, offset, count)
    except asyncio.CancelledError:
        try:
            conn.shutdown(socket.SHUT_RDWR)  # ends the thread's sending promptly
        except OSError:
            pass  # the thread has finished and closed it
        raise
    finally:
        _copying -= copy
