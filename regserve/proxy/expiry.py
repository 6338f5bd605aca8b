"""`proxy.ttl`: what a pull-through cache fetched expires `ttl` after it was fetched, as in
distribution's cache. Expiring removes the repository's links to it (a layer's link; a manifest's
revision with the tags on it and its referrer link), so the next pull fetches it again; the bytes
themselves go with the next garbage collection, once nothing links them.

It deletes, so it fails closed: any error but "not found" stops the pass, and is raised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..errors import BlobUnknown, ManifestUnknown
from ..registry import Registry, paths
from ..registry.registry import digests_under, walk_repositories
from ..storage import PathNotFound, StorageDriver


@dataclass
class Expired:
    manifests: int = 0
    layers: int = 0


def interval(ttl: float) -> float:
    """How often the cache looks for what expired: a tenth of the ttl, between 1 s and an hour."""
    return min(max(ttl / 10, 1.0), 3600.0)


async def expire(registry: Registry, ttl: float, now: float | None = None) -> Expired:
    """Remove the links to everything fetched before `now - ttl`."""
    deadline = (time.time() if now is None else now) - ttl
    driver = registry.driver
    out = Expired()
    for name in await walk_repositories(driver, ("_manifests", "_layers")):
        repo = registry.repository(name)
        for d in await digests_under(driver, paths.revisions(name)):
            if await _older(driver, paths.revision_link(name, d), deadline):
                try:
                    await repo.manifests.delete(str(d))
                    out.manifests += 1
                except ManifestUnknown:
                    pass
        for d in await digests_under(driver, paths.layers(name)):
            if await _older(driver, paths.layer_link(name, d), deadline):
                try:
                    await repo.blobs.unlink(d)
                    out.layers += 1
                except BlobUnknown:
                    pass
    return out


async def _older(driver: StorageDriver, path: str, deadline: float) -> bool:
    try:
        return (await driver.stat(path)).mtime < deadline
    except PathNotFound:
        return False
