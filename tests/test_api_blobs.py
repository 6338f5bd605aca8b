"""GET/HEAD/DELETE of blobs, Range requests, and the two download paths (sendfile, copy)."""

import asyncio
import logging
import os
import socket
import threading
import time

import aiohttp
import pytest

from regserve.api import sendfile
from regserve.registry.blobs import BlobStore

from .conftest import digest_of

BIG = os.urandom(3 << 20)      # large enough for the sendfile path
BIG_DIGEST = digest_of(BIG)


@pytest.fixture
async def pushed(client):
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={BIG_DIGEST}", data=BIG)
    assert r.status == 201
    return client


async def test_get_blob_headers_and_body(pushed):
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 200
    assert r.headers["Content-Length"] == str(len(BIG))
    assert r.headers["Docker-Content-Digest"] == BIG_DIGEST
    assert r.headers["ETag"] == f'"{BIG_DIGEST}"'
    assert r.headers["Accept-Ranges"] == "bytes"
    assert await r.read() == BIG


async def test_head_blob(pushed):
    r = await pushed.head(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 200
    assert r.headers["Content-Length"] == str(len(BIG))
    assert r.headers["Docker-Content-Digest"] == BIG_DIGEST
    assert await r.read() == b""


@pytest.mark.parametrize("header,start,end", [
    ("bytes=0-0", 0, 0),
    ("bytes=100-199", 100, 199),
    ("bytes=1048576-", 1 << 20, len(BIG) - 1),
    ("bytes=-1000", len(BIG) - 1000, len(BIG) - 1),
    ("bytes=5-99999999", 5, len(BIG) - 1),
])
async def test_range_requests(pushed, header, start, end):
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"Range": header})
    assert r.status == 206
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(BIG)}"
    assert await r.read() == BIG[start:end + 1]


@pytest.mark.parametrize("header", [f"bytes={len(BIG)}-", f"bytes={len(BIG) + 5}-{len(BIG) + 10}", "bytes=-0"])
async def test_unsatisfiable_range(pushed, header):
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"Range": header})
    assert r.status == 416
    assert r.headers["Content-Range"] == f"bytes */{len(BIG)}"
    assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_if_range_mismatch_serves_whole_blob(pushed):
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}",
                         headers={"Range": "bytes=0-9", "If-Range": '"sha256:other"'})
    assert r.status == 200 and len(await r.read()) == len(BIG)


async def test_if_none_match(pushed):
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"If-None-Match": f'"{BIG_DIGEST}"'})
    assert r.status == 304


async def test_unknown_blob(client):
    r = await client.get(f"/v2/foo/blobs/{digest_of(b'missing')}")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    r = await client.head(f"/v2/foo/blobs/{digest_of(b'missing')}")
    assert r.status == 404


async def test_invalid_digest_in_path(client):
    r = await client.get("/v2/foo/blobs/sha256:nothex")
    assert r.status == 400
    assert (await r.json())["errors"][0]["code"] == "DIGEST_INVALID"


