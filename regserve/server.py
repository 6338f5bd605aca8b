"""Running the server: sockets, uvloop, worker processes, graceful stop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time

from aiohttp import web

from . import logs, metrics
from .api.app import make_app, make_registry, runner_options
from .api.debug import make_debug_app
from .config import TLS_CLIENT_AUTH, TLS_VERSIONS, Config
from .connections import Limits, RegistryRunner

log = logging.getLogger("regserve")


def parse_addr(addr: str) -> tuple[str, int]:
    """distribution's http.addr: "host:port", ":port" (every address: host "") or "[v6]:port"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"http.addr: expected host:port, got {addr!r}")
    return host.strip("[]"), int(port)


def listen_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A socket bound to `host` ("": every address, IPv6 and IPv4 as Go's ":5000" is, or IPv4's
    alone where the host has no IPv6), SO_REUSEPORT so that every worker binds its own."""
    if host == "":
        try:
            return _bind(socket.AF_INET6, "::", port, listen, dual=True)
        except OSError:  # no IPv6 here (disabled in the kernel or the container)
            host = "0.0.0.0"
    return _bind(socket.AF_INET6 if ":" in host else socket.AF_INET, host, port, listen)


def _bind(family: int, host: str, port: int, listen: bool, dual: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        raise


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within its cgroup's CPU quota (a
    container limited to 1.5 CPUs gets 2 workers, one pinned to 3 cores gets 3)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),  # cgroup v2: "max 100000"
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):   # cgroup v1
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if parse is not None:
            quota, period = parse(text)
            return None if quota == "max" else int(quota) / int(period)
        quota = int(text)
        if quota <= 0:
            return None
        return quota / int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
    return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt(3) parameters


def tune_malloc() -> None:
    """Keep request-body buffers (up to 1 MiB each, thousands per GiB) in the heap. glibc's
    defaults hand them back to the kernel as they are freed, by munmap or by trimming the heap,
    and every new one then costs page faults: an aiohttp handler draining a streamed 1 GiB body
    spent 0.50 CPU-s in it with the defaults, 0.17 with these settings. Freed memory stays
    reusable, bounded by what is in flight."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: every connection and every blob being
    sent or received holds a descriptor, and the usual soft default (1024) is far below what
    the connection limit allows. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft


def setup_logging(config: Config) -> None:
    logs.setup(config.log_level, config.log_formatter,
               config.raw.get("log", {}).get("fields") or {}, config.access_log)


async def _purge_loop(app: web.Application, config: Config) -> None:
    """storage.maintenance.uploadpurging: abandoned upload sessions, and with them the storage
    driver's own debris (temporaries a crash or a full disk left behind)."""
    from .api.common import REGISTRY_KEY
    from .registry.gc import TEMPORARY_AGE
    await asyncio.sleep(random.uniform(60, 300))  # spread the work of several replicas
    while True:
        registry = app[REGISTRY_KEY]
        try:
            purged = await registry.purge_uploads(config.upload_purge_age, config.upload_purge_dryrun)
            if purged:
                log.info("purged %d stale uploads%s", len(purged),
                         " (dry run)" if config.upload_purge_dryrun else "")
            if not config.upload_purge_dryrun and not registry.readonly:
                removed = await registry.driver.purge_temporaries(TEMPORARY_AGE)
                if removed:
                    log.info("removed %d temporaries left behind by a crash or a full disk", removed)
        except Exception:
            log.exception("upload purge failed")  # it only deletes what is stale: next time
        await asyncio.sleep(max(config.upload_purge_interval, 60))


async def _gc_loop(app: web.Application, config: Config) -> None:
    """storage.maintenance.gc: garbage collection inside the server, online, every `interval`
    (the first a random part of it after the start: replicas spread out; one collection at a
    time runs on a storage in any case)."""
    from .api.common import REGISTRY_KEY
    from .registry.gc import GarbageCollectionAborted, collect
    from .registry.registry import RegistryBusy
    await asyncio.sleep(random.uniform(0.1, 1.0) * config.gc_interval)
    while True:
        try:
            report = await collect(app[REGISTRY_KEY], dry_run=config.gc_dryrun, delete_untagged=config.gc_untagged,
                                   grace=config.gc_grace, log=lambda s: None)
            log.info("garbage collection: %s", report.summary(config.gc_dryrun))
        except RegistryBusy:
            log.info("garbage collection skipped: another one is running on this storage")
        except GarbageCollectionAborted as e:
            log.error("garbage collection aborted: %s", e)
        except Exception:
            log.exception("garbage collection stopped")  # what it deleted was garbage: next time
        await asyncio.sleep(config.gc_interval)


async def _expiry_loop(app: web.Application, config: Config) -> None:
    """proxy.ttl: a pull-through cache's links to what it fetched more than `ttl` ago are
    removed (the next pull fetches again). It deletes: an error stops the pass, loudly."""
    from .api.common import REGISTRY_KEY
    from .proxy.expiry import expire, interval
    while True:
        await asyncio.sleep(interval(config.proxy_ttl))
        try:
            expired = await expire(app[REGISTRY_KEY], config.proxy_ttl)
            if expired.manifests or expired.layers:
                log.info("pull-through cache: %d manifests and %d layers expired (proxy.ttl)",
                         expired.manifests, expired.layers)
        except Exception:
            log.exception("pull-through cache expiry stopped; it runs again in %.0f s",
                          interval(config.proxy_ttl))


