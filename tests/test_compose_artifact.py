"""Compose OCI artifacts, as `docker compose publish` pushes them and `docker compose -f oci://...`
reads them: stored and served byte-exact, artifactType kept. Debian has no Compose v2, so oras
pushes the same layout (both the OCI 1.1 form and the 1.0 fallback compose writes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from .authutil import basic, htpasswd_file
from .conftest import http

ROOT = Path(__file__).resolve().parent.parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def users(tmp_path):
    return htpasswd_file(tmp_path / "htpasswd", {"publisher": "Swordfish"})


def descriptor(media_type: str, data: bytes, annotations: dict[str, str] | None = None) -> dict:
    d = {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
    if annotations:
        d["annotations"] = annotations
    return d


@pytest.mark.parametrize("oci_version", ["1.1", "1.0"])
def test_compose_project_published_and_read_back(server_factory, tmp_path, users, oci_version):
    oras_provider = pytest.importorskip("oras.provider")
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"version: 0.1\nauth:\n  htpasswd:\n    realm: Registry Realm\n    path: {users}\n")
    srv = server_factory(config_file=cfg)
    host = srv.url.removeprefix("http://")

    compose = (ROOT / "docker" / "compose.yml").read_bytes()  # what README says to publish
    (tmp_path / "compose.yml").write_bytes(compose)
    (tmp_path / "config.json").write_bytes(b"{}")
    layer = descriptor("application/vnd.docker.compose.file+yaml", compose,
                       {"com.docker.compose.file": "compose.yml", "com.docker.compose.version": "2.40.0"})
    manifest: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if oci_version == "1.1":
        manifest["artifactType"] = "application/vnd.docker.compose.project"
        config = descriptor("application/vnd.oci.empty.v1+json", b"{}")
    else:
        config = descriptor("application/vnd.docker.compose.config.empty.v1+json", b"{}")
    manifest.update(config=config, layers=[layer],
                    annotations={"org.opencontainers.image.created": "2026-12-02T00:00:00Z"})

    client = oras_provider.Registry(hostname=host, insecure=True, auth_backend="basic")
    client.login(username="publisher", password="Swordfish", hostname=host)
    target = client.get_container(f"{host}/regserve/compose:{oci_version}")
    for path, desc in ((tmp_path / "config.json", config), (tmp_path / "compose.yml", layer)):
        assert client.upload_blob(str(path), target, desc).status_code in (200, 201)
    assert client.upload_manifest(manifest, target).status_code == 201

    # What `docker compose -f oci://host/regserve/compose:TAG up` fetches.
    fetched = client.get_manifest(target, allowed_media_type=[OCI_MANIFEST])
    assert fetched == manifest
    out = tmp_path / "pulled.yml"
    client.download_blob(target, layer["digest"], str(out))
    assert out.read_bytes() == compose
    assert client.get_tags(target) == [oci_version]

    # The same over plain HTTP: media type and digest as stored; anonymous readers refused.
    url = f"{srv.url}/v2/regserve/compose/manifests/{oci_version}"
    status, headers, body = http("GET", url, headers={"Accept": OCI_MANIFEST, **basic("publisher", "Swordfish")})
    assert status == 200 and headers["Content-Type"] == OCI_MANIFEST
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert json.loads(body).get("artifactType") == manifest.get("artifactType")
    status, _, body = http("GET", url, headers={"Accept": OCI_MANIFEST})
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
