"""The load generator. It speaks only the registry HTTP API and is built not to be the bottleneck:

* bulk bytes go through blocking sockets in threads: uploads with os.sendfile from the blob file
  (zero-copy, the client spends no CPU on payload), or, framed in docker's 32 KiB chunks (too
  small for a sendfile each), with sendmsg straight from a mapping of the file (the kernel's copy
  into the socket is the only one); downloads with recv_into one reused buffer;
* request-rate scenarios use a lean HTTP/1.1 client on uvloop streams (keep-alive, one request
  in flight per connection), far cheaper per request than a general-purpose client.

Both are checked against benchmarks/nullserver.py (`python -m benchmarks --calibrate`).
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

RECV_BUF = 4 << 20
FRAME = 32 << 10  # chunked-encoding frame of a streamed PATCH: docker's (Go's io.Copy buffer)
SENDFILE_FRAME_MIN = 1 << 20  # frames at least this large go out by sendfile, one each
SEND_FRAMES = 128  # smaller frames: this many sent per sendmsg (3 iovecs each, IOV_MAX 1024)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    received: int = 0  # body bytes read (and discarded, for large bodies)


class HTTPError(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return status, headers


class BlockingConnection:
    """One keep-alive connection used from one thread."""

    def __init__(self, base: str, recv_buf: int = RECV_BUF) -> None:
        u = urlparse(base)
        self.host, self.port, self.netloc = u.hostname, u.port, u.netloc
        self._connect()
        self.buf = memoryview(bytearray(recv_buf))

    def _connect(self) -> None:
        self.sock = socket.create_connection((self.host, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""
        self.closing = False  # the server said `Connection: close`: the next request reconnects

    def close(self) -> None:
        self.sock.close()

    def _head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, file: tuple[int, int, int] | None = None,
                chunked: bool = False, discard: bool = False, send_only: int | None = None,
                frame: int = 0, mapped: memoryview | None = None) -> Response:
        """`file` = (fd, offset, length) is sent with sendfile, as chunked frames of `frame` bytes
        (default FRAME) if `chunked`; frames smaller than SENDFILE_FRAME_MIN are sent from
        `mapped`, the file's map_file().
        `send_only` sends that many body bytes and returns without reading a response."""
        headers = dict(headers or {})
        frame = frame or FRAME
        if self.closing:  # as any HTTP client does
            self.sock.close()
            self._connect()
        if file is not None:
            if chunked:
                headers["Transfer-Encoding"] = "chunked"
            else:
                headers["Content-Length"] = str(file[2])
        elif body is not None:
            headers["Content-Length"] = str(len(body))
        elif method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = "0"
        self.sock.sendall(self._head(method, path, headers) + (body or b""))
        if file is not None:
            fd, offset, length = file
            if send_only is not None:
                length = send_only
            if chunked and frame < SENDFILE_FRAME_MIN:
                if mapped is None:
                    raise ValueError("frames this small are sent from the file's mapping")
                self._send_small_frames(mapped[offset:offset + length], frame)
            else:
                self._sendfile_frames(fd, offset, offset + length, frame if chunked else 0)
            if send_only is not None:
                return Response(0, {})
            if chunked:
                self.sock.sendall(b"0\r\n\r\n")
        return self._response(method, discard)

    def _sendfile_frames(self, fd: int, offset: int, end: int, frame: int) -> None:
        """The file range by sendfile: as chunked frames of `frame` bytes, or plain if 0."""
        while offset < end:
            n = min(frame or end - offset, end - offset)
            if frame:
                self.sock.sendall(f"{n:x}\r\n".encode())
            sent_to = offset + n
            while offset < sent_to:
                offset += os.sendfile(self.sock.fileno(), fd, offset, sent_to - offset)
            if frame:
                self.sock.sendall(b"\r\n")

    def _send_small_frames(self, body: memoryview, frame: int) -> None:
        """Chunked frames too small for a sendfile each (docker's 32 KiB), SEND_FRAMES of them
        per sendmsg, from the file's mapping."""
        step = frame * SEND_FRAMES
        for block in range(0, len(body), step):
            parts: list = []
            for start in range(block, min(block + step, len(body)), frame):
                piece = body[start:start + frame]
                parts += [b"%x\r\n" % len(piece), piece, b"\r\n"]
            sent = self.sock.sendmsg(parts)
            if sent < sum(map(len, parts)):  # interrupted: finish the slow way
                self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def _response(self, method: str, discard: bool) -> Response:
        data = self.pending
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HTTPError("connection closed")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status, headers = _parse_head(head)
        self.closing = headers.get("connection", "").lower() == "close"
        length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("content-length", 0))
        if not discard:
            while len(rest) < length:
                chunk = self.sock.recv(max(65536, length - len(rest)))
                if not chunk:
                    raise HTTPError("connection closed")
                rest += chunk
            self.pending = rest[length:]
            return Response(status, headers, rest[:length], length)
        got = min(len(rest), length)
        self.pending = rest[length:] if len(rest) > length else b""
        while got < length:
            n = self.sock.recv_into(self.buf, min(len(self.buf), length - got))
            if not n:
                raise HTTPError("connection closed")
            got += n
        return Response(status, headers, b"", got)


def map_file(path: str | os.PathLike) -> memoryview:
    """The whole file, mapped read-only with its pages populated now, so that sending from it
    later neither copies nor faults. It shares the page cache's pages: no memory of its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return memoryview(mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                    prot=mmap.PROT_READ))
    finally:
        os.close(fd)  # the mapping keeps the file


class AsyncConnection:
    """A lean keep-alive HTTP/1.1 connection on uvloop streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, netloc: str) -> None:
        self.reader, self.writer, self.netloc = reader, writer, netloc

    @classmethod
    async def open(cls, base: str) -> "AsyncConnection":
        u = urlparse(base)
        reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=4 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, u.netloc)

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes | None = None) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.netloc}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, hdrs = _parse_head(head[:-4])
        length = 0 if method == "HEAD" or status in (204, 304) else int(hdrs.get("content-length", 0))
        data = await self.reader.readexactly(length) if length else b""
        return Response(status, hdrs, data, length)

    async def close(self) -> None:
        self.writer.close()


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def pct(self, p: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(len(s) * p))] if s else 0.0


async def hammer(base: str, concurrency: int, count: int, make_request) -> tuple[float, Latencies]:
    """`count` requests over `concurrency` connections; returns (seconds, latencies)."""
    conns = [await AsyncConnection.open(base) for _ in range(concurrency)]
    lat = Latencies()
    remaining = count

    async def worker(conn: AsyncConnection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t = time.perf_counter()
            r = await make_request(conn)
            lat.add(time.perf_counter() - t)
            if r.status >= 400:
                raise HTTPError(f"status {r.status}: {r.body[:200]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        await c.close()
    return elapsed, lat


def location_path(resp: Response) -> str:
    loc = resp.headers["location"]
    u = urlparse(loc)
    return u.path + (f"?{u.query}" if u.query else "")


def with_query(path: str, **params: str) -> str:
    sep = "&" if "?" in path else "?"
    return path + sep + "&".join(f"{k}={v}" for k, v in params.items())
