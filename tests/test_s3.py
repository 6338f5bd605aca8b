"""regserve on S3 (a real Ceph RGW), as operators run it: stateless replicas over one bucket
behind a load balancer, and garbage collection from the command line. The driver contract and
the API suite over S3 are in test_storage_contract.py and test_over_every_driver.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from regserve.storage import Busy, PathNotFound, s3

from .conftest import OCI_MANIFEST, digest_of, http, image_manifest, require_tool
from .test_layout_compat import Distribution
from .test_resume import upload_offset


def s3_env(rgw: dict[str, str], root: str) -> dict[str, str]:
    return {"REGISTRY_STORAGE": "s3", "REGISTRY_STORAGE_S3_BUCKET": rgw["S3_BUCKET"],
            "REGISTRY_STORAGE_S3_REGIONENDPOINT": rgw["S3_ENDPOINT"], "REGISTRY_STORAGE_S3_REGION": "us-east-1",
            "REGISTRY_STORAGE_S3_ACCESSKEY": rgw["S3_ACCESS_KEY"], "REGISTRY_STORAGE_S3_SECRETKEY": rgw["S3_SECRET_KEY"],
            "REGISTRY_STORAGE_S3_ROOTDIRECTORY": root, "REGISTRY_STORAGE_S3_CHUNKSIZE": str(5 << 20)}


@pytest.fixture
def replicas(rgw, server_factory, tmp_path):
    root = f"/replicas-{uuid.uuid4().hex[:12]}"
    env = s3_env(rgw, root)
    servers = []
    for i in range(3):
        data = tmp_path / f"unused-{i}"
        data.mkdir()
        servers.append(server_factory(data, env=env))
    return servers, env


def test_a_push_whose_every_request_lands_on_another_replica(replicas):
    (a, b, c), _ = replicas
    layer = os.urandom(13 << 20)  # more than two parts of the 5 MiB chunksize
    config = b'{"architecture":"amd64","os":"linux"}'
    status, headers, _ = http("POST", f"{a.url}/v2/team/app/blobs/uploads/")
    assert status == 202
    location = headers["Location"]
    if location.startswith("http"):
        location = "/" + location.split("/", 3)[3]
    offset = 0
    for i, server in enumerate((b, c, a, b)):  # a chunk a replica, in order
        chunk = layer[offset:offset + len(layer) // 4 + (len(layer) % 4 if i == 3 else 0)]
        status, headers, body = http("PATCH", server.url + location, chunk, {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
        assert status == 202, body
        offset += len(chunk)
        assert headers["Range"] == f"0-{offset - 1}"
        location = headers["Location"]
        if location.startswith("http"):
            location = "/" + location.split("/", 3)[3]
    assert offset == len(layer)
    sep = "&" if "?" in location else "?"
    status, _, body = http("PUT", f"{c.url}{location}{sep}digest={digest_of(layer)}")
    assert status == 201, body
    assert http("POST", f"{a.url}/v2/team/app/blobs/uploads/?digest={digest_of(config)}", config)[0] == 201
    manifest = image_manifest(digest_of(config), len(config), [(digest_of(layer), len(layer))])
    status, _, body = http("PUT", f"{b.url}/v2/team/app/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
    assert status == 201, body

    for server in (a, b, c):  # every replica serves it, byte-exact
        status, _, got = http("GET", f"{server.url}/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert (status, got) == (200, manifest)
        status, headers, got = http("GET", f"{server.url}/v2/team/app/blobs/{digest_of(layer)}")
        assert status == 200 and got == layer  # redirected to the engine, and followed
        status, headers, got = http("GET", f"{server.url}/v2/team/app/blobs/{digest_of(layer)}",
                                    headers={"Range": "bytes=5242000-5243999"})
        assert status == 206 and got == layer[5242000:5244000]
        status, headers, got = http("HEAD", f"{server.url}/v2/team/app/blobs/{digest_of(layer)}")
        assert status == 200 and int(headers["Content-Length"]) == len(layer) and got == b""
    status, _, body = http("GET", f"{a.url}/v2/_catalog")
    assert status == 200 and b"team/app" in body


def test_garbage_collect_over_s3(replicas, tmp_path):
    (a, _, _), env = replicas
    kept, orphan = os.urandom(4000), os.urandom(5000)
    config = b"{}"
    for blob in (kept, orphan, config):
        assert http("POST", f"{a.url}/v2/gc/app/blobs/uploads/?digest={digest_of(blob)}", blob)[0] == 201
    manifest = image_manifest(digest_of(config), len(config), [(digest_of(kept), len(kept))])
    assert http("PUT", f"{a.url}/v2/gc/app/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})[0] == 201
    cfg = tmp_path / "config.yml"
    cfg.write_text("version: 0.1\nstorage:\n  s3: {}\n")
    run = subprocess.run([sys.executable, "-m", "regserve", "garbage-collect", str(cfg), "--grace", "0s"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
                         cwd=str(Path(tmp_path)))
    assert run.returncode == 0, run.stderr
    assert f"blob eligible for deletion: {digest_of(orphan)}" in run.stdout
    assert http("HEAD", f"{a.url}/v2/gc/app/blobs/{digest_of(orphan)}")[0] == 404
    assert http("GET", f"{a.url}/v2/gc/app/blobs/{digest_of(kept)}")[2] == kept


def raw_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A GET that does not follow redirects."""
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("GET", u.path + ("?" + u.query if u.query else ""), headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        conn.close()


def test_blob_downloads_redirect_to_the_object_store_unless_disabled(rgw, server_factory, tmp_path):
    root = f"/redirect-{uuid.uuid4().hex[:12]}"
    blob = os.urandom(3 << 20)
    d = digest_of(blob)
    servers = {}
    for name, extra in (("redirect", {}), ("proxy", {"REGISTRY_STORAGE_REDIRECT_DISABLE": "true"})):
        data = tmp_path / name
        data.mkdir()
        servers[name] = server_factory(data, env={**s3_env(rgw, root), **extra})
    assert http("POST", f"{servers['proxy'].url}/v2/r/app/blobs/uploads/?digest={d}", blob)[0] == 201

    status, headers, _ = raw_get(f"{servers['redirect'].url}/v2/r/app/blobs/{d}")
    assert status == 307 and headers["Docker-Content-Digest"] == d
    assert headers["Location"].startswith(rgw["S3_ENDPOINT"] + "/")  # the engine itself
    status, _, got = raw_get(headers["Location"], {"Range": "bytes=100-199"})
    assert (status, got) == (206, blob[100:200])  # clients send their Range on
    assert raw_get(headers["Location"])[2] == blob
    status, headers, got = http("HEAD", f"{servers['redirect'].url}/v2/r/app/blobs/{d}")
    assert status == 200 and int(headers["Content-Length"]) == len(blob)  # HEAD answers here

    status, headers, got = raw_get(f"{servers['proxy'].url}/v2/r/app/blobs/{d}")
    assert status == 200 and got == blob and "Location" not in headers
    status, headers, got = raw_get(f"{servers['proxy'].url}/v2/r/app/blobs/{d}", {"Range": "bytes=-10"})
    assert status == 206 and got == blob[-10:]


def test_skopeo_pulls_through_the_redirects(rgw, server_factory, tmp_path):
    from .oci_layout import build_image
    from .test_e2e_skopeo import ROOT as REPO_ROOT
    from .test_e2e_skopeo import blobs, skopeo
    require_tool("skopeo", "real client for end-to-end tests")
    data = tmp_path / "unused"
    data.mkdir()
    srv = server_factory(data, env={**s3_env(rgw, f"/skopeo-{uuid.uuid4().hex[:12]}"),
                                    "REGISTRY_LOG_ACCESSLOG_DISABLED": "false"})
    host = srv.url.removeprefix("http://")
    src, out = tmp_path / "src", tmp_path / "out"
    build_image(src, "v1", REPO_ROOT / "regserve")
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src}:v1", f"docker://{host}/s3/app:v1")
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{host}/s3/app:v1", f"oci:{out}:v1")
    assert blobs(out) == blobs(src)
    log = srv.log_path.read_text()
    assert "http.response.status=307" in log  # the layers came from the engine


