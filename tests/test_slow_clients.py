"""Slow, idle and flooding clients cost bounded threads, memory and descriptors, and never stall
the others: a real server process with short timeouts, attacked while a real client works."""

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import digest_of, http

BLOB = os.urandom(32 << 20)  # far more than the socket buffers of a client that reads nothing
DIGEST = digest_of(BLOB)
TIMEOUTS = {"REGISTRY_HTTP_TIMEOUTS_READHEADER": "2s", "REGISTRY_HTTP_TIMEOUTS_BODYIDLE": "3s",
            "REGISTRY_HTTP_TIMEOUTS_WRITE": "3s", "REGISTRY_HTTP_TIMEOUTS_IDLE": "30s"}


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (reading what it sends)."""
    s.settimeout(0.2)
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if not s.recv(1 << 20):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def legit_pull(url: str, timeout: float = 10.0) -> float:
    start = time.time()
    status, _, body = http("GET", f"{url}/v2/app/blobs/{DIGEST}")
    assert status == 200 and body == BLOB
    elapsed = time.time() - start
    assert elapsed < timeout
    return elapsed


@pytest.fixture
def server(server_factory):
    srv = server_factory(env=TIMEOUTS)
    status, _, _ = http("POST", f"{srv.url}/v2/app/blobs/uploads/?digest={DIGEST}", BLOB)
    assert status == 201
    return srv


def test_downloads_nobody_reads_hold_no_thread_and_are_dropped(server):
    """More stalled downloads than the old pool had threads (128): a real pull still goes
    through at once, the server's threads stay few, and the stalled ones are dropped after the
    write timeout."""
    before = proc_status(server.proc.pid)
    stalled = []
    for _ in range(140):
        s = connect(server.port, rcvbuf=4096)
        s.sendall(f"GET /v2/app/blobs/{DIGEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stalled.append(s)
    time.sleep(1)
    during = proc_status(server.proc.pid)
    assert during["Threads"] < before["Threads"] + 30, (before, during)
    assert during["fds"] >= before["fds"] + 140  # each holds its connection (and blob) meanwhile
    legit_pull(server.url, timeout=5)
    deadline = time.time() + 10  # the write timeout (3 s) and the watchdog's tick; read nothing
    while proc_status(server.proc.pid)["fds"] > before["fds"] + 5 and time.time() < deadline:
        time.sleep(0.2)
    after = proc_status(server.proc.pid)
    assert after["fds"] <= before["fds"] + 5, (before, after)
    for s in stalled:
        s.close()


def test_stalled_uploads_hold_no_thread_nor_buffers_and_keep_what_arrived(server_factory):
    """100 PATCHes that send 1 MiB of a declared 64 MiB and go quiet: no thread and no staging
    buffer each while they wait, a real push goes through meanwhile, and after the body-idle
    timeout they are cut off, each session keeping its 1 MiB to resume from."""
    server = server_factory(env={**TIMEOUTS, "REGISTRY_HTTP_TIMEOUTS_BODYIDLE": "7s"})
    before = proc_status(server.proc.pid)
    stalled = []
    for i in range(100):
        status, headers, _ = http("POST", f"{server.url}/v2/up{i % 4}/blobs/uploads/")
        path = urlparse(headers["Location"]).path
        s = connect(server.port)
        s.sendall(f"PATCH {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {64 << 20}\r\n\r\n".encode())
        s.sendall(BLOB[:1 << 20])
        stalled.append((s, path))
    time.sleep(5)  # past the staging-idle pause: buffers and freed memory given back
    during = proc_status(server.proc.pid)
    assert during["Threads"] < before["Threads"] + 30, (before, during)
    # KiB: the process's spare staging buffers (24 MiB), not 2-3 MiB for each upload
    assert during["VmRSS"] < before["VmRSS"] + 60 * 1024, (before, during)
    small = os.urandom(4 << 20)
    status, _, _ = http("POST", f"{server.url}/v2/other/blobs/uploads/?digest={digest_of(small)}", small)
    assert status == 201
    assert all(closed_by_server(s, within=6) for s, _ in stalled)
    for s, path in stalled:
        s.close()
        status, headers, _ = http("GET", f"{server.url}{path}")
        assert status == 204 and headers["Range"] == f"0-{(1 << 20) - 1}"


def test_headers_sent_slowly_are_cut_off(server):
    """A slowloris sends its headers a byte at a time: closed once the header timeout passes,
    though bytes keep coming; a real client is served meanwhile."""
    slow = [connect(server.port) for _ in range(30)]
    for s in slow:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
    start = time.time()
    while time.time() - start < 3.5:
        for s in slow:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        time.sleep(0.3)
    status, _, _ = http("GET", f"{server.url}/v2/")
    assert status == 200
    assert all(closed_by_server(s, within=2) for s in slow)
    for s in slow:
        s.close()


def test_idle_connections_make_room_for_new_clients(server_factory):
    """Past http.maxconnections, the idle connections that waited longest are closed: a flood of
    idle connections costs bounded descriptors, and real clients keep being served."""
    srv = server_factory(env={**TIMEOUTS, "REGISTRY_HTTP_MAXCONNECTIONS": "100"})
    before = proc_status(srv.proc.pid)
    idle = [connect(srv.port) for _ in range(300)]
    time.sleep(0.5)
    for _ in range(10):
        status, _, _ = http("GET", f"{srv.url}/v2/")
        assert status == 200
    during = proc_status(srv.proc.pid)
    assert during["fds"] <= before["fds"] + 110, (before, during)
    assert sum(closed_by_server(s, within=0.5) for s in idle[:100]) >= 90  # the oldest went first
    for s in idle:
        s.close()


def test_idle_keepalive_connections_are_closed(server_factory):
    srv = server_factory(env={**TIMEOUTS, "REGISTRY_HTTP_TIMEOUTS_IDLE": "1s"})
    s = connect(srv.port)
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    start = time.time()
    assert closed_by_server(s, within=5)
    assert 0.8 < time.time() - start < 4
    s.close()
    never = connect(srv.port)  # a connection that never sends a byte
    assert closed_by_server(never, within=5)
    never.close()


def test_open_files_limit_is_raised_to_the_hard_limit(server):
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard
