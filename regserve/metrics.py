"""Prometheus metrics (`http.debug.prometheus.enabled`), right across `--workers` processes.

Off unless enabled: every hook below is then one test of a global, and prometheus_client is not
even imported. Enabled, `enable()` runs in each worker before anything is counted; with several
workers every process writes its values to files in one directory (prometheus_client's
multiprocess mode, set up by the parent before it forks), and whichever worker answers a scrape
adds them all up.
"""

from __future__ import annotations

import os
from typing import Any

ENABLED = False
_m: Any = None  # the metric objects, once enabled
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STORAGE_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self.requests = Counter("regserve_http_requests", "HTTP requests answered",
                                ["route", "method", "status"])
        self.latency = Histogram("regserve_http_request_duration_seconds", "Time to answer a request",
                                 ["route", "method"], buckets=LATENCY_BUCKETS)
        self.pushed = Counter("regserve_blob_bytes_pushed", "Blob bytes received in uploads")
        self.pulled = Counter("regserve_blob_bytes_pulled", "Blob bytes sent in downloads")
        self.uploads = Gauge("regserve_uploads_in_progress", "Upload requests being received",
                             multiprocess_mode="livesum")
        self.storage = Histogram("regserve_storage_operation_duration_seconds",
                                 "Time a storage driver operation took", ["driver", "operation"],
                                 buckets=STORAGE_BUCKETS)
        self.storage_errors = Counter("regserve_storage_errors", "Storage driver operations that failed "
                                      "(not counting 'not found')", ["driver", "operation"])
        self.gc_runs = Counter("regserve_gc_runs", "Garbage collections", ["result"])
        self.gc_blobs = Counter("regserve_gc_blobs_deleted", "Blobs garbage collection deleted")
        self.gc_manifests = Counter("regserve_gc_manifests_deleted", "Manifests garbage collection deleted")
        self.gc_bytes = Counter("regserve_gc_bytes_freed", "Bytes of blobs garbage collection deleted")
        self.proxy = Counter("regserve_proxy_requests", "Pull-through cache lookups, by what was "
                             "looked up and whether it was here (hit), fetched for it (miss) or "
                             "being fetched (joined)", ["kind", "result"])
        self.upstream = Counter("regserve_proxy_upstream_bytes", "Bytes a pull-through cache fetched from its upstream")
        self.events = Counter("regserve_notifications", "Notification events", ["endpoint", "result"])
        self.events_pending = Gauge("regserve_notifications_pending", "Events waiting to be sent",
                                    ["endpoint"], multiprocess_mode="livesum")


def prepare(directory: str | None) -> None:
    """In the parent, before any worker forks: where the workers' values go (None: one
    process, values in memory). The directory is emptied: values of processes gone are stale."""
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


def enable() -> None:
    global ENABLED, _m
    if _m is None:
        _m = _Metrics()
    ENABLED = True


def disable() -> None:
    global ENABLED
    ENABLED = False


def process_exited(pid: int) -> None:
    """The parent's word that a worker is gone: its live gauges stop counting."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def exposition() -> tuple[bytes, str]:
    """The metrics text of every process, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# -- hooks: each a no-op when disabled ---------------------------------------------------------

def request(route: str, method: str, status: int, seconds: float) -> None:
    if ENABLED:
        _m.requests.labels(route, method, str(status)).inc()
        _m.latency.labels(route, method).observe(seconds)


def pushed(nbytes: int) -> None:
    if ENABLED and nbytes:
        _m.pushed.inc(nbytes)


def pulled(nbytes: int) -> None:
    if ENABLED and nbytes:
        _m.pulled.inc(nbytes)


def upload_started() -> None:
    if ENABLED:
        _m.uploads.inc()


def upload_ended() -> None:
    if ENABLED:
        _m.uploads.dec()


def storage(driver: str, operation: str, seconds: float, failed: bool) -> None:
    if ENABLED:
        _m.storage.labels(driver, operation).observe(seconds)
        if failed:
            _m.storage_errors.labels(driver, operation).inc()


def gc(result: str, blobs: int = 0, manifests: int = 0, nbytes: int = 0) -> None:
    if ENABLED:
        _m.gc_runs.labels(result).inc()
        _m.gc_blobs.inc(blobs)
        _m.gc_manifests.inc(manifests)
        _m.gc_bytes.inc(nbytes)


def event(endpoint: str, result: str) -> None:
    if ENABLED:
        _m.events.labels(endpoint, result).inc()


def events_pending(endpoint: str, delta: int) -> None:
    if ENABLED:
        _m.events_pending.labels(endpoint).inc(delta)


def proxied(kind: str, result: str) -> None:
    if ENABLED:
        _m.proxy.labels(kind, result).inc()


def upstream_bytes(nbytes: int) -> None:
    if ENABLED and nbytes:
        _m.upstream.inc(nbytes)
