"""garbage-collect: what it keeps, what it deletes, agreement with distribution's, that it is safe
beside a registry serving pushes, and that it fails closed on any error while marking."""

import asyncio
import errno
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regserve.registry import Registry
from regserve.registry.gc import GarbageCollectionAborted, collect
from regserve.registry.registry import RegistryBusy
from regserve.storage.filesystem import FilesystemDriver

from .conftest import OCI_INDEX, OCI_MANIFEST, digest_of, image_manifest, require_tool
from .faults import FaultyDriver

BLOBS = {k: os.urandom(3000) + k.encode() for k in ("c1", "l1", "l2", "c2", "l3", "orphan", "c3", "l4", "art")}


def blob_exists(data_dir: Path, d: str) -> bool:
    h = d.split(":")[1]
    return (data_dir / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data").exists()


async def populate(client) -> dict:
    for b in BLOBS.values():
        repo = "b" if b in (BLOBS["c3"], BLOBS["l4"]) else "a"
        assert (await client.post(f"/v2/{repo}/blobs/uploads/?digest={digest_of(b)}", data=b)).status == 201

    async def put(repo, ref, body, media=OCI_MANIFEST):
        r = await client.put(f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media})
        assert r.status == 201, await r.text()

    def img(c, *layers, **extra):
        return image_manifest(digest_of(BLOBS[c]), len(BLOBS[c]), [(digest_of(BLOBS[x]), len(BLOBS[x])) for x in layers],
                              **extra)

    tagged, untagged, child = img("c1", "l1", "l2"), img("c2", "l3"), img("c3", "l4")
    await put("a", "v1", tagged)
    await put("a", digest_of(untagged), untagged)
    await put("b", digest_of(child), child)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(child), "size": len(child)}]}).encode()
    await put("b", "multi", index, OCI_INDEX)
    referrer = img("art", "l1", subject={"mediaType": OCI_MANIFEST, "digest": digest_of(tagged), "size": len(tagged)})
    await put("a", digest_of(referrer), referrer)
    return {"tagged": tagged, "untagged": untagged, "child": child, "index": index, "referrer": referrer}


def blob_path(data_dir: Path, blob: bytes) -> Path:
    h = digest_of(blob).split(":")[1]
    return data_dir / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"


def tree(data_dir: Path) -> dict[str, bytes]:
    """Every file of the data directory but the driver's own, with its bytes."""
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.is_file() and p.relative_to(data_dir).parts[0] not in (".regserve", "regserve")}  # not the locks


@pytest.fixture
async def populated(aiohttp_client, app_factory):
    """A registry populated by a client, then stopped (garbage-collect runs offline), and a way to
    start it again to check what is served."""
    client = await aiohttp_client(app_factory())
    manifests = await populate(client)
    await client.close()

    async def restart():
        return await aiohttp_client(app_factory())
    return manifests, restart


async def test_gc_deletes_only_unreferenced_blobs(populated, data_dir):
    m, restart = populated
    registry = Registry(FilesystemDriver(str(data_dir)))
    lines: list[str] = []
    assert not (await collect(registry, log=lines.append)).blobs_deleted  # all younger than the grace period
    report = await collect(registry, dry_run=True, grace=0, log=lines.append)
    assert [str(d) for d in report.blobs_deleted] == [digest_of(BLOBS["orphan"])] and not report.manifests_deleted
    assert blob_exists(data_dir, digest_of(BLOBS["orphan"]))  # dry run
    assert any("eligible for deletion" in line for line in lines)

    report = await collect(registry, grace=0, log=lines.append)
    client = await restart()
    assert [str(d) for d in report.blobs_deleted] == [digest_of(BLOBS["orphan"])]
    assert not blob_exists(data_dir, digest_of(BLOBS["orphan"])) and report.links_deleted == 1
    assert (await client.head(f"/v2/a/blobs/{digest_of(BLOBS['orphan'])}")).status == 404
    for name in ("untagged", "referrer"):
        assert (await client.get(f"/v2/a/manifests/{digest_of(m[name])}")).status == 200
    for b in ("c1", "l1", "l2", "c2", "l3", "art"):
        assert (await client.get(f"/v2/a/blobs/{digest_of(BLOBS[b])}")).status == 200