class _BuffersOut:
    """Which part buffers a driver's pool handed out are not back yet, and the most bytes of
    them out at once."""

    def __init__(self, driver: Any) -> None:
        self.out: dict[int, int] = {}  # id -> size
        self.peak_bytes = 0
        get, put = driver.parts.get, driver.parts.put

        def watched_get(size: int) -> bytearray:
            buffer = get(size)
            self.out[id(buffer)] = size
            self.peak_bytes = max(self.peak_bytes, sum(self.out.values()))
            return buffer

        def watched_put(buffer: bytearray) -> None:
            self.out.pop(id(buffer), None)
            put(buffer)
        driver.parts.get, driver.parts.put = watched_get, watched_put


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "received-in-place"])
async def test_body_bytes_of_all_writers_stay_within_the_budget(rgw, in_place):
    """Concurrent writers wait for room before they take more of a body, rather than grow the
    process: at no time do the bytes they hold (staged, filling a part, parts in flight) exceed
    the budget; with the pipeline's shared writing threads fewer than the writers, no writer
    starves the others (admission happens on the event loop, before a thread is involved), and
    every object arrives whole. Batches straddle parts' ends, as real bodies do: when a
    straddling batch needed the next part's room first, every holder waited for room that
    only its own unfinished part would free (32 concurrent pushes hung)."""
    from regserve.storage.budget import ByteBudget
    from regserve.storage.s3 import S3Driver
    driver = S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                      secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/budget-{uuid.uuid4().hex[:12]}",
                      chunksize=5 << 20)
    driver.buffers = ByteBudget(10 << 20)  # two parts for six writers
    peak = 0
    take = driver.buffers.take

    async def watched_take(n: int) -> None:
        nonlocal peak
        await take(n)
        peak = max(peak, driver.buffers.used)
    driver.buffers.take = watched_take  # type: ignore[method-assign]
    buffers = _BuffersOut(driver)
    blobs = [os.urandom((12 << 20) + i) for i in range(6)]

    threads = ThreadPoolExecutor(2)  # fewer writing threads than writers, as the upload pipeline has

    async def push(i: int) -> None:
        loop = asyncio.get_running_loop()
        await driver.put_content(f"/up/{i}/startedat", b"x")
        writer = await driver.append(f"/up/{i}/data")
        if in_place:  # fills end at parts' ends; receiving runs ahead of writing
            await _received_in_place(writer, blobs[i], lag=2)
            await writer.commit(f"/blobs/{i}", len(blobs[i]))
            return
        for start in range(0, len(blobs[i]), 700_000):  # batches that straddle parts' ends
            piece = blobs[i][start:start + 700_000]
            await writer.ready()  # as the upload pipeline does, on the loop
            await writer.admit(len(piece))
            await loop.run_in_executor(threads, writer.write_from_thread, [piece], loop)
        await writer.commit(f"/blobs/{i}", len(blobs[i]))
    try:
        await asyncio.wait_for(asyncio.gather(*(push(i) for i in range(6))), 120)  # no deadlock
        assert peak <= 10 << 20 and driver.buffers.used == 0
        # A part gets a whole buffer only once the budget covers it: one that a straddling
        # batch started early grows as bytes come (six writers with a whole part each: 30 MiB)
        assert 5 << 20 <= buffers.peak_bytes <= 10 << 20
        for i, blob in enumerate(blobs):
            assert await driver.get_content(f"/blobs/{i}") == blob
    finally:
        threads.shutdown(wait=False, cancel_futures=True)
        await driver.close()


