"""Garbage collection, distribution's mark and sweep over the same layout, safe while the registry
serves pushes and pulls.

Mark (no lock): every manifest revision of every repository (with `delete_untagged`, only
manifests reachable from a tag, from an index that is kept, or whose subject is kept) and
everything it references: config, layers, child manifests. Sweep: delete the manifests not
kept, the blobs nobody marked, and the repository links to those blobs.

Online, it never deletes what a push is using. Every write that references content (a commit, a
link, a mount, a manifest put) holds BlobStore.referencing shared and touches what it references
(its mtime becomes now). The sweep deletes in batches of SWEEP_BATCH, each holding that lock
exclusively, and re-checks each candidate under it: a blob or manifest written or touched since
`grace` before the collection began is kept (the grace also keeps the layers of a push whose
manifest has not come yet). So a push that references a blob either finds it present and keeps
it, or finds it gone and answers MANIFEST_BLOB_UNKNOWN (the client pushes the layer again); a
manifest never points at a blob the collection deleted. A manifest spared by the re-check spares
what it references. One collection at a time runs on a storage (Registry.collecting).

It fails closed. Marking only reads, and any error in it (a read error, a link that names no
digest, a stored manifest that does not parse or is missing) aborts the run before anything is
deleted: what cannot be read must never count as unreferenced. Every "not found" marking relied
on is asked again before anything is deleted; one that is found now, and is older than the
collection, aborts it. A delete that fails stops the sweep there.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .. import metrics
from ..errors import BlobUnknown, DamagedContent, ManifestUnknown, NameUnknown, RegistryError
from ..reference import Digest, parse_digest
from ..storage import PathNotFound, StorageDriver, delete_if_there
from . import paths
from .registry import Registry, digests_under, list_or_empty

TEMPORARY_AGE = 3600.0  # the driver's temporaries untouched this long are debris
DEFAULT_GRACE = 3600.0  # what was written or referenced this recently is never swept
SWEEP_BATCH = 256       # deletes under one hold of the exclusive lock: writes wait this long at most
MARKINGS = 3            # markings that may each miss something found later, before giving up


class GarbageCollectionAborted(Exception):
    """Marking met an error other than "not found": nothing was deleted."""


@dataclass
class Report:
    marked: set[Digest] = field(default_factory=set)
    blobs_deleted: list[Digest] = field(default_factory=list)
    manifests_deleted: list[tuple[str, Digest]] = field(default_factory=list)
    links_deleted: int = 0
    temporaries_deleted: int = 0
    bytes_freed: int = 0
    kept_recent: int = 0  # unreferenced, but written or referenced within the grace period
    seconds: float = 0.0

    def summary(self, dry_run: bool) -> str:
        verb = "eligible for deletion" if dry_run else "deleted"
        return (f"{len(self.blobs_deleted)} blobs ({_size(self.bytes_freed)}) and {len(self.manifests_deleted)} "
                f"manifests {verb}, {len(self.marked)} blobs marked, {self.kept_recent} kept as recent, "
                f"in {self.seconds:.1f} s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _references(d: Digest, payload: bytes) -> tuple[list[Digest], list[Digest], Digest | None]:
    """(blobs, child manifests, subject) a stored manifest names. A manifest that is not JSON
    cannot say what it references: that aborts the collection."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise DamagedContent(f"stored manifest {d} is not valid JSON") from None

    def digests(items: object) -> list[Digest]:
        out = []
        for item in items if isinstance(items, list) else []:
            try:
                out.append(parse_digest(item["digest"]))
            except (RegistryError, KeyError, TypeError):
                continue  # not a descriptor: references nothing
        return out

    if not isinstance(doc, dict):
        return [], [], None
    blobs = digests([doc["config"]] if isinstance(doc.get("config"), dict) else [])
    blobs += digests(doc.get("layers"))
    fs_layers = doc.get("fsLayers")
    if isinstance(fs_layers, list):
        blobs += digests([{"digest": x.get("blobSum")} for x in fs_layers if isinstance(x, dict)])
    subject = digests([doc["subject"]] if isinstance(doc.get("subject"), dict) else [])
    return blobs, digests(doc.get("manifests")), (subject[0] if subject else None)


Progress = Callable[[str, int, int], Any]  # (phase, done, total)


