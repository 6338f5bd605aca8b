"""regserve on S3 (a real Ceph RGW), as operators run it: stateless replicas over one bucket
behind a load balancer, and garbage collection from the command line. The driver contract and
the API suite over S3 are in test_storage_contract.py and test_over_every_driver.py."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import OCI_MANIFEST, digest_of, http, image_manifest


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
        assert status == 200 and got == layer and headers["Docker-Content-Digest"] == digest_of(layer)
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