def distribution_on_s3(rgw: dict[str, str], root: str, tmp: Path) -> Distribution:
    """The real CNCF distribution 2.8.2 (Debian's docker-registry) on the same bucket and root."""
    return Distribution(None, tmp, storage=f"""  s3:
    region: us-east-1
    regionendpoint: {rgw["S3_ENDPOINT"]}
    bucket: {rgw["S3_BUCKET"]}
    accesskey: {rgw["S3_ACCESS_KEY"]}
    secretkey: {rgw["S3_SECRET_KEY"]}
    rootdirectory: {root}
    secure: false
  redirect: {{disable: true}}
""")


def push_image(url: str, name: str, layer: bytes) -> bytes:
    config = b'{"architecture":"amd64","os":"linux"}'
    for blob in (config, layer):  # POST, then the whole blob in the PUT: what both servers take
        status, headers, body = http("POST", f"{url}/v2/{name}/blobs/uploads/")
        assert status == 202, body
        location = headers["Location"]
        location = location if location.startswith("http") else url + location
        sep = "&" if "?" in location else "?"
        status, _, body = http("PUT", f"{location}{sep}digest={digest_of(blob)}", blob,
                               {"Content-Type": "application/octet-stream"})
        assert status == 201, body
    manifest = image_manifest(digest_of(config), len(config), [(digest_of(layer), len(layer))])
    status, _, body = http("PUT", f"{url}/v2/{name}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
    assert status == 201, body
    return manifest


def pull_image(url: str, name: str, manifest: bytes, layer: bytes) -> None:
    status, _, got = http("GET", f"{url}/v2/{name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert (status, got) == (200, manifest)
    status, _, got = http("GET", f"{url}/v2/{name}/blobs/{digest_of(layer)}")
    assert (status, got) == (200, layer)
    assert name.encode() in http("GET", f"{url}/v2/_catalog")[2]


def test_a_bucket_shared_with_distribution_both_ways(rgw, server_factory, tmp_path):
    require_tool("docker-registry", "CNCF distribution, the layout reference")
    root = f"/interop-{uuid.uuid4().hex[:12]}"
    data = tmp_path / "unused"
    data.mkdir()
    ours = server_factory(data, env=s3_env(rgw, root))
    theirs = distribution_on_s3(rgw, root, tmp_path)
    try:
        by_them = os.urandom(7 << 20)
        manifest = push_image(theirs.url, "from/distribution", by_them)
        pull_image(ours.url, "from/distribution", manifest, by_them)
        by_us = os.urandom(11 << 20)  # several parts at the tests' 5 MiB chunk size
        manifest = push_image(ours.url, "from/regserve", by_us)
        pull_image(theirs.url, "from/regserve", manifest, by_us)
    finally:
        theirs.stop()


async def test_batch_deletes_carry_content_md5(rgw):
    """Stricter S3 engines refuse a DeleteObjects without Content-MD5; the engine checks it."""
    import base64
    import hashlib

    from regserve.storage.s3 import S3Driver
    driver = S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                      secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/md5-{uuid.uuid4().hex[:12]}")
    sent: list[tuple[str | None, bytes]] = []

    def capture(request, **_):
        md5 = request.headers.get("Content-MD5")
        sent.append((md5.decode() if isinstance(md5, bytes) else md5, bytes(request.body)))
    try:
        for i in range(3):
            await driver.put_content(f"/doomed/{i}", b"x")
        (await driver._s3()).meta.events.register("before-send.s3.DeleteObjects", capture)
        await driver.delete("/doomed")
        assert sent and all(md5 == base64.b64encode(hashlib.md5(body).digest()).decode() for md5, body in sent)
        with pytest.raises(PathNotFound):
            await driver.stat("/doomed")
    finally:
        await driver.close()


def _driver(rgw: dict[str, str], name: str) -> Any:
    from regserve.storage.s3 import S3Driver
    return S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                    secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/{name}-{uuid.uuid4().hex[:12]}",
                    chunksize=5 << 20)


async def _received_in_place(writer: Any, blob: bytes, fill: int = 700_000, lag: int = 4) -> None:
    """Feed `blob` as the upload pipeline feeds a body received in place: room, a fill straight
    into stage_space(), staged, admitted, hashed from take_staged()'s views; the writing comes
    `lag` fills later, so receiving runs ahead into the next parts' buffers."""
    pending: list[Any] = []
    pos = 0
    while pos < len(blob):
        while pending and not writer.ready_now():  # as the pipeline hands its batch over first
            await writer.write(pending.pop(0))
        await writer.ready()
        space = writer.stage_space()
        n = min(len(space), fill, len(blob) - pos)
        space[:n] = blob[pos:pos + n]
        writer.staged(n)
        await writer.admit(n)
        data, staged = writer.take_staged()
        assert b"".join(bytes(d) for d in data) == blob[pos:pos + n]
        pos += n
        pending.append(staged)
        if len(pending) > lag:
            await writer.write(pending.pop(0))
    for staged in pending:
        await writer.write(staged)


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "received-in-place"])
async def test_every_multipart_upload_has_equal_parts_as_parts_grow(rgw, monkeypatch, in_place):
    """Parts grow so that 10,000 reach far, yet each multipart upload keeps one part size (R2
    refuses unequal ones): a writer moves to a new segment when its parts double. Received in
    place, a part received ahead that starts the next segment gets that segment's size."""
    monkeypatch.setattr(s3, "PARTS_PER_SEGMENT", 2)
    driver = _driver(rgw, "segments")
    sizes: dict[str, set[int]] = {}
    try:
        client = await driver._s3()
        upload_part = client.upload_part

        async def recorded(**kw: Any) -> Any:
            sizes.setdefault(kw["UploadId"], set()).add(len(kw["Body"]))
            return await upload_part(**kw)
        client.upload_part = recorded
        await driver.put_content("/up/startedat", b"x")
        writer = await driver.append("/up/data")
        blob = os.urandom((35 << 20) + 3)
        if in_place:
            await _received_in_place(writer, blob)
        else:
            for start in range(0, len(blob), 1 << 20):
                await writer.write([blob[start:start + (1 << 20)]])
        await writer.close()
        segments = await driver._segments(driver._key("/up/data"))
        assert [size for _, size, _ in segments] == [10 << 20, 20 << 20, (5 << 20) + 3]
        # every upload but the last segment's: one size of part (the last part may be smaller)
        assert sorted(min(s) for s in sizes.values() if len(s) == 1) == [5 << 20, 10 << 20]
        writer = await driver.append("/up/data")
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob
        assert driver.buffers.used == 0
    finally:
        await driver.close()


