"""Builds real OCI image layouts from real files for end-to-end tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CREATED = "2026-11-30T10:00:00Z"  # the images' build time, as their configs say


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    d = hashlib.sha256(data).hexdigest()
    path = layout / "blobs/sha256" / d
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{d}", len(data)


def _layer_from(files: dict[str, bytes]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(content))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), diff_id


def _image(layout: Path, arch: str, layers: list[dict[str, bytes]]) -> dict:
    descs, diff_ids = [], []
    for files in layers:
        blob, diff_id = _layer_from(files)
        d, size = _write_blob(layout, blob)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size})
        diff_ids.append(diff_id)
    config = json.dumps({"architecture": arch, "os": "linux", "created": CREATED,
                         "config": {"Cmd": ["/bin/sh"], "Labels": {"org.opencontainers.image.title": "e2e"}},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cd, cs = _write_blob(layout, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": cd, "size": cs},
                           "layers": descs}).encode()
    md, ms = _write_blob(layout, manifest)
    return {"mediaType": OCI_MANIFEST, "digest": md, "size": ms,
            "platform": {"architecture": arch, "os": "linux"}}


def _finish(layout: Path, desc: dict, tag: str) -> None:
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    desc = dict(desc, annotations={"org.opencontainers.image.ref.name": tag})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


def source_files(root: Path) -> dict[str, bytes]:
    """The project's own Python sources: real files for a realistic layer."""
    return {f"app/{p.relative_to(root)}": p.read_bytes() for p in sorted(root.rglob("*.py"))}


def build_image(layout: Path, tag: str, src: Path, big_bytes: int = 24 << 20) -> str:
    """A three-layer image: the project's sources, a large incompressible file, a small config file.
    Returns the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    desc = _image(layout, "amd64", [
        source_files(src),
        {"data/big.bin": os.urandom(big_bytes)},
        {"etc/app.conf": b"listen = 0.0.0.0\n"},
    ])
    _finish(layout, desc, tag)
    return desc["digest"]


def build_index(layout: Path, tag: str, src: Path) -> str:
    """A multi-platform OCI index of two images. Returns the index digest."""
    layout.mkdir(parents=True, exist_ok=True)
    children = [_image(layout, arch, [source_files(src), {f"etc/{arch}": arch.encode()}])
                for arch in ("amd64", "arm64")]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).encode()
    d, size = _write_blob(layout, index)
    _finish(layout, {"mediaType": OCI_INDEX, "digest": d, "size": size}, tag)
    return d


def build_referrer(layout: Path, tag: str, subject: dict, artifact_type: str, payload: bytes) -> str:
    """An OCI 1.1 artifact (a signature, an SBOM) whose subject is `subject` (a descriptor of a
    manifest in the same layout). Returns its digest."""
    layout.mkdir(parents=True, exist_ok=True)
    cd, cs = _write_blob(layout, b"{}")
    ld, ls = _write_blob(layout, payload)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": cs},
                           "layers": [{"mediaType": "application/octet-stream", "digest": ld, "size": ls}],
                           "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"],
                                       "size": subject["size"]}}).encode()
    d, size = _write_blob(layout, manifest)
    _finish(layout, {"mediaType": OCI_MANIFEST, "digest": d, "size": size}, tag)
    return d
