"""The scenarios. Each takes a server and the shared blob files, does its work through the HTTP
API only, and returns its figures; the harness adds server CPU% and peak RSS around it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .client import (
    RECV_BUF,
    AsyncConnection,
    BlockingConnection,
    HTTPError,
    Latencies,
    hammer,
    location_path,
    map_file,
    with_query,
)
from .servers import Server

MIB = 1 << 20
GIB = 1 << 30
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class BlobFile:
    path: Path
    size: int
    digest: str
    _mapped: memoryview | None = field(default=None, init=False, repr=False, compare=False)

    def mapped(self) -> memoryview:
        """The file's mapping, which docker-framed pushes are sent from; made on first use,
        before any timing starts, then kept."""
        if self._mapped is None:
            self._mapped = map_file(self.path)
        return self._mapped

    @classmethod
    def create(cls, path: Path, size: int) -> "BlobFile":
        """Random bytes written once to disk in 8 MiB steps (never held whole in memory)."""
        sidecar = path.with_suffix(".digest")
        if path.exists() and path.stat().st_size == size and sidecar.exists():
            return cls(path, size, sidecar.read_text().strip())
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(8 * MIB, left))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        digest = f"sha256:{h.hexdigest()}"
        sidecar.write_text(digest)
        return cls(path, size, digest)


def label_of(size: int) -> str:
    return f"{size // MIB}MiB" if size < GIB else f"{size // GIB}GiB"


def _check(resp, *expected: int) -> None:
    if resp.status not in expected:
        raise HTTPError(f"unexpected status {resp.status} (wanted {expected}): {resp.body[:300]!r}")


# -- push ---------------------------------------------------------------------------------------

def push_large(server: Server, blob: BlobFile, chunk: int | None = None, repo: str = "bench/large",
               frame: int = 0, forget: bool = True) -> dict:
    """docker's way (POST, one streamed PATCH without Content-Range, PUT ?digest=), its body in
    chunked-encoding frames of `frame` bytes (default: docker's 32 KiB); or Content-Range PATCHes
    of `chunk` bytes. The server's copy is forgotten first (unless the caller did)."""
    if forget:
        server.forget_blob(blob.digest)
    conn = BlockingConnection(server.url)
    fd = os.open(blob.path, os.O_RDONLY)
    mapped = blob.mapped()
    try:
        start = time.perf_counter()
        r = conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        _check(r, 202)
        loc = location_path(r)
        octet = {"Content-Type": "application/octet-stream"}
        if chunk is None:
            r = conn.request("PATCH", loc, octet, file=(fd, 0, blob.size), chunked=True, frame=frame,
                             mapped=mapped)
            _check(r, 202)
            loc = location_path(r)
        else:
            for off in range(0, blob.size, chunk):
                n = min(chunk, blob.size - off)
                r = conn.request("PATCH", loc, {**octet, "Content-Range": f"{off}-{off + n - 1}"},
                                 file=(fd, off, n))
                _check(r, 202)
                loc = location_path(r)
        r = conn.request("PUT", with_query(loc, digest=blob.digest))
        _check(r, 201)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        conn.close()
    return {"MiB/s": blob.size / MIB / elapsed, "seconds": elapsed, "GiB": blob.size / GIB}


def push_concurrent(server: Server, blobs: list[BlobFile]) -> dict:
    """Every blob pushed at once, docker's way (one streamed PATCH each), each to a repository
    of its own. A blob listed twice is pushed twice at once (two CI jobs pushing the same
    layer): each push is received and hashed whole, only the commit finds it there."""
    for blob in blobs:
        server.forget_blob(blob.digest)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(blobs)) as pool:
        list(pool.map(lambda ib: push_large(server, ib[1], repo=f"bench/c{ib[0]}", forget=False),
                      enumerate(blobs)))
    elapsed = time.perf_counter() - start
    total = sum(b.size for b in blobs)
    return {"MiB/s": total / MIB / elapsed, "seconds": elapsed, "GiB": total / GIB}


def push_stream(url: str, blob: BlobFile, frame: int = 0) -> dict:
    """One streamed PATCH of the blob, timed alone: the client's side of push_large."""
    conn = BlockingConnection(url)
    fd = os.open(blob.path, os.O_RDONLY)
    mapped = blob.mapped()
    try:
        start = time.perf_counter()
        r = conn.request("PATCH", "/v2/x/blobs/uploads/u", file=(fd, 0, blob.size), chunked=True,
                         frame=frame, mapped=mapped)
        elapsed = time.perf_counter() - start
        _check(r, 202)
        if r.headers.get("range") != f"0-{blob.size - 1}":
            raise HTTPError(f"sink saw {r.headers.get('range')}")
    finally:
        os.close(fd)
        conn.close()
    return {"MiB/s": blob.size / MIB / elapsed}