def test_part_buffers_are_reused_up_to_what_they_keep():
    from regserve.storage.s3 import PartBuffers
    parts = PartBuffers(keep=16)
    a, b, c = parts.get(8), parts.get(8), parts.get(8)
    for buffer in (a, b, c):
        parts.put(buffer)  # the third is over what is kept: dropped
    parts.put(bytearray(5))  # a part grown in place, of a size never handed out: dropped
    again = [parts.get(8), parts.get(8), parts.get(8)]
    assert {id(x) for x in again[:2]} == {id(a), id(b)} and again[2] is not c
    assert parts.get(5) is not None and len(parts.get(5)) == 5


async def test_a_writer_gives_every_part_buffer_back(rgw):
    """Every part buffer a writer took goes back to the pool when it is done, also the one a
    body's last fill was offered and left empty (left to the garbage collector instead, one
    buffer a push fragmented the heap: 32 pushes at once grew a worker to 736 MB in three
    rounds)."""
    driver = _driver(rgw, "giveback")
    buffers = _BuffersOut(driver)
    try:
        await driver.put_content("/up/startedat", b"x")
        writer = await driver.append("/up/data")
        blob = os.urandom(10 << 20)  # two whole parts
        await _received_in_place(writer, blob)
        await writer.ready()
        assert len(writer.stage_space()) == 5 << 20  # the last fill: the body ends, nothing comes
        await writer.commit("/blob", len(blob))
        assert not buffers.out and await driver.get_content("/blob") == blob
    finally:
        await driver.close()


async def test_a_push_waits_for_room_before_its_body_is_read(rgw):
    """ready(), which the upload pipeline awaits before it reads on, waits while the budget is
    spent: a waiting push holds none of its body (32 pushes on one worker no longer hold a
    batch each beyond the budget)."""
    from regserve.storage.budget import ByteBudget
    driver = _driver(rgw, "ready")
    driver.buffers = ByteBudget(5 << 20)  # one part
    try:
        for i in (1, 2):
            await driver.put_content(f"/up{i}/startedat", b"x")
        first, second = await driver.append("/up1/data"), await driver.append("/up2/data")
        await first.ready()
        waiting = asyncio.ensure_future(second.ready())
        await asyncio.sleep(0.2)
        assert not waiting.done() and driver.buffers.used == 5 << 20
        await first.close()  # nothing came: its room goes back
        await asyncio.wait_for(waiting, 5)
        await second.close()
        assert driver.buffers.used == 0
    finally:
        await driver.close()


async def test_a_quiet_client_makes_its_bytes_durable_and_gives_the_budget_back(rgw):
    """A body that goes quiet (release_staging) ends the writer's segment: what arrived is
    durable and counted in the size, the writer holds no budget while it waits (idle clients
    cannot starve busy ones), and the upload continues into a new segment."""
    driver = _driver(rgw, "quiet")
    try:
        await driver.put_content("/up/startedat", b"x")
        writer = await driver.append("/up/data")
        blob = os.urandom(9 << 20)
        await writer.admit(3 << 20)
        await writer.write([blob[:3 << 20]])
        assert driver.buffers.used == 5 << 20  # one whole part is covered
        await writer.release_staging()
        assert driver.buffers.used == 0
        assert (await driver.stat("/up/data")).size == 3 << 20  # durable before the writer closes
        await writer.admit(6 << 20)
        await writer.write([blob[3 << 20:]])
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob
        assert driver.buffers.used == 0
    finally:
        await driver.close()


async def test_the_lease_of_an_owner_that_died_expires_and_exactly_one_contender_takes_it(rgw, monkeypatch):
    """A replica killed while owning an upload leaves its lease behind: nobody may take the
    upload until the lease expires, then exactly one of many contenders does (a conditional
    PUT on the lease's ETag), and a live owner's lease is renewed, never lost to a contender."""
    monkeypatch.setattr(s3, "LEASE_SECONDS", 2.0)
    driver = _driver(rgw, "leases")
    try:
        await driver.put_content("/up/startedat", b"x")
        lease = f"{driver._private}/locks/{driver._key('/up/startedat')}/x"
        client = await driver._s3()
        await client.put_object(Bucket=driver.bucket, Key=lease,
                                Body=json.dumps({"expires": time.time() + 2.0}).encode())  # the dead owner's
        with pytest.raises(Busy):
            async with driver.lock("/up/startedat"):
                pass
        await asyncio.sleep(2.2)
        owners, attempts = 0, 0
        release = asyncio.Event()

        async def contend() -> None:
            nonlocal owners, attempts
            try:
                async with driver.lock("/up/startedat"):
                    owners += 1
                    attempts += 1
                    await release.wait()
            except Busy:
                attempts += 1
        contenders = [asyncio.ensure_future(contend()) for _ in range(8)]
        while attempts < 8:
            await asyncio.sleep(0.05)
        assert owners == 1
        await asyncio.sleep(4.5)  # two lease lifetimes: the owner renews it meanwhile
        with pytest.raises(Busy):
            async with driver.lock("/up/startedat"):
                pass
        release.set()
        await asyncio.gather(*contenders)
        async with driver.lock("/up/startedat"):  # released: free at once
            pass
    finally:
        await driver.close()