async def collect(registry: Registry, dry_run: bool = False, delete_untagged: bool = False,
                  grace: float = DEFAULT_GRACE, log: Callable[[str], Any] = print,
                  progress: Progress | None = None, clock: Callable[[], float] = time.time) -> Report:
    """A garbage collection (RegistryBusy while another runs on the same storage). `clock`
    tells when it begins (tests move it forward, so that what they pushed looks old)."""
    async with AsyncExitStack() as stack:
        if not dry_run:
            await stack.enter_async_context(registry.collecting())
        try:
            report = await _collect(registry, dry_run, delete_untagged, grace, log,
                                    progress or (lambda *a: None), clock)
        except Exception:
            metrics.gc("aborted")
            raise
    if not dry_run:
        metrics.gc("done", len(report.blobs_deleted), len(report.manifests_deleted), report.bytes_freed)
    return report


async def _collect(registry: Registry, dry_run: bool, delete_untagged: bool, grace: float,
                   log: Callable[[str], Any], progress: Progress, clock: Callable[[], float]) -> Report:
    report = Report()
    began = clock()
    cutoff = began - grace
    driver, store = registry.driver, registry.blob_store
    for attempt in range(1, MARKINGS + 1):
        observer = _AbsenceRecorder(driver, began)
        try:
            doomed, references = await _mark(Registry(observer), report, delete_untagged, progress)
            missed = await observer.missed()
        except (OSError, DamagedContent) as e:
            raise GarbageCollectionAborted(f"marking failed, nothing was deleted: {e}") from e
        if not missed:
            break
        if attempt == MARKINGS:
            raise GarbageCollectionAborted(
                f"marking failed, nothing was deleted: {missed} was not found, then found, in each of "
                f"{MARKINGS} markings: the storage answers inconsistently")
        # Marked again: what the first asking missed is marked now (report.marked only grows).

    # Manifests no tag reaches, each checked again while no reference is being written.
    for start in range(0, len(doomed), SWEEP_BATCH):
        async with AsyncExitStack() as stack:
            if not dry_run:
                await stack.enter_async_context(store.sweeping())
            for name, d in doomed[start:start + SWEEP_BATCH]:
                if await _spared(registry, name, d, cutoff):
                    _keep(report.marked, d, references)  # and what it needs
                    report.kept_recent += 1
                    continue
                report.manifests_deleted.append((name, d))
                log(f"{name}: manifest eligible for deletion: {d}")
                if not dry_run:
                    try:
                        await registry.repository(name).manifests.delete(str(d))
                    except ManifestUnknown:
                        pass  # deleted meanwhile
        progress("manifests", min(start + SWEEP_BATCH, len(doomed)), len(doomed))

    # Blobs nobody marked, and the repository links to them.
    candidates = []
    for alg_dir in sorted(await list_or_empty(driver, paths.BLOBS)):
        for prefix in sorted(await list_or_empty(driver, alg_dir)):
            for blob_dir in sorted(await list_or_empty(driver, prefix)):
                try:
                    d = parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{blob_dir.rsplit('/', 1)[1]}")
                except RegistryError:
                    continue  # not a blob's directory: not ours to judge
                if d not in report.marked:
                    candidates.append((d, blob_dir))
    links = await _links_to({d for d, _ in candidates}, registry) if candidates and not dry_run else {}
    for start in range(0, len(candidates), SWEEP_BATCH):
        async with AsyncExitStack() as stack:
            if not dry_run:
                await stack.enter_async_context(store.sweeping())
            for d, blob_dir in candidates[start:start + SWEEP_BATCH]:
                try:
                    info = await driver.stat(paths.blob_data(d))
                except PathNotFound:
                    continue  # gone, or never more than a directory
                if info.mtime >= cutoff:  # written or referenced since the grace period began
                    report.kept_recent += 1
                    continue
                report.blobs_deleted.append(d)
                report.bytes_freed += info.size
                log(f"blob eligible for deletion: {d}")
                if dry_run:
                    continue
                await delete_if_there(driver, blob_dir)
                store.forget(d)
                for name in links.get(d, ()):
                    await delete_if_there(driver, paths.layer_link(name, d).rsplit("/", 1)[0])
                    report.links_deleted += 1
        progress("blobs", min(start + SWEEP_BATCH, len(candidates)), len(candidates))
    if not dry_run:
        try:
            report.temporaries_deleted = await driver.purge_temporaries(TEMPORARY_AGE)
        except PathNotFound:
            pass  # no temporaries at all
    report.seconds = clock() - began
    log(report.summary(dry_run))
    return report


async def _spared(registry: Registry, name: str, d: Digest, cutoff: float) -> bool:
    """Whether a manifest marking found unreachable must stay after all: gone already, pushed
    or referenced (by an index: its blob is touched) since the cutoff, or tagged now."""
    driver = registry.driver
    try:
        if (await driver.stat(paths.revision_link(name, d))).mtime >= cutoff:
            return True
    except PathNotFound:
        return True  # deleted meanwhile: nothing to do
    try:
        if (await driver.stat(paths.blob_data(d))).mtime >= cutoff:
            return True
    except PathNotFound:
        pass
    return bool(await registry.repository(name).tags.pointing_to(d))