def push_many_small(server: Server, blobs: BlobFile, count: int, size: int, concurrency: int) -> dict:
    """`count` blobs of `size` bytes (slices of one file), `concurrency` at a time; a single
    POST ?digest= where the server completes it, else POST then PUT."""
    digests = []
    with open(blobs.path, "rb") as f:
        for i in range(count):
            digests.append("sha256:" + hashlib.sha256(f.read(size)).hexdigest())
    fd = os.open(blobs.path, os.O_RDONLY)
    single = {"n": 0}

    async def run() -> tuple[float, object]:
        index = iter(range(count))

        async def one(conn: AsyncConnection):
            i = next(index)
            data = os.pread(fd, size, i * size)
            r = await conn.request("POST", f"/v2/bench/small/blobs/uploads/?digest={digests[i]}",
                                   {"Content-Type": "application/octet-stream"}, data)
            if r.status == 201:
                single["n"] += 1
                return r
            _check(r, 202)  # no single-request push: finish with PUT
            return await conn.request("PUT", with_query(location_path(r), digest=digests[i]),
                                      {"Content-Type": "application/octet-stream"}, data)

        return await hammer(server.url, concurrency, count, one)

    try:
        elapsed, lat = asyncio.run(run())
    finally:
        os.close(fd)
    return {"blobs/s": count / elapsed, "p99_ms": lat.pct(0.99) * 1000,
            "single_request": single["n"] == count}


# -- pull ---------------------------------------------------------------------------------------

