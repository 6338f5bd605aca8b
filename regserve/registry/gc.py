"""Garbage collection, distribution's mark and sweep over the same layout.

Mark: every manifest revision of every repository (with `delete_untagged`, only manifests reachable
from a tag, from an index that is kept, or whose subject is kept) and everything it references:
config, layers, child manifests. Sweep: delete manifests not kept, blobs nobody marked, and the
repository links to those blobs.

It fails closed. Marking only reads, and any error in it (a read error, a link that names no
digest, a stored manifest that does not parse or is missing, a listed tag that cannot be read)
aborts the run before anything is deleted: what cannot be read must never count as unreferenced. A delete that fails
aborts the sweep there. Like distribution's, it is for a registry that is stopped or read-only: a
blob pushed but not yet referenced by a manifest is garbage to it. That is enforced: the sweep
takes the storage's serving lock exclusively (`Registry.sweeping`), which every regserve serving
writes holds shared, and refuses to run beside one.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BlobUnknown, DamagedContent, ManifestUnknown, NameUnknown, RegistryError
from ..reference import Digest, parse_digest
from ..storage import PathNotFound, StorageDriver
from . import paths
from .registry import Registry

TEMPORARY_AGE = 3600.0  # the driver's temporaries untouched this long are debris


class GarbageCollectionAborted(Exception):
    """Marking met an error other than "not found": nothing was deleted."""


@dataclass
class Report:
    marked: set[Digest] = field(default_factory=set)
    blobs_deleted: list[Digest] = field(default_factory=list)
    manifests_deleted: list[tuple[str, Digest]] = field(default_factory=list)
    links_deleted: int = 0
    temporaries_deleted: int = 0


async def _digests_under(driver: StorageDriver, base: str) -> list[Digest]:
    """`<base>/<alg>/<hex>` entries (revision links, layer links)."""
    out = []
    for alg_dir in await _list(driver, base):
        for entry in await _list(driver, alg_dir):
            try:
                out.append(parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{entry.rsplit('/', 1)[1]}"))
            except RegistryError:
                continue  # not a digest's directory: not ours to judge
    return out


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


async def collect(registry: Registry, dry_run: bool = False, delete_untagged: bool = False,
                  log: Callable[[str], Any] = print) -> Report:
    if dry_run:
        return await _collect(registry, True, delete_untagged, log)
    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(registry.sweeping())
        except (OSError, PathNotFound) as e:
            raise GarbageCollectionAborted(f"could not take the storage's lock, nothing was deleted: {e}") from e
        return await _collect(registry, False, delete_untagged, log)


async def _collect(registry: Registry, dry_run: bool, delete_untagged: bool,
                   log: Callable[[str], Any]) -> Report:
    report = Report()
    driver = registry.driver
    observer = _AbsenceRecorder(driver)
    try:
        doomed = await _mark(Registry(observer), report, delete_untagged)
        await observer.confirm()
    except (OSError, DamagedContent) as e:
        raise GarbageCollectionAborted(f"marking failed, nothing was deleted: {e}") from e
    for name, d in doomed:
        report.manifests_deleted.append((name, d))
        log(f"{name}: manifest eligible for deletion: {d}")
        if not dry_run:
            try:
                await registry.repository(name).manifests.delete(str(d))
            except ManifestUnknown:
                pass  # deleted meanwhile
    for alg_dir in await _list(driver, paths.BLOBS):
        for prefix in await _list(driver, alg_dir):
            for blob_dir in await _list(driver, prefix):
                try:
                    d = parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{blob_dir.rsplit('/', 1)[1]}")
                except RegistryError:
                    continue  # not a blob's directory: not ours to judge
                if d in report.marked:
                    continue
                report.blobs_deleted.append(d)
                log(f"blob eligible for deletion: {d}")
                if not dry_run:
                    await _delete(driver, blob_dir)
                    registry.blob_store.forget(d)
    # Links to swept blobs would answer BLOB_UNKNOWN forever: remove them too.
    swept = set(report.blobs_deleted)
    if swept and not dry_run:
        for name in await registry.all_repositories():
            for d in await _digests_under(driver, paths.layers(name)):
                if d in swept:
                    await _delete(driver, paths.layer_link(name, d).rsplit("/", 1)[0])
                    report.links_deleted += 1
    if not dry_run:
        try:
            report.temporaries_deleted = await driver.purge_temporaries(TEMPORARY_AGE)
        except PathNotFound:
            pass  # no temporaries at all
    log(f"{len(report.marked)} blobs marked, {len(report.blobs_deleted)} blobs and "
        f"{len(report.manifests_deleted)} manifests eligible for deletion")
    return report


async def _mark(registry: Registry, report: Report, delete_untagged: bool) -> list[tuple[str, Digest]]:
    """Fill `report.marked`; the manifests to delete. Reads only."""
    doomed: list[tuple[str, Digest]] = []
    for name in await registry.all_repositories():
        repo = registry.repository(name)
        revisions = await _digests_under(registry.driver, paths.revisions(name))
        references = {}
        for d in revisions:
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
                except ManifestUnknown:  # listed a moment ago: no one may delete during a sweep
                    raise DamagedContent(f"{name}: tag {tag} is listed but cannot be read") from None
            changed = True
            while changed:  # children of kept indexes, and referrers of kept manifests, stay
                changed = False
                for d, (_, children, subject) in references.items():
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
    return doomed


class _AbsenceRecorder:
    """The driver, for marking: it remembers every "not found" marking relied on, and
    `confirm()` asks again. A listing or read that fails once with "not found" (a flaky
    network filesystem, a storage error reported as ENOENT) would otherwise make whole
    repositories look empty, and their blobs garbage."""

    def __init__(self, driver: StorageDriver) -> None:
        self._driver = driver
        self._absent: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    async def list(self, path: str) -> list[str]:
        return await self._observe("list", path)

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

    async def confirm(self) -> None:
        for op, path in self._absent:
            try:
                await getattr(self._driver, op)(path)
            except PathNotFound:
                continue
            raise DamagedContent(f"{path} was not found, then found: the storage answered "
                                 "inconsistently while marking")


async def _list(driver: StorageDriver, path: str) -> list[str]:
    try:
        return sorted(await driver.list(path))
    except PathNotFound:
        return []


async def _delete(driver: StorageDriver, path: str) -> None:
    try:
        await driver.delete(path)
    except PathNotFound:
        pass  # gone already: what we wanted
