"""Running the server: sockets, uvloop, worker processes, graceful stop."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import random
import resource
import signal
import socket
import ssl
import sys
import time

from aiohttp import web

from .api.app import RUNNER_OPTIONS, make_app, make_registry
from .config import TLS_CLIENT_AUTH, TLS_VERSIONS, Config
from .connections import Limits, RegistryRunner

log = logging.getLogger("regserve")


def parse_addr(addr: str) -> tuple[str, int]:
    """distribution's http.addr: "host:port", ":port" (every interface) or "[v6]:port"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"http.addr: expected host:port, got {addr!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def listen_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


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
    level = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
             "debug": logging.DEBUG}[config.log_level]
    fields = " ".join(f"{k}={v}" for k, v in (config.raw.get("log", {}).get("fields") or {}).items())
    fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s" + (f" {fields}" if fields else "")
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    if not config.access_log:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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


async def serve(config: Config, sock: socket.socket, purge: bool = True) -> None:
    app = make_app(config, make_registry(config))
    runner = RegistryRunner(app, Limits.of(config),
                            access_log=logging.getLogger("aiohttp.access") if config.access_log else None,
                            **RUNNER_OPTIONS)
    await runner.setup()
    site = web.SockSite(runner, sock, shutdown_timeout=config.drain_timeout or 5.0,
                        ssl_context=tls_context(config))
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    purger = asyncio.ensure_future(_purge_loop(app, config)) if purge and config.upload_purging else None
    await stop.wait()
    if purger:
        purger.cancel()
    await runner.cleanup()


def _run_loop(config: Config, sock: socket.socket, purge: bool) -> None:
    try:
        import uvloop
        uvloop.run(serve(config, sock, purge))
    except ImportError:
        asyncio.run(serve(config, sock, purge))


def _worker(config: Config, host: str, port: int, index: int, reserved: socket.socket) -> None:
    reserved.close()  # inherited from the parent; it must not linger in the SO_REUSEPORT group
    setup_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sock = listen_socket(host, port)
    _run_loop(config, sock, purge=index == 0)


def check(config: Config) -> None:
    """Load everything a worker will need, so a bad htpasswd file, policy, key or certificate
    stops the start with its own message (and a token signing key is created once, here)."""
    from .api.auth import build
    build(config)
    tls_context(config)


def run(config: Config, workers: int = 1) -> None:
    setup_logging(config)
    tune_malloc()
    files = raise_open_files_limit()
    if files < 2 * config.max_connections:
        log.warning("open files limit %d is low for http.maxconnections %d", files, config.max_connections)
    check(config)
    host, port = parse_addr(config.addr)
    # Bound, not yet listening: it reserves the port (and resolves port 0). Only listening
    # sockets receive connections, so with workers it never takes any.
    sock = listen_socket(host, port, listen=False)
    port = sock.getsockname()[1]
    root = config.rootdirectory
    log.info("regserve listening on %s://%s:%d (storage: %s%s, auth: %s, workers: %d)",
             "https" if config.tls_certificate else "http", host, port, config.storage_driver,
             f" {os.path.abspath(root)}" if root else "", config.auth_mode, workers)
    for key in config.ignored:
        log.warning("configuration key %s is accepted but not used by regserve", key)
    sys.stderr.flush()
    if workers <= 1:
        sock.listen(1024)
        _run_loop(config, sock, purge=True)
        return
    # Each worker binds its own SO_REUSEPORT socket; the kernel spreads connections. The parent's
    # socket holds the port until every worker listens, then is closed.
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(config, host, port, i, sock), daemon=False)
             for i in range(workers)]
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
    sock.close()
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(timeout=0.5)
            if not stopping and p.exitcode not in (None, 0):
                log.error("worker %d exited with %s; stopping", p.pid, p.exitcode)
                stop(signal.SIGTERM, None)
