"""The seed deployment for real: docker/Dockerfile built on a private dockerd with no network inside
the build, docker/compose.yml brought up with Debian's docker-compose over volumes that
distribution (running as root, as registry:3 does) wrote, then the seed's operations: health,
`htpasswd -Bbn` inside, docker login/push/pull, `bin/registry garbage-collect`, restart, pull.

Everything runs on temporary directories and is stopped by its own PID. Skips only where no dockerd
can run (not root, or docker.io/docker-compose/debootstrap absent outside CI)."""

from __future__ import annotations

import base64
import http.client as http_client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import free_port, http, require_tool
from .test_layout_compat import Distribution
from .test_s3 import s3_env

ROOT = Path(__file__).resolve().parent.parent


class Dockerd:
    """A private dockerd on temporary directories (the host has none running)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sock = base / "sock"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}")
        self.env.pop("DOCKER_CONFIG", None)
        self.env["DOCKER_CONFIG"] = str(base / "client")  # logins stay in this test
        self.log = open(base / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
             "--pidfile", str(base / "pid"), "-H", f"unix://{self.sock}", "--iptables=false",
             "--ip6tables=false", "--bridge=none", "--storage-driver=overlay2"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while self.run("info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("dockerd did not start: " + (base / "dockerd.log").read_text()[-2000:])
            time.sleep(0.5)

    def run(self, *args: str, check: bool = True, input: bytes | None = None,
            timeout: float = 600, cmd: str = "docker", cwd: Path | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run([cmd, *args], env=self.env, input=input, capture_output=True,
                           timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout.decode()[-3000:]}\n{r.stderr.decode()[-3000:]}")
        return r

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and containerd
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        # Whatever dockerd left mounted under our directories (after a kill) goes before removal.
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(self.base))]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    if os.geteuid() != 0:
        if os.environ.get("REGSERVE_REQUIRE_E2E"):
            pytest.fail("the deployment test needs root to run a private dockerd")
        pytest.skip("a private dockerd needs root")
    for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
        require_tool(tool, "the seed deployment test")
    base = Path(tempfile.mkdtemp(prefix="rs-dk-", dir="/tmp"))  # short: the socket path is limited
    d = Dockerd(base)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def debian_mirror() -> str:
    """The mirror apt uses here (CI's may differ from deb.debian.org)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and line.split()[1].rstrip("/").endswith("/debian"):
                return line.split()[1]
    return "http://deb.debian.org/debian"


def build_base_image(d: Dockerd, work: Path) -> str:
    """Debian with python3: what a public slim Python image gives, made here without a registry."""
    rootfs = work / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
                    "bookworm", str(rootfs), debian_mirror()],
                   check=True, capture_output=True, timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(["docker", "import", "-", "regserve-test-base:bookworm"], stdin=tar.stdout,
                       env=d.env, capture_output=True, timeout=600)
    tar.wait()
    assert r.returncode == 0 and tar.returncode == 0, r.stderr.decode()
    shutil.rmtree(rootfs)
    return "regserve-test-base:bookworm"


def build_context(work: Path) -> Path:
    """The repository as a build context, with wheels made on the host for an offline build."""
    ctx = work / "ctx"
    shutil.copytree(ROOT, ctx, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "__pycache__", "work", ".pytest_cache", ".ruff_cache", "wheels"))
    # regserve's dependencies as locked, and its build backend (pip builds regserve in the image).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(ctx / "docker" / "wheels"),
                    "-c", str(ctx / "docker" / "requirements.lock"), str(ctx), "setuptools>=64"],
                   check=True, capture_output=True, timeout=900)
    return ctx


def compose_files(ctx: Path, port: int, base: str) -> list[str]:
    """docker/compose.yml as Debian's docker-compose 1.29 takes it, plus the test's override.
    Compose v1 refuses the top-level `name:` key that v2 reads; `-p registry` says the same."""
    seed = (ctx / "docker" / "compose.yml").read_text()
    assert "\nname: registry\n" in seed
    (ctx / "docker" / "compose.v1.yml").write_text(seed.replace("\nname: registry\n", "\n", 1))
    (ctx / "docker" / "compose.test.yml").write_text(f"""services:
  registry:
    build:
      network: host
      args:
        BASE: {base}
        PIP_OPTIONS: --no-index --find-links /src/docker/wheels
    ports:
      - "127.0.0.1:{port}:5000"
    healthcheck:
      interval: 2s
      start_period: 0s
""")
    return ["-p", "registry", "-f", str(ctx / "docker" / "compose.v1.yml"),
            "-f", str(ctx / "docker" / "compose.test.yml")]


def tiny_image(d: Dockerd, work: Path, name: str, content: bytes) -> None:
    root = work / f"img-{name.replace('/', '_').replace(':', '_')}"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "payload").write_bytes(content)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(["docker", "import", "-", name], stdin=tar.stdout, env=d.env, capture_output=True)
    tar.wait()
    assert r.returncode == 0, r.stderr.decode()


