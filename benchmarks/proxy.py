"""A pull-through cache under fan-out: N clients pulling one cold layer at once.

    python -m benchmarks.proxy [--clients 32] [--size-mib 1024] [--rounds 3] [--work DIR] [--out FILE]

One upstream (regserve, 2 workers, its metrics on) serves a layer of `--size-mib` random bytes.
In front of it, each cache in turn, started on an empty directory for every round (cold): regserve
(`proxy.remoteurl`, 2 workers) and distribution 2.8.2 in proxy mode. `--clients` clients pull the
layer from the cache at once; measured: the time until the last of them has it all, and what the
upstream sent (blob GETs and bytes, from its own counters). Every client counts its bytes, and the
first checks the digest. Writes benchmarks/RESULTS-proxy.md."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from .servers import Distribution, Regserve, free_port

HERE = Path(__file__).resolve().parent
NAME = "mirror/base"


class Upstream(Regserve):
    name = "upstream"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, workers=2)
        self.debug_port = free_port()

    def write_config(self) -> Path:
        cfg = super().write_config()
        cfg.write_text(cfg.read_text().replace(
            "http: {", f"http: {{debug: {{addr: '127.0.0.1:{self.debug_port}', prometheus: {{enabled: true}}}}, "))
        return cfg

    def sent(self) -> tuple[int, int]:
        """(blob GETs answered, blob bytes sent) so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.debug_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        gets = sum(float(m.group(1)) for m in re.finditer(
            r'regserve_http_requests_total\{[^}]*method="GET"[^}]*route="/v2/\{name\}/blobs/\{digest\}"[^}]*\} (\S+)',
            text))
        sent = re.search(r"^regserve_blob_bytes_pulled_total (\S+)", text, re.M)
        return int(gets), int(float(sent.group(1))) if sent else 0


class Cache:
    """A cache under test, proxying `upstream`."""

    def __init__(self, server: Regserve | Distribution, upstream: Upstream) -> None:
        self.server = server
        original = server.write_config

        def write_config() -> Path:
            cfg = original()
            cfg.write_text(cfg.read_text() + f"proxy: {{remoteurl: '{upstream.url}'}}\n")
            return cfg
        server.write_config = write_config  # type: ignore[method-assign]


def write_upstream(upstream: Upstream, size: int) -> str:
    """The layer, in distribution's layout in the upstream's directory (as a push leaves it)."""
    h = hashlib.sha256()
    tmp = upstream.workdir / "layer.tmp"
    with open(tmp, "wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            h.update(chunk)
            f.write(chunk)
    d = "sha256:" + h.hexdigest()
    blob = upstream.blob_path(d)
    blob.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, blob / "data")
    link = upstream.data / f"docker/registry/v2/repositories/{NAME}/_layers/sha256/{d[7:]}"
    link.mkdir(parents=True, exist_ok=True)
    (link / "link").write_text(d)
    os.sync()
    return d


def pull(port: int, digest: str, check: bool) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"/v2/{NAME}/blobs/{digest}")
    r = conn.getresponse()
    while r.status in (301, 302, 307) and r.getheader("Location"):
        raise RuntimeError("a redirect: not expected from a filesystem cache")
    if r.status != 200:
        raise RuntimeError(f"GET answered {r.status}: {r.read()[:200]!r}")
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    h = hashlib.sha256() if check else None
    n = 0
    while got := r.readinto(buf):
        n += got
        if h is not None:
            h.update(view[:got])
    conn.close()
    if h is not None and "sha256:" + h.hexdigest() != digest:
        raise RuntimeError("the first client got other bytes than the layer")
    return n


def fan_out(port: int, digest: str, clients: int, size: int) -> float:
    errors: list[BaseException] = []
    finished: list[float] = []

    def one(i: int) -> None:
        try:
            if pull(port, digest, i == 0) != size:
                raise RuntimeError("short body")
            finished.append(time.perf_counter())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    return max(finished) - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "proxy", help="scratch directory")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS-proxy.md")
    args = ap.parse_args()
    size = args.size_mib << 20
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    upstream = Upstream(work / "upstream")
    upstream.workdir.mkdir(parents=True)
    upstream.start()
    digest = write_upstream(upstream, size)
    results: dict[str, list[tuple[float, int, int]]] = {}
    version = ""
    try:
        for round_ in range(args.rounds):
            for make in (lambda: Regserve(work / "regserve", workers=2), lambda: Distribution(work / "distribution")):
                server = make()
                server.workdir.mkdir(parents=True, exist_ok=True)
                Cache(server, upstream)
                server.start(fresh=True)
                try:
                    if isinstance(server, Distribution):
                        version = "distribution " + server.version().split()[-1]
                    before = upstream.sent()
                    seconds = fan_out(server.port, digest, args.clients, size)
                    time.sleep(0.5)  # the upstream's last counters
                    after = upstream.sent()
                finally:
                    server.stop()
                gets, sent = after[0] - before[0], after[1] - before[1]
                results.setdefault(server.name, []).append((seconds, gets, sent))
                print(f"round {round_ + 1}: {server.name:12} {seconds:7.1f} s until the last of "
                      f"{args.clients} clients had it; upstream: {gets} blob GETs, {sent / (1 << 30):.1f} GiB",
                      flush=True)
    finally:
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)  # two copies of the layer, and the caches'
    write_results(results, args, version)


def write_results(results: dict[str, list[tuple[float, int, int]]], args: argparse.Namespace, version: str) -> None:
    lines = [
        "# Pull-through cache under fan-out",
        "",
        f"`python -m benchmarks.proxy --clients {args.clients} --size-mib {args.size_mib} --rounds {args.rounds}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores. {args.clients} clients pull one cold "
        f"{args.size_mib} MiB layer from a cache at once; the cache starts empty every round, its upstream is "
        "a regserve on loopback. Medians of the rounds (each round's figures in brackets). Reference: "
        f"{version or 'distribution'} in proxy mode.",
        "",
        "| cache | time until the last client has the layer | upstream blob GETs | bytes fetched from upstream |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in results.items():
        secs = [r[0] for r in rows]
        gets = [r[1] for r in rows]
        sent = [r[2] / (1 << 30) for r in rows]
        lines.append(f"| {name} | {statistics.median(secs):.1f} s ({', '.join(f'{s:.1f}' for s in secs)}) | "
                     f"{statistics.median(gets):.0f} ({', '.join(map(str, gets))}) | "
                     f"{statistics.median(sent):.1f} GiB ({', '.join(f'{s:.1f}' for s in sent)}) |")
    if {"regserve", "distribution"} <= results.keys():
        ratio = statistics.median(r[0] for r in results["distribution"]) / \
            statistics.median(r[0] for r in results["regserve"])
        lines += ["", f"Distribution's time over regserve's (medians): {ratio:.2f}."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
