"""Content never changes once committed: races and hostile sequences against one registry."""

import asyncio
import hashlib
import os
import stat
from pathlib import Path

import pytest

from regserve.api import make_app
from regserve.registry import Registry
from regserve.storage import CommitMismatch
from regserve.storage.filesystem import FilesystemDriver

from .conftest import OCI_MANIFEST, digest_of, image_manifest, make_config
from .faults import FaultyDriver

LAYER = os.urandom(3 << 20)
DIGEST = digest_of(LAYER)


def blob_file(data_dir: Path, d: str) -> Path:
    h = d.split(":")[1]
    return data_dir / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"


async def test_a_patch_racing_the_final_put_never_reaches_the_blob(client, data_dir):
    r = await client.post("/v2/team/app/blobs/uploads/")
    location = r.headers["Location"]
    half = len(LAYER) // 2
    assert (await client.patch(location, data=LAYER[:half])).status == 202
    release = asyncio.Event()

    async def slow_last_chunk():
        yield LAYER[half:half + 4096]
        await release.wait()
        yield LAYER[half + 4096:]

    put = asyncio.ensure_future(client.put(f"{location}?digest={DIGEST}", data=slow_last_chunk()))
    await asyncio.sleep(0.3)  # the PUT holds the session, mid-body
    patch = asyncio.ensure_future(client.patch(location, data=b"EVIL" * 1024))
    await asyncio.sleep(0.3)  # the PATCH is waiting for the session
    release.set()
    put_response, patch_response = await put, await patch
    assert put_response.status == 201
    assert patch_response.status == 404
    assert (await patch_response.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert hashlib.sha256(blob_file(data_dir, DIGEST).read_bytes()).hexdigest() == DIGEST.split(":")[1]
    r = await client.get(f"/v2/team/app/blobs/{DIGEST}")
    assert await r.read() == LAYER


@pytest.fixture
async def faulty(aiohttp_client, data_dir):
    """A client of a registry whose storage calls can be failed or held (tests/faults.py)."""
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    config = make_config(data_dir, REGISTRY_STORAGE_DELETE_ENABLED="true", REGISTRY_HTTP_RELATIVEURLS="true")
    client = await aiohttp_client(make_app(config, Registry(driver, delete_enabled=True)))
    return client, driver


async def test_a_patch_waiting_while_the_commit_renames_gets_upload_unknown(faulty, data_dir):
    """The commit is held just before it publishes; a PATCH for the same session arrives and
    waits for the session's owner. Once the commit is done, the session is gone for it: it
    never appends to the published file."""
    client, driver = faulty
    r = await client.post("/v2/team/app/blobs/uploads/")
    location = r.headers["Location"]
    assert (await client.patch(location, data=LAYER)).status == 202
    hold = driver.gate("writer.commit", "/blobs/")
    put = asyncio.ensure_future(client.put(f"{location}?digest={DIGEST}"))
    while not any(op == "writer.commit" for op, _ in driver.calls):
        await asyncio.sleep(0.01)
    patch = asyncio.ensure_future(client.patch(location, data=b"EVIL" * 1024))
    await asyncio.sleep(0.3)
    assert not patch.done()  # waiting for the owner
    hold.set()
    assert (await put).status == 201
    patched = await patch
    assert patched.status == 404 and (await patched.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    stored = blob_file(data_dir, DIGEST)
    assert stored.read_bytes() == LAYER
    assert stat.S_IMODE(stored.stat().st_mode) == 0o444  # no one may open it for writing again
    for method in ("GET", "DELETE"):  # the session is over for every request
        r = await client.request(method, location)
        assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    r = await client.put(f"{location}?digest={DIGEST}")
    assert r.status == 404


async def test_a_cancel_waits_for_the_owner_and_ends_the_session(faulty):
    client, driver = faulty
    r = await client.post("/v2/team/app/blobs/uploads/")
    location = r.headers["Location"]
    release = asyncio.Event()

    async def slow_body():
        yield LAYER[:1 << 20]
        await release.wait()
        yield LAYER[1 << 20:2 << 20]

    patch = asyncio.ensure_future(client.patch(location, data=slow_body()))
    await asyncio.sleep(0.3)
    cancel = asyncio.ensure_future(client.delete(location))
    await asyncio.sleep(0.3)
    assert not cancel.done()
    release.set()
    assert (await patch).status == 202
    assert (await cancel).status == 204
    assert (await client.get(location)).status == 404
    assert (await client.patch(location, data=b"more")).status == 404


async def test_commit_publishes_only_the_verified_file(tmp_path):
    """At the driver: a file appended to, replaced or removed behind the writer's back is never
    published, and nothing appears at the destination."""
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "up").mkdir()
    writer = await driver.append("/up/data")
    await writer.write([b"a" * 100])
    with pytest.raises(CommitMismatch):
        await writer.commit("/blob/data", 99)
    other = await driver.append("/up/data")  # a second appender, as the old race had
    await other.write([b"evil"])
    await other.close()
    with pytest.raises(CommitMismatch):
        await writer.commit("/blob/data", 100)
    (tmp_path / "up/data").unlink()
    (tmp_path / "up/data").write_bytes(b"a" * 100)  # same size, another file
    with pytest.raises(CommitMismatch):
        await writer.commit("/blob/data", 100)
    await writer.close()
    assert not (tmp_path / "blob").exists()
    await driver.close()


async def test_a_damaged_blob_is_repaired_by_the_next_push(client, data_dir):
    """A blob whose size is not its content's (bytes appended by an earlier bug, a torn copy)
    cannot hash to its name: the next verified push of the layer replaces it."""
    assert (await client.post(f"/v2/a/blobs/uploads/?digest={DIGEST}", data=LAYER)).status == 201
    stored = blob_file(data_dir, DIGEST)
    stored.chmod(0o644)
    with open(stored, "ab") as f:
        f.write(b"EVIL")
    assert (await client.post(f"/v2/b/blobs/uploads/?digest={DIGEST}", data=LAYER)).status == 201
    assert stored.read_bytes() == LAYER
    r = await client.post("/v2/c/blobs/uploads/")  # and by a session's commit
    stored.chmod(0o644)
    with open(stored, "ab") as f:
        f.write(b"EVIL")
    r = await client.put(f"{r.headers['Location']}?digest={DIGEST}", data=LAYER)
    assert r.status == 201 and stored.read_bytes() == LAYER


async def test_manifest_puts_and_deletes_racing_see_only_spec_statuses(client):
    """Concurrent PUTs and DELETEs of the same tags and digests: 201, 202 and 404 only (a link
    written into a directory a DELETE just removed used to answer 500)."""
    config = b"{}"
    assert (await client.post(f"/v2/race/blobs/uploads/?digest={digest_of(config)}", data=config)).status == 201
    manifests = [image_manifest(digest_of(config), len(config), [], annotations={"n": str(i)}) for i in range(4)]
    statuses: set[int] = set()

    async def put(i: int) -> None:
        r = await client.put(f"/v2/race/manifests/t{i % 2}", data=manifests[i % 4],
                             headers={"Content-Type": OCI_MANIFEST})
        statuses.add(r.status)

    async def delete(i: int) -> None:
        ref = digest_of(manifests[i % 4]) if i % 3 else f"t{i % 2}"
        statuses.add((await client.delete(f"/v2/race/manifests/{ref}")).status)

    async def get(i: int) -> None:
        r = await client.get(f"/v2/race/manifests/t{i % 2}")
        statuses.add(r.status)
        if r.status == 200:
            assert await r.read() in manifests

    for round_ in range(40):
        await asyncio.gather(*(f(i + round_) for i in range(6) for f in (put, delete, get)))
    assert statuses <= {200, 201, 202, 404}, statuses
    assert {201, 202} <= statuses
