"""Many clients pushing, mounting, tagging, deleting and pulling the same content at once,
against `--workers 2`; then a full integrity scan of what is stored."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from .conftest import OCI_MANIFEST, digest_of, http, image_manifest

LAYERS = [os.urandom(300_000 + i * 1000) for i in range(4)]
CONFIGS = [json.dumps({"config": i}).encode() for i in range(3)]
MANIFESTS = [image_manifest(digest_of(CONFIGS[i % 3]), len(CONFIGS[i % 3]),
                            [(digest_of(LAYERS[j]), len(LAYERS[j])) for j in (i % 4, (i + 1) % 4)])
             for i in range(5)]
BY_DIGEST = {digest_of(m): m for m in MANIFESTS}
REPOS = ["s/a", "s/b", "s/c"]
TAGS = ["t0", "t1", "t2"]
CLIENTS, OPERATIONS = 12, 40
GRACE = 0.5  # the collections' in the test beside them


def blobs_of(manifest: bytes) -> list[bytes]:
    doc = json.loads(manifest)
    wanted = [doc["config"]["digest"]] + [layer["digest"] for layer in doc["layers"]]
    every = {digest_of(b): b for b in LAYERS + CONFIGS}
    return [every[d] for d in wanted]


class Client:
    def __init__(self, url: str, seed: int, problems: list[str]) -> None:
        self.url, self.rng, self.problems = url, random.Random(seed), problems
        self.retries = 0  # manifest pushes that found a layer collected meanwhile, and pushed it again

    def expect(self, what: str, status: int, allowed: tuple[int, ...], body: bytes = b"") -> bool:
        if status not in allowed:
            self.problems.append(f"{what}: {status} {body[:200]!r}")
        return status in allowed

    def push_blob(self, repo: str, blob: bytes) -> None:
        d = digest_of(blob)
        if self.rng.random() < 0.5:
            status, _, body = http("POST", f"{self.url}/v2/{repo}/blobs/uploads/?digest={d}", blob)
            self.expect(f"monolithic {repo}", status, (201,), body)
            return
        status, headers, body = http("POST", f"{self.url}/v2/{repo}/blobs/uploads/")
        if not self.expect(f"start {repo}", status, (202,), body):
            return
        half = len(blob) // 2
        path = urlparse(headers["Location"]).path
        status, headers, body = http("PATCH", f"{self.url}{path}", blob[:half],
                                     {"Content-Range": f"0-{half - 1}"})
        if not self.expect(f"patch {repo}", status, (202,), body):
            return
        path = urlparse(headers["Location"]).path
        status, _, body = http("PUT", f"{self.url}{path}?digest={d}", blob[half:],
                               {"Content-Range": f"{half}-{len(blob) - 1}"})
        self.expect(f"commit {repo}", status, (201,), body)

    def operate(self) -> None:
        repo = self.rng.choice(REPOS)
        kind = self.rng.choice(["push", "push", "mount", "tag", "tag", "untag", "delete", "pull", "pull"])
        manifest = self.rng.choice(MANIFESTS)
        if kind == "push":
            self.push_blob(repo, self.rng.choice(LAYERS + CONFIGS))
        elif kind == "mount":
            blob = self.rng.choice(LAYERS)
            status, headers, body = http("POST", f"{self.url}/v2/{repo}/blobs/uploads/?mount={digest_of(blob)}"
                                         f"&from={self.rng.choice(REPOS)}")
            if self.expect(f"mount {repo}", status, (201, 202), body) and status == 202:
                path = urlparse(headers["Location"]).path  # not there to mount: a session instead
                self.expect("cancel", http("DELETE", f"{self.url}{path}")[0], (204,))
        elif kind == "tag":
            tag = self.rng.choice(TAGS)
            for attempt in range(5):  # a collection may take a layer between its push and the manifest's
                for blob in blobs_of(manifest):
                    self.push_blob(repo, blob)
                status, _, body = http("PUT", f"{self.url}/v2/{repo}/manifests/{tag}", manifest,
                                       {"Content-Type": OCI_MANIFEST})
                if status != 400 or b"MANIFEST_BLOB_UNKNOWN" not in body:
                    break
                self.retries += 1
            self.expect(f"tag {repo}", status, (201,), body)
        elif kind == "untag":
            status, _, body = http("DELETE", f"{self.url}/v2/{repo}/manifests/{self.rng.choice(TAGS)}")
            self.expect(f"untag {repo}", status, (202, 404), body)
        elif kind == "delete":
            status, _, body = http("DELETE", f"{self.url}/v2/{repo}/manifests/{digest_of(manifest)}")
            self.expect(f"delete {repo}", status, (202, 404), body)
        else:
            status, headers, body = http("GET", f"{self.url}/v2/{repo}/manifests/{self.rng.choice(TAGS)}")
            if not self.expect(f"pull {repo}", status, (200, 404), body) or status == 404:
                return
            if BY_DIGEST.get(headers["Docker-Content-Digest"]) != body or digest_of(body) not in BY_DIGEST:
                self.problems.append(f"pull {repo}: a manifest that was never pushed")
                return
            for blob in blobs_of(body):
                status, _, got = http("GET", f"{self.url}/v2/{repo}/blobs/{digest_of(blob)}")
                if status == 200 and got == blob:
                    continue
                # Only a manifest untagged and collected meanwhile may lose its blobs.
                again, headers, _ = http("GET", f"{self.url}/v2/{repo}/manifests/{digest_of(body)}")
                if again == 200:
                    self.problems.append(f"pull {repo}: blob {digest_of(blob)} of a live manifest "
                                         f"answered {status}")


def scan(data: Path) -> list[str]:
    """Every blob hashes to its name; every tag resolves to a stored manifest whose blobs are
    linked in its repository and whole; nothing temporary or half-done is left."""
    v2 = data / "docker/registry/v2"
    problems = []
    for blob in (v2 / "blobs").rglob("data"):
        if hashlib.sha256(blob.read_bytes()).hexdigest() != blob.parent.name:
            problems.append(f"blob {blob.parent.name} does not hash to its name")
    for repo in REPOS:
        base = v2 / "repositories" / repo
        for tag_dir in (base / "_manifests/tags").glob("*"):
            d = (tag_dir / "current/link").read_text()
            h = d.split(":")[1]
            if not (base / f"_manifests/revisions/sha256/{h}/link").exists():
                problems.append(f"{repo}:{tag_dir.name} points at a deleted manifest {d}")
                continue
            manifest = (v2 / f"blobs/sha256/{h[:2]}/{h}/data").read_bytes()
            for blob in blobs_of(manifest):
                bh = digest_of(blob).split(":")[1]
                if not (base / f"_layers/sha256/{bh}/link").exists():
                    problems.append(f"{repo}:{tag_dir.name} needs {bh}, not linked")
                elif (v2 / f"blobs/sha256/{bh[:2]}/{bh}/data").read_bytes() != blob:
                    problems.append(f"{repo}:{tag_dir.name} needs {bh}, damaged")
        for session in (base / "_uploads").glob("*") if (base / "_uploads").exists() else []:
            problems.append(f"{repo}: upload session {session.name} left behind")
    problems += [f"temporary {p.name} left behind" for p in (data / ".regserve/tmp").iterdir()]
    return problems


def test_concurrent_clients_leave_consistent_storage(server_factory):
    srv = server_factory(workers=2)
    problems: list[str] = []
    clients = [Client(srv.url, seed, problems) for seed in range(CLIENTS)]

    def run(client: Client) -> None:
        for _ in range(OPERATIONS):
            try:
                client.operate()
            except Exception as e:  # noqa: BLE001 - reported with the others
                problems.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    srv.stop()
    assert problems == []
    assert scan(srv.data) == []
    log = srv.log_path.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_garbage_collection_while_clients_push_tag_and_delete(server_factory):
    """Collections run back to back (grace 0.5 s, untagged manifests too) while clients push,
    retag, untag, delete and pull. No tag ever points at a manifest whose blobs are gone, a push
    either completes or answers MANIFEST_BLOB_UNKNOWN and goes through when pushed again, and
    once everything is older than the grace period a last collection leaves exactly what the
    tags reach."""
    import asyncio

    from regserve.registry import Registry
    from regserve.registry.gc import collect
    from regserve.storage.filesystem import FilesystemDriver
    srv = server_factory(workers=2)
    problems: list[str] = []
    clients = [Client(srv.url, 100 + seed, problems) for seed in range(8)]
    running, collections = True, []

    def collector() -> None:
        while running:
            try:
                report = asyncio.run(collect(Registry(FilesystemDriver(str(srv.data))), delete_untagged=True,
                                             grace=GRACE, log=lambda s: None))
                collections.append(report)
            except Exception as e:  # noqa: BLE001 - reported with the others
                problems.append(f"collection: {type(e).__name__}: {e}")

    def run(client: Client) -> None:
        for _ in range(2 * OPERATIONS):
            try:
                client.operate()
            except Exception as e:  # noqa: BLE001 - reported with the others
                problems.append(f"{type(e).__name__}: {e}")
            time.sleep(client.rng.uniform(0, 0.05))  # so that content ages past the grace period
    gc = threading.Thread(target=collector)
    gc.start()
    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running = False
    gc.join()
    assert problems == []
    assert len(collections) >= 3 and any(r.blobs_deleted for r in collections)
    time.sleep(GRACE + 0.5)  # everything is older than the grace period now
    final = asyncio.run(collect(Registry(FilesystemDriver(str(srv.data))), delete_untagged=True, grace=GRACE,
                                log=lambda s: None))
    srv.stop()
    assert scan(srv.data) == []
    reached = reached_from_tags(srv.data)
    stored = {f"sha256:{p.parent.name}" for p in (srv.data / "docker/registry/v2/blobs").rglob("data")}
    assert stored == reached, (final.summary(False), stored ^ reached)


def reached_from_tags(data: Path) -> set[str]:
    """The manifests the tags point at, and the blobs those reference."""
    v2 = data / "docker/registry/v2"
    out = set()
    for repo in REPOS:
        for tag_dir in (v2 / "repositories" / repo / "_manifests/tags").glob("*"):
            d = (tag_dir / "current/link").read_text()
            h = d.split(":")[1]
            out.add(d)
            out |= {digest_of(b) for b in blobs_of((v2 / f"blobs/sha256/{h[:2]}/{h}/data").read_bytes())}
    return out
