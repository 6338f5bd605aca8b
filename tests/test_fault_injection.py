"""A storage error at any single call of a push, commit, tag, delete, mount or garbage
collection never loses or changes what was acknowledged, answers with the spec's body, and
leaves a registry that works once the storage does.

The scenario runs once to count its storage calls; then, for each call and each of EIO, ENOSPC
and ENOENT, it runs again on a copy of the same starting state with that one call failing, and
the outcome is checked against what the client was told.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from regserve.api import make_app
from regserve.registry import Registry
from regserve.registry.gc import GarbageCollectionAborted, collect
from regserve.storage import PathNotFound
from regserve.storage.filesystem import FilesystemDriver

from .conftest import OCI_MANIFEST, RegserveTestServer, digest_of, image_manifest, make_config
from .faults import FaultyDriver
from .test_conformance_workflows import SPEC_CODES

BASE_CONFIG, BASE_LAYER = b'{"base": true}', os.urandom(3000)
OLD_CONFIG = b'{"old": true}'
# Over one batch (the upload pipeline runs); its second PATCH large enough to be received in
# place (receiver.py), starting mid-block (the head goes through the page cache).
CONFIG, LAYER = b'{"new": true}', os.urandom((4 << 20) + (600 << 10))
FIRST = (400 << 10) + 1000
BASE = image_manifest(digest_of(BASE_CONFIG), len(BASE_CONFIG), [(digest_of(BASE_LAYER), len(BASE_LAYER))])
OLD = image_manifest(digest_of(OLD_CONFIG), len(OLD_CONFIG), [])
NEW = image_manifest(digest_of(CONFIG), len(CONFIG), [(digest_of(LAYER), len(LAYER))])


async def _client(aiohttp_client, data: Path, driver):
    config = make_config(data, REGISTRY_STORAGE_DELETE_ENABLED="true", REGISTRY_HTTP_RELATIVEURLS="true")
    return await aiohttp_client(RegserveTestServer(make_app(config, Registry(driver, delete_enabled=True))))


async def _put_manifest(client, repo: str, ref: str, body: bytes):
    return await client.put(f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": OCI_MANIFEST})


async def _starting_state(aiohttp_client, data: Path) -> None:
    """Acknowledged before the scenario: app:base (tagged) and app@OLD (by digest only)."""
    client = await _client(aiohttp_client, data, FilesystemDriver(str(data)))
    for blob in (BASE_CONFIG, BASE_LAYER, OLD_CONFIG):
        assert (await client.post(f"/v2/app/blobs/uploads/?digest={digest_of(blob)}", data=blob)).status == 201
    assert (await _put_manifest(client, "app", "base", BASE)).status == 201
    assert (await _put_manifest(client, "app", digest_of(OLD), OLD)).status == 201
    await client.close()


async def _scenario(client) -> list[tuple[str, int, bytes]]:
    """The steps, each with its answer; a step whose precondition failed is skipped."""
    steps: list[tuple[str, int, bytes]] = []

    async def step(name: str, response) -> bool:
        steps.append((name, response.status, await response.read()))
        return 200 <= response.status < 300

    r = await client.post("/v2/app/blobs/uploads/")
    if await step("start", r):
        location = r.headers["Location"]
        r = await client.patch(location, data=LAYER[:FIRST])
        if await step("patch", r):
            r = await client.patch(r.headers["Location"], data=LAYER[FIRST:],
                                   headers={"Content-Range": f"{FIRST}-{len(LAYER) - 1}"})
            if await step("patch2", r):
                assert r.headers.get("Connection") == "close"  # it was received in place
                await step("commit", await client.put(f"{r.headers['Location']}?digest={digest_of(LAYER)}"))
    await step("config", await client.post(f"/v2/app/blobs/uploads/?digest={digest_of(CONFIG)}", data=CONFIG))
    await step("tag v1", await _put_manifest(client, "app", "v1", NEW))
    await step("tag v2", await _put_manifest(client, "app", "v2", NEW))
    await step("untag v1", await client.delete("/v2/app/manifests/v1"))
    await step("mount", await client.post(f"/v2/other/blobs/uploads/?mount={digest_of(LAYER)}&from=app"))
    await step("delete old", await client.delete(f"/v2/app/manifests/{digest_of(OLD)}"))
    return steps


async def _gc(driver) -> str:
    try:
        await collect(Registry(driver), delete_untagged=True, grace=0, log=lambda s: None)
        return "done"
    except (GarbageCollectionAborted, OSError, PathNotFound) as e:  # the CLI says so and exits 1
        return type(e).__name__


def _blob(data: Path, content: bytes) -> Path:
    h = hashlib.sha256(content).hexdigest()
    return data / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"


async def _check(aiohttp_client, data: Path, steps: list[tuple[str, int, bytes]]) -> None:
    told = {name: status for name, status, _ in steps}
    for name, status, body in steps:
        assert status < 500 or status == 500 and json.loads(body)["errors"][0]["message"] == "internal error", \
            (name, status, body)
        if status >= 400:
            assert json.loads(body)["errors"][0]["code"] in SPEC_CODES | {"UNKNOWN"}, (name, body)
    # Whatever is stored hashes to its name: nothing was ever published half-written.
    for blob in (data / "docker/registry/v2/blobs").rglob("data"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.parent.name, blob
    client = await _client(aiohttp_client, data, FilesystemDriver(str(data)))

    async def pullable(repo: str, ref: str, manifest: bytes, blobs: tuple[bytes, ...]) -> None:
        r = await client.get(f"/v2/{repo}/manifests/{ref}")
        assert r.status == 200 and await r.read() == manifest, (repo, ref, r.status)
        for blob in blobs:
            r = await client.get(f"/v2/{repo}/blobs/{digest_of(blob)}")
            assert r.status == 200 and await r.read() == blob, (repo, ref, digest_of(blob))

    await pullable("app", "base", BASE, (BASE_CONFIG, BASE_LAYER))  # acknowledged before: untouched
    if told.get("delete old", 0) != 202:  # not deleted as far as the client knows: still there
        assert (await client.get(f"/v2/app/manifests/{digest_of(OLD)}")).status in (200, 404)
    if told.get("delete old") == 202:
        assert (await client.get(f"/v2/app/manifests/{digest_of(OLD)}")).status == 404
    if told.get("tag v2") == 201:
        await pullable("app", "v2", NEW, (CONFIG, LAYER))
    if told.get("untag v1") == 202:
        assert (await client.get("/v2/app/manifests/v1")).status == 404
    elif told.get("tag v1") == 201:
        await pullable("app", "v1", NEW, (CONFIG, LAYER))
    if told.get("mount") == 201 and told.get("tag v2") == 201:
        r = await client.get(f"/v2/other/blobs/{digest_of(LAYER)}")
        assert r.status == 200 and await r.read() == LAYER
    # And once the storage works again, so does the registry: the push goes through whole.
    steps = await _scenario(client)
    for name, status, body in steps:
        if name in ("start", "patch", "patch2", "commit", "config", "tag v1", "tag v2"):
            assert status in (201, 202), (name, status, body)
    await pullable("app", "v2", NEW, (CONFIG, LAYER))
    await client.close()


async def _run(aiohttp_client, start: Path, work: Path, fault: tuple[int, int] | None) -> tuple[int, str]:
    shutil.copytree(start, work)
    driver = FaultyDriver(FilesystemDriver(str(work)))
    client = await _client(aiohttp_client, work, driver)
    started = len(driver.calls)  # the registry's own start is not the scenario's
    if fault is not None:
        driver.inject("*", fault[1], skip=fault[0])
    steps = await _scenario(client)
    await client.close()  # the registry stops (closing its driver), and garbage-collect runs
    driver.inner = FilesystemDriver(str(work))
    gc = await _gc(driver)
    driver.faults.clear()
    await _check(aiohttp_client, work, steps)
    return len(driver.calls) - started, gc


async def test_every_storage_call_failing_in_turn(aiohttp_client, tmp_path):
    start = tmp_path / "start"
    start.mkdir()
    await _starting_state(aiohttp_client, start)
    total, gc = await _run(aiohttp_client, start, tmp_path / "clean", None)
    assert gc == "done" and total > 50
    outcomes: dict[str, int] = {}
    for index in range(total):
        for error in (errno.EIO, errno.ENOSPC, errno.ENOENT):
            _, gc = await _run(aiohttp_client, start, tmp_path / f"run-{index}-{error}", (index, error))
            outcomes[gc] = outcomes.get(gc, 0) + 1
            shutil.rmtree(tmp_path / f"run-{index}-{error}")
    assert outcomes.get("GarbageCollectionAborted") and outcomes.get("done")  # both were met