def tls_context(config: Config) -> ssl.SSLContext | None:
    """http.tls: certificate and key, minimum version, and client certificates (mutual TLS)."""
    if not config.tls_certificate:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[config.tls_minimum]
    ctx.load_cert_chain(config.tls_certificate, config.tls_key)
    if config.tls_clientcas:
        for ca in config.tls_clientcas:
            ctx.load_verify_locations(cafile=ca)
        ctx.verify_mode = TLS_CLIENT_AUTH[config.tls_clientauth]
    return ctx


async def serve(config: Config, sock: socket.socket, purge: bool = True,
                debug_sock: socket.socket | None = None) -> None:
    if config.prometheus:
        metrics.enable()
    registry = make_registry(config)
    app = make_app(config, registry)
    runner = RegistryRunner(app, Limits.of(config), access_log=logging.getLogger(logs.ACCESS_LOGGER),
                            access_log_class=logs.AccessLogger, **runner_options(config))
    await runner.setup()
    site = web.SockSite(runner, sock, shutdown_timeout=config.drain_timeout or 5.0,
                        ssl_context=tls_context(config))
    await site.start()
    debug_runner = None
    if debug_sock is not None:  # health and metrics, apart from the API and its auth
        debug_runner = web.AppRunner(make_debug_app(config, registry), access_log=None)
        await debug_runner.setup()
        await web.SockSite(debug_runner, debug_sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    background = []
    if purge and config.upload_purging:
        background.append(asyncio.ensure_future(_purge_loop(app, config)))
    if purge and config.gc_enabled and not config.readonly:
        background.append(asyncio.ensure_future(_gc_loop(app, config)))
    if purge and config.proxy_url and config.proxy_ttl > 0 and not config.readonly:
        background.append(asyncio.ensure_future(_expiry_loop(app, config)))
    await stop.wait()
    log.info("stopping: in-flight requests get up to %ss", config.drain_timeout or 5.0)
    for task in background:
        task.cancel()
    await runner.cleanup()
    if debug_runner is not None:
        await debug_runner.cleanup()


def _run_loop(config: Config, sock: socket.socket, purge: bool, debug_sock: socket.socket | None) -> None:
    try:
        import uvloop
        uvloop.run(serve(config, sock, purge, debug_sock))
    except ImportError:
        asyncio.run(serve(config, sock, purge, debug_sock))


def _worker(config: Config, index: int, inherited: list[socket.socket]) -> None:
    for reserved in inherited:  # the parent's: they must not linger in the SO_REUSEPORT group
        reserved.close()
    setup_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sock = listen_socket(*parse_addr(config.addr))
    debug = listen_socket(*parse_addr(config.debug_addr)) if config.debug_addr else None
    _run_loop(config, sock, index == 0, debug)


def check(config: Config) -> None:
    """Load everything a worker will need, so a bad htpasswd file, policy, key or certificate
    stops the start with its own message (and a token signing key is created once, here)."""
    from .api.auth import build
    build(config)
    tls_context(config)


def run(config: Config, workers: int | None = None) -> None:
    setup_logging(config)
    tune_malloc()
    workers = workers or usable_cores()
    files = raise_open_files_limit()
    if files < 2 * config.max_connections:
        log.warning("open files limit %d is low for http.maxconnections %d", files, config.max_connections)
    check(config)
    host, port = parse_addr(config.addr)
    # Bound, not yet listening: they reserve the ports (and resolve port 0). Only listening
    # sockets receive connections, so with workers they never take any.
    sock = listen_socket(host, port, listen=False)
    config.addr = f"[{host}]:{sock.getsockname()[1]}" if ":" in host else f"{host}:{sock.getsockname()[1]}"
    debug = listen_socket(*parse_addr(config.debug_addr), listen=False) if config.debug_addr else None
    metrics_dir = tempfile.mkdtemp(prefix="regserve-metrics-") if config.prometheus and workers > 1 else None
    if config.prometheus:
        metrics.prepare(metrics_dir)
    root = config.rootdirectory
    where = f" {os.path.abspath(root)}" if root else ""
    if config.storage_driver == "s3":
        params = config.storage_params
        where = f" s3://{params['bucket']}/{str(params.get('rootdirectory', '')).strip('/')}"
    log.info("regserve listening on %s://%s (storage: %s%s, auth: %s, workers: %d%s)",
             "https" if config.tls_certificate else "http", config.addr if host else "*" + config.addr,
             config.storage_driver, where, config.auth_mode, workers,
             f", health and metrics on {config.debug_addr}" if debug else "")
    for key in config.ignored:
        log.warning("configuration key %s is accepted but not used by regserve", key)
    sys.stderr.flush()
    try:
        if workers <= 1:
            sock.listen(1024)
            if debug is not None:
                debug.listen(128)
            _run_loop(config, sock, True, debug)
        else:
            _supervise(config, workers, [s for s in (sock, debug) if s is not None])
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("regserve stopped")


def _supervise(config: Config, workers: int, reserved: list[socket.socket]) -> None:
    """Each worker binds its own SO_REUSEPORT sockets; the kernel spreads connections. The
    parent's sockets hold the ports until every worker listens, then are closed."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(config, i, reserved), daemon=False) for i in range(workers)]
    for p in procs:
        p.start()
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    time.sleep(0.5)
    for s in reserved:
        s.close()
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(timeout=0.5)
            if p.exitcode is not None and p.pid and config.prometheus:
                metrics.process_exited(p.pid)
            if not stopping and p.exitcode not in (None, 0):
                log.error("worker %d exited with %s; stopping", p.pid, p.exitcode)
                stop(signal.SIGTERM, None)
