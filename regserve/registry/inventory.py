"""What a registry holds, summarised for people (the web UI): manifests with their platforms,
sizes and build times, repositories with their tags, last push and storage used.

Content is immutable, so what is read from it (a manifest's layers, its image config's
platform and created time) is cached by digest for the life of the process. What changes
(names, tags, revisions) is listed afresh on every request, except the list of every
repository name, which a registry of thousands takes a while to walk: it is kept for a few
seconds and refreshed behind the requests that use it. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, TypeVar

from ..errors import BlobUnknown, ManifestInvalid, RegistryError
from ..reference import Digest, parse_digest
from ..storage import PathNotFound
from . import paths
from .blobs import LRU
from .manifests import INDEX_TYPES, Descriptor, parse_manifest
from .registry import Registry, digests_under, walk_repositories

log = logging.getLogger("regserve.inventory")
T = TypeVar("T")
IMAGE_CONFIGS = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
MAX_CONFIG_BYTES = 4 << 20   # an image config is a few KiB; a larger one is not read for a summary
NAMES_TTL = 10.0             # seconds a walk of every repository name is served before another


@dataclass(frozen=True)
class Child:
    """An index's entry: one platform's manifest."""
    digest: Digest
    media_type: str
    size: int
    platform: str | None


@dataclass(frozen=True)
class Summary:
    """One manifest as a person wants to see it. `blobs` is everything the manifest keeps in
    its repository with the bytes each costs: itself, its config and layers (an index's
    children are manifests of their own, summarised apart)."""
    digest: Digest
    media_type: str
    manifest_size: int
    artifact_type: str | None = None
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Child, ...] = ()
    subject: Digest | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    platform: str | None = None
    created: str | None = None
    image: dict[str, Any] = field(default_factory=dict)  # the config's entrypoint, cmd, labels...
    blobs: dict[Digest, int] = field(default_factory=dict)
    damaged: bool = False
    config_read: bool = False  # platform, created and image are filled in

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def image_size(self) -> int:
        """Manifest, config and layers: what pulling this one image moves."""
        return sum(self.blobs.values())


@dataclass(frozen=True)
class TagInfo:
    name: str
    digest: Digest | None     # None: the tag's link is gone or damaged
    summary: Summary | None


@dataclass
class RepositoryOverview:
    name: str
    tags: list[str]
    revisions: list[Digest]
    last_push: float | None
    blobs: dict[Digest, int]  # every blob its manifests keep, each once

    @property
    def size(self) -> int:
        return sum(self.blobs.values())


@dataclass
class Usage:
    """Storage used per repository, with what other repositories share counted as shared."""
    taken_at: float
    repositories: dict[str, dict[Digest, int]]
    holders: Counter  # digest -> how many repositories keep it
    sizes: dict[str, int] = field(default_factory=dict)
    shares: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, blobs in self.repositories.items():
            self.sizes[name] = sum(blobs.values())
            self.shares[name] = sum(size for d, size in blobs.items() if self.holders[d] > 1)

    def shared(self, name: str) -> int:
        return self.shares.get(name, 0)

    def total(self, names: list[str]) -> int:
        """Bytes the given repositories take together, each blob counted once."""
        seen: dict[Digest, int] = {}
        for name in names:
            seen.update(self.repositories.get(name, {}))
        return sum(seen.values())


def platform_of(doc: Any) -> str | None:
    """"os/architecture[/variant]" of an image config or an index entry's platform."""
    if not isinstance(doc, dict) or not isinstance(doc.get("os"), str) or not isinstance(doc.get("architecture"), str):
        return None
    parts = [doc["os"], doc["architecture"]]
    if isinstance(doc.get("variant"), str) and doc["variant"]:
        parts.append(doc["variant"])
    return "/".join(parts)