async def test_delete_blob(pushed):
    r = await pushed.delete(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 202
    assert (await pushed.head(f"/v2/foo/blobs/{BIG_DIGEST}")).status == 404
    r = await pushed.delete(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 404
    assert (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_delete_disabled(aiohttp_client, app_factory):
    c = await aiohttp_client(app_factory(REGISTRY_STORAGE_DELETE_ENABLED="false"))
    await c.post(f"/v2/foo/blobs/uploads/?digest={BIG_DIGEST}", data=BIG)
    r = await c.delete(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 405
    assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"
    assert (await c.head(f"/v2/foo/blobs/{BIG_DIGEST}")).status == 200


async def test_blob_removed_from_disk_is_unknown(pushed, data_dir):
    hexd = BIG_DIGEST.split(":")[1]
    await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}")  # warm the size cache
    os.unlink(data_dir / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data")
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 404


async def test_keepalive_pulls_are_not_held_back_by_cork(pushed):
    """The sendfile path corks the socket; it must uncork after each body, or the body's last
    partial segment (and the next response) waits for the kernel's 200 ms cork timeout: 20 pulls
    would then take at least 4 s instead of a fraction of one."""
    start = time.monotonic()
    for _ in range(20):
        r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}")
        assert r.status == 200
        assert len(await r.read()) == len(BIG)
    assert time.monotonic() - start < 2.0


async def slots_released() -> None:
    """The client may have the whole body a moment before the handler gives its slot back."""
    for _ in range(200):
        if sendfile._copying == 0:
            return
        await asyncio.sleep(0.01)
    assert sendfile._copying == 0


class PathSpy:
    """Wraps the two download paths: `used` lists the ones that downloads took, in order (once
    per download, whatever its number of bursts); those named in `hold` first wait for `release`.
    Each still does its work."""

    def __init__(self, monkeypatch, hold: tuple[str, ...] = ()) -> None:
        self.used: list[str] = []
        self.started, self.release, self.finished = (threading.Event() for _ in range(3))
        seen: set[int] = set()
        for name in ("_copy_blocking", "_sendfile_blocking"):
            real = getattr(sendfile, name)

            def spy(transfer, _real=real, _name=name):
                self.started.set()
                try:
                    if id(transfer) not in seen:
                        seen.add(id(transfer))
                        if _name in hold:
                            assert self.release.wait(10)
                        self.used.append(_name)
                    return _real(transfer)
                finally:
                    self.finished.set()
            monkeypatch.setattr(sendfile, name, spy)


@pytest.mark.parametrize("setting,path", [(None, "_copy_blocking"), ("false", "_copy_blocking"),
                                          ("true", "_sendfile_blocking")])
async def test_download_paths_send_exact_bytes(aiohttp_client, app_factory, monkeypatch, setting, path):
    """Unset, a loopback peer (as here) is sent a copy; http.sendfile forces either way. Both
    paths send the exact bytes, whole and ranged; the copy's step is made odd-sized so that the
    ranges end mid-step."""
    monkeypatch.setattr(sendfile, "COPY_STEP", (1 << 20) + 13)
    monkeypatch.setattr(sendfile, "COPY_MIN", 1 << 20)
    used = PathSpy(monkeypatch).used
    env = {} if setting is None else {"REGISTRY_HTTP_SENDFILE": setting}
    client = await aiohttp_client(app_factory(**env))
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={BIG_DIGEST}", data=BIG)
    assert r.status == 201
    r = await client.get(f"/v2/foo/blobs/{BIG_DIGEST}")
    assert r.status == 200 and await r.read() == BIG
    start, end = 100_001, len(BIG) - 77
    r = await client.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"Range": f"bytes={start}-{end}"})
    assert r.status == 206 and await r.read() == BIG[start:end + 1]
    assert used == [path, path]


async def test_small_bodies_are_not_copied(pushed, monkeypatch):
    """Under COPY_MIN a copy's setup is not repaid: sendfile even to a local peer."""
    monkeypatch.setattr(sendfile, "COPY_MIN", 1 << 20)
    used = PathSpy(monkeypatch).used
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"Range": "bytes=0-1048574"})
    assert r.status == 206 and await r.read() == BIG[:(1 << 20) - 1]
    r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}", headers={"Range": "bytes=0-1048575"})
    assert r.status == 206 and await r.read() == BIG[:1 << 20]
    assert used == ["_sendfile_blocking", "_copy_blocking"]


async def test_copying_downloads_are_limited(pushed, monkeypatch):
    """Beyond COPY_SLOTS concurrent copying downloads, the others use sendfile. The first copy
    is held until the others have finished, so all of them overlap it."""
    monkeypatch.setattr(sendfile, "COPY_SLOTS", 1)
    monkeypatch.setattr(sendfile, "COPY_MIN", 1 << 20)
    spy = PathSpy(monkeypatch, hold=("_copy_blocking",))
    used = spy.used

    async def pull() -> bytes:
        r = await pushed.get(f"/v2/foo/blobs/{BIG_DIGEST}")
        assert r.status == 200
        return await r.read()
    first = asyncio.ensure_future(pull())
    try:
        for _ in range(500):
            if sendfile._copying:
                break
            await asyncio.sleep(0.01)
        assert sendfile._copying == 1, "the first pull should be copying"
        others = await asyncio.wait_for(asyncio.gather(pull(), pull()), 5)
        assert others == [BIG, BIG]
        assert used == ["_sendfile_blocking", "_sendfile_blocking"]
    finally:
        spy.release.set()
    assert await first == BIG
    await slots_released()
    assert await pull() == BIG  # the slot is free again: copied
    assert used[-1] == "_copy_blocking"


