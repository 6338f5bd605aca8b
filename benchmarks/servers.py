"""Servers under test: regserve, the reference registry, and the null server. Each runs as its own
process on a free loopback port and is stopped by its PID. CPU time and peak RSS are read from
/proc for the whole process tree (regserve --workers forks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

CLK_TCK = os.sysconf("SC_CLK_TCK")
CHECKOUT = Path(__file__).resolve().parent.parent  # the harness's own; servers run from it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                pids += kids
                frontier += kids
        except OSError:
            continue
    return pids


class Server:
    name = "server"
    source = CHECKOUT  # where a Python server imports its package from

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log: BinaryIO | None = None
        self.storage_yaml = f"  filesystem: {{rootdirectory: {self.data}}}\n"  # benchmarks.s3 replaces it

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, fresh: bool = True) -> None:
        """Start the server, on an empty data directory unless not `fresh`."""
        if fresh and self.data.exists():
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "server.log", "wb" if fresh else "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.environment())
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {(self.workdir / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def environment(self) -> dict[str, str]:
        """PYTHONPATH is set (not inherited), so that what runs is known."""
        return dict(os.environ, PYTHONPATH=str(self.source))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not None:  # None: never started (another server failed first)
            self.log.close()

    # -- metrics ------------------------------------------------------------------------------

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            except OSError:
                continue
        return total

    def reset_peak_rss(self) -> None:
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def peak_rss_mib(self) -> float:
        """The largest VmHWM of any process of the server (each worker is its own budget)."""
        peak = 0
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                continue
        return peak / 1024

    def rss_total_mib(self) -> float:
        """Resident memory now, all the server's processes together."""
        total = 0
        for pid in _tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                continue
        return total / 1024

    def write_config(self) -> Path:
        """The settings both registries run with: same storage, no auth, no access log."""
        cfg = self.workdir / "config.yml"
        cfg.write_text(f"""version: 0.1
log: {{level: error, accesslog: {{disabled: true}}}}
storage:
{self.storage_yaml}  delete: {{enabled: true}}
  cache: {{blobdescriptor: inmemory}}
  maintenance: {{uploadpurging: {{enabled: false}}}}
http: {{addr: 127.0.0.1:{self.port}, secret: bench}}
""")
        return cfg

    def blob_path(self, digest: str) -> Path:
        alg, hexd = digest.split(":")
        return self.data / f"docker/registry/v2/blobs/{alg}/{hexd[:2]}/{hexd}"

    def forget_blob(self, digest: str) -> None:
        """Remove a blob behind the server's back so the next push really commits it (both
        servers use distribution's layout). Synced, so that the deletion's journal commit (and
        on a disk mounted with `discard`, the trim of its blocks) does not land in the push."""
        shutil.rmtree(self.blob_path(digest), ignore_errors=True)
        os.sync()


class Regserve(Server):
    name = "regserve"

    def __init__(self, workdir: Path, workers: int, source: Path | None = None) -> None:
        """`source`: a checkout whose regserve package runs instead of this one's, to measure
        another commit with this harness."""
        super().__init__(workdir)
        self.workers = workers
        self.source = (source or CHECKOUT).resolve()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "regserve", "serve", str(self.write_config()), "--workers",
                str(self.workers)]


class Distribution(Server):
    name = "distribution"

    def command(self) -> list[str]:
        return [ensure_reference(), "serve", str(self.write_config())]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.pop("AWS_CA_BUNDLE", None)  # its Go S3 client panics at start with one set
        return env

    def version(self) -> str:
        r = subprocess.run([ensure_reference(), "--version"], capture_output=True, text=True)
        return r.stdout.strip()


class NullServer(Server):
    name = "null"

    def __init__(self, workdir: Path, blob_file: Path) -> None:
        super().__init__(workdir)
        self.blob_file = blob_file

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.nullserver", str(self.port), str(self.blob_file)]

    def forget_blob(self, digest: str) -> None:
        pass


def ensure_reference() -> str:
    """Debian's docker-registry (CNCF distribution 2.8.2), installed when missing."""
    path = shutil.which("docker-registry")
    if path:
        return path
    if os.geteuid() != 0:
        raise RuntimeError("docker-registry is missing; install Debian's docker-registry package")
    subprocess.run(["apt-get", "install", "-y", "-q", "docker-registry"], check=True,
                   stdout=subprocess.DEVNULL)
    path = shutil.which("docker-registry")
    if not path:
        raise RuntimeError("installing docker-registry failed")
    return path