def image_payload(d: Dockerd, image: str) -> bytes:
    """/etc/payload of an image, read without running it."""
    cid = d.out("create", image, "/none")
    try:
        return d.run("cp", f"{cid}:/etc/payload", "-").stdout  # a tar stream holding the file
    finally:
        d.run("rm", cid)


def wait_health(d: Dockerd, status: str = "healthy", timeout: float = 120) -> None:
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        state = d.out("inspect", "-f", "{{.State.Health.Status}}", "registry")
        if state == status:
            return
        time.sleep(1)
    logs = d.run("logs", "registry", check=False)
    raise AssertionError(f"registry is {state!r}, not {status!r}:\n{logs.stdout.decode()[-3000:]}"
                         f"{logs.stderr.decode()[-3000:]}")


def serve_on_s3(d: Dockerd, work: Path, rgw: dict[str, str]) -> None:
    """The same image on S3, configured by environment alone: a container on the host's network
    against the tests' Ceph RGW. docker pushes a layer of a few MiB and pulls it back (through
    the registry's 307 to a presigned RGW URL, which a plain GET of the blob gets too)."""
    port = free_port()
    host = f"127.0.0.1:{port}"
    root = f"/image-{uuid.uuid4().hex[:12]}"
    env = {**s3_env(rgw, root), "REGISTRY_HTTP_ADDR": host,
           "REGISTRY_HTTP_DEBUG_ADDR": f"127.0.0.1:{free_port()}"}
    d.run("run", "-d", "--name", "registry-s3", "--network", "host",
          *[arg for k, v in env.items() for arg in ("-e", f"{k}={v}")], "regserve:test")
    try:
        deadline = time.time() + 60
        while not _answers(f"http://{host}/v2/"):
            if time.time() > deadline:
                raise AssertionError(d.run("logs", "registry-s3", check=False).stderr.decode()[-3000:])
            time.sleep(0.5)
        content = os.urandom(3 << 20)
        tiny_image(d, work, f"{host}/on/s3:v1", content)
        d.run("push", f"{host}/on/s3:v1")
        d.run("rmi", f"{host}/on/s3:v1")
        d.run("pull", f"{host}/on/s3:v1")
        assert content in image_payload(d, f"{host}/on/s3:v1")
        _, _, body = http("GET", f"http://{host}/v2/on/s3/manifests/v1",
                          headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        layer = json.loads(body)["layers"][0]["digest"]
        conn = http_client.HTTPConnection(host, timeout=30)
        conn.request("GET", f"/v2/on/s3/blobs/{layer}")
        r = conn.getresponse()
        assert r.status == 307 and r.headers["Location"].startswith(rgw["S3_ENDPOINT"]), r.status
        conn.close()
    finally:
        d.run("rm", "-f", "registry-s3", check=False)


def _answers(url: str) -> bool:
    try:
        return http("GET", url)[0] == 200
    except OSError:  # not listening yet
        return False


def test_seed_deployment_with_docker_compose(dockerd, tmp_path, request):
    d = dockerd
    work = Path(tempfile.mkdtemp(prefix="rs-deploy-", dir=tmp_path))
    base = build_base_image(d, work)
    ctx = build_context(work)
    port = free_port()
    host = f"127.0.0.1:{port}"
    files = compose_files(ctx, port, base)
    compose_env = {"SERVICE_DOMAIN": "registry.example.test", "REGSERVE_VERSION": "test"}
    d.env.update(compose_env)

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return d.run(*files, *args, cmd="docker-compose", check=check, cwd=ctx / "docker")

    d.run("network", "create", "traefik_default")
    try:
        # An existing registry:3 deployment: its volumes, written as root by distribution.
        d.run("volume", "create", "registry_data")
        d.run("volume", "create", "registry_auth")
        mountpoint = Path(d.out("volume", "inspect", "-f", "{{.Mountpoint}}", "registry_data"))
        old = Distribution(mountpoint, work)
        try:
            tiny_image(d, work, f"127.0.0.1:{old.port}/legacy/app:v1", b"written by registry:3")
            d.run("push", f"127.0.0.1:{old.port}/legacy/app:v1")
        finally:
            old.stop()
        assert all(p.stat().st_uid == 0 for p in mountpoint.rglob("*"))

        compose("build")
        # The image the seed runs: unprivileged, labelled, pinned, with the seed's tools inside.
        info = json.loads(d.out("image", "inspect", "regserve:test"))[0]["Config"]
        assert info["Labels"]["org.opencontainers.image.title"] == "regserve"
        assert info["Healthcheck"]["Test"] == ["CMD", "registry", "healthcheck"]
        assert d.out("run", "--rm", "regserve:test", "--version").startswith("regserve ")

        compose("up", "-d", "--no-build")
        wait_health(d)
        ps = d.out("top", "registry", "-o", "pid,user,args").splitlines()[1:]
        assert any("regserve serve" in line for line in ps), ps
        assert all(line.split()[1] != "root" for line in ps), ps
        # `:5000` is every address, IPv6 included (one dual-stack socket), as with distribution;
        # one worker per CPU the container may use.
        tcp6 = d.out("exec", "registry", "cat", "/proc/net/tcp6").splitlines()
        assert any(line.split()[1] == "0" * 32 + ":1388" and line.split()[3] == "0A" for line in tcp6[1:]), tcp6
        cores = d.out("exec", "registry", "nproc")
        start_log = d.run("logs", "registry").stderr.decode() + d.run("logs", "registry").stdout.decode()
        assert f"workers: {cores}" in start_log, start_log[-2000:]
        # Handed over to the unprivileged user, and still what distribution wrote.
        assert all(p.stat().st_uid == 10001 for p in mountpoint.rglob("*"))
        status, _, body = http("GET", f"http://{host}/v2/")
        assert status == 401

        # The seed's post-deployment steps, verbatim.
        d.run("exec", "registry", "sh", "-c", "htpasswd -Bbn myuser Swordfish > /auth/htpasswd")
        d.run("exec", "registry", "sh", "-c", "htpasswd -Bb /auth/htpasswd anotheruser Swordfish")
        d.run("login", host, "-u", "myuser", "--password-stdin", input=b"Swordfish")
        d.run("pull", f"{host}/legacy/app:v1")
        assert b"written by registry:3" in image_payload(d, f"{host}/legacy/app:v1")

        tiny_image(d, work, f"{host}/alpine:latest", b"pushed through compose")
        d.run("push", f"{host}/alpine:latest")
        tiny_image(d, work, f"{host}/alpine:old", b"soon garbage")
        d.run("push", f"{host}/alpine:old")
        d.run("rmi", f"{host}/alpine:latest", f"{host}/legacy/app:v1")
        d.run("pull", f"{host}/alpine:latest")
        assert b"pushed through compose" in image_payload(d, f"{host}/alpine:latest")
        # The web UI, from the installed wheel (its templates and files are package data).
        ui_auth = {"Authorization": "Basic " + base64.b64encode(b"myuser:Swordfish").decode()}
        status, _, page = http("GET", f"http://{host}/ui/repo/alpine", headers=ui_auth)
        assert status == 200 and b'data-tag="latest"' in page, page[:2000]
        assert http("GET", f"http://{host}/ui/static/ui.css")[0] == 200

        # Orphan an image (deleted by digest), then the seed's garbage-collect inside the container.
        d.run("logout", host)
        d.run("login", host, "-u", "anotheruser", "--password-stdin", input=b"Swordfish")
        auth = {"Authorization": "Basic " + base64.b64encode(b"anotheruser:Swordfish").decode(),
                "Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        status, headers, body = http("GET", f"http://{host}/v2/alpine/manifests/old", headers=auth)
        assert status == 200
        old_layer = json.loads(body)["layers"][0]["digest"]
        assert http("DELETE", f"http://{host}/v2/alpine/manifests/{headers['Docker-Content-Digest']}",
                    headers=auth)[0] == 202
        seed_gc = ["exec", "registry", "bin/registry", "garbage-collect", "/etc/docker/registry/config.yml"]
        gc = d.run(*seed_gc)  # online: what was written within the grace period (1h) stays
        assert old_layer not in gc.stdout.decode()
        assert http("HEAD", f"http://{host}/v2/alpine/blobs/{old_layer}", headers=auth)[0] == 200
        gc = d.run(*seed_gc, "--grace", "0s")
        assert f"blob eligible for deletion: {old_layer}" in gc.stdout.decode()
        assert http("HEAD", f"http://{host}/v2/alpine/blobs/{old_layer}", headers=auth)[0] == 404
        assert not [p for p in mountpoint.rglob("*") if p.stat().st_uid != 10001]  # nothing root's

        compose("restart")
        wait_health(d)
        d.run("rmi", f"{host}/alpine:latest")
        for ref in (f"{host}/alpine:latest", f"{host}/legacy/app:v1"):
            d.run("pull", ref)
        assert b"pushed through compose" in image_payload(d, f"{host}/alpine:latest")
        assert b"written by registry:3" in image_payload(d, f"{host}/legacy/app:v1")

        logs = d.run("logs", "registry")
        text = logs.stdout + logs.stderr
        assert b"regserve listening on" in text and b"regserve stopped" in text
        assert b"Swordfish" not in text and b"Authorization" not in text

        serve_on_s3(d, work, request.getfixturevalue("rgw"))
    finally:
        compose("down", "-v", check=False)
        d.run("volume", "rm", "-f", "registry_data", "registry_auth", check=False)
        d.run("network", "rm", "traefik_default", check=False)
