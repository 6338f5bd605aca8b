"""The debug address (`http.debug.addr`): health and metrics for the operator, apart from the API
and its authentication.

- `/debug/health`: distribution's health checks, as it reports them: `{}` and 200 while they
  pass, 503 and `{"<check>": "<error>"}` once one failed `threshold` times in a row. The checks
  are distribution's `health` section: `storagedriver` (a stat of the storage's root), `file`
  (unhealthy while the file exists), `http` (a URI that must answer `statuscode`) and `tcp` (an
  address that must accept connections), each with its `interval` and `threshold`.
- `/healthz`: liveness, 200 while the process answers at all.
- `/readyz`: readiness, 200 when the storage answers now (within 2 s) and the checks pass.
- `/metrics` (`http.debug.prometheus.path`): Prometheus text, when
  `http.debug.prometheus.enabled`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from .. import metrics
from ..config import Config, ConfigError, parse_duration
from ..registry import Registry
from ..storage import PathNotFound

log = logging.getLogger("regserve.health")
READY_TIMEOUT = 2.0


@dataclass
class Check:
    name: str
    probe: Callable[[], Awaitable[None]]  # raises when unhealthy
    interval: float
    threshold: int
    failures: int = 0
    error: str | None = None

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.probe(), max(self.interval, 1.0))
                if self.error is not None:
                    log.info("health check %s passes again", self.name)
                self.failures, self.error = 0, None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure is the check's answer
                self.failures += 1
                if self.failures >= self.threshold:
                    if self.error is None:
                        log.warning("health check %s failed: %s", self.name, e)
                    self.error = str(e) or type(e).__name__
            await asyncio.sleep(self.interval)


def _section(health: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = health.get(key) or []
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"health.{key}: expected a list of mappings")
    return items


def checks(config: Config, registry: Registry) -> list[Check]:
    """distribution's health section, as checks."""
    health = config.raw.get("health") or {}
    if not isinstance(health, dict):
        raise ConfigError("health: expected a mapping")
    out: list[Check] = []

    def every(item: dict[str, Any], key: str, default: str = "10s") -> float:
        return parse_duration(item.get("interval", default), f"health.{key}.interval")

    storage = health.get("storagedriver") or {}
    if isinstance(storage, dict) and storage.get("enabled"):
        async def stat_root() -> None:
            try:
                await registry.driver.stat("/")
            except PathNotFound:
                pass  # the storage answers; its root just has nothing yet
        out.append(Check(f"storagedriver_{registry.driver.name}", stat_root, every(storage, "storagedriver"),
                         int(storage.get("threshold", 1) or 1)))
    for item in _section(health, "file"):
        path = str(item.get("file", ""))

        async def file_absent(path: str = path) -> None:
            if os.path.exists(path):
                raise RuntimeError("file exists")
        out.append(Check(path, file_absent, every(item, "file"), 1))
    for item in _section(health, "http"):
        uri, expected = str(item.get("uri", "")), int(item.get("statuscode", 200))
        timeout = parse_duration(item.get("timeout", "1s"), "health.http.timeout")
        headers = {k: ",".join(map(str, v)) if isinstance(v, list) else str(v)
                   for k, v in (item.get("headers") or {}).items()}

        async def http_ok(uri: str = uri, expected: int = expected, timeout: float = timeout,
                          headers: dict[str, str] = headers) -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.head(uri, headers=headers) as response:
                    if response.status != expected:
                        raise RuntimeError(f"downstream service returned unexpected status: {response.status}")
        out.append(Check(uri, http_ok, every(item, "http"), int(item.get("threshold", 1) or 1)))
    for item in _section(health, "tcp"):
        addr = str(item.get("addr", ""))
        timeout = parse_duration(item.get("timeout", "1s"), "health.tcp.timeout")

        async def tcp_open(addr: str = addr, timeout: float = timeout) -> None:
            host, _, port = addr.rpartition(":")
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
            writer.close()
        out.append(Check(addr, tcp_open, every(item, "tcp"), int(item.get("threshold", 1) or 1)))
    return out


CHECKS_KEY = web.AppKey("checks", list)
REGISTRY_KEY = web.AppKey("debug_registry", Registry)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def _failing(app: web.Application) -> dict[str, str]:
    return {c.name: c.error for c in app[CHECKS_KEY] if c.error is not None}


async def debug_health(request: web.Request) -> web.Response:
    failing = _failing(request.app)
    return _json(failing, 503 if failing else 200)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    failing = _failing(request.app)
    try:
        await asyncio.wait_for(request.app[REGISTRY_KEY].driver.stat("/"), READY_TIMEOUT)
    except PathNotFound:
        pass
    except Exception as e:  # noqa: BLE001 - any failure means: not ready
        failing["storage"] = str(e) or type(e).__name__
    if failing:
        return _json({"status": "unready", "errors": failing}, 503)
    return _json({"status": "ready"})


async def prometheus(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


def make_debug_app(config: Config, registry: Registry) -> web.Application:
    app = web.Application()
    app[CHECKS_KEY] = checks(config, registry)
    app[REGISTRY_KEY] = registry
    app.router.add_get("/debug/health", debug_health)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.prometheus:
        app.router.add_get(config.prometheus_path, prometheus)

    async def run_checks(app: web.Application) -> Any:
        tasks = [asyncio.ensure_future(c.run()) for c in app[CHECKS_KEY]]
        yield
        for task in tasks:
            task.cancel()
    app.cleanup_ctx.append(run_checks)
    return app
