"""The benchmark harness itself works (small sizes, regserve only): behaviour, not timings."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import scenarios as sc
from benchmarks.run import check_free_space, main, parse_size, revision, space_needed, summarise, table
from benchmarks.servers import CHECKOUT, Regserve


def test_scenarios_run_against_regserve(tmp_path: Path):
    srv = Regserve(tmp_path / "rs", workers=1)
    srv.workdir.mkdir(parents=True)
    srv.start()
    try:
        big = sc.BlobFile.create(tmp_path / "big.bin", 6 << 20)
        small = sc.BlobFile.create(tmp_path / "small.bin", 50 * 4096)
        assert sc.push_large(srv, big)["MiB/s"] > 0
        # docker's framing from the file's mapping, ending mid-frame and mid-sendmsg: the server
        # accepts the PUT only if the bytes it received hash to the digest
        odd = sc.BlobFile.create(tmp_path / "odd.bin", (5 << 20) + 12345)
        assert sc.push_large(srv, odd)["MiB/s"] > 0
        assert sc.push_large(srv, big, chunk=1 << 20)["MiB/s"] > 0
        assert sc.pull_large(srv, big)["MiB/s"] > 0
        sc.push_large(srv, big, repo="bench/mid")
        assert sc.pull_concurrent(srv, big, 4)["MiB/s"] > 0
        assert sc.range_get(srv, big, 20, 4)["req/s"] > 0
        assert sc.push_many_small(srv, small, 50, 4096, 8)["single_request"] is True
        sc.prepare_manifest(srv)
        assert sc.manifest_ops(srv, "HEAD", 100, 8)["req/s"] > 0
        assert sc.resume(srv, big, cut=False)["works"] is True
        cut = sc.resume(srv, big, cut=True)
        assert cut["works"] is True and cut["kept_MiB"] > 0
        assert srv.peak_rss_mib() > 0 and srv.cpu_seconds() > 0
        twice = sc.push_concurrent(srv, [big, odd, big])  # the same blob twice at once, too
        assert twice["GiB"] == (2 * big.size + odd.size) / (1 << 30) and twice["MiB/s"] > 0
        fanout = sc.pull_fanout(srv, big, 20)
        assert fanout["MiB/s"] > 0 and 0 < fanout["p50_s"] <= fanout["p99_s"] <= fanout["last_s"]
        idle = sc.idle_connections(srv, 50)
        assert idle["open_after_2s"] == 50 and idle["rss_total_MiB"] > 0
    finally:
        srv.stop()


def test_measure_adds_cpu_per_gib_and_the_clients_cpu(tmp_path: Path):
    from benchmarks.run import Harness, concurrency, parse_args
    h = Harness(parse_args(["--workdir", str(tmp_path)]))
    srv = Regserve(tmp_path / "rs", workers=1)
    srv.workdir.mkdir(parents=True)
    srv.start()
    try:
        big = sc.BlobFile.create(tmp_path / "big.bin", 32 << 20)
        rec = h.measure("push_large[32MiB]", srv, lambda: sc.push_large(srv, big), 0)
    finally:
        srv.stop()
    assert "GiB" not in rec and rec["cpu_s_per_GiB"] > 0 and rec["client_cpu_%"] >= 0
    assert concurrency(parse_args(["--concurrent", "4,16"])) == [4, 16]


def test_chart_series_and_sections():
    from benchmarks.chart import series
    from benchmarks.run import cpu_section, scaling_section

    def summary(scenario: str, **figures: tuple[float, float]) -> dict:
        return {"scenario": scenario, **{f.replace("__", "/"): {"a": {"median": a}, "b": {"median": b}}
                                         for f, (a, b) in figures.items()}}

    summaries = [summary("push_large[256MiB]", MiB__s=(1000, 300), cpu_s_per_GiB=(1.0, 2.0)),
                 summary("push_large[1GiB]", MiB__s=(1200, 400), cpu_s_per_GiB=(1.1, 2.1)),
                 summary("pull_large[1GiB,warm]", MiB__s=(4000, 3000)),
                 summary("push_concurrent[4x1GiB]", MiB__s=(2400, 600), cpu_s_per_GiB=(1.2, 2.2)),
                 summary("pull_fanout[500x256MiB]", MiB__s=(3000, 2000), one_client_MiB__s=(3100, 2500))]
    panels = series(summaries, ("a", "b"))
    assert panels["size"]["push, a"] == [(256, 1000), (1024, 1200)]
    assert panels["size"]["pull (warm), b"] == [(1024, 3000)]
    assert panels["concurrency"]["push 1GiB, a"] == [(1, 1200), (4, 2400)]
    assert panels["concurrency"]["pull 256MiB, b"] == [(1, 2500), (500, 2000)]
    assert "2.00× one push" in scaling_section(summaries, ("a", "b"))
    cpu = cpu_section(summaries, ("a", "b"), 0.5)
    assert "0.50 CPU-s/GiB" in cpu and "| push_concurrent[4x1GiB] | 1.20 | 2.20 |" in cpu


def test_report_helpers():
    assert parse_size("64M") == 64 << 20 and parse_size("4G") == 4 << 30 and parse_size("512K") == 512 << 10
    records = [{"scenario": "s", "server": n, "round": r, "MiB/s": v}
               for n, vals in (("a", [10, 30, 20]), ("b", [5, 5, 10])) for r, v in enumerate(vals)]
    (summary,) = summarise(records, ("a", "b"))
    assert summary["MiB/s"]["a"]["median"] == 20 and summary["MiB/s"]["ratio"] == 4.0
    assert "4.00×" in table([summary], ("a", "b"))


def test_a_server_that_never_started_stops_cleanly(tmp_path: Path):
    """When the first server fails to start, the harness stops the others, never started."""
    srv = Regserve(tmp_path / "rs", workers=1)
    srv.stop()


def test_free_space_is_checked_before_anything_is_generated(tmp_path: Path):
    """Blob files not there yet, plus a copy of each per server store, less what the stores
    (emptied at start) hold now, plus 2 GiB."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "mid.bin").write_bytes(b"x" * 1000)  # there already
    (tmp_path / "blobs" / "large-5000.bin").write_bytes(b"x" * 10)  # wrong size: made again
    (tmp_path / "regserve" / "data" / "d").mkdir(parents=True)
    (tmp_path / "regserve" / "data" / "d" / "old").write_bytes(b"x" * 700)
    files = {"large-5000.bin": 5000, "mid.bin": 1000}
    blob_dir = tmp_path / "blobs"
    stores = [tmp_path / "regserve" / "data", tmp_path / "distribution" / "data"]
    assert space_needed(blob_dir, files, stores) == 5000 + 2 * 6000 - 700 + (2 << 30)
    assert space_needed(blob_dir, files, []) == 5000 + (2 << 30)
    check_free_space(blob_dir, files, stores[:1])  # a few KiB: fits
    with pytest.raises(SystemExit, match="needs about"):
        check_free_space(blob_dir, {"large-1.bin": 1 << 60}, stores[:1])
    assert not (tmp_path / "blobs" / "large-1.bin").exists()