def _keep(marked: set[Digest], d: Digest, references: dict[Digest, tuple]) -> None:
    todo = [d]
    while todo:
        one = todo.pop()
        if one in marked:
            continue
        marked.add(one)
        blobs, children, _ = references.get(one, ([], [], None))
        marked.update(blobs)
        todo.extend(children)


async def _mark(registry: Registry, report: Report, delete_untagged: bool,
                progress: Progress) -> tuple[list[tuple[str, Digest]], dict[Digest, tuple]]:
    """Fill `report.marked`; the manifests to delete, and what each stored manifest
    references. Reads only."""
    doomed: list[tuple[str, Digest]] = []
    references: dict[Digest, tuple] = {}
    names = await registry.all_repositories()
    for count, name in enumerate(names, 1):
        repo = registry.repository(name)
        revisions = await digests_under(registry.driver, paths.revisions(name))
        for d in revisions:
            if d in references:
                continue
            try:
                payload = await registry.blob_store.read_small(d)
            except BlobUnknown:  # what it references cannot be known: never guess "nothing"
                raise DamagedContent(f"{name}: the manifest of revision {d} is missing; delete the "
                                     f"revision (DELETE /v2/{name}/manifests/{d}) to go on") from None
            references[d] = _references(d, payload)
        keep: set[Digest] = set(revisions)
        if delete_untagged:
            keep = set()
            try:
                tags = await repo.tags.all() if revisions else []
            except NameUnknown:
                tags = []
            for tag in tags:
                try:
                    keep.add(await repo.tags.resolve(tag))
                except ManifestUnknown:
                    continue  # untagged meanwhile; what stays is checked again before any delete
            changed = True
            while changed:  # children of kept indexes, and referrers of kept manifests, stay
                changed = False
                for d in revisions:
                    _, children, subject = references[d]
                    grow = set(children) if d in keep else set()
                    if d not in keep and subject is not None and subject in keep:
                        grow.add(d)
                    if not grow <= keep:
                        keep |= grow
                        changed = True
            doomed += [(name, d) for d in revisions if d not in keep]
        for d in keep:
            report.marked.add(d)
            blobs, children, _ = references.get(d, ([], [], None))
            report.marked.update(blobs)
            report.marked.update(children)
        progress("marking", count, len(names))
    return doomed, references


async def _links_to(digests: set[Digest], registry: Registry) -> dict[Digest, list[str]]:
    """The repositories linking each of `digests`."""
    out: dict[Digest, list[str]] = {}
    for name in await registry.all_repositories():
        for d in await digests_under(registry.driver, paths.layers(name)):
            if d in digests:
                out.setdefault(d, []).append(name)
    return out


class _AbsenceRecorder:
    """The driver, for marking: it remembers every "not found" marking relied on, and
    `missed()` asks again. A listing or read that fails once with "not found" (a flaky network
    filesystem, a storage error reported as ENOENT) would otherwise make whole repositories look
    empty, and their blobs garbage. What is found on the second asking was either created since
    the collection began (its time says so: nothing older depends on it) or missed; then the
    collection marks everything again rather than trust that marking. Storage timestamps are
    coarser than the clock (a filesystem's clock tick, S3's seconds), so something created as
    the collection began can look missed: that costs one more marking, never a deletion."""

    def __init__(self, driver: StorageDriver, began: float) -> None:
        self._driver = driver
        self._began = began
        self._absent: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:  # every read marking makes is one of those below
        return getattr(self._driver, name)

    async def list(self, path: str) -> list[str]:
        return await self._observe("list", path)

    async def list_many(self, paths: Sequence[str]) -> dict[str, list[str] | None]:
        listed = await self._driver.list_many(paths)
        self._absent += [("list", path) for path, children in listed.items() if children is None]
        return listed

    async def get_content(self, path: str) -> bytes:
        return await self._observe("get_content", path)

    async def stat(self, path: str) -> Any:
        return await self._observe("stat", path)

    async def _observe(self, op: str, path: str) -> Any:
        try:
            return await getattr(self._driver, op)(path)
        except PathNotFound:
            self._absent.append((op, path))
            raise

    async def missed(self) -> str | None:
        """The first path that marking found absent, that is there now and older than the
        collection; None when every absence holds (or is newer)."""
        for op, path in self._absent:
            try:
                await getattr(self._driver, op)(path)
                if (await self._driver.stat(path)).mtime >= self._began:
                    continue  # created since the collection began
            except PathNotFound:
                continue
            return path
        return None

