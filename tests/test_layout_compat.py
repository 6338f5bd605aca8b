"""Data directories are interchangeable with distribution's.

One test builds distribution's layout by hand; the others run the real distribution (Debian's
docker-registry, 2.8.2) on the same directory as regserve, both ways, including handing an
in-progress upload from distribution to regserve (distribution's saved hash state is read)."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import OCI_MANIFEST, digest_of, free_port, http, image_manifest, require_tool

CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
LAYER = os.urandom(3 << 20)


def put_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_distribution_layout(root: Path, name: str, tag: str) -> bytes:
    """Exactly what distribution writes for a pushed image."""
    v2 = root / "docker/registry/v2"
    manifest = image_manifest(digest_of(CONFIG), len(CONFIG), [(digest_of(LAYER), len(LAYER))])
    for blob in (CONFIG, LAYER, manifest):
        h = digest_of(blob).split(":")[1]
        put_file(v2 / f"blobs/sha256/{h[:2]}/{h}/data", blob)
    repo = v2 / "repositories" / name
    for blob in (CONFIG, LAYER):
        put_file(repo / f"_layers/sha256/{digest_of(blob).split(':')[1]}/link", digest_of(blob).encode())
    md = digest_of(manifest)
    put_file(repo / f"_manifests/revisions/sha256/{md.split(':')[1]}/link", md.encode())
    put_file(repo / f"_manifests/tags/{tag}/current/link", md.encode())
    put_file(repo / f"_manifests/tags/{tag}/index/sha256/{md.split(':')[1]}/link", md.encode())
    return manifest


def check_image(url: str, name: str, tag: str, manifest: bytes) -> None:
    st, h, body = http("GET", f"{url}/v2/{name}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    assert st == 200 and body == manifest
    assert h["Docker-Content-Digest"] == digest_of(manifest)
    st, _, body = http("GET", f"{url}/v2/{name}/blobs/{digest_of(LAYER)}")
    assert st == 200 and body == LAYER
    st, _, body = http("GET", f"{url}/v2/{name}/tags/list")
    assert json.loads(body)["tags"] == [tag]
    st, _, body = http("GET", f"{url}/v2/_catalog")
    assert name in json.loads(body)["repositories"]


def push_image(url: str, name: str, tag: str) -> bytes:
    for blob in (CONFIG, LAYER):
        st, h, _ = http("POST", f"{url}/v2/{name}/blobs/uploads/")
        assert st == 202
        loc = h["Location"]
        sep = "&" if "?" in loc else "?"
        st, _, _ = http("PUT", f"{loc}{sep}digest={digest_of(blob)}", blob,
                        {"Content-Type": "application/octet-stream"})
        assert st == 201
    manifest = image_manifest(digest_of(CONFIG), len(CONFIG), [(digest_of(LAYER), len(LAYER))])
    st, _, body = http("PUT", f"{url}/v2/{name}/manifests/{tag}", manifest, {"Content-Type": OCI_MANIFEST})
    assert st == 201, body
    return manifest


def test_serves_a_hand_built_distribution_layout(server_factory, tmp_path):
    data = tmp_path / "data"
    manifest = write_distribution_layout(data, "library/alpine", "3.19")
    srv = server_factory(data=data)
    check_image(srv.url, "library/alpine", "3.19", manifest)


def test_writes_distribution_layout(server_factory, tmp_path):
    srv = server_factory()
    manifest = push_image(srv.url, "team/app", "v1")
    v2 = srv.data / "docker/registry/v2"
    md = digest_of(manifest).split(":")[1]
    lh = digest_of(LAYER).split(":")[1]
    assert (v2 / f"blobs/sha256/{lh[:2]}/{lh}/data").read_bytes() == LAYER
    assert (v2 / f"blobs/sha256/{md[:2]}/{md}/data").read_bytes() == manifest
    repo = v2 / "repositories/team/app"
    assert (repo / f"_layers/sha256/{lh}/link").read_text() == f"sha256:{lh}"
    assert (repo / f"_manifests/revisions/sha256/{md}/link").read_text() == f"sha256:{md}"
    assert (repo / "_manifests/tags/v1/current/link").read_text() == f"sha256:{md}"
    assert (repo / f"_manifests/tags/v1/index/sha256/{md}/link").read_text() == f"sha256:{md}"
    leftovers = list((srv.data / ".regserve/tmp").iterdir())  # the driver's temporaries, all gone
    assert leftovers == []


class Distribution:
    """The real CNCF distribution on a data directory (or the `storage` YAML given, indented two
    spaces under `storage:`), stopped by its PID."""

    def __init__(self, data: Path | None, tmp: Path, storage: str | None = None, extra: str = "",
                 ready: tuple[int, ...] = (200,)) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / f"distribution-{self.port}.yml"
        storage = storage or f"  filesystem: {{rootdirectory: {data}}}\n"
        cfg.write_text(f"""version: 0.1
log: {{level: error, accesslog: {{disabled: true}}}}
storage:
{storage}  delete: {{enabled: true}}
http: {{addr: 127.0.0.1:{self.port}, secret: test-secret}}
{extra}""")
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # its Go S3 client panics on it
        log_path = tmp / f"distribution-{self.port}.log"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([shutil.which("docker-registry"), "serve", str(cfg)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if http("GET", self.url + "/v2/")[0] in ready:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("distribution did not start: " + log_path.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture
def distribution(tmp_path):
    require_tool("docker-registry", "CNCF distribution, the layout reference")
    started = []

    def start(data: Path) -> Distribution:
        d = Distribution(data, tmp_path)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_distribution_serves_what_regserve_wrote(server_factory, distribution, tmp_path):
    srv = server_factory()
    manifest = push_image(srv.url, "team/app", "v1")
    srv.stop()
    check_image(distribution(srv.data).url, "team/app", "v1", manifest)


def test_regserve_serves_what_distribution_wrote(server_factory, distribution, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    dist = distribution(data)
    manifest = push_image(dist.url, "team/app", "v2")
    dist.stop()
    check_image(server_factory(data=data).url, "team/app", "v2", manifest)


def test_upload_started_on_distribution_finishes_on_regserve(server_factory, distribution, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    dist = distribution(data)
    st, h, _ = http("POST", f"{dist.url}/v2/handoff/blobs/uploads/")
    assert st == 202
    loc = urlparse(h["Location"])
    half = len(LAYER) // 2
    st, h, _ = http("PATCH", f"{dist.url}{loc.path}?{loc.query}", LAYER[:half],
                    {"Content-Type": "application/octet-stream"})
    assert st == 202
    dist.stop()
    srv = server_factory(data=data)
    st, h, _ = http("GET", f"{srv.url}{loc.path}")
    assert st == 204 and h["Range"] == f"0-{half - 1}"
    st, _, _ = http("PATCH", f"{srv.url}{loc.path}", LAYER[half:], {"Content-Range": f"{half}-{len(LAYER) - 1}"})
    assert st == 202
    st, _, _ = http("PUT", f"{srv.url}{loc.path}?digest={digest_of(LAYER)}")
    assert st == 201
    assert http("GET", f"{srv.url}/v2/handoff/blobs/{digest_of(LAYER)}")[2] == LAYER
