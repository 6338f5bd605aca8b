"""Notifications: distribution's `notifications` section and its event envelope.

Each endpoint (`url`, `headers`, `timeout`, `threshold`, `backoff`, `ignoredmediatypes`,
`ignore.mediatypes`, `ignore.actions`, `disabled`) gets the events of pushes, pulls, deletes and
mounts, POSTed as `{"events": [...]}` with Content-Type
application/vnd.docker.distribution.events.v1+json, in distribution's event shape (id,
timestamp, action, target, request, actor, source). Emitting never waits: each endpoint has a
bounded queue (QUEUE_SIZE events, the oldest dropped and counted when it is full) and a task of
its own that sends what is queued, up to BATCH events a request. A failed send is retried: at
once until `threshold` failures in a row, then after `backoff`, doubling up to MAX_BACKOFF,
until the endpoint answers 2xx again; events are not lost meanwhile unless the queue overflows.
So a slow or dead endpoint never slows a push. Each worker process sends its own events.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import metrics
from .config import ConfigError, parse_duration

log = logging.getLogger("regserve.notifications")
CONTENT_TYPE = "application/vnd.docker.distribution.events.v1+json"
QUEUE_SIZE = 10000
BATCH = 100
MAX_BACKOFF = 60.0
ACTIONS = ("push", "pull", "delete", "mount")


@dataclass
class Endpoint:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 1.0
    threshold: int = 10
    backoff: float = 1.0
    ignored_media_types: set[str] = field(default_factory=set)
    ignored_actions: set[str] = field(default_factory=set)

    def wants(self, event: dict[str, Any]) -> bool:
        return event["action"] not in self.ignored_actions and \
            event["target"].get("mediaType") not in self.ignored_media_types


def endpoints(section: Any) -> tuple[list[Endpoint], bool]:
    """The enabled endpoints of distribution's notifications section, and whether events name
    a manifest's references (events.includereferences)."""
    if not section:
        return [], False
    if not isinstance(section, dict):
        raise ConfigError("notifications: expected a mapping")
    include = bool((section.get("events") or {}).get("includereferences", False))
    out = []
    for i, item in enumerate(section.get("endpoints") or []):
        key = f"notifications.endpoints[{i}]"
        if not isinstance(item, dict) or not str(item.get("url") or "").startswith(("http://", "https://")):
            raise ConfigError(f"{key}: a mapping with an http(s) url")
        if item.get("disabled"):
            continue
        headers = {str(k): ",".join(map(str, v)) if isinstance(v, list) else str(v)
                   for k, v in (item.get("headers") or {}).items()}
        ignore = item.get("ignore") or {}
        out.append(Endpoint(
            name=str(item.get("name") or item["url"]), url=str(item["url"]), headers=headers,
            timeout=parse_duration(item.get("timeout", "1s"), f"{key}.timeout"),
            threshold=max(1, int(item.get("threshold", 10))),
            backoff=parse_duration(item.get("backoff", "1s"), f"{key}.backoff"),
            ignored_media_types=set(item.get("ignoredmediatypes") or []) | set(ignore.get("mediatypes") or []),
            ignored_actions=set(ignore.get("actions") or [])))
    return out, include


class Notifier:
    def __init__(self, targets: list[Endpoint], include_references: bool = False, source_addr: str = "") -> None:
        self.include_references = include_references
        host = socket.gethostname()
        self._source = {"addr": host + source_addr if source_addr.startswith(":") else source_addr or host,
                        "instanceID": str(uuid.uuid4())}
        self._queues: list[asyncio.Queue] = []
        self._targets = targets
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        for target in self._targets:
            queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
            self._queues.append(queue)
            self._tasks.append(asyncio.ensure_future(self._send_loop(target, queue)))

    async def stop(self, drain: float = 2.0) -> None:
        """Give what is queued `drain` seconds to go out, then stop."""
        joins = [asyncio.ensure_future(q.join()) for q in self._queues]
        if joins:
            await asyncio.wait(joins, timeout=drain)
        for task in self._tasks + joins:
            task.cancel()
        await asyncio.gather(*self._tasks, *joins, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def emit(self, action: str, target: dict[str, Any], request: dict[str, Any], actor: str | None) -> None:
        """Queue an event for every endpoint that wants it. Never waits."""
        event = {"id": str(uuid.uuid4()), "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
                 "action": action, "target": target, "request": request,
                 "actor": {"name": actor} if actor else {}, "source": self._source}
        for endpoint, queue in zip(self._targets, self._queues):
            if not endpoint.wants(event):
                continue
            if queue.full():  # the oldest goes: a dead endpoint must not hold a push
                queue.get_nowait()
                queue.task_done()
                metrics.event(endpoint.name, "dropped")
                metrics.events_pending(endpoint.name, -1)
            queue.put_nowait(event)
            metrics.events_pending(endpoint.name, 1)

    async def _send_loop(self, endpoint: Endpoint, queue: asyncio.Queue) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._deliver(endpoint, batch)
            finally:
                metrics.events_pending(endpoint.name, -len(batch))
                for _ in batch:
                    queue.task_done()

    async def _deliver(self, endpoint: Endpoint, events: list[dict[str, Any]]) -> None:
        """Until the endpoint takes them."""
        body = json.dumps({"events": events}).encode()
        headers = {**endpoint.headers, "Content-Type": CONTENT_TYPE}
        failures, pause = 0, endpoint.backoff
        while True:
            try:
                assert self._session is not None
                async with self._session.post(endpoint.url, data=body, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=endpoint.timeout)) as response:
                    if 200 <= response.status < 300:
                        if failures >= endpoint.threshold:
                            log.info("notification endpoint %s answers again", endpoint.name)
                        metrics.event(endpoint.name, "sent")
                        return
                    problem = f"answered {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                problem = str(e) or type(e).__name__
            failures += 1
            metrics.event(endpoint.name, "failed")
            if failures < endpoint.threshold:
                await asyncio.sleep(min(0.1, endpoint.backoff))
                continue
            if failures == endpoint.threshold:
                log.warning("notification endpoint %s failed %d times (%s); retrying every %ss and more",
                            endpoint.name, failures, problem, endpoint.backoff)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_BACKOFF)
