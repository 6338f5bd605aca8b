"""GET/HEAD/DELETE of blobs, Range requests, and the two download paths (sendfile, copy)."""

import asyncio
import os
import threading
import time

import pytest

from regserve.api import sendfile

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


def record_paths(monkeypatch) -> list[str]:
    """Which of the download paths ran, in order (each still does its work)."""
    used: list[str] = []
    for name in ("_copy_blocking", "_sendfile_blocking"):
        real = getattr(sendfile, name)

        def spy(*args, _real=real, _name=name):
            used.append(_name)
            return _real(*args)
        monkeypatch.setattr(sendfile, name, spy)
    return used


@pytest.mark.parametrize("setting,path", [(None, "_copy_blocking"), ("false", "_copy_blocking"),
                                          ("true", "_sendfile_blocking")])
async def test_download_paths_send_exact_bytes(aiohttp_client, app_factory, monkeypatch, setting, path):
    """Unset, a loopback peer (as here) is sent a copy; http.sendfile forces either way. Both
    paths send the exact bytes, whole and ranged; the copy's step is made odd-sized so that the
    ranges end mid-step."""
    monkeypatch.setattr(sendfile, "COPY_STEP", (1 << 20) + 13)
    used = record_paths(monkeypatch)
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


async def test_copying_downloads_are_limited(pushed, monkeypatch):
    """Beyond COPY_SLOTS concurrent copying downloads, the others use sendfile. The first copy
    is held until the others have finished, so all of them overlap it."""
    monkeypatch.setattr(sendfile, "COPY_SLOTS", 1)
    used = record_paths(monkeypatch)
    release = threading.Event()
    real_copy = sendfile._copy_blocking

    def held_copy(*args):
        assert release.wait(10)
        return real_copy(*args)
    monkeypatch.setattr(sendfile, "_copy_blocking", held_copy)

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
        release.set()
    assert await first == BIG
    assert sendfile._copying == 0
    assert await pull() == BIG  # the slot is free again: copied
    assert used[-1] == "_copy_blocking"


class Peer:
    def __init__(self, peername):
        self.peername = peername

    def get_extra_info(self, name):
        return self.peername if name == "peername" else None


@pytest.mark.parametrize("peername,local", [
    (("127.0.0.1", 4000), True), (("127.8.9.1", 4000), True), (("::1", 4000, 0, 0), True),
    (("::ffff:127.0.0.1", 4000, 0, 0), True), (("10.1.2.3", 4000), False),
    (("::ffff:10.1.2.3", 4000, 0, 0), False), (("fe80::1%eth0", 4000, 0, 2), False),
    (("2001:db8::1", 4000, 0, 0), False), (None, False), ("", False)])
def test_peer_is_local(peername, local):
    assert sendfile.peer_is_local(Peer(peername)) is local