class Inventory:
    def __init__(self, registry: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.driver = registry.driver
        self.clock = clock
        self._summaries: LRU = LRU(50_000)
        self._running: dict[Any, asyncio.Future] = {}  # reads and overviews in progress
        self._pushed_at: LRU = LRU(200_000)   # (name, digest) -> mtime of its revision link
        self._names: tuple[float, list[str]] | None = None
        self._usage: Usage | None = None

    # -- names ---------------------------------------------------------------------------------

    async def names(self) -> list[str]:
        """Every repository with manifests, in order. Served from the last walk while it is
        young; an older one is still served while a new walk runs behind it."""
        if self._names is None:
            await self._shared("names", self._refresh_names)
        elif self.clock() - self._names[0] > NAMES_TTL:
            self._behind("names", self._refresh_names)
        assert self._names is not None
        return self._names[1]

    async def first_names(self, count: int) -> tuple[list[str], bool]:
        """Every name (and True) when a walk of them is at hand; else, while the first walk of
        them runs behind, the first `count` names in order (and False), which a walk that stops
        there finds at once."""
        if self._names is not None:
            return await self.names(), True
        self._behind("names", self._refresh_names)
        return await walk_repositories(self.driver, ("_manifests",), None, count), False

    async def _refresh_names(self) -> None:
        started = self.clock()
        names = await walk_repositories(self.driver, ("_manifests",))
        self._names = (started, names)

    # -- manifests -----------------------------------------------------------------------------

    async def summary(self, d: Digest, with_config: bool = True) -> Summary:
        """A manifest's summary; BlobUnknown when its bytes are not in storage. Its image
        config (platform, created time) is a second read, which sizes do not need."""
        summary = self._summaries.get(d)
        if summary is None:
            summary = await self._read_once(d)
        if with_config and not summary.config_read:
            summary = replace(summary, config_read=True, **await self._read_config(summary.config))
            self._summaries.put(d, summary)
        return summary

    async def _read_once(self, d: Digest) -> Summary:
        """The manifest read by one request at a time: pages that want it at once share it."""
        summary = await self._shared(("manifest", d), lambda: self._read_manifest(d))
        if self._summaries.get(d) is None:
            self._summaries.put(d, summary)
        return summary

    async def _shared(self, key: Any, start: Callable[[], Awaitable[T]]) -> T:
        """`start()`'s result, started once for everyone who asks while it runs; one who gives
        up waiting (a page out of time) leaves it running for the others and the caches."""
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(start())
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(running)

    def _behind(self, key: Any, start: Callable[[], Awaitable[None]]) -> None:
        """Start `start()` behind the request, unless it runs already. A failure is logged, and
        what the last one found is served meanwhile."""
        if key not in self._running:
            asyncio.ensure_future(self._shared(key, start)).add_done_callback(log_failure)

    async def _read_manifest(self, d: Digest) -> Summary:
        payload = await self.registry.blob_store.read_small(d)
        try:
            m = parse_manifest(payload, None, d)
            doc = json.loads(payload)
        except (ManifestInvalid, ValueError):
            log.error("manifest %s is stored but cannot be read as one", d)
            return Summary(d, "unknown", len(payload), blobs={d: len(payload)}, damaged=True, config_read=True)
        config = m.blobs[0] if m.blobs and not m.manifests and "config" in doc else None
        children = tuple(Child(c.digest, c.media_type, c.size, platform_of(entry.get("platform")))
                         for c, entry in zip(m.manifests, doc.get("manifests") or []))
        blobs = {d: len(payload)}
        for desc in m.blobs:
            blobs[desc.digest] = desc.size
        return Summary(d, m.media_type, len(payload), m.artifact_type, config,
                       tuple(m.blobs[1:] if config is not None else m.blobs), children,
                       m.subject.digest if m.subject else None, dict(m.annotations or {}), blobs=blobs)

    async def _read_config(self, config: Descriptor | None) -> dict[str, Any]:
        """Platform, created time and run settings from an image config, where there is one."""
        if config is None or config.media_type not in IMAGE_CONFIGS or config.size > MAX_CONFIG_BYTES:
            return {}
        try:
            doc = json.loads(await self.registry.blob_store.read_small(config.digest))
        except (BlobUnknown, ValueError, RecursionError):
            return {}
        if not isinstance(doc, dict):
            return {}
        inner = doc.get("config") if isinstance(doc.get("config"), dict) else {}
        image = {k: inner[k] for k in ("Entrypoint", "Cmd", "WorkingDir", "User", "Labels", "ExposedPorts")
                 if inner.get(k)}
        created = doc.get("created") if isinstance(doc.get("created"), str) else None
        return {"platform": platform_of(doc), "created": created, "image": image}

    async def summaries(self, digests: list[Digest], with_config: bool = True) -> dict[Digest, Summary]:
        """Summaries of the manifests whose bytes are there (read concurrently, a few at a time)."""
        def done(s: Summary | None) -> bool:
            return s is not None and (s.config_read or not with_config)
        missing = [d for d in digests if not done(self._summaries.get(d))]
        await _bounded(missing, functools.partial(self._try_summary, with_config=with_config), 16)
        out: dict[Digest, Summary] = {}
        for d in digests:
            s = self._summaries.get(d)
            if s is not None:
                out[d] = s
        return out

    async def _try_summary(self, d: Digest, with_config: bool) -> None:
        try:
            await self.summary(d, with_config)
        except BlobUnknown:
            pass  # the revision's bytes were collected: it shows as missing

    def index_size(self, summary: Summary, children: dict[Digest, Summary]) -> int:
        """What an index and every platform it names take, each blob once."""
        seen = dict(summary.blobs)
        for child in summary.children:
            if child.digest in children:
                seen.update(children[child.digest].blobs)
        return sum(seen.values())

    # -- repositories --------------------------------------------------------------------------

    async def revisions(self, name: str) -> list[Digest]:
        return await digests_under(self.driver, paths.revisions(name))

    async def kept_blobs(self, revisions: list[Digest]) -> dict[Digest, int]:
        """Every blob these manifests keep (themselves, configs, layers), each once."""
        blobs: dict[Digest, int] = {}
        for s in (await self.summaries(revisions, with_config=False)).values():
            blobs.update(s.blobs)
        return blobs

    async def tags(self, name: str, tags: list[str]) -> list[TagInfo]:
        """What each of these tags points to, with its manifest's summary."""
        repo = self.registry.repository(name)
        digests: dict[str, Digest | None] = {}

        async def resolve(tag: str) -> None:
            try:
                digests[tag] = await repo.tags.resolve(tag)
            except RegistryError:
                digests[tag] = None  # untagged meanwhile, or a damaged link
        await _bounded(tags, resolve, 16)
        found = await self.summaries([d for d in digests.values() if d is not None])
        return [TagInfo(t, digests[t], found.get(digests[t]) if digests[t] else None) for t in tags]

    async def overview(self, name: str, tags: list[str] | None = None) -> RepositoryOverview:
        """Tags (unless given, as listed just now), revisions, last push and the bytes the
        repository's manifests keep; one in progress is shared."""
        return await self._shared(("overview", name), lambda: self._overview(name, tags))

    async def _overview(self, name: str, tags: list[str] | None) -> RepositoryOverview:
        if tags is None:
            tags = await self.registry.repository(name).tags.all()
        revisions = await self.revisions(name)
        blobs = await self.kept_blobs(revisions)
        return RepositoryOverview(name, tags, revisions, await self._last_push(name, revisions), blobs)

    async def _last_push(self, name: str, revisions: list[Digest]) -> float | None:
        """When the newest of its manifests was pushed (its revision link was written)."""
        async def stat(d: Digest) -> None:
            try:
                self._pushed_at.put((name, d), (await self.driver.stat(paths.revision_link(name, d))).mtime)
            except PathNotFound:
                pass
        await _bounded([d for d in revisions if self._pushed_at.get((name, d)) is None], stat, 16)
        times = [t for t in (self._pushed_at.get((name, d)) for d in revisions) if t is not None]
        return max(times) if times else None

    async def referrers(self, name: str, subject: Digest) -> dict[str, list[Summary]]:
        """The manifests that name `subject`, grouped by artifact type."""
        repo = self.registry.repository(name)
        descriptors = await repo.manifests.referrers(subject, None)
        found = await self.summaries([parse_digest(desc["digest"]) for desc in descriptors])
        groups: dict[str, list[Summary]] = {}
        for s in found.values():
            groups.setdefault(s.artifact_type or s.media_type, []).append(s)
        return dict(sorted(groups.items()))

    # -- storage used --------------------------------------------------------------------------

    @property
    def last_usage(self) -> Usage | None:
        """The latest count, whatever its age, starting none."""
        return self._usage

    def usage(self, max_age: float) -> Usage | None:
        """The latest count of storage used per repository (None before the first is done);
        one older than `max_age` starts a new count behind it."""
        if self._usage is None or self.clock() - self._usage.taken_at > max_age:
            self._behind("usage", self._count_usage)
        return self._usage

    async def wait_for_usage(self) -> Usage:
        """The count running now, or a new one."""
        await self._shared("usage", self._count_usage)
        assert self._usage is not None
        return self._usage

    async def _count_usage(self) -> None:
        started = self.clock()
        await self._refresh_names()
        assert self._names is not None
        per_repo: dict[str, dict[Digest, int]] = {}

        async def count(name: str) -> None:
            per_repo[name] = await self.kept_blobs(await self.revisions(name))
        await _bounded(self._names[1], count, 8)
        holders: Counter = Counter(d for blobs in per_repo.values() for d in blobs)
        self._usage = Usage(started, per_repo, holders)


def log_failure(task: asyncio.Future) -> None:
    """For work nobody awaits any more: its failure is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("reading what the registry holds failed", exc_info=task.exception())


async def _bounded(items: list, work: Callable[[Any], Awaitable[None]], limit: int) -> None:
    """`work` on every item, at most `limit` at once."""
    it = iter(items)

    async def worker() -> None:
        for item in it:
            await work(item)
    await asyncio.gather(*(worker() for _ in range(min(limit, len(items)))))
