"""Starting and stopping the single-node Ceph RGW of these scripts from Python, on free loopback
ports: for the S3 tests (tests/conftest.py) and the S3 benchmarks (benchmarks/s3.py)."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_free_ports() -> int:
    """A free port whose successor is free too (the mon takes both)."""
    while True:
        port = _free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


def exports(text: str) -> dict[str, str]:
    """The `export NAME=value` lines start-ceph-rgw.sh prints, as a dict."""
    return dict(line[len("export "):].split("=", 1) for line in text.splitlines() if line.startswith("export "))


def start(base: Path, bucket: str, osd_size_gb: int | None = None) -> subprocess.CompletedProcess:
    """Bring one up under `base`; the caller checks returncode (stderr says why) and reads
    `exports(result.stdout)`. Whatever the outcome, stop(base) afterwards."""
    env = dict(os.environ, CEPH_INSTALL="0", CEPH_MON_PORT=str(_two_free_ports()), CEPH_RGW_PORT=str(_free_port()),
               CEPH_OSD_PORT_MIN=str(random.randrange(20000, 30000, 100)), S3_BUCKET=bucket)
    if osd_size_gb is not None:
        env["CEPH_OSD_SIZE_GB"] = str(osd_size_gb)
    return subprocess.run([str(SCRIPTS / "start-ceph-rgw.sh"), str(base)], env=env, capture_output=True,
                          text=True, timeout=600)


def stop(base: Path) -> None:
    """Stop it by its PIDs and remove its data."""
    subprocess.run([str(SCRIPTS / "stop-ceph-rgw.sh"), str(base), "--purge"], capture_output=True, timeout=120)
