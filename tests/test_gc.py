"""garbage-collect: what it keeps, what it deletes, and agreement with distribution's."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from regserve.registry import Registry
from regserve.registry.gc import collect
from regserve.storage.filesystem import FilesystemDriver

from .conftest import OCI_INDEX, OCI_MANIFEST, digest_of, image_manifest, require_tool

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


async def test_gc_deletes_only_unreferenced_blobs(client, data_dir):
    m = await populate(client)
    registry = Registry(FilesystemDriver(str(data_dir)))
    lines: list[str] = []
    report = await collect(registry, dry_run=True, log=lines.append)
    assert [str(d) for d in report.blobs_deleted] == [digest_of(BLOBS["orphan"])] and not report.manifests_deleted
    assert blob_exists(data_dir, digest_of(BLOBS["orphan"]))  # dry run
    assert any("eligible for deletion" in line for line in lines)

    report = await collect(registry, log=lines.append)
    assert [str(d) for d in report.blobs_deleted] == [digest_of(BLOBS["orphan"])]
    assert not blob_exists(data_dir, digest_of(BLOBS["orphan"])) and report.links_deleted == 1
    assert (await client.head(f"/v2/a/blobs/{digest_of(BLOBS['orphan'])}")).status == 404
    for name in ("untagged", "referrer"):
        assert (await client.get(f"/v2/a/manifests/{digest_of(m[name])}")).status == 200
    for b in ("c1", "l1", "l2", "c2", "l3", "art"):
        assert (await client.get(f"/v2/a/blobs/{digest_of(BLOBS[b])}")).status == 200


async def test_gc_delete_untagged_keeps_index_children_and_referrers(client, data_dir):
    m = await populate(client)
    report = await collect(Registry(FilesystemDriver(str(data_dir))), delete_untagged=True, log=lambda s: None)
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


async def test_cli_dry_run_and_agreement_with_distribution(client, data_dir, tmp_path):
    await populate(client)
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {data_dir}\n")
    ours = subprocess.run([sys.executable, "-m", "regserve", "garbage-collect", str(cfg), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert ours.returncode == 0, ours.stderr
    eligible = set(re.findall(r"blob eligible for deletion: (\S+)", ours.stdout))
    assert eligible == {digest_of(BLOBS["orphan"])}
    if shutil.which("docker-registry") is None:
        require_tool("docker-registry", "CNCF distribution, the garbage-collect reference")
    theirs = subprocess.run(["docker-registry", "garbage-collect", "--dry-run", str(cfg)], capture_output=True,
                            text=True, timeout=60)
    assert theirs.returncode == 0, theirs.stderr
    assert set(re.findall(r"blob eligible for deletion: (\S+)", theirs.stdout + theirs.stderr)) == eligible
