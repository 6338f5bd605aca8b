"""Zero-copy blob downloads.

uvloop has no loop.sendfile, and aiohttp's fallback copies the file through Python. Instead a
worker thread calls os.sendfile on a dup of the connection's socket (the dup keeps the socket
alive even if the event loop closes its own descriptor), waiting for writability with poll(2)
when the socket buffer is full. The event loop does nothing per byte.

The socket is corked (TCP_CORK) while sendfile runs, so that the kernel sends only full
segments; uncorking at the end sends the rest. Without it the page-by-page splicing of sendfile
leaves partial segments: on loopback here 1.9-2.0 GB/s uncorked, 2.6-2.9 GB/s corked
(a bare sendfile loop, 256 MiB cached file, 8 transfers each).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

STALL_TIMEOUT_MS = 120_000  # a client that takes nothing for this long is dropped
SMALL = 64 << 10           # below this a read+write beats a thread handoff
SENDFILE_STEP = 4 << 20     # per sendfile call, as Go does: the thread re-checks the socket often
_pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix="sendfile")


def _send_blocking(sock_fd: int, file_fd: int, offset: int, count: int) -> None:
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while count > 0:
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, min(count, SENDFILE_STEP))
        except BlockingIOError:
            if not poller.poll(STALL_TIMEOUT_MS):
                raise ConnectionResetError("client stalled") from None
            continue
        if sent == 0:
            raise ConnectionResetError("blob shorter than expected")
        offset += sent
        count -= sent


async def send_file(request: web.Request, response: web.StreamResponse, path: str,
                    offset: int, count: int) -> web.StreamResponse:
    """Send `count` bytes of the file at `path` from `offset` as the response body. Raises
    FileNotFoundError before anything is sent if the file is gone."""
    file_fd = os.open(path, os.O_RDONLY)
    try:
        response.content_length = count
        await response.prepare(request)
        if request.method == "HEAD" or count == 0:
            pass
        elif count <= SMALL:
            await response.write(os.pread(file_fd, count, offset))
        else:
            await _send_large(request, file_fd, offset, count)
        await response.write_eof()
        return response
    finally:
        os.close(file_fd)


async def _send_large(request: web.Request, file_fd: int, offset: int, count: int) -> None:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    while transport.get_write_buffer_size():  # headers must be on the wire before our bytes
        await asyncio.sleep(0.001)
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
    sock = transport.get_extra_info("socket")
    sock_fd = os.dup(sock.fileno())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        await asyncio.get_running_loop().run_in_executor(_pool, _send_blocking, sock_fd, file_fd,
                                                         offset, count)
    finally:
        os.close(sock_fd)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # sends the last partial segment
        except OSError:
            pass  # the connection is gone
