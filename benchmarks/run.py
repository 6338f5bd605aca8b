"""The harness: start both servers, run every scenario A/B/B/A, report medians and ratios.

    python -m benchmarks                 # the full run, writes benchmarks/RESULTS.md
    python -m benchmarks --quick         # small sizes, a smoke run
    python -m benchmarks --calibrate     # the client against the null server
    python -m benchmarks --storage s3    # both registries on one Ceph RGW (benchmarks/s3.py)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import chart
from . import scenarios as sc
from .client import FRAME
from .nullserver import raw_sink
from .scenarios import MIB, BlobFile
from .servers import Distribution, NullServer, Regserve, Server

HERE = Path(__file__).resolve().parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B").rstrip("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def sha256_rate() -> float:
    """Single-core SHA-256 MiB/s (hashlib, the same OpenSSL code regserve drives)."""
    buf = os.urandom(64 * MIB)
    h = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(8):
        h.update(buf)
    return 512 / (time.perf_counter() - start)


def disk_rates(workdir: Path, rounds: int = 3) -> dict:
    """Durable write (write + fdatasync) of 1 GiB on the benchmark disk, and its cold sequential
    read: the file's pages dropped from the page cache (posix_fadvise DONTNEED, which needs no
    privilege and touches nothing else), then read in 4 MiB steps with the kernel's readahead,
    as `dd` would. The read is the limit for a pull from disk. Medians of `rounds`."""
    path = workdir / "disk-probe"
    buf = os.urandom(4 * MIB)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(256):
        os.write(fd, buf)
    os.fdatasync(fd)
    os.close(fd)
    write = 1024 / (time.perf_counter() - start)
    reads = [sc.cold_read(path) for _ in range(rounds)]
    os.unlink(path)
    return {"write_fdatasync_MiB/s": write, "read_cold_MiB/s": statistics.median(reads)}


def loopback_rates(path: Path, rounds: int = 5) -> dict:
    """How fast this machine moves a cached file to a loopback client that reads into a 4 MiB
    buffer: by sendfile on a corked socket (regserve's path to remote peers), and by read+write
    (regserve's path to peers on this host, in 4 MiB steps; distribution 2.8.2's way too, in
    32 KiB steps, as its storage driver hides the file from Go's sendfile; here 256 KiB steps).
    Both are kernel work; neither registry runs here. Medians of `rounds` transfers."""
    size = path.stat().st_size
    sc.read_through(path)  # cached, like the blobs the pull scenarios serve
    rates = {}
    for mode in ("sendfile", "copy"):
        listener = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            conn, _ = listener.accept()
            fd = os.open(path, os.O_RDONLY)
            buf = bytearray(256 << 10)
            try:
                while conn.recv(1):
                    offset = 0
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(mode == "sendfile"))
                    while offset < size:
                        if mode == "sendfile":
                            offset += os.sendfile(conn.fileno(), fd, offset, min(4 * MIB, size - offset))
                        else:
                            n = os.preadv(fd, [buf], offset)
                            conn.sendall(memoryview(buf)[:n])
                            offset += n
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)  # the last segment
            finally:
                os.close(fd)
                conn.close()

        server = multiprocessing.get_context("fork").Process(target=serve, daemon=True)
        server.start()  # a process of its own, as a server is: no GIL shared with the client
        samples = []
        with socket.create_connection(listener.getsockname()) as client:
            view = memoryview(bytearray(4 * MIB))
            for _ in range(rounds):
                start = time.perf_counter()
                client.sendall(b"g")
                left = size
                while left:
                    left -= client.recv_into(view, min(len(view), left))
                samples.append(size / MIB / (time.perf_counter() - start))
        server.join()
        listener.close()
        rates[f"loopback_{mode}_MiB/s"] = statistics.median(samples)
    return rates


def space_needed(blob_dir: Path, files: dict[str, int], stores: list[Path]) -> int:
    """Bytes of free disk a run needs: the blob `files` (name: size) not in `blob_dir` yet, and a
    copy of each in every server's store (kept there for the pulls), less what those `stores`
    hold now (a server's start empties its store); plus 2 GiB for the disk probe and small blobs."""
    def held(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0

    missing = sum(size for name, size in files.items()
                  if not (blob_dir / name).is_file() or (blob_dir / name).stat().st_size != size)
    stored = len(stores) * sum(files.values()) - sum(map(held, stores))
    return max(0, missing + stored) + (2 << 30)


def check_free_space(blob_dir: Path, files: dict[str, int], stores: list[Path]) -> None:
    """Stop before generating anything if the disk cannot hold the run: a full disk would kill
    it midway, and trouble everything else on that disk."""
    need, free = space_needed(blob_dir, files, stores), shutil.disk_usage(blob_dir.parent).free
    if need > free:
        sys.exit(f"benchmarks: this run needs about {need / (1 << 30):.1f} GiB free on the disk of "
                 f"{blob_dir}, which has {free / (1 << 30):.1f} GiB; choose smaller --sizes or another --workdir")


def machine(workdir: Path, probe_file: Path) -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GiB": round(mem, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "sha256_single_core_MiB/s": round(sha := sha256_rate()),
            "sha256_floor_cpu_s_per_GiB": round(1024 / sha, 2),
            **{k: round(v) for k, v in disk_rates(workdir).items()},
            **{k: round(v) for k, v in loopback_rates(probe_file).items()}}


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.out = open(self.work / "results.jsonl", "w")
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def measure(self, scenario: str, server: Server, fn: Callable[[], dict], round_: int) -> dict:
        """Runs `fn` and adds around it: the server's CPU (all its processes) as a share of the
        wall time and, where `fn` says how many GiB it moved, in CPU-seconds per GiB; the
        client's own CPU (this process: the reader can see it is not the limit); peak RSS."""
        self.progress(f"{scenario} on {server.name}, round {round_ + 1}")
        os.sync()  # the previous run's writeback must not land in this one's measurement
        server.reset_peak_rss()
        cpu0, client0, t0 = server.cpu_seconds(), _own_cpu(), time.perf_counter()
        figures = fn()
        wall = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        figures["cpu_%"] = 100 * cpu / wall
        gib = figures.pop("GiB", None)
        if gib:
            figures["cpu_s_per_GiB"] = cpu / gib
        figures["client_cpu_%"] = 100 * (_own_cpu() - client0) / wall
        figures["peak_rss_MiB"] = server.peak_rss_mib()
        return self.record(scenario, server.name, round_, figures)

    def record(self, scenario: str, server: str, round_: int, figures: dict) -> dict:
        rec = {"scenario": scenario, "server": server, "round": round_, **figures}
        self.records.append(rec)
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()
        print(json.dumps(rec), flush=True)
        main = next(((k, v) for k, v in figures.items() if isinstance(v, float)), None)
        self.progress(f"{scenario} on {server}, round {round_ + 1}"
                      + (f": {fmt(main[1])} {main[0]}" if main else ""), done=True)
        return rec

    def progress(self, text: str, done: bool = False) -> None:
        """One line on the terminal: what runs now, or what just finished; with the count of
        measurements made and the time since the start."""
        elapsed = int(time.monotonic() - self.started)
        line = f"[{len(self.records):3d} done, {elapsed // 60:2d}m{elapsed % 60:02d}s] {text}"
        if self.tty:  # stdout has the JSON lines, maybe redirected
            sys.stderr.write("\r\033[K" + line + ("\n" if done else ""))
            sys.stderr.flush()

    def abba(self, scenario: str, servers: list[Server], fn: Callable[[Server], dict],
             rounds: int, warmup: bool = False, each_round: Callable[[], None] | None = None) -> None:
        """Rounds alternate the order: A B, B A, A B, ... so drift hits both alike. `each_round`
        runs first in every round (a sample of the S3 engine's own rate, in the same conditions)."""
        if warmup:
            for s in servers:
                fn(s)
        for r in range(rounds):
            if each_round is not None:
                each_round()
            order = servers if r % 2 == 0 else list(reversed(servers))
            for s in order:
                self.measure(scenario, s, lambda s=s: fn(s), r)


def _own_cpu() -> float:
    """CPU-seconds this process (the client, all its threads) has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarise(records: list[dict], names: tuple[str, str]) -> list[dict]:
    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        rows = [r for r in records if r["scenario"] == scenario]
        figures = [k for k in rows[0] if k not in ("scenario", "server", "round")]
        summary = {"scenario": scenario}
        for fig in figures:
            per = {}
            for name in names:
                vals = [r[fig] for r in rows if r["server"] == name and isinstance(r.get(fig), (int, float))
                        and not isinstance(r.get(fig), bool)]
                flags = [r[fig] for r in rows if r["server"] == name and isinstance(r.get(fig), bool)]
                if vals:
                    per[name] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                elif flags:
                    per[name] = {"all": all(flags)}
            if len(per) == 2 and all("median" in v for v in per.values()) and per[names[1]]["median"]:
                per["ratio"] = per[names[0]]["median"] / per[names[1]]["median"]
            summary[fig] = per
        out.append(summary)
    return out


def fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def table(summaries: list[dict], names: tuple[str, str]) -> str:
    lines = [f"| scenario | figure | {names[0]} median (min–max) | {names[1]} median (min–max) | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for s in summaries:
        for fig, per in s.items():
            if fig == "scenario":
                continue
            cells = []
            for name in names:
                v = per.get(name, {})
                if "median" in v:
                    cells.append(f"{fmt(v['median'])} ({fmt(v['min'])}–{fmt(v['max'])})")
                elif "all" in v:
                    cells.append("yes" if v["all"] else "no")
                else:
                    cells.append("–")
            ratio = f"{per['ratio']:.2f}×" if "ratio" in per else "–"
            lines.append(f"| {s['scenario']} | {fig} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def concurrency(args: argparse.Namespace) -> list[int]:
    """The push_concurrent counts (--concurrent)."""
    return [int(x) for x in args.concurrent.split(",")]


DISTINCT_PUSHES = 4  # push_concurrent's distinct blobs on a filesystem (more pushes repeat them)


def run_suite(h: Harness, servers: list[Server], blobs: dict, args: argparse.Namespace) -> None:
    rounds = args.rounds
    sizes = [parse_size(x) for x in args.sizes.split(",")]
    chunk, frame = parse_size(args.chunk), parse_size(args.frame)
    wanted = set(args.scenarios.split(",")) if args.scenarios else None

    def want(name: str) -> bool:
        return wanted is None or name in wanted or name.split("[")[0] in wanted

    if want("idle_connections"):  # first: the servers' memory is not yet what other scenarios left
        h.abba(f"idle_connections[{args.idle_connections}]", servers,
               lambda s: sc.idle_connections(s, args.idle_connections), rounds)

    for size in sizes:
        blob = blobs[size]
        label = sc.label_of(size)
        if want("push_large"):
            h.abba(f"push_large[{label}]", servers, lambda s: sc.push_large(s, blob), rounds, warmup=True)
            h.abba(f"push_large[{label},frame={args.frame}]", servers,
                   lambda s: sc.push_large(s, blob, frame=frame), rounds)
            h.abba(f"push_large[{label},chunk={args.chunk}]", servers,
                   lambda s: sc.push_large(s, blob, chunk), rounds)
        if want("pull_large"):
            for s in servers:  # make sure it is there to pull
                sc.push_large(s, blob)
            h.abba(f"pull_large[{label},warm]", servers, lambda s: sc.pull_large(s, blob), rounds)
        if want("pull_cold"):
            for s in servers:
                sc.push_large(s, blob)
            h.abba(f"pull_cold[{label}]", servers, lambda s: sc.pull_cold(s, blob), rounds)
        if want("pull_after_push") and size == parse_size(args.fresh_size):
            for clients, later in ((1, 0.0), (args.clients, 0.0), (1, 10.0)):
                when = f",{later:.0f} s later" if later else ""
                h.abba(f"pull_after_push[{label},{clients} client{'s' if clients > 1 else ''}{when}]", servers,
                       lambda s, c=clients, w=later: sc.pull_after_push(s, blob, c, later=w), rounds)
    mid = blobs["mid"]
    if want("pull_concurrent") or want("range_get") or want("pull_fanout"):
        for s in servers:
            sc.push_large(s, mid, repo="bench/mid")
    if want("pull_concurrent"):
        h.abba(f"pull_concurrent[{args.clients}x{mid.size // MIB}MiB]", servers,
               lambda s: sc.pull_concurrent(s, mid, args.clients), rounds)
    if want("push_concurrent"):
        many = blobs["concurrent"]
        for n in concurrency(args):
            batch = [many[i % len(many)] for i in range(n)]
            h.abba(f"push_concurrent[{n}x{sc.label_of(many[0].size)}]", servers,
                   lambda s, b=batch: sc.push_concurrent(s, b), rounds)
    if want("pull_fanout"):
        h.abba(f"pull_fanout[{args.fanout_clients}x{sc.label_of(mid.size)}]", servers,
               lambda s: sc.pull_fanout(s, mid, args.fanout_clients), rounds)
    if want("push_many_small"):
        counter = {"i": 0}

        def small(s: Server) -> dict:
            counter["i"] += 1
            f = BlobFile.create(h.work / "blobs" / f"small-{counter['i']}.bin", args.small_count * 4096)
            return sc.push_many_small(s, f, args.small_count, 4096, 32)

        h.abba(f"push_many_small[{args.small_count}x4KiB,c=32]", servers, small, rounds)
    if want("manifest_ops"):
        for s in servers:
            sc.prepare_manifest(s)
        for method in ("HEAD", "GET"):
            h.abba(f"manifest_ops[{method},c=64]", servers,
                   lambda s, m=method: sc.manifest_ops(s, m, args.manifest_count, 64), rounds, warmup=True)
    if want("range_get"):
        h.abba("range_get[1MiB,c=16]", servers, lambda s: sc.range_get(s, mid, args.range_count, 16), rounds)
    if want("resume"):
        h.abba(f"resume[{mid.size // MIB}MiB]", servers, lambda s: sc.resume(s, mid, cut=False), rounds)
        h.abba(f"resume_cut[{mid.size // MIB}MiB]", servers, lambda s: sc.resume(s, mid, cut=True), rounds)


def revision(checkout: Path) -> str:
    """The commit a checkout is at, marked `+changes` if its files differ from it."""
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(checkout), *a], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "an unknown commit"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _median(summaries: list[dict], scenario: str, figure: str, name: str) -> float | None:
    for s in summaries:
        if s["scenario"] == scenario:
            return s.get(figure, {}).get(name, {}).get("median")
    return None


def cpu_section(summaries: list[dict], names: tuple[str, str], floor: float) -> str:
    """Server CPU-seconds per GiB of every push scenario, beside SHA-256's own cost."""
    def cell(per: dict) -> str:
        return fmt(per["median"]) if per else "–"

    rows = [f"| {s['scenario']} | {cell(s['cpu_s_per_GiB'].get(names[0]))} | "
            f"{cell(s['cpu_s_per_GiB'].get(names[1]))} |" for s in summaries if "cpu_s_per_GiB" in s]
    if not rows:
        return "(no push scenario run)"
    return (f"The floor: hashing alone costs {floor:.2f} CPU-s/GiB (the single-core SHA-256 rate above). "
            f"All the server's processes are counted.\n\n| scenario | {names[0]} | {names[1]} |\n"
            "| --- | --- | --- |\n" + "\n".join(rows))


def scaling_section(summaries: list[dict], names: tuple[str, str]) -> str:
    """Aggregate push throughput at each concurrency, as a multiple of one push of the same size."""
    lines = []
    for s in summaries:
        if not s["scenario"].startswith("push_concurrent["):
            continue
        size = s["scenario"].split("x", 1)[1].rstrip("]")
        cells = []
        for n in names:
            single = _median(summaries, f"push_large[{size}]", "MiB/s", n)
            many = s["MiB/s"].get(n, {}).get("median")
            cells.append(f"{fmt(many)} MiB/s = {many / single:.2f}× one push" if single and many else "–")
        lines.append(f"| {s['scenario']} | {cells[0]} | {cells[1]} |")
    if not lines:
        return "(push_concurrent not run)"
    return f"| scenario | {names[0]} | {names[1]} |\n| --- | --- | --- |\n" + "\n".join(lines)


def write_results(path: Path, info: dict, summaries: list[dict], names: tuple[str, str],
                  args: argparse.Namespace, ref_version: str, regserve_at: str, picture: str | None = None,
                  note: str = "") -> None:
    sha = info["sha256_single_core_MiB/s"]
    pushes = [s for s in summaries if "push_large[" in s["scenario"] and "chunk" not in s["scenario"]]
    share = "\n".join(f"- {s['scenario']}: regserve {fmt(s['MiB/s'][names[0]]['median'])} MiB/s = "
                      f"{100 * s['MiB/s'][names[0]]['median'] / sha:.0f}% of single-core SHA-256 ({sha} MiB/s)"
                      for s in pushes if names[0] in s.get("MiB/s", {}))
    command = " ".join(["python -m benchmarks"] + sys.argv[1:])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    chart_line = f"\n![throughput against layer size and concurrency]({picture})\n" if picture else ""
    text = f"""# Benchmark results

Generated by `{command}` on {when}.
regserve at {regserve_at} ({args.workers} worker{'s' if args.workers != 1 else ''}) against {ref_version}, same client,
same disk, no auth, access log off; rounds alternate A/B/B/A ({args.rounds} samples per server and
scenario). Ratios are regserve / reference of the medians (for latency, CPU and RSS lower is better).
`client_cpu_%` is the load generator's own CPU, so a reader can see it is not the limit.
{note}{chart_line}
## Machine

| | |
| --- | --- |
""" + "\n".join(f"| {k} | {v} |" for k, v in info.items()) + f"""

## Figures

{table(summaries, names)}

## CPU per GiB pushed

{cpu_section(summaries, names, 1024 / sha)}

## Concurrent pushes

{scaling_section(summaries, names)}

## Hashing budget

{share or '(push_large not run)'}
"""
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256M,1G", help="push_large/pull_large sizes, e.g. 256M,1G,4G")
    p.add_argument("--chunk", default="64M", help="Content-Range chunk size for the chunked push")
    p.add_argument("--frame", default="16M",
                   help="a second streamed push with chunked-encoding frames this large (docker's are 32K)")
    p.add_argument("--mid-size", default="256M", help="blob for pull_concurrent, range_get, resume")
    p.add_argument("--clients", type=int, default=16, help="pull_concurrent and pull_after_push clients")
    p.add_argument("--fresh-size", default="1G", help="the layer pull_after_push pushes and pulls at once")
    p.add_argument("--small-count", type=int, default=2000)
    p.add_argument("--manifest-count", type=int, default=20000, help="requests per manifest_ops run")
    p.add_argument("--range-count", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4, help="samples per server (order alternates)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="regserve --workers")
    p.add_argument("--scenarios", default="", help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="small sizes and counts: a smoke run")
    p.add_argument("--calibrate", action="store_true", help="measure the client against the null server")
    p.add_argument("--source", type=Path, default=None,
                   help="run regserve from this checkout (another commit; default: this one)")
    p.add_argument("--storage", choices=("filesystem", "s3"), default="filesystem",
                   help="s3: both registries on a single-node Ceph RGW the run starts (benchmarks/s3.py)")
    p.add_argument("--rgw", type=Path, default=None,
                   help="with --storage s3: the exports of a running RGW (tests/s3/start-ceph-rgw.sh)")
    p.add_argument("--concurrent", default=None,
                   help="push_concurrent: counts of 1 GiB pushes at once (default 4,16; with --storage s3: 8)")
    p.add_argument("--fanout-clients", type=int, default=500, help="pull_fanout: clients pulling --mid-size at once")
    p.add_argument("--idle-connections", type=int, default=2000, help="idle_connections: keep-alive connections")
    p.add_argument("--workdir", default=str(HERE / "work"))
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.source is not None and not (args.source / "regserve" / "__main__.py").is_file():
        sys.exit(f"benchmarks: --source {args.source} is not a regserve checkout")
    if args.quick:
        args.sizes, args.mid_size, args.chunk, args.frame = "64M", "32M", "8M", "4M"
        args.small_count, args.manifest_count, args.range_count, args.rounds = 200, 2000, 100, 2
        args.fanout_clients, args.idle_connections = 50, 200
        args.concurrent = args.concurrent or "2,4"
    args.concurrent = args.concurrent or ("8" if args.storage == "s3" else "4,16")
    if args.storage == "s3" and args.results == str(HERE / "RESULTS.md"):
        args.results = str(HERE / "RESULTS-s3.md")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h = Harness(args)
    sizes = [parse_size(x) for x in args.sizes.split(",")]
    blob_dir = h.work / "blobs"
    wanted = {**{s: (f"large-{s}.bin", s) for s in sizes}, "mid": ("mid.bin", parse_size(args.mid_size))}
    concurrent_size = (64 << 20) if args.quick else (1 << 30)
    distinct = max(concurrency(args))
    if args.storage != "s3":
        distinct = min(DISTINCT_PUSHES, distinct)
    wanted.update({f"c{i}": (f"concurrent-{i}-{concurrent_size}.bin", concurrent_size) for i in range(distinct)})
    if args.calibrate:
        servers: list[Server] = [NullServer(h.work / "null", blob_dir / wanted[sizes[0]][0])]
        stores = []  # it keeps nothing
    else:
        servers = [Regserve(h.work / "regserve", args.workers, args.source),
                   Distribution(h.work / "distribution")]
        stores = [s.data for s in servers]
    check_free_space(blob_dir, dict(wanted.values()), stores)
    blobs: dict = {key: BlobFile.create(blob_dir / name, size) for key, (name, size) in wanted.items()}
    info = machine(h.work, blobs["mid"].path)
    engine = None
    blobs["concurrent"] = [blobs.pop(f"c{i}") for i in range(distinct)]
    if args.storage == "s3":
        from . import s3
        engine = s3.Engine(args.rgw)
        for server in servers:
            s3.OnS3(server, engine, redirect=True)
    print(json.dumps({"machine": info}), flush=True)

    for s in servers:
        (s.workdir).mkdir(parents=True, exist_ok=True)
    try:
        for s in servers:
            s.start()
        if args.calibrate:
            blob = blobs[sizes[0]]
            sink_url, sink = raw_sink()
            try:
                for frame in (0, parse_size(args.frame)):
                    for r in range(args.rounds):
                        h.record(f"push_stream[raw sink,frame={frame or FRAME}]", "raw sink", r,
                                 sc.push_stream(sink_url, blob, frame))
            finally:
                sink.terminate()
            for name, fn in (("push_large", lambda: sc.push_large(servers[0], blob)),
                             (f"push_large[frame={args.frame}]",
                              lambda: sc.push_large(servers[0], blob, frame=parse_size(args.frame))),
                             ("pull_large", lambda: sc.pull_large(servers[0], blob)),
                             ("manifest_ops[GET,c=64]",
                              lambda: sc.manifest_ops(servers[0], "GET", args.manifest_count, 64))):
                for r in range(args.rounds):
                    h.measure(name, servers[0], fn, r)
            return 0
        if engine is not None:
            from . import s3
            s3.run_suite(h, servers, blobs, args, engine, sizes)
            info.update(engine.rates())
        else:
            run_suite(h, servers, blobs, args)
    finally:
        for s in servers:
            s.stop()
        if engine is not None:
            engine.stop()
    names = (servers[0].name, servers[1].name)
    summaries = summarise(h.records, names)
    for s in summaries:
        print(json.dumps({"summary": s}), flush=True)
    print(table(summaries, names))
    picture = Path(args.results).with_suffix(".png")
    drawn = chart.draw(summaries, names, picture)
    write_results(Path(args.results), info, summaries, names, args, servers[1].version(),
                  revision(servers[0].source), picture.name if drawn else None,
                  s3.note(args.rounds, summaries, names, engine, sizes[-1]) if engine else "")
    return 0