class Connection:
    """Only a transport's addresses: a stand-in for the unit test of peer_is_local."""

    def __init__(self, peername, sockname):
        self.names = {"peername": peername, "sockname": sockname}

    def get_extra_info(self, name):
        return self.names.get(name)


OURS = ("10.1.2.3", 5000)


@pytest.mark.parametrize("peername,sockname,local", [
    (("127.0.0.1", 4000), ("127.0.0.1", 5000), True), (("127.8.9.1", 4000), OURS, True),
    (("::1", 4000, 0, 0), ("::1", 5000, 0, 0), True), (("::ffff:127.0.0.1", 4000, 0, 0), OURS, True),
    (("10.1.2.3", 4000), OURS, True), (("::ffff:10.1.2.3", 4000, 0, 0), OURS, True),
    (("10.1.2.4", 4000), OURS, False), (("::ffff:10.9.9.9", 4000, 0, 0), OURS, False),
    (("fe80::1%eth0", 4000, 0, 2), ("fe80::2%eth0", 5000, 0, 2), False),
    (("2001:db8::1", 4000, 0, 0), ("2001:db8::2", 5000, 0, 0), False),
    (("10.1.2.3", 4000), None, False), (None, OURS, False), ("", OURS, False)])
def test_peer_is_local(peername, sockname, local):
    """Loopback peers, and peers with our own address on the connection, are on this host."""
    assert sendfile.peer_is_local(Connection(peername, sockname)) is local


@pytest.mark.parametrize("setting", ["false", "true", "streamed"])
async def test_client_gone_mid_download(aiohttp_client, app_factory, caplog, monkeypatch, setting):
    """A client that hangs up mid-body costs the server nothing lasting: no error beyond the
    connection's, the copy slot and the buffer are given back, and the next pull is whole.
    "streamed": the path of TLS connections and drivers without local files."""
    if setting == "streamed":
        monkeypatch.setattr(BlobStore, "local_path", lambda self, info: None)
    data = os.urandom(48 << 20)  # more than the socket buffers hold
    digest = digest_of(data)
    env = {} if setting == "streamed" else {"REGISTRY_HTTP_SENDFILE": setting}
    client = await aiohttp_client(app_factory(**env))
    r = await client.post(f"/v2/foo/blobs/uploads/?digest={digest}", data=data)
    assert r.status == 201
    for _ in range(3):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        writer.write(f"GET /v2/foo/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(1 << 20)
        writer.transport.abort()  # RST: the server's next write fails
    await slots_released()
    r = await client.get(f"/v2/foo/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert not errors, [rec.getMessage() for rec in errors]


@pytest.mark.parametrize("setting", ["false", "true"])
async def test_cancelled_download_keeps_its_descriptors(aiohttp_server, app_factory, tmp_path,
                                                        monkeypatch, setting):
    """A download's request cancelled while its thread sends (as on shutdown, or with aiohttp's
    handler cancellation, on here) must leave the thread its own descriptors. Were they closed
    under it, files opened next would reuse their numbers, and the thread would copy into them:
    here the files are opened just then, and must be unchanged when the thread has finished."""
    spy = PathSpy(monkeypatch, hold=("_copy_blocking", "_sendfile_blocking"))
    server = await aiohttp_server(app_factory(REGISTRY_HTTP_SENDFILE=setting))  # cancels handlers
    async with aiohttp.ClientSession() as session:
        r = await session.post(server.make_url(f"/v2/foo/blobs/uploads/?digest={BIG_DIGEST}"),
                               data=BIG)
        assert r.status == 201
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(f"GET /v2/foo/blobs/{BIG_DIGEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    assert await asyncio.to_thread(spy.started.wait, 10)
    writer.transport.abort()
    for _ in range(500):  # until the server has seen the connection go (and cancelled its handler)
        if not server.runner.server.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.runner.server.connections
    files = []
    for i in range(8):
        path = tmp_path / f"bystander-{i}"
        path.write_bytes(bytes([i]) * (1 << 20))
        files.append((path, os.open(path, os.O_RDWR)))
    try:
        spy.release.set()
        assert await asyncio.to_thread(spy.finished.wait, 10)
    finally:
        for _, fd in files:
            os.close(fd)
    for i, (path, _) in enumerate(files):
        assert path.read_bytes() == bytes([i]) * (1 << 20), f"{path.name} was written to"
