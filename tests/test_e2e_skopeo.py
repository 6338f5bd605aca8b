"""End to end with a real client: skopeo copies real images into a running regserve and back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, http, require_tool
from .oci_layout import build_image, build_index


@pytest.fixture(autouse=True)
def _skopeo_present():
    require_tool("skopeo", "real client for end-to-end tests")


def skopeo(*args: str) -> str:
    """skopeo with an empty blob-info cache, so uploads are really uploads, not remembered mounts."""
    cmd = ["skopeo", *args]
    if os.geteuid() == 0 and shutil.which("unshare"):
        os.makedirs("/var/lib/containers/cache", exist_ok=True)
        cmd = ["unshare", "-m", "sh", "-c",
               'mount -t tmpfs tmpfs /var/lib/containers/cache && exec "$@"', "sh", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def blobs(layout: Path) -> dict[str, str]:
    out = {}
    for p in (layout / "blobs/sha256").iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name  # every blob intact
        out[p.name] = p.name
    return out


def test_copy_image_in_and_out(server_factory, tmp_path):
    srv = server_factory()
    host = srv.url.removeprefix("http://")
    src = tmp_path / "src"
    manifest_digest = build_image(src, "v1", ROOT / "regserve")
    skopeo("copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src}:v1",
           f"docker://{host}/e2e/app:v1")

    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{host}/e2e/app:v1")
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == manifest_digest

    out = tmp_path / "out"
    skopeo("copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{host}/e2e/app:v1",
           f"oci:{out}:v1")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == manifest_digest
    assert blobs(out) == blobs(src)

    tags = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{host}/e2e/app"))
    assert tags["Tags"] == ["v1"]


def test_copy_multi_platform_index(server_factory, tmp_path):
    srv = server_factory()
    host = srv.url.removeprefix("http://")
    src = tmp_path / "src"
    index_digest = build_index(src, "multi", ROOT / "regserve")
    skopeo("copy", "--all", "--preserve-digests", "--dest-tls-verify=false", f"oci:{src}:multi",
           f"docker://{host}/e2e/multi:latest")
    st, h, _ = http("HEAD", f"{srv.url}/v2/e2e/multi/manifests/latest")
    assert st == 200 and h["Docker-Content-Digest"] == index_digest
    out = tmp_path / "out"
    skopeo("copy", "--all", "--preserve-digests", "--src-tls-verify=false",
           f"docker://{host}/e2e/multi:latest", f"oci:{out}:multi")
    assert blobs(out) == blobs(src)


def test_docker_schema2_conversion_and_delete(server_factory, tmp_path):
    srv = server_factory()
    host = srv.url.removeprefix("http://")
    src = tmp_path / "src"
    build_image(src, "v1", ROOT / "regserve", big_bytes=1 << 20)
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{src}:v1",
           f"docker://{host}/e2e/docker:v1")
    st, h, body = http("GET", f"{srv.url}/v2/e2e/docker/manifests/v1",
                       headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert st == 200
    assert h["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert json.loads(body)["mediaType"] == h["Content-Type"]
    skopeo("delete", "--tls-verify=false", f"docker://{host}/e2e/docker:v1")
    assert http("GET", f"{srv.url}/v2/e2e/docker/manifests/v1")[0] == 404