@pytest.mark.parametrize("failing", ["path", "holders"])
async def test_a_lock_that_fails_to_look_at_its_path_or_holders_leaves_no_lease_behind(rgw, failing):
    """The lease goes out with the first look at the path, and the look for other holders
    with the second: an error in either, after the lease was taken, drops it, so the next
    owner gets the lock at once instead of after the lease's lifetime."""
    driver = _driver(rgw, "lease-errors")
    try:
        await driver.put_content("/up/startedat", b"x")
        key = driver._key("/up/startedat")
        head, others = driver._head, driver._others
        calls = {"head": 0}

        async def failing_head(k: str) -> Any:
            if k == key:
                calls["head"] += 1
                if calls["head"] == 1:
                    await asyncio.sleep(0.2)  # the lease is taken meanwhile
                    raise OSError("injected: HEAD failed")
            return await head(k)

        async def failing_others(*args: Any) -> bool:
            raise OSError("injected: listing failed")

        if failing == "path":
            driver._head = failing_head
        else:
            driver._others = failing_others
        with pytest.raises(OSError, match="injected"):
            async with driver.lock("/up/startedat"):
                pass
        driver._head, driver._others = head, others
        async with driver.lock("/up/startedat"):  # no wait: nothing was left held
            pass
    finally:
        await driver.close()


def _upload_on_a_replica(rgw: dict[str, str], server_factory: Any, tmp_path: Path, root: str,
                         size: int) -> tuple[dict[str, str], Any, bytes, str]:
    """A replica on a root of its own (`env`, for the one the caller starts later over
    tmp_path/b), a random blob of `size`, and the path of an upload session begun on it."""
    env = s3_env(rgw, f"/{root}-{uuid.uuid4().hex[:12]}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = server_factory(tmp_path / "a", env=env)
    status, headers, _ = http("POST", f"{first.url}/v2/big/blobs/uploads/")
    assert status == 202
    return env, first, os.urandom(size), urlparse(headers["Location"]).path


def test_kill_9_mid_patch_on_s3_resumes_on_another_replica_from_the_durable_offset(rgw, server_factory, tmp_path):
    """A replica killed mid-PATCH loses only what was not in a published segment: bytes that
    arrived before the client paused (their segment published when the body went quiet) are
    the offset another replica reports, and the push completes there: its first PATCH waits out
    the dead replica's lease (shorter than a request's wait for an owner) instead of failing."""
    env, first, blob, path = _upload_on_a_replica(rgw, server_factory, tmp_path, "crash", 20 << 20)
    u = urlparse(first.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(f"PATCH {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(blob)}\r\n\r\n".encode())
    s.sendall(blob[:12 << 20])
    time.sleep(4)  # the body goes quiet: its segment is published
    s.sendall(blob[12 << 20:15 << 20])  # less than a part: in memory only
    time.sleep(0.3)
    first.stop(signal.SIGKILL)
    s.close()
    second = server_factory(tmp_path / "b", env=env)
    offset = upload_offset(second.url, path)
    assert offset == 12 << 20
    status, headers, body = http("PATCH", f"{second.url}{path}", blob[offset:],
                              {"Content-Range": f"{offset}-{len(blob) - 1}"})
    assert status == 202, body
    digest = digest_of(blob)
    status, _, body = http("PUT", f"{second.url}{path}?digest={digest}")
    assert status == 201, body
    status, _, got = http("GET", f"{second.url}/v2/big/blobs/{digest}")
    assert status == 200 and got == blob


async def test_segments_of_every_size_assemble_in_equal_parts(rgw):
    """A commit joins an upload's segments in parts of one size but the last (R2 refuses
    others; distribution's multipartcopychunksize sets the size): a part within one segment is
    copied server-side, only a part that spans segments is read and sent again (never more
    than a part at once)."""
    from regserve.storage.s3 import S3Driver
    driver = S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                      secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/assemble-{uuid.uuid4().hex[:12]}",
                      chunksize=5 << 20, multipartcopychunksize=5 << 20, multipartcopythresholdsize=5 << 20)
    reads: list[int] = []
    read_key = driver._read_key

    async def recorded(key: str, first: int = 0, last: int | None = None) -> bytes:
        data = await read_key(key, first, last)
        reads.append(len(data))
        return data
    driver._read_key = recorded  # type: ignore[method-assign]
    parts: dict[int, int] = {}  # the joined object's parts: number -> size
    try:
        client = await driver._s3()
        upload_part, upload_part_copy = client.upload_part, client.upload_part_copy

        async def sent(**kw: Any) -> Any:
            if kw["Key"].endswith("/blob"):
                parts[kw["PartNumber"]] = len(kw["Body"])
            return await upload_part(**kw)

        async def copied(**kw: Any) -> Any:
            first, last = map(int, kw["CopySourceRange"].removeprefix("bytes=").split("-"))
            parts[kw["PartNumber"]] = last - first + 1
            return await upload_part_copy(**kw)
        client.upload_part, client.upload_part_copy = sent, copied
        await driver.put_content("/up/startedat", b"x")
        writer = await driver.append("/up/data")
        sizes = [1 << 20, 12 << 20, 2 << 20, (6 << 20) + 1, 3 << 20]
        blob = os.urandom(sum(sizes))
        offset = 0
        for size in sizes:
            await writer.write([blob[offset:offset + size]])
            await writer.release_staging()  # the client pauses: a segment each
            offset += size
        assert [s for _, s, _ in await driver._segments(driver._key("/up/data"))] == sizes
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob
        # 5 MiB parts: [seg 0 + head of 1] [in 1] [tail of 1 + seg 2] [in 3] [rest of 3 + seg 4]
        assert [parts[n] for n in sorted(parts)] == [5 << 20] * 4 + [(4 << 20) + 1]
        assert sum(reads) == 3 * (5 << 20) - (1 << 20) + 1 and max(reads) <= 4 << 20
    finally:
        await driver.close()


def _second_part_fails(client: Any) -> Any:
    """Make the client's second UploadPart fail as a reset connection; the real one, to put back."""
    upload_part = client.upload_part
    calls = 0

    async def failing(**kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("connection reset by the engine")
        return await upload_part(**kw)
    client.upload_part = failing
    return upload_part


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "received-in-place"])
async def test_a_failed_part_is_never_published_as_a_segment_with_a_hole(rgw, in_place):
    """S3 completes a multipart upload whatever part numbers are missing: a segment completed
    after one of its parts failed would hold the bytes after it shifted, under an offset that
    says otherwise. A writer whose part failed aborts its segment instead: the upload's size
    stays what was durable before, and the upload continues from there."""
    driver = _driver(rgw, "failedpart")
    try:
        await driver.put_content("/up/startedat", b"x")
        client = await driver._s3()
        upload_part = _second_part_fails(client)
        writer = await driver.append("/up/data")
        blob = os.urandom(64 << 20)  # more parts than go at once: the failure meets a write
        with pytest.raises(OSError):
            if in_place:
                await _received_in_place(writer, blob)
            else:
                for start in range(0, len(blob), 1 << 20):
                    await writer.write([blob[start:start + (1 << 20)]])
            await writer.close()
        await writer.close()
        assert await driver._segments(driver._key("/up/data")) == []  # nothing with a hole was published
        assert driver.buffers.used == 0
        client.upload_part = upload_part
        writer = await driver.append("/up/data")
        await writer.write([blob])
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob
    finally:
        await driver.close()


