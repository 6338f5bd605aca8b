"""The web UI's pages on a large registry: server time to render them, cold and warm.

    python -m benchmarks.ui [--repositories 10000] [--tags 5000] [--rounds 20]

Builds, in distribution's layout, a registry of `--repositories` repositories (an image with
three layers each, one to three tags, layers shared between groups of ten) plus one repository
with `--tags` tags, each its own image. Then one regserve worker serves it, and each page is
fetched once right after the process starts (cold: nothing cached) and `--rounds` times after
(warm: the median). Beside them, what a third-party UI asks of distribution 2.8.2 for the same
lists (`_catalog`, `tags/list`), as the reference. Writes benchmarks/RESULTS-ui.md."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

from .servers import CHECKOUT, Distribution, Regserve

HERE = Path(__file__).resolve().parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Layout:
    """Writes distribution's layout directly: quicker than pushing 100,000 objects."""

    def __init__(self, root: Path) -> None:
        self.root = root / "docker/registry/v2"

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def blob(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        path = self.root / f"blobs/sha256/{hexd[:2]}/{hexd}/data"
        if not path.exists():
            self._write(path, data)
        return f"sha256:{hexd}"

    def link(self, repo: str, kind: str, digest: str) -> None:
        self._write(self.root / f"repositories/{repo}/{kind}/sha256/{digest.split(':')[1]}/link", digest.encode())

    def image(self, repo: str, tags: list[str], config_extra: dict, layers: list[bytes]) -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-11-30T10:00:00Z",
                             "config": {"Cmd": ["/bin/sh"], **config_extra},
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        descs = []
        for layer in layers:
            d = self.blob(layer)
            self.link(repo, "_layers", d)
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                          "size": len(layer)})
        cd = self.blob(config)
        self.link(repo, "_layers", cd)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": cd, "size": len(config)}, "layers": descs}).encode()
        md = self.blob(manifest)
        self.link(repo, "_manifests/revisions", md)
        for tag in tags:
            base = self.root / f"repositories/{repo}/_manifests/tags/{tag}"
            self._write(base / "current/link", md.encode())
            self._write(base / f"index/sha256/{md.split(':')[1]}/link", md.encode())


def build(root: Path, repositories: int, tags: int) -> None:
    layout = Layout(root)
    for i in range(repositories):
        shared = f"shared layer {i // 10}".encode() * 50
        layout.image(f"team-{i % 100:02d}/app-{i:05d}", [f"v{t}" for t in range(1 + i % 3)],
                     {"Labels": {"build": str(i)}}, [shared, f"own layer {i}".encode() * 40, b"base" * 100])
    for t in range(tags):
        layout.image("big/many-tags", [f"build-{t:05d}"], {"Labels": {"build": str(t)}},
                     [f"tag layer {t}".encode() * 30, b"base" * 100])


def timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status}")
    return (time.perf_counter() - started) * 1000, body


def measure(url: str, paths: list[str], rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per path (ms): the first fetch; the time until a fetch shows everything (a page may show
    sizes as still being counted: it is fetched again every 100 ms until it does not); and the
    median of `rounds` fetches after that."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    out = {}
    for path in paths:
        started = time.perf_counter()
        first, body = timed_get(conn, path)
        while b'id="pending"' in body:
            time.sleep(0.1)
            body = timed_get(conn, path)[1]
        complete = (time.perf_counter() - started) * 1000
        out[path] = (first, complete, statistics.median(timed_get(conn, path)[0] for _ in range(rounds)))
    conn.close()
    return out


def count_usage(url: str) -> float:
    """How long the storage page takes to count every repository (ms): it says it is counting,
    and refreshes, until it has."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
    started = time.perf_counter()
    while True:
        conn.request("GET", "/ui/storage")
        resp = conn.getresponse()
        if b'id="usage"' in resp.read():
            break
        time.sleep(0.1)
    conn.close()
    return (time.perf_counter() - started) * 1000


def drop_caches() -> None:
    """Where allowed (root), the first fetch reads the disk, as after a host restart."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ui", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repositories", type=int, default=10000)
    p.add_argument("--tags", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--workdir", type=Path, default=HERE / "work" / "ui")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS-ui.md")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ui_paths = ["/ui/", f"/ui/?page={args.repositories // 50}", "/ui/?q=app-0999", "/ui/repo/big/many-tags",
                f"/ui/repo/big/many-tags?page={args.tags // 100}", "/ui/repo/team-07/app-00007"]
    api_paths = ["/v2/_catalog?n=1000", "/v2/big/many-tags/tags/list"]
    rows = []
    for server, paths in ((Regserve(args.workdir / "regserve", workers=1), ui_paths + api_paths),
                          (Distribution(args.workdir / "distribution"), api_paths)):
        server.workdir.mkdir(parents=True, exist_ok=True)
        server.start()
        try:
            started = time.time()
            build(server.data, args.repositories, args.tags)
            print(f"{server.name}: built {args.repositories} repositories in {time.time() - started:.0f} s", flush=True)
            server.stop()
            drop_caches()
            server.start(fresh=False)  # a new process: nothing cached
            figures = measure(server.url, paths, args.rounds)
            if isinstance(server, Regserve):
                counted = count_usage(server.url)
                figures.update(measure(server.url, ["/ui/storage", "/ui/storage?page=100"], args.rounds))
                figures["/ui/storage"] = (figures["/ui/storage"][0], counted, figures["/ui/storage"][2])
            for path, (first, complete, warm) in figures.items():
                rows.append((server.name, path, first, complete, warm))
                print(f"{server.name:12} {path:40} first {first:8.1f} ms  complete {complete:8.1f} ms  "
                      f"warm median {warm:6.1f} ms", flush=True)
        finally:
            server.stop()
    lines = ["# The web UI on a large registry", "",
             f"{args.repositories} repositories (one image each, 1–3 tags) and one repository of {args.tags} tags, "
             f"each its own image; one regserve worker; time to the last byte on loopback, first fetch after "
             f"the process started and median of {args.rounds} more. regserve at `{revision()}`; "
             f"reference: distribution 2.8.2's API for the same lists.", "",
             "`first`: the first fetch after the process started; `complete`: until a fetch shows every "
             "figure (a page waits at most 150 ms for what is not cached yet and says it is still counting; "
             "for `/ui/storage`, until the count of every repository is done); `warm`: after that.", "",
             "| server | request | first (ms) | complete (ms) | warm median (ms) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {s} | `{p}` | {first:.1f} | {complete:.1f} | {warm:.1f} |" for s, p, first, complete, warm in rows]
    args.results.write_text("\n".join(lines) + "\n")
    return 0


def revision() -> str:
    r = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