async def test_gc_delete_untagged_keeps_index_children_and_referrers(populated, data_dir):
    m, restart = populated
    report = await collect(Registry(FilesystemDriver(str(data_dir))), delete_untagged=True, grace=0,
                           log=lambda s: None)
    client = await restart()
    assert [(n, str(d)) for n, d in report.manifests_deleted] == [("a", digest_of(m["untagged"]))]
    gone = {str(d) for d in report.blobs_deleted}
    assert gone == {digest_of(BLOBS["orphan"]), digest_of(BLOBS["c2"]), digest_of(BLOBS["l3"]), digest_of(m["untagged"])}
    assert (await client.get(f"/v2/a/manifests/{digest_of(m['untagged'])}")).status == 404
    for repo, ref in (("a", "v1"), ("b", "multi"), ("b", digest_of(m["child"])), ("a", digest_of(m["referrer"]))):
        assert (await client.get(f"/v2/{repo}/manifests/{ref}")).status == 200
    for b in ("c3", "l4"):
        assert (await client.get(f"/v2/b/blobs/{digest_of(BLOBS[b])}")).status == 200
    r = await client.get(f"/v2/a/referrers/{digest_of(m['tagged'])}")
    assert [x["digest"] for x in (await r.json())["manifests"]] == [digest_of(m["referrer"])]