def test_a_pull_through_cache_on_s3_fetches_once_for_every_replica(rgw, server_factory, tmp_path):
    """Two cache replicas on one bucket: 16 clients pulling one cold blob from both, at once,
    cause one upstream download, streamed to all of them as its rounds land in the bucket."""
    from .test_proxy import Relay, big_layer, fetch_all, push_image
    upstream = server_factory(tmp_path / "upstream")
    layer = big_layer(160 << 20)  # three rounds: two published segments and the last
    push_image(upstream.url, "team/base", "v1", [layer])
    d = digest_of(layer)
    relay = Relay(upstream.port)
    try:
        env = {**s3_env(rgw, f"/cache-{uuid.uuid4().hex[:12]}"), "REGISTRY_PROXY_REMOTEURL": relay.url}
        caches = [server_factory(tmp_path / f"unused-{i}", env=env) for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            results = [x for part in pool.map(lambda c: fetch_all(f"{c.url}/v2/team/base/blobs/{d}", 8, layer),
                                              caches) for x in part]
        assert results == [(200, d, len(layer))] * 16
        assert relay.blob_gets(d) == [None]
        # Kept in the bucket: a third replica serves it with no upstream at all.
        upstream.stop()
        third = server_factory(tmp_path / "unused-3", env=env)
        assert fetch_all(f"{third.url}/v2/team/base/blobs/{d}", 1) == [(200, d, len(layer))]
    finally:
        relay.close()


def test_a_cache_replica_killed_mid_fetch_is_taken_over_on_s3(rgw, server_factory, tmp_path):
    """kill -9 of the replica fetching: its lease runs out, a reader on another replica takes the
    fetch over from the last round in the bucket, and its client gets the whole blob."""
    from .test_proxy import Relay, big_layer, fetch_all, push_image
    upstream = server_factory(tmp_path / "upstream")
    layer = big_layer(160 << 20)
    push_image(upstream.url, "app", "v1", [layer])
    d = digest_of(layer)
    relay = Relay(upstream.port)
    relay.rate = 40 << 20
    try:
        root = f"/cache-{uuid.uuid4().hex[:12]}"
        env = {**s3_env(rgw, root), "REGISTRY_PROXY_REMOTEURL": relay.url}
        first, second = (server_factory(tmp_path / f"unused-{i}", env=env) for i in range(2))
        threading_started = ThreadPoolExecutor(1)
        threading_started.submit(lambda: _quietly(fetch_all, f"{first.url}/v2/app/blobs/{d}", 1))
        data = f"/docker/registry/v2/repositories/app/_uploads/fetch-sha256-{d[7:]}/data"

        async def stored() -> int:  # a driver of its own each time: each asyncio.run is a new loop
            driver = s3.S3Driver(bucket=rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"],
                                 accesskey=rgw["S3_ACCESS_KEY"], secretkey=rgw["S3_SECRET_KEY"],
                                 rootdirectory=root)
            try:
                return (await driver.stat(data)).size
            except PathNotFound:
                return 0
            finally:
                await driver.close()
        deadline = time.time() + 60
        while asyncio.run(stored()) < 64 << 20 and time.time() < deadline:  # one round in the bucket
            time.sleep(0.2)
        first.stop(signal.SIGKILL)
        threading_started.shutdown(wait=True)
        relay.rate = None
        assert fetch_all(f"{second.url}/v2/app/blobs/{d}", 1) == [(200, d, len(layer))]
        gets = relay.blob_gets(d)
        assert len(gets) == 2 and gets[0] is None and int(gets[1][6:-1]) >= 64 << 20, gets
    finally:
        relay.close()


def _quietly(f, *args):
    try:
        f(*args)
    except OSError:
        pass  # its server was killed


# -- one multipart upload across PATCHes (open segments) -------------------------------------

P = 5 << 20  # the tests' part size (chunksize)


async def _uploads_under(driver: Any) -> list[dict]:
    client = await driver._s3()
    r = await client.list_multipart_uploads(Bucket=driver.bucket, Prefix=driver.root + "/")
    return r.get("Uploads", [])


async def _append(driver: Any, data: bytes, path: str = "/up/data") -> None:
    """One PATCH's worth: a writer that writes `data` and closes."""
    writer = await driver.append(path)
    await writer.write([data])
    await writer.close()


async def _open_record(driver: Any, path: str = "/up/data") -> tuple[str, str, dict]:
    """The open segment's record key, its upload's key, and the record."""
    key = driver._key(path)
    (record_key,) = [k for _, _, k in await driver._segments(key) if "/.open/" in k]
    return record_key, driver._open_segment(record_key)[1], await driver._record(record_key)


@pytest.mark.parametrize("in_place", [False, True], ids=["copied", "received-in-place"])
async def test_chunks_of_whole_parts_stay_one_multipart_upload_and_commit_without_a_copy(rgw, in_place):
    """PATCHes that end on a part's end leave the multipart upload open for the next (any
    replica: all it needs is in the bucket), so the commit completes it and makes one
    CopyObject: no byte of the upload is copied again (RGW copies ranges byte by byte: 4.5 s
    a GiB). A PATCH that ends mid-part seals it into a segment, holding every byte so far."""
    driver = _driver(rgw, "open")
    assembled: list[Any] = []

    async def no_assembly(*args: Any) -> None:
        assembled.append(args)
        raise AssertionError("joined by a copy")
    try:
        await driver.put_content("/up/startedat", b"x")
        blob = os.urandom(6 * P + 12345)
        for start, end in ((0, 2 * P), (2 * P, 5 * P)):
            writer = await driver.append("/up/data")
            if in_place:
                await _received_in_place(writer, blob[start:end])
            else:
                await writer.write([blob[start:end]])
            await writer.close()
            segments = await driver._segments(driver._key("/up/data"))
            assert [(o, s) for o, s, _ in segments] == [(0, end)] and "/.open/" in segments[0][2]
            assert (await driver.stat("/up/data")).size == end
            assert len(await _uploads_under(driver)) == 1
        _, _, record = await _open_record(driver)
        assert len(record["etags"]) == 5 and record["part"] == P
        await _append(driver, blob[5 * P:])  # ends mid-part: sealed, one segment of it all
        segments = await driver._segments(driver._key("/up/data"))
        assert [(o, s) for o, s, _ in segments] == [(0, len(blob))] and "/.seg/" in segments[0][2]
        driver._assemble = no_assembly  # type: ignore[method-assign]
        writer = await driver.append("/up/data")
        await writer.commit("/blob", len(blob))
        assert not assembled and await driver.get_content("/blob") == blob
        assert await _uploads_under(driver) == []
    finally:
        await driver.close()


async def test_an_open_segment_is_sealed_by_the_commit_and_by_a_readable_appender(rgw):
    """The commit seals the open upload itself (CompleteMultipartUpload, then one copy); an
    appender whose bytes others read as they grow (a pull-through fetch) seals what it finds
    open and leaves nothing open behind it."""
    driver = _driver(rgw, "seal")
    try:
        await driver.put_content("/up/startedat", b"x")
        await driver.put_content("/pt/startedat", b"x")
        blob = os.urandom(4 * P)
        await _append(driver, blob[:2 * P])
        writer = await driver.append("/up/data")
        await writer.write([blob[2 * P:]])
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob and await _uploads_under(driver) == []

        await _append(driver, blob[:2 * P], "/pt/data")  # a client's PATCH: left open
        writer = await driver.append("/pt/data", readable=True)
        assert all("/.seg/" in k for _, _, k in await driver._segments(driver._key("/pt/data")))
        await writer.write([blob[2 * P:]])
        await writer.close()
        segments = await driver._segments(driver._key("/pt/data"))
        assert [s for _, s, _ in segments] == [2 * P, 2 * P] and all("/.seg/" in k for _, _, k in segments)
        assert b"".join([c async for c in driver.reader("/pt/data")]) == blob
    finally:
        await driver.close()


async def test_a_part_resent_by_a_writer_that_lost_its_lease_fails_the_commit(rgw):
    """A replica that stalled past its lease can still land a part in the open upload after
    the next owner recorded it. Its completion lists the recorded ETags, so the commit fails
    (500, the session unusable) rather than publish bytes nobody hashed."""
    driver = _driver(rgw, "stale")
    try:
        await driver.put_content("/up/startedat", b"x")
        blob = os.urandom(3 * P)
        await _append(driver, blob[:2 * P])
        _, target, record = await _open_record(driver)
        client = await driver._s3()
        await client.upload_part(Bucket=driver.bucket, Key=target, UploadId=record["upload"],
                                 PartNumber=2, Body=os.urandom(P))  # the stale replica's bytes
        writer = await driver.append("/up/data")
        await writer.write([blob[2 * P:]])
        with pytest.raises(s3.CommitMismatch):
            await writer.commit("/blob", len(blob))
        with pytest.raises(PathNotFound):
            await driver.stat("/blob")
    finally:
        await driver.close()


@pytest.mark.parametrize("then", ["read", "appended"])
async def test_parts_a_killed_writer_never_recorded_are_cut_off(rgw, then):
    """A writer killed mid-PATCH leaves parts past the record (RGW then refuses a completion
    that does not list every part): the upload is still sealed at the recorded size, by the
    owner's read (rebuilding a hash state) or by the next writer ending mid-part, and the
    bytes that follow are the next writer's."""
    driver = _driver(rgw, "orphans")
    try:
        await driver.put_content("/up/startedat", b"x")
        blob = os.urandom(4 * P + 777)
        await _append(driver, blob[:2 * P])
        _, target, record = await _open_record(driver)
        client = await driver._s3()
        for number in (3, 4, 5):  # the killed writer's, never recorded
            await client.upload_part(Bucket=driver.bucket, Key=target, UploadId=record["upload"],
                                     PartNumber=number, Body=os.urandom(P))
        assert (await driver.stat("/up/data")).size == 2 * P
        if then == "read":
            assert b"".join([c async for c in driver.reader("/up/data", P, P)]) == blob[P:2 * P]
            await _append(driver, blob[2 * P:])
        else:  # the client resends from the offset: part 3, then a short part 4; 5 is left over
            await _append(driver, blob[2 * P:3 * P + 100])
            await _append(driver, blob[3 * P + 100:])
        writer = await driver.append("/up/data")
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob
        assert await _uploads_under(driver) == []
        assert [k async for k, _ in driver._listed(driver._private + "/tmp/")] == []
    finally:
        await driver.close()


async def test_an_open_upload_lives_as_long_as_its_session(rgw):
    """Purging temporaries aborts abandoned multipart uploads, but not an open segment's: a
    client may pause between chunks for longer than that. Deleting the session aborts it."""
    driver = _driver(rgw, "purge")
    try:
        await driver.put_content("/up/startedat", b"x")
        blob = os.urandom(2 * P)
        await _append(driver, blob)
        client = await driver._s3()
        await client.create_multipart_upload(Bucket=driver.bucket, Key=driver._key("/other"))  # abandoned
        assert len(await _uploads_under(driver)) == 2
        assert await driver.purge_temporaries(0) == 1
        assert len(await _uploads_under(driver)) == 1
        assert b"".join([c async for c in driver.reader("/up/data", 0, 10)]) == blob[:10]  # sealed by the read
        await _append(driver, blob)  # open again, in a second segment
        assert len(await _uploads_under(driver)) == 1
        await driver.delete("/up")
        assert await _uploads_under(driver) == []
    finally:
        await driver.close()


def test_kill_9_mid_patch_with_an_open_upload_resumes_on_another_replica(rgw, server_factory, tmp_path):
    """A replica killed mid-PATCH while the upload is open, parts of that PATCH already in
    the bucket but not recorded: another replica reports the recorded offset, the client
    resends from there in a shorter chunk (so one of the dead replica's parts outlives it),
    and the blob comes out whole."""
    env, first, blob, path = _upload_on_a_replica(rgw, server_factory, tmp_path, "crash-open", 30 << 20)
    status, _, body = http("PATCH", f"{first.url}{path}", blob[:10 << 20], {"Content-Range": f"0-{(10 << 20) - 1}"})
    assert status == 202, body
    u = urlparse(first.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(f"PATCH {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {20 << 20}\r\n"
              f"Content-Range: {10 << 20}-{(30 << 20) - 1}\r\n\r\n".encode())
    s.sendall(blob[10 << 20:28 << 20])  # parts 3-5 go to S3; 3 MiB wait for the rest
    time.sleep(1.5)
    first.stop(signal.SIGKILL)
    s.close()
    second = server_factory(tmp_path / "b", env=env)
    assert upload_offset(second.url, path) == 10 << 20
    status, headers, body = http("PATCH", f"{second.url}{path}", blob[10 << 20:17 << 20],
                                 {"Content-Range": f"{10 << 20}-{(17 << 20) - 1}"})
    assert status == 202, body
    digest = digest_of(blob)
    status, _, body = http("PUT", f"{second.url}{path}?digest={digest}", blob[17 << 20:],
                           {"Content-Range": f"{17 << 20}-{len(blob) - 1}"})
    assert status == 201, body
    status, _, got = http("GET", f"{second.url}/v2/big/blobs/{digest}")
    assert status == 200 and got == blob


async def test_a_failed_part_of_a_writer_going_on_in_an_open_upload_keeps_what_was_recorded(rgw):
    """A writer that went on in an open upload and had a part fail must not abort the upload
    (its parts before were recorded by earlier PATCHes): the size stays the recorded one, and
    whatever of its own parts landed past the record is cut off when the client resends."""
    driver = _driver(rgw, "failedopen")
    try:
        await driver.put_content("/up/startedat", b"x")
        blob = os.urandom(12 * P + 5)
        await _append(driver, blob[:2 * P])
        client = await driver._s3()
        upload_part = _second_part_fails(client)
        writer = await driver.append("/up/data")
        with pytest.raises(OSError):
            for start in range(2 * P, 12 * P, 1 << 20):
                await writer.write([blob[start:start + (1 << 20)]])
            await writer.close()
        await writer.close()
        client.upload_part = upload_part
        assert (await driver.stat("/up/data")).size == 2 * P and driver.buffers.used == 0
        assert len(await _uploads_under(driver)) == 1  # the recorded parts are still there
        await _append(driver, blob[2 * P:])
        writer = await driver.append("/up/data")
        await writer.commit("/blob", len(blob))
        assert await driver.get_content("/blob") == blob and await _uploads_under(driver) == []
    finally:
        await driver.close()
