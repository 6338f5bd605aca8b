"""Shared fixtures: an in-process app for API tests, and real server processes on free ports."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from regserve import config as config_mod
from regserve.api import make_app
from regserve.api.app import RUNNER_OPTIONS, runner_options
from regserve.api.common import CONFIG_KEY
from regserve.connections import Limits, RegistryRunner

ROOT = Path(__file__).resolve().parent.parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def make_config(root: Path, **overrides: Any) -> config_mod.Config:
    env = {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(root)}
    env.update({k: str(v) for k, v in overrides.items()})
    return config_mod.load(None, env)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def storage_kind() -> str:
    """The driver under the in-process app: the filesystem, unless a module asks for every
    driver (see tests/test_over_every_driver.py)."""
    return "filesystem"


@pytest.fixture
def app_factory(request, data_dir: Path, storage_kind: str):
    """Apps on one storage: the data directory, or (storage_kind) a fresh in-memory driver, or a
    root directory of this test's own in the S3 bucket of the `rgw` fixture."""
    from regserve.api.app import make_registry
    if storage_kind == "inmemory":
        from regserve.storage.inmemory import InMemoryDriver
        driver = InMemoryDriver()
    elif storage_kind == "s3":
        import uuid

        from regserve.storage.s3 import S3Driver
        rgw = request.getfixturevalue("rgw")
        driver = S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                          secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/api-{uuid.uuid4().hex[:12]}")

    def factory(**overrides: Any):
        overrides.setdefault("REGISTRY_STORAGE_DELETE_ENABLED", "true")
        overrides.setdefault("REGISTRY_HTTP_RELATIVEURLS", "true")
        if storage_kind == "s3":  # the registry's own blob serving (redirects: test_s3.py)
            overrides.setdefault("REGISTRY_STORAGE_REDIRECT_DISABLE", "true")
        config = make_config(data_dir, **overrides)
        if storage_kind == "filesystem":
            return make_app(config)
        return make_app(config, registry=make_registry(config, driver))
    return factory


class RegserveTestServer(TestServer):
    """An app served as `regserve serve` serves it: the same runner, connection limits and
    options (aiohttp's TestServer asks for handler_cancellation=True; ours win)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        config = self.app.get(CONFIG_KEY)
        limits = Limits.of(config) if config is not None else Limits()
        kwargs.pop("keepalive_timeout", None)
        options = runner_options(config) if config is not None else RUNNER_OPTIONS
        return RegistryRunner(self.app, limits, **{**kwargs, **options})


@pytest.fixture
def aiohttp_client(aiohttp_client):
    """pytest-aiohttp's client, with applications served by RegserveTestServer."""
    async def make(app_or_server: Any, **kwargs: Any):
        if isinstance(app_or_server, web.Application):
            app_or_server = RegserveTestServer(app_or_server)
        return await aiohttp_client(app_or_server, **kwargs)
    return make


@pytest.fixture
async def client(aiohttp_client, app_factory):
    return await aiohttp_client(app_factory())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real `regserve serve` process on a free loopback port, stopped by its own PID."""

    def __init__(self, data: Path, env: dict[str, str] | None = None, workers: int = 1,
                 config_file: Path | None = None, log: Path | None = None, tls_ca: Path | None = None,
                 tls_client: tuple[Path, Path] | None = None) -> None:
        self.data, self.port = data, free_port()
        self.tls_ca, self.tls_client = tls_ca, tls_client
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or data.parent / f"server-{self.port}.log"
        full_env = dict(os.environ)
        full_env.update({"REGISTRY_HTTP_ADDR": f"127.0.0.1:{self.port}",
                         "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data),
                         "REGISTRY_STORAGE_DELETE_ENABLED": "true",
                         "REGISTRY_LOG_ACCESSLOG_DISABLED": "true"})
        full_env.update(env or {})
        if full_env.get("REGISTRY_STORAGE", "filesystem") != "filesystem":  # another driver chosen
            del full_env["REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY"]
        args = [sys.executable, "-m", "regserve", "serve"]
        if config_file:
            args.append(str(config_file))
        args += ["--workers", str(workers)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=str(data.parent))
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Ready when /v2/ answers at all (401 included: auth is configured)."""
        import ssl
        url, ctx = self.url + "/v2/", None
        if self.tls_ca:
            url = url.replace("http://", "https://")
            ctx = ssl.create_default_context(cafile=str(self.tls_ca))
            if self.tls_client:
                ctx.load_cert_chain(*map(str, self.tls_client))
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=ctx) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    servers: list[ServerProcess] = []

    def factory(data: Path | None = None, **kwargs: Any) -> ServerProcess:
        d = data or tmp_path / "data"
        d.mkdir(exist_ok=True)
        s = ServerProcess(d, **kwargs)
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop()


def http(method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A blocking request for tests against real processes."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def image_manifest(config_digest: str, config_size: int, layers: list[tuple[str, int]],
                   **extra: Any) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": config_digest, "size": config_size},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                       "size": s} for d, s in layers]}
    doc.update(extra)
    return json.dumps(doc).encode()


def require_tool(name: str, why: str) -> str:
    """The path of an external tool; skip when it is absent, except in CI where it must be there."""
    import shutil
    path = shutil.which(name)
    if path is None:
        if os.environ.get("REGSERVE_REQUIRE_E2E"):
            pytest.fail(f"{name} is required in CI ({why}) but is not installed")
        pytest.skip(f"{name} is not installed here ({why}); .ci/run installs it")
    return path


@pytest.fixture(scope="session")
def rgw(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A single-node Ceph RADOS Gateway (Debian's ceph packages) on free loopback ports, for the
    S3 tests: its S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY and S3_BUCKET. Stopped by its PIDs.
    REGSERVE_TEST_RGW=FILE (the exports start-ceph-rgw.sh printed) reuses a running one instead,
    to iterate on the S3 tests without a minute of bring-up each run."""
    from .s3 import rgw as engine
    if os.environ.get("REGSERVE_TEST_RGW"):
        yield engine.exports(Path(os.environ["REGSERVE_TEST_RGW"]).read_text())
        return
    for tool in ("radosgw", "ceph-mon", "ceph-osd"):
        require_tool(tool, "Ceph RGW, the S3 engine of the S3 tests")
    base = tmp_path_factory.mktemp("rgw")
    r = engine.start(base, "registry")
    try:
        if r.returncode != 0:
            pytest.fail(f"Ceph RGW did not start:\n{r.stderr[-4000:]}")
        yield engine.exports(r.stdout)
    finally:
        engine.stop(base)

