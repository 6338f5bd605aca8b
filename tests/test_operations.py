"""What an operator watches: logs (text and JSON, an access line a request, no credentials),
health at the debug address, and Prometheus metrics right across worker processes."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from regserve import config as config_mod
from regserve.api.debug import make_debug_app
from regserve.registry import Registry
from regserve.storage.filesystem import FilesystemDriver

from .authutil import basic, htpasswd_file
from .conftest import digest_of, free_port, http
from .faults import FaultyDriver

BLOB = os.urandom(3 << 20)


def test_json_logs_carry_request_ids_and_never_credentials(server_factory, tmp_path):
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "s3cret-Passw0rd"})
    srv = server_factory(env={"REGISTRY_LOG_FORMATTER": "json", "REGISTRY_LOG_ACCESSLOG_DISABLED": "false",
                              "REGISTRY_LOG_FIELDS_SERVICE": "registry", "REGISTRY_AUTH_HTPASSWD_REALM": "r",
                              "REGISTRY_AUTH_HTPASSWD_PATH": str(users)})
    auth = basic("alice", "s3cret-Passw0rd")
    status, headers, _ = http("POST", f"{srv.url}/v2/app/blobs/uploads/?digest={digest_of(BLOB)}", BLOB, auth)
    assert status == 201
    status, pulled, _ = http("GET", f"{srv.url}/v2/app/blobs/{digest_of(BLOB)}", headers=auth)
    assert status == 200 and pulled["X-Request-Id"]
    assert http("GET", f"{srv.url}/v2/", headers=basic("alice", "wrong"))[0] == 401
    srv.stop()
    lines = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "msg"} <= set(e) and e.get("service") == "registry" for e in lines)
    access = [e for e in lines if e["msg"] == "response completed"]
    pull = next(e for e in access if e["http.request.id"] == pulled["X-Request-Id"])
    assert pull["http.request.method"] == "GET" and pull["http.response.status"] == 200
    assert pull["http.route"] == "/v2/{name}/blobs/{digest}" and pull["http.response.duration"].endswith("ms")
    assert [e["http.response.status"] for e in access][-3:] == [201, 200, 401]  # after the readiness probe
    text = srv.log_path.read_text()
    secret = base64.b64encode(b"alice:s3cret-Passw0rd").decode()
    assert "s3cret" not in text and secret not in text and "Authorization" not in text
    assert lines[0]["msg"].startswith("regserve listening on") and lines[-1]["msg"] == "regserve stopped"


def test_text_logs_are_logrus_lines(server_factory):
    srv = server_factory(env={"REGISTRY_LOG_ACCESSLOG_DISABLED": "false"})
    assert http("GET", f"{srv.url}/v2/")[0] == 200
    srv.stop()
    lines = srv.log_path.read_text().splitlines()
    assert all(re.match(r'time="?[0-9T:.-]+Z"? level=\w+ msg=', line) for line in lines if line), lines
    assert any('msg="response completed"' in line and "http.response.status=200" in line for line in lines)


def _config_file(tmp_path: Path, debug_port: int, health: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(f"version: 0.1\nhttp:\n  addr: 127.0.0.1:0\n  debug:\n    addr: 127.0.0.1:{debug_port}\n"
                    f"    prometheus:\n      enabled: true\nstorage:\n  filesystem:\n    rootdirectory: x\n"
                    f"  delete:\n    enabled: true\n{health}")
    return path


def test_health_at_the_debug_address(server_factory, tmp_path):
    """distribution's /debug/health with its checks, /healthz and /readyz; a failing check
    turns them 503 and back."""
    debug = free_port()
    flag = tmp_path / "maintenance"
    cfg = _config_file(tmp_path, debug, "health:\n  storagedriver:\n    enabled: true\n    interval: 1s\n"
                                        f"    threshold: 1\n  file:\n    - file: {flag}\n      interval: 1s\n")
    server_factory(config_file=cfg)
    base = f"http://127.0.0.1:{debug}"
    assert http("GET", f"{base}/debug/health") == (200, http("GET", f"{base}/debug/health")[1], b"{}")
    assert http("GET", f"{base}/healthz")[0] == 200 and http("GET", f"{base}/readyz")[0] == 200
    assert healthcheck(cfg).returncode == 0
    flag.write_text("down for maintenance")
    deadline = time.time() + 5
    while http("GET", f"{base}/debug/health")[0] != 503 and time.time() < deadline:
        time.sleep(0.2)
    status, _, body = http("GET", f"{base}/debug/health")
    assert status == 503 and json.loads(body) == {str(flag): "file exists"}
    assert http("GET", f"{base}/readyz")[0] == 503 and http("GET", f"{base}/healthz")[0] == 200
    unhealthy = healthcheck(cfg)
    assert unhealthy.returncode == 1 and "/readyz answered 503" in unhealthy.stderr
    flag.unlink()
    deadline = time.time() + 5
    while http("GET", f"{base}/debug/health")[0] != 200 and time.time() < deadline:
        time.sleep(0.2)
    assert http("GET", f"{base}/debug/health")[0] == 200


def healthcheck(config: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regserve", "healthcheck", *([str(config)] if config else [])],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30)


def test_healthcheck_without_a_debug_address_asks_the_api(server_factory, tmp_path):
    """An htpasswd registry answers /v2/ with 401: alive. Nothing listening: unhealthy."""
    users = htpasswd_file(tmp_path / "htpasswd", {"alice": "pw"})
    srv = server_factory(env={"REGISTRY_AUTH_HTPASSWD_REALM": "r", "REGISTRY_AUTH_HTPASSWD_PATH": str(users)})
    env = {"REGISTRY_HTTP_ADDR": f":{srv.port}", "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(srv.data)}
    assert healthcheck(env=env).returncode == 0
    srv.stop()
    down = healthcheck(env=env)
    assert down.returncode == 1 and down.stderr.startswith(f"unhealthy: http://127.0.0.1:{srv.port}/v2/")


async def test_the_storage_check_reports_a_failing_driver(aiohttp_client, data_dir):
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    config = config_mod.load(None, {"REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(data_dir),
                                    "REGISTRY_HEALTH_STORAGEDRIVER_ENABLED": "true",
                                    "REGISTRY_HEALTH_STORAGEDRIVER_INTERVAL": "1s",
                                    "REGISTRY_HEALTH_STORAGEDRIVER_THRESHOLD": "2"})
    client = await aiohttp_client(make_debug_app(config, Registry(driver)))
    assert (await client.get("/debug/health")).status == 200
    driver.inject("stat", errno.EIO, times=-1)
    for _ in range(50):
        r = await client.get("/debug/health")
        if r.status == 503:
            break
        await __import__("asyncio").sleep(0.1)
    assert r.status == 503 and "Input/output error" in (await r.json())["storagedriver_filesystem"]
    assert (await client.get("/readyz")).status == 503


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_add_up_across_workers(server_factory, tmp_path):
    debug = free_port()
    srv = server_factory(config_file=_config_file(tmp_path, debug, ""), workers=2)
    url = srv.url
    d = digest_of(BLOB)
    assert http("POST", f"{url}/v2/app/blobs/uploads/?digest={d}", BLOB)[0] == 201
    pulls = 12
    for _ in range(pulls):  # new connections: the kernel spreads them over both workers
        assert http("GET", f"{url}/v2/app/blobs/{d}")[0] == 200
    assert http("GET", f"{url}/v2/nothing/blobs/{d}")[0] == 404
    for _ in range(4):  # each scrape may be answered by either worker: each tells the sum
        status, headers, body = http("GET", f"http://127.0.0.1:{debug}/metrics")
        text = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        requests = _samples(text, "regserve_http_requests_total")
        route = 'route="/v2/{name}/blobs/{digest}"'
        assert requests[f'regserve_http_requests_total{{method="GET",{route},status="200"}}'] == pulls
        assert requests[f'regserve_http_requests_total{{method="GET",{route},status="404"}}'] == 1
        assert _samples(text, "regserve_blob_bytes_pulled_total")["regserve_blob_bytes_pulled_total"] == \
            pulls * len(BLOB)
        assert _samples(text, "regserve_blob_bytes_pushed_total")["regserve_blob_bytes_pushed_total"] == len(BLOB)
        assert _samples(text, "regserve_uploads_in_progress")["regserve_uploads_in_progress"] == 0
        commits = _samples(text, "regserve_storage_operation_duration_seconds_count")
        assert commits['regserve_storage_operation_duration_seconds_count{driver="filesystem",operation="commit"}'] \
            >= 1
    srv.stop(signal.SIGTERM)