def read_through(path: Path) -> None:
    """Read a file once, to nowhere, so that it is in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8 * MIB)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def cold_read(path: Path, step: int = 4 * MIB) -> float:
    """MiB/s of a sequential read of a file whose pages were dropped from the page cache first
    (posix_fadvise DONTNEED: no privilege needed, nothing else disturbed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(step)
        start, total = time.perf_counter(), 0
        while n := os.readv(fd, [buf]):
            total += n
        return total / MIB / (time.perf_counter() - start)
    finally:
        os.close(fd)


def evict(server: Server, blob: BlobFile) -> None:
    """Drop the server's copy of a blob from the page cache, as time or a restart would."""
    fd = os.open(server.blob_path(blob.digest) / "data", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(server: Server, blob: BlobFile) -> None:
    """Read the server's own copy of a blob once, so that both servers serve from the page cache
    (each has its copy, and the machine may have evicted one and not the other)."""
    path = server.blob_path(blob.digest) / "data"
    if path.exists():
        read_through(path)


PULL_SAMPLE_BYTES = 2 << 30  # a pull sample is at least this much: one 0.1 s GET is a coin flip


def pull_large(server: Server, blob: BlobFile, repo: str = "bench/large") -> dict:
    """GETs of the blob to nowhere, back to back on one connection: as many as make up
    PULL_SAMPLE_BYTES (one for blobs that large; at most 16), timed together."""
    warm(server, blob)
    gets = min(16, max(1, PULL_SAMPLE_BYTES // blob.size))
    conn = BlockingConnection(server.url)
    try:
        start = time.perf_counter()
        for _ in range(gets):
            r = conn.request("GET", f"/v2/{repo}/blobs/{blob.digest}", discard=True)
            _check(r, 200)
            if r.received != blob.size:
                raise HTTPError(f"short read {r.received}")
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return {"MiB/s": gets * blob.size / MIB / elapsed}


def get_blob(server: Server, blob: BlobFile, repo: str, follow_redirect: bool = False) -> tuple[float, bool]:
    """One GET of the blob to nowhere: its time, and whether it was redirected (followed to
    the target, as clients do, if `follow_redirect`; the redirect's round trip counted)."""
    conn = BlockingConnection(server.url)
    try:
        start = time.perf_counter()
        r = conn.request("GET", f"/v2/{repo}/blobs/{blob.digest}", discard=True)
        redirected = follow_redirect and r.status in (302, 307)
        if redirected:
            target = urlparse(r.headers["location"])
            other = BlockingConnection(f"{target.scheme}://{target.netloc}")
            try:
                r = other.request("GET", f"{target.path}?{target.query}", discard=True)
            finally:
                other.close()
        _check(r, 200)
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    if r.received != blob.size:
        raise HTTPError(f"short read {r.received}")
    return elapsed, redirected


def pull_cold(server: Server, blob: BlobFile, repo: str = "bench/large") -> dict:
    """One GET of a blob that is on disk only (evicted from the page cache): a layer pulled long
    after its push, or after a restart. Its limit is a cold read of the very same file, evicted
    again and read at once after the pull (`disk_MiB/s`: the same blocks, which the disk, or the
    host of a VM, may hold in its own cache by then): `of_disk_%` is the pull's share of it."""
    evict(server, blob)
    elapsed, _ = get_blob(server, blob, repo)
    pulled = blob.size / MIB / elapsed
    disk = cold_read(server.blob_path(blob.digest) / "data")
    return {"MiB/s": pulled, "disk_MiB/s": disk, "of_disk_%": 100 * pulled / disk}


def pull_after_push(server: Server, blob: BlobFile, clients: int, repo: str = "bench/fresh",
                    later: float = 0.0) -> dict:
    """What a cluster meets: a layer pushed, then pulled by `clients` nodes at once (or `later`
    seconds later), nothing warmed by the harness (the server's copy is wherever its push and
    the server left it: in the page cache or not). Each sample pushes the blob anew (forgetting
    the server's copy first) and times the pulls only."""
    push_large(server, blob, repo=repo)
    time.sleep(later)
    elapsed = max(_pull_at_once(server, blob, clients, repo))
    return {"MiB/s": blob.size * clients / MIB / elapsed, "seconds": elapsed}


def pull_concurrent(server: Server, blob: BlobFile, clients: int, repo: str = "bench/mid") -> dict:
    warm(server, blob)
    elapsed = max(_pull_at_once(server, blob, clients, repo))
    return {"MiB/s": blob.size * clients / MIB / elapsed}


def _pull_at_once(server: Server, blob: BlobFile, clients: int, repo: str,
                  recv_buf: int = RECV_BUF) -> list[float]:
    """`clients` connections, opened first, GET the blob at the same time, each whole: the
    seconds from their common start to each one's last byte."""
    conns = [BlockingConnection(server.url, recv_buf) for _ in range(clients)]
    start_line = threading.Barrier(clients + 1, timeout=60)
    start = 0.0

    def pull(conn: BlockingConnection) -> float:
        start_line.wait()
        r = conn.request("GET", f"/v2/{repo}/blobs/{blob.digest}", discard=True)
        _check(r, 200)
        if r.received != blob.size:
            raise HTTPError(f"short read {r.received}")
        return time.perf_counter() - start

    try:
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(pull, c) for c in conns]
            start = time.perf_counter()
            start_line.wait()
            return [f.result() for f in futures]
    finally:
        for c in conns:
            c.close()


FANOUT_RECV_BUF = 256 << 10  # per client: 500 clients with the usual 4 MiB would hold 2 GiB


def pull_fanout(server: Server, blob: BlobFile, clients: int, repo: str = "bench/mid") -> dict:
    """A cluster pulling one layer: `clients` connections opened first, then all GET the blob at
    once. Aggregate rate, the time to last byte (p50, p99, max) from the common start, and the
    aggregate as a share of one client pulling the same blob alone just before, as pull_large
    does (`one_client_MiB/s`, `of_one_%`)."""
    one = pull_large(server, blob, repo)["MiB/s"]  # warms it too
    done = Latencies(_pull_at_once(server, blob, clients, repo, FANOUT_RECV_BUF))
    last = done.pct(1.0)
    aggregate = clients * blob.size / MIB / last
    return {"MiB/s": aggregate, "one_client_MiB/s": one, "of_one_%": 100 * aggregate / one, "p50_s": done.pct(0.5),
            "p99_s": done.pct(0.99), "last_s": last}


def idle_connections(server: Server, count: int) -> dict:
    """What `count` idle keep-alive connections cost the server: each makes one request
    (GET /v2/) and then stays open, sending nothing. Resident memory of all the server's
    processes before and after (`rss_growth_MiB`, and per connection); how many are still open
    2 s later; and the latency of a request on a new connection meanwhile."""
    url = urlparse(server.url)
    request = f"GET /v2/ HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode()
    before = server.rss_total_mib()
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = socket.create_connection((url.hostname, url.port))
            conns.append(conn)
            conn.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:  # the answer's head; its 2-byte body may follow
                chunk = conn.recv(65536)
                if not chunk:
                    raise HTTPError("connection closed")
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise HTTPError(f"GET /v2/ answered {head[:40]!r}")
        time.sleep(2.0)
        after = server.rss_total_mib()
        open_ = sum(_still_open(c) for c in conns)
        start = time.perf_counter()
        probe = BlockingConnection(server.url, 64 << 10)
        try:
            _check(probe.request("GET", "/v2/"), 200)
        finally:
            probe.close()
        latency = time.perf_counter() - start
    finally:
        for c in conns:
            c.close()
    growth = after - before
    return {"rss_total_MiB": after, "rss_growth_MiB": growth, "KiB_per_connection": growth * 1024 / count,
            "open_after_2s": open_, "new_request_ms": latency * 1000}


def _still_open(conn: socket.socket) -> bool:
    """Whether the server has kept the connection open (what it sent since is read and dropped)."""
    while True:
        try:
            if not conn.recv(65536, socket.MSG_DONTWAIT):
                return False  # closed by the server
        except BlockingIOError:
            return True
        except OSError:
            return False


def range_get(server: Server, blob: BlobFile, count: int, concurrency: int, repo: str = "bench/mid") -> dict:
    warm(server, blob)
    rng = random.Random(7)
    offsets = [rng.randrange(0, blob.size - MIB) for _ in range(count)]
    it = iter(offsets)

    async def one(conn: AsyncConnection):
        off = next(it)
        r = await conn.request("GET", f"/v2/{repo}/blobs/{blob.digest}",
                               {"Range": f"bytes={off}-{off + MIB - 1}"})
        if r.status != 206 or len(r.body) != MIB:
            raise HTTPError(f"range answered {r.status} with {len(r.body)} bytes")
        return r

    elapsed, lat = asyncio.run(hammer(server.url, concurrency, count, one))
    return {"MiB/s": count / elapsed, "req/s": count / elapsed, "p99_ms": lat.pct(0.99) * 1000}


# -- manifests ----------------------------------------------------------------------------------

def prepare_manifest(server: Server, repo: str = "bench/manifest") -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cd = "sha256:" + hashlib.sha256(config).hexdigest()
    conn = BlockingConnection(server.url)
    try:
        r = conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        _check(r, 202)
        _check(conn.request("PUT", with_query(location_path(r), digest=cd), body=config), 201)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": cd, "size": len(config)},
                               "layers": []}).encode()
        _check(conn.request("PUT", f"/v2/{repo}/manifests/latest",
                            {"Content-Type": OCI_MANIFEST}, manifest), 201)
    finally:
        conn.close()
    return repo


def manifest_ops(server: Server, method: str, count: int, concurrency: int,
                 repo: str = "bench/manifest") -> dict:
    headers = {"Accept": OCI_MANIFEST}

    async def one(conn: AsyncConnection):
        return await conn.request(method, f"/v2/{repo}/manifests/latest", headers)

    elapsed, lat = asyncio.run(hammer(server.url, concurrency, count, one))
    return {"req/s": count / elapsed, "p50_ms": lat.pct(0.5) * 1000, "p99_ms": lat.pct(0.99) * 1000}


# -- resume -------------------------------------------------------------------------------------

def _offset(conn: BlockingConnection, loc: str) -> int:
    r = conn.request("GET", loc)
    _check(r, 204)
    end = int(r.headers.get("range", "0-0").split("-")[1])
    return end + 1 if end else 0


def resume(server: Server, blob: BlobFile, cut: bool, repo: str = "bench/resume") -> dict:
    """Push half, ask the offset, finish. With `cut`, the first PATCH declares the whole blob
    but the connection is dropped halfway; the client resumes from whatever offset the server
    reports. `works` says whether the blob then commits with the right digest."""
    server.forget_blob(blob.digest)
    half = blob.size // 2
    fd = os.open(blob.path, os.O_RDONLY)
    conn = BlockingConnection(server.url)
    octet = {"Content-Type": "application/octet-stream"}
    try:
        start = time.perf_counter()
        r = conn.request("POST", f"/v2/{repo}/blobs/uploads/")
        _check(r, 202)
        loc = location_path(r)
        if cut:
            cutter = BlockingConnection(server.url)
            cutter.request("PATCH", loc, octet, file=(fd, 0, blob.size), send_only=half)
            cutter.sock.shutdown(socket.SHUT_RDWR)
            cutter.close()
            offset, deadline = -1, time.time() + 10
            while time.time() < deadline:  # wait for the server to settle the dropped request
                now = _offset(conn, loc)
                if now == offset:
                    break
                offset = now
                time.sleep(0.2)
        else:
            r = conn.request("PATCH", loc, {**octet, "Content-Range": f"0-{half - 1}"}, file=(fd, 0, half))
            _check(r, 202)
            loc = location_path(r)
            offset = _offset(conn, loc)
        kept = offset
        if offset < blob.size:
            r = conn.request("PATCH", loc, {**octet, "Content-Range": f"{offset}-{blob.size - 1}"},
                             file=(fd, offset, blob.size - offset))
            if r.status != 202:
                return {"works": False, "kept_MiB": kept / MIB, "seconds": time.perf_counter() - start}
            loc = location_path(r)
        r = conn.request("PUT", with_query(loc, digest=blob.digest))
        elapsed = time.perf_counter() - start
        return {"works": r.status == 201, "kept_MiB": kept / MIB, "seconds": elapsed}
    except (HTTPError, OSError):
        return {"works": False, "kept_MiB": 0.0, "seconds": 0.0}
    finally:
        os.close(fd)
        conn.close()
