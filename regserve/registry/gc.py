"""Offline garbage collection, distribution's mark and sweep over the same layout.

Mark: every manifest revision of every repository (with `delete_untagged`, only manifests reachable
from a tag, from an index that is kept, or whose subject is kept) and everything it references:
config, layers, child manifests. Sweep: delete blobs nobody marked, and the repository links to
them. Like distribution's, it is meant for a registry that is stopped or read-only: a blob pushed
but not yet referenced by a manifest is garbage to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..reference import Digest, parse_digest
from ..storage import PathNotFound, StorageDriver
from . import paths
from .registry import Registry


@dataclass
class Report:
    marked: set[Digest] = field(default_factory=set)
    blobs_deleted: list[Digest] = field(default_factory=list)
    manifests_deleted: list[tuple[str, Digest]] = field(default_factory=list)
    links_deleted: int = 0


async def _digests_under(driver: StorageDriver, base: str) -> list[Digest]:
    """`<base>/<alg>/<hex>` entries (revision links, layer links)."""
    out = []
    try:
        algorithms = await driver.list(base)
    except PathNotFound:
        return out
    for alg_dir in algorithms:
        try:
            entries = await driver.list(alg_dir)
        except PathNotFound:
            continue
        for entry in entries:
            try:
                out.append(parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{entry.rsplit('/', 1)[1]}"))
            except Exception:
                continue  # not a digest directory: leave it alone
    return out


def _references(payload: bytes) -> tuple[list[Digest], list[Digest], Digest | None]:
    """(blobs, child manifests, subject) a stored manifest names; tolerant of odd documents."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return [], [], None

    def digests(items: object) -> list[Digest]:
        out = []
        for item in items if isinstance(items, list) else []:
            try:
                out.append(parse_digest(item["digest"]))
            except Exception:
                continue
        return out

    if not isinstance(doc, dict):
        return [], [], None
    blobs = digests([doc["config"]] if isinstance(doc.get("config"), dict) else [])
    blobs += digests(doc.get("layers"))
    blobs += digests(doc.get("fsLayers") and [{"digest": x.get("blobSum")} for x in doc["fsLayers"]])
    subject = digests([doc["subject"]] if isinstance(doc.get("subject"), dict) else [])
    return blobs, digests(doc.get("manifests")), (subject[0] if subject else None)


async def collect(registry: Registry, dry_run: bool = False, delete_untagged: bool = False,
                  log=print) -> Report:
    driver = registry.driver
    report = Report()
    for name in await registry.all_repositories():
        repo = registry.repository(name)
        revisions = await _digests_under(driver, paths.revisions(name))
        payloads: dict[Digest, bytes] = {}
        for d in revisions:
            try:
                payloads[d] = await registry.blob_store.read_small(d)
            except Exception:
                continue  # revision whose blob is gone: nothing to mark through it
        keep: set[Digest] = set(revisions)
        if delete_untagged:
            keep = set()
            for tag in await repo.tags.all() if revisions else []:
                try:
                    keep.add(await repo.tags.resolve(tag))
                except Exception:
                    continue
            changed = True
            while changed:  # children of kept indexes, and referrers of kept manifests, stay
                changed = False
                for d, payload in payloads.items():
                    _, children, subject = _references(payload)
                    grow = set(children) if d in keep else set()
                    if d not in keep and subject is not None and subject in keep:
                        grow.add(d)
                    if not grow <= keep:
                        keep |= grow
                        changed = True
            for d in revisions:
                if d not in keep:
                    report.manifests_deleted.append((name, d))
                    log(f"{name}: manifest eligible for deletion: {d}")
                    if not dry_run:
                        await repo.manifests.delete(str(d))
        for d in keep:
            report.marked.add(d)
            blobs, children, _ = _references(payloads.get(d, b""))
            report.marked.update(blobs)
            report.marked.update(children)
    # Sweep the blob store.
    for alg_dir in await _list(driver, paths.BLOBS):
        for prefix in await _list(driver, alg_dir):
            for blob_dir in await _list(driver, prefix):
                try:
                    d = parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{blob_dir.rsplit('/', 1)[1]}")
                except Exception:
                    continue
                if d in report.marked:
                    continue
                report.blobs_deleted.append(d)
                log(f"blob eligible for deletion: {d}")
                if not dry_run:
                    await driver.delete(blob_dir)
                    registry.blob_store.forget(d)
    # Links to swept blobs would answer BLOB_UNKNOWN forever: remove them too.
    swept = set(report.blobs_deleted)
    if swept and not dry_run:
        for name in await registry.all_repositories():
            for d in await _digests_under(driver, paths.layers(name)):
                if d in swept:
                    await driver.delete(paths.layer_link(name, d).rsplit("/", 1)[0])
                    report.links_deleted += 1
    log(f"{len(report.marked)} blobs marked, {len(report.blobs_deleted)} blobs and "
        f"{len(report.manifests_deleted)} manifests eligible for deletion")
    return report


async def _list(driver: StorageDriver, path: str) -> list[str]:
    try:
        return sorted(await driver.list(path))
    except PathNotFound:
        return []