async def test_cli_dry_run_and_agreement_with_distribution(populated, data_dir, tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {data_dir}\n")
    ours = subprocess.run([sys.executable, "-m", "regserve", "garbage-collect", str(cfg), "--dry-run",
                           "--grace", "0s"], capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr
    eligible = set(re.findall(r"blob eligible for deletion: (\S+)", ours.stdout))
    assert eligible == {digest_of(BLOBS["orphan"])}
    if shutil.which("docker-registry") is None:
        require_tool("docker-registry", "CNCF distribution, the garbage-collect reference")
    theirs = subprocess.run(["docker-registry", "garbage-collect", "--dry-run", str(cfg)], capture_output=True,
                            text=True, timeout=60)
    assert theirs.returncode == 0, theirs.stderr
    assert set(re.findall(r"blob eligible for deletion: (\S+)", theirs.stdout + theirs.stderr)) == eligible


def later(seconds: float = 7200.0):
    """A collection's clock `seconds` ahead: what the tests pushed looks that old to it."""
    return lambda: time.time() + seconds


async def test_gc_beside_a_live_registry_keeps_what_is_young_or_referenced(aiohttp_client, app_factory, data_dir):
    """The registry serves while garbage-collect runs: garbage older than the grace period goes,
    a layer just pushed (its manifest not pushed yet) stays."""
    client = await aiohttp_client(app_factory())
    m = await populate(client)
    fresh = os.urandom(5000)
    clock = later()  # the orphan is two hours old ...
    assert (await client.post(f"/v2/a/blobs/uploads/?digest={digest_of(fresh)}", data=fresh)).status == 201
    os.utime(blob_path(data_dir, fresh), (clock(), clock()))  # ... a layer pushed just now is not
    report = await collect(Registry(FilesystemDriver(str(data_dir))), log=lambda s: None, clock=clock)
    assert [str(d) for d in report.blobs_deleted] == [digest_of(BLOBS["orphan"])]
    assert (await client.get(f"/v2/a/blobs/{digest_of(fresh)}")).status == 200
    assert (await client.get(f"/v2/a/manifests/{digest_of(m['tagged'])}")).status == 200


async def test_a_push_referencing_an_old_blob_during_the_collection_keeps_it(aiohttp_client, app_factory, data_dir):
    """Marking found the blob unreferenced; before the sweep, a manifest that references it is
    pushed: the sweep sees it referenced anew and keeps it, and the manifest pulls whole."""
    client = await aiohttp_client(app_factory())
    await populate(client)
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    hold = driver.gate("lock", "/regserve/gc")  # the sweep's exclusive hold: after the marking
    clock = later()
    gc = asyncio.ensure_future(collect(Registry(driver), log=lambda s: None, clock=clock))
    while not any(op == "lock" and path == "/regserve/gc" for op, path in driver.calls):
        await asyncio.sleep(0.01)
    manifest = image_manifest(digest_of(BLOBS["c1"]), len(BLOBS["c1"]),
                              [(digest_of(BLOBS["orphan"]), len(BLOBS["orphan"]))])
    r = await client.put("/v2/a/manifests/revived", data=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    os.utime(blob_path(data_dir, BLOBS["orphan"]), (clock(), clock()))  # "just now", on the gc's clock
    hold.set()
    report = await gc
    assert digest_of(BLOBS["orphan"]) not in {str(d) for d in report.blobs_deleted} and report.kept_recent
    r = await client.get(f"/v2/a/blobs/{digest_of(BLOBS['orphan'])}")
    assert r.status == 200 and await r.read() == BLOBS["orphan"]


async def test_a_push_during_the_sweep_fails_cleanly_rather_than_dangle(aiohttp_client, app_factory, data_dir):
    """The sweep holds its lock and is deleting the blob when a manifest referencing it comes:
    the push waits, then finds the blob gone and answers MANIFEST_BLOB_UNKNOWN. No manifest
    ever points at a blob the collection deleted."""
    client = await aiohttp_client(app_factory())
    await populate(client)
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    h = digest_of(BLOBS["orphan"]).split(":")[1]
    hold = driver.gate("delete", f"/blobs/sha256/{h[:2]}/{h}")
    gc = asyncio.ensure_future(collect(Registry(driver), log=lambda s: None, clock=later()))
    while not any(op == "delete" for op, _ in driver.calls):
        await asyncio.sleep(0.01)
    manifest = image_manifest(digest_of(BLOBS["c1"]), len(BLOBS["c1"]),
                              [(digest_of(BLOBS["orphan"]), len(BLOBS["orphan"]))])
    put = asyncio.ensure_future(client.put("/v2/a/manifests/late", data=manifest,
                                           headers={"Content-Type": OCI_MANIFEST}))
    await asyncio.sleep(0.3)
    assert not put.done()  # waiting for the sweep's batch
    hold.set()
    await gc
    r = await put
    assert r.status == 400 and (await r.json())["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    assert (await client.get("/v2/a/manifests/late")).status == 404
    # Pushed again, layer first, it goes through.
    assert (await client.post(f"/v2/a/blobs/uploads/?digest={digest_of(BLOBS['orphan'])}",
                              data=BLOBS["orphan"])).status == 201
    assert (await client.put("/v2/a/manifests/late", data=manifest,
                             headers={"Content-Type": OCI_MANIFEST})).status == 201


async def test_one_collection_at_a_time(populated, data_dir, tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {data_dir}\n")
    registry = Registry(FilesystemDriver(str(data_dir)))
    async with registry.collecting():
        with pytest.raises(RegistryBusy):
            await collect(Registry(FilesystemDriver(str(data_dir))), log=lambda s: None)
        gc = await asyncio.create_subprocess_exec(sys.executable, "-m", "regserve", "garbage-collect", str(cfg),
                                                  stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        _, err = await gc.communicate()
    assert gc.returncode == 1 and b"another garbage collection is running" in err and b"Traceback" not in err
    gc = await asyncio.create_subprocess_exec(sys.executable, "-m", "regserve", "garbage-collect", str(cfg),
                                              "--grace", "0s", stdout=asyncio.subprocess.PIPE)
    out, _ = await gc.communicate()
    assert gc.returncode == 0 and b"1 blobs" in out and b"deleted" in out


MARKING_READS = [
    ("get_content", "/_manifests/tags/v1/current/link"),   # a tag's link
    ("get_content", "/blobs/sha256/"),                     # a manifest's bytes
    ("list", "/_manifests/tags"),                          # a repository's tags
    ("list", "/_manifests/revisions/sha256"),              # a repository's manifests
    ("list", "/repositories"),                             # the repositories
    ("list", "/repositories/b"),                           # a repository's directory (list_many)
]
LATER = 60  # collections here run a minute after the push: what was pushed is older than them


@pytest.mark.parametrize("op,path,error", [(*r, errno.EIO) for r in MARKING_READS]
                         + [("get_content", "/blobs/sha256/", errno.ENOENT)])
async def test_gc_aborts_on_any_error_while_marking(populated, data_dir, op, path, error):
    """One failed read while marking must not make a tagged manifest (and its blobs) garbage:
    the run stops, and nothing at all is deleted."""
    before = tree(data_dir)
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    driver.inject(op, error, path)
    with pytest.raises(GarbageCollectionAborted, match="nothing was deleted"):
        await collect(Registry(driver), delete_untagged=True, grace=0, log=lambda s: None,
                      clock=lambda: time.time() + LATER)
    assert any(p for o, p in driver.calls if o == op and path in p)  # the fault was met
    assert tree(data_dir) == before


@pytest.mark.parametrize("op,path", [r for r in MARKING_READS if r[1] != "/blobs/sha256/"])
async def test_a_not_found_that_was_there_is_marked_again(populated, data_dir, tmp_path, op, path):
    """A read that answers "not found" once for content that is there (older than the
    collection, so not a push racing it) must not make what it leads to garbage: the collection
    marks everything again, and deletes exactly what a collection without the fault deletes.
    (A manifest revision whose bytes are not found is damage, and stops it: the test above.)"""
    reference = tmp_path / "reference"
    shutil.copytree(data_dir, reference)
    await collect(Registry(FilesystemDriver(str(reference))), delete_untagged=True, grace=0,
                  log=lambda s: None, clock=lambda: time.time() + LATER)
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    driver.inject(op, errno.ENOENT, path)
    await collect(Registry(driver), delete_untagged=True, grace=0, log=lambda s: None,
                  clock=lambda: time.time() + LATER)
    assert any(p for o, p in driver.calls if o == op and path in p)  # the fault was met
    assert tree(data_dir) == tree(reference)


async def test_a_storage_that_misses_in_every_marking_stops_the_collection(populated, data_dir):
    """Not found to every marking, found whenever asked again: nothing can be trusted, nothing is
    deleted."""
    from regserve.storage import PathNotFound

    class Liar(FilesystemDriver):
        async def list(self, path: str) -> list[str]:
            asked_again = any(frame.function == "missed" for frame in inspect.stack()[1:4])
            if path.endswith("/repositories") and not asked_again:
                raise PathNotFound(path)
            return await super().list(path)
    before = tree(data_dir)
    with pytest.raises(GarbageCollectionAborted, match="in each of 3 markings"):
        await collect(Registry(Liar(str(data_dir))), delete_untagged=True, grace=0, log=lambda s: None,
                      clock=lambda: time.time() + LATER)
    assert tree(data_dir) == before


async def test_gc_aborts_on_a_damaged_link_or_manifest(populated, data_dir):
    before_link = data_dir / "docker/registry/v2/repositories/a/_manifests/tags/v1/current/link"
    original = before_link.read_bytes()
    before_link.write_bytes(b"not a digest")
    before = tree(data_dir)
    with pytest.raises(GarbageCollectionAborted, match="holds no digest"):
        await collect(Registry(FilesystemDriver(str(data_dir))), delete_untagged=True, grace=0, log=lambda s: None)
    assert tree(data_dir) == before
    before_link.write_bytes(original)
    m, _ = populated
    h = digest_of(m["untagged"]).split(":")[1]
    stored = data_dir / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"
    stored.chmod(0o644)
    stored.write_bytes(b"{not json")
    before = tree(data_dir)
    with pytest.raises(GarbageCollectionAborted, match="not valid JSON"):
        await collect(Registry(FilesystemDriver(str(data_dir))), grace=0, log=lambda s: None)
    assert tree(data_dir) == before


async def test_gc_stops_at_a_failed_delete(populated, data_dir):
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    driver.inject("delete", errno.EIO, "/blobs/")
    with pytest.raises(OSError):
        await collect(Registry(driver), grace=0, log=lambda s: None)
    assert len([c for c in driver.calls if c[0] == "delete"]) == 1  # nothing after the failure


async def test_names_that_look_like_temporaries_are_content(aiohttp_client, app_factory, data_dir):
    """`.tmp-` is legal in repository names and tags: such content is listed, served, and kept
    by garbage-collect like any other."""
    client = await aiohttp_client(app_factory())
    config, layer = b"{}", os.urandom(2000)
    for blob in (config, layer):
        r = await client.post(f"/v2/team/app.tmp-1/blobs/uploads/?digest={digest_of(blob)}", data=blob)
        assert r.status == 201
    manifest = image_manifest(digest_of(config), len(config), [(digest_of(layer), len(layer))])
    r = await client.put("/v2/team/app.tmp-1/manifests/v1.tmp-2", data=manifest,
                         headers={"Content-Type": OCI_MANIFEST})
    assert r.status == 201
    assert "team/app.tmp-1" in (await (await client.get("/v2/_catalog")).json())["repositories"]
    assert (await (await client.get("/v2/team/app.tmp-1/tags/list")).json())["tags"] == ["v1.tmp-2"]
    await client.close()
    report = await collect(Registry(FilesystemDriver(str(data_dir))), delete_untagged=True, log=lambda s: None)
    assert not report.blobs_deleted and not report.manifests_deleted
    client = await aiohttp_client(app_factory())
    r = await client.get("/v2/team/app.tmp-1/manifests/v1.tmp-2")
    assert r.status == 200 and await r.read() == manifest
    assert await (await client.get(f"/v2/team/app.tmp-1/blobs/{digest_of(layer)}")).read() == layer