def test_regserve_runs_from_the_checkout_given(tmp_path: Path):
    """--source: the server imports regserve from that checkout, not from the harness's."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "regserve").symlink_to(CHECKOUT / "regserve")
    srv = Regserve(tmp_path / "rs", workers=1, source=other)
    srv.workdir.mkdir(parents=True)
    srv.start()
    try:
        with open(f"/proc/{srv.proc.pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert env[b"PYTHONPATH"] == str(other).encode()
    finally:
        srv.stop()
    assert Regserve(tmp_path / "x", workers=1).environment()["PYTHONPATH"] == str(CHECKOUT)
    with pytest.raises(SystemExit, match="not a regserve checkout"):
        main(["--source", str(tmp_path / "rs"), "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # refused before anything was made


def test_results_name_the_commit_measured(tmp_path: Path):
    def git(*a: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                       check=True, capture_output=True)

    assert revision(tmp_path) == "an unknown commit"
    git("init", "-q")
    (tmp_path / "f").write_text("a")
    git("add", "f")
    git("commit", "-q", "-m", "x")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert revision(tmp_path) == head
    (tmp_path / "f").write_text("b")
    assert revision(tmp_path) == head + "+changes"


def test_the_pull_through_benchmark_counts_what_each_cache_fetched(tmp_path: Path):
    from .conftest import require_tool
    require_tool("docker-registry", "CNCF distribution 2.8.2 in proxy mode, the reference cache")
    out = tmp_path / "RESULTS-proxy.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks.proxy", "--clients", "3", "--size-mib", "8",
                        "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(out)],
                       cwd=CHECKOUT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "| 1 (1) | 0.0 GiB" in rows["regserve"]  # one upstream GET, 8 MiB
    assert "| 3 (3) |" in rows["distribution"] or "| 4 (4) |" in rows["distribution"]  # one per client
    assert not (tmp_path / "work").exists()
