"""Logs in distribution's shapes: `log.formatter` text (logrus's key=value lines) or json (one
object a line), `log.fields` on every line, and an access line a request ("response completed")
with distribution's field names, a request id included. Nothing that authenticates a request
(the Authorization header, a token) is ever logged: the access line takes the method, the path
and query, the host, the peer and the user agent, and no header besides."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import uuid
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import metrics

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
_NAMES = {logging.CRITICAL: "fatal", logging.ERROR: "error", logging.WARNING: "warning",
          logging.INFO: "info", logging.DEBUG: "debug"}
REQUEST_ID_KEY = web.RequestKey("request_id", str)
ACCESS_LOGGER = "regserve.access"


def _when(created: float) -> str:
    return dt.datetime.fromtimestamp(created, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Formatter(logging.Formatter):
    """`text`: time="..." level=info msg="..." key=value ...; `json`: the same as an object.
    A record's `fields` (logging's `extra={"fields": {...}}`) and the configured `log.fields`
    join the line; an exception's traceback is the `error` field (json) or follows (text)."""

    def __init__(self, kind: str, fields: dict[str, Any]) -> None:
        super().__init__()
        self.kind, self.fields = kind, {str(k): v for k, v in fields.items()}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": _when(record.created), "level": _NAMES.get(record.levelno, "info"),
                                 "msg": record.getMessage(), "logger": record.name, "pid": record.process}
        entry.update(getattr(record, "fields", None) or {})
        entry.update(self.fields)
        trace = self.formatException(record.exc_info) if record.exc_info else ""
        if self.kind == "json":
            if trace:
                entry["error"] = trace
            return json.dumps(entry, default=str)
        line = " ".join(f"{k}={_text_value(v)}" for k, v in entry.items())
        return f"{line}\n{trace}" if trace else line


def _text_value(value: Any) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-:/+@" for c in text):
        return text
    return json.dumps(text)  # quoted and escaped, as logrus does


def setup(level: str, kind: str, fields: dict[str, Any], access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(kind if kind in ("json", "logstash") else "text", fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # ours replaces it
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)


class AccessLogger(AbstractAccessLogger):
    """One line a request, with distribution's field names; and the request metrics."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        route = getattr(getattr(request, "match_info", None), "route", None)
        resource = getattr(route, "resource", None)
        canonical = resource.canonical if resource is not None else "-"
        metrics.request(canonical, request.method, response.status, time_taken)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        fields = {
            "http.request.id": request.get(REQUEST_ID_KEY, "-"),
            "http.request.method": request.method,
            "http.request.uri": request.path_qs,
            "http.request.host": request.host,
            "http.request.remoteaddr": request.remote or "-",
            "http.request.useragent": request.headers.get("User-Agent", ""),
            "http.route": canonical,
            "http.response.status": response.status,
            "http.response.written": response.body_length,
            "http.response.duration": f"{time_taken * 1000:.3f}ms",
        }
        self.logger.info("response completed", extra={"fields": fields})

    @property
    def enabled(self) -> bool:
        return metrics.ENABLED or self.logger.isEnabledFor(logging.INFO)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every request gets an id, for its log lines and (request_id_header) for its client."""
    request[REQUEST_ID_KEY] = str(uuid.uuid4())
    return await handler(request)


def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """On response prepare: `X-Request-Id`, so a client's report names the server's log line."""
    rid = request.get(REQUEST_ID_KEY)
    if rid is not None:
        response.headers["X-Request-Id"] = rid
