"""Resumable uploads across a dropped connection, a restart, a crash and another process."""

import os
import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from regserve.registry.uploads import UploadSession

from .conftest import digest_of, http

BLOB = os.urandom(6 << 20)
DIGEST = digest_of(BLOB)


def start_upload(url, name="big"):
    status, headers, _ = http("POST", f"{url}/v2/{name}/blobs/uploads/")
    assert status == 202
    return urlparse(headers["Location"]).path


def send_partial_patch(url, path, data, declared_length):
    """Send a PATCH that declares `declared_length` bytes, send `data`, then drop the connection."""
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall((f"PATCH {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/octet-stream\r\n"
               f"Content-Length: {declared_length}\r\n\r\n").encode())
    s.sendall(data)
    time.sleep(0.2)
    s.close()


def upload_offset(url, path, expect=None, timeout=10.0):
    """The session's size as GET reports it (waiting for the server to settle a dropped request)."""
    deadline = time.time() + timeout
    while True:
        status, headers, _ = http("GET", f"{url}{path}")
        assert status == 204
        end = int(headers["Range"].split("-")[1])
        size = end + 1 if end or expect == 1 else (0 if expect != 1 else 1)
        if expect is None or size == expect or time.time() > deadline:
            return size
        time.sleep(0.05)


def hashstate_offsets(data: Path, path: str) -> list[int]:
    upload_id = path.rsplit("/", 1)[1]
    d = data / f"docker/registry/v2/repositories/big/_uploads/{upload_id}/hashstates/sha256"
    if not d.exists():  # the first PATCH has not settled yet
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())  # not temp files


def finish(url, path, offset):
    status, headers, _ = http("PATCH", f"{url}{path}", BLOB[offset:],
                              {"Content-Range": f"{offset}-{len(BLOB) - 1}"})
    assert status == 202, headers
    status, headers, _ = http("PUT", f"{url}{path}?digest={DIGEST}")
    assert status == 201
    status, _, body = http("GET", f"{url}/v2/big/blobs/{DIGEST}")
    assert status == 200 and body == BLOB


def test_resume_after_dropped_connection(server_factory, tmp_path):
    srv = server_factory()
    path = start_upload(srv.url)
    half = 3 << 20
    send_partial_patch(srv.url, path, BLOB[:half], len(BLOB))
    assert upload_offset(srv.url, path, expect=half) == half  # the bytes that arrived are kept
    deadline = time.time() + 10  # the state is written just after the data settles
    while hashstate_offsets(srv.data, path) != [half] and time.time() < deadline:
        time.sleep(0.05)
    assert hashstate_offsets(srv.data, path) == [half]        # and their hash state was saved
    finish(srv.url, path, half)


def test_resume_after_restart(server_factory):
    srv = server_factory()
    path = start_upload(srv.url)
    status, _, _ = http("PATCH", f"{srv.url}{path}", BLOB[:1 << 20], {"Content-Range": f"0-{(1 << 20) - 1}"})
    assert status == 202
    srv.stop()
    srv2 = server_factory(data=srv.data)
    assert upload_offset(srv2.url, path) == 1 << 20
    finish(srv2.url, path, 1 << 20)


def test_resume_after_crash_mid_patch(server_factory):
    """kill -9 while a PATCH streams: whatever reached the disk is the offset, and the hash state
    behind it (if any) is completed from the stored bytes."""
    srv = server_factory()
    path = start_upload(srv.url)
    u = urlparse(srv.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall((f"PATCH {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(BLOB)}\r\n\r\n").encode())
    s.sendall(BLOB[:5 << 20])
    time.sleep(0.5)
    srv.stop(signal.SIGKILL)
    s.close()
    srv2 = server_factory(data=srv.data)
    offset = upload_offset(srv2.url, path)
    assert 0 <= offset <= 5 << 20
    finish(srv2.url, path, offset)


def test_session_continues_on_another_process(server_factory):
    a = server_factory()
    b = server_factory(data=a.data)
    path = start_upload(a.url)
    assert http("PATCH", f"{a.url}{path}", BLOB[:100], {"Content-Range": "0-99"})[0] == 202
    assert http("PATCH", f"{b.url}{path}", BLOB[100:200], {"Content-Range": "100-199"})[0] == 202
    assert upload_offset(a.url, path) == 200
    finish(a.url, path, 200)


async def test_resume_does_not_reread_stored_bytes(client, monkeypatch):
    r = await client.post("/v2/big/blobs/uploads/")
    loc = r.headers["Location"]
    assert (await client.patch(loc, data=BLOB[:4 << 20])).status == 202

    async def forbidden(self, hasher, start, end):
        if end > start:
            raise AssertionError(f"re-read stored bytes {start}-{end}")

    monkeypatch.setattr(UploadSession, "_hash_stored", forbidden)
    assert (await client.patch(loc, data=BLOB[4 << 20:])).status == 202
    r = await client.put(f"{loc}?digest={DIGEST}")
    assert r.status == 201


async def test_missing_hash_state_falls_back_to_rehash(client, data_dir):
    r = await client.post("/v2/big/blobs/uploads/")
    loc, upload_id = r.headers["Location"], r.headers["Docker-Upload-UUID"]
    await client.patch(loc, data=BLOB[:1000])
    states = data_dir / f"docker/registry/v2/repositories/big/_uploads/{upload_id}/hashstates/sha256"
    for p in states.iterdir():
        p.write_bytes(b"corrupt")
    await client.patch(loc, data=BLOB[1000:])
    assert (await client.put(f"{loc}?digest={DIGEST}")).status == 201


@pytest.mark.parametrize("workers", [2])
def test_workers_share_sessions(server_factory, workers):
    """N processes on one port: sessions started on one worker continue on others."""
    srv = server_factory(workers=workers)
    for i in range(12):
        blob = os.urandom(100_000 + i)
        d = digest_of(blob)
        path = start_upload(srv.url, f"w{i}")
        for off in range(0, len(blob), 25_000):  # each request is a new connection
            chunk = blob[off:off + 25_000]
            st, _, _ = http("PATCH", f"{srv.url}{path}", chunk,
                            {"Content-Range": f"{off}-{off + len(chunk) - 1}"})
            assert st == 202
        assert http("PUT", f"{srv.url}{path}?digest={d}")[0] == 201
        assert http("GET", f"{srv.url}/v2/w{i}/blobs/{d}")[2] == blob
    children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert len(children) == workers
