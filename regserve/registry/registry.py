"""The registry and its repositories."""

from __future__ import annotations

import datetime as dt
import os
import time

from ..errors import ReadOnly, Unsupported
from ..reference import check_name
from ..storage import PathNotFound, StorageDriver
from . import paths
from .blobs import BlobStore, RepositoryBlobs
from .manifests import ManifestCache, Manifests, Tags
from .uploads import Uploads


class Repository:
    def __init__(self, registry: "Registry", name: str) -> None:
        self.registry = registry
        self.name = check_name(name)
        driver = registry.driver
        self.blobs = RepositoryBlobs(driver, registry.blob_store, name)
        self.tags = Tags(driver, name)
        self.manifests = Manifests(driver, registry.blob_store, self.blobs, self.tags,
                                   registry.manifest_cache, name)
        self.uploads = Uploads(driver, registry.blob_store, name)


class Registry:
    def __init__(self, driver: StorageDriver, *, delete_enabled: bool = False,
                 readonly: bool = False) -> None:
        self.driver = driver
        self.delete_enabled = delete_enabled
        self.readonly = readonly
        self.blob_store = BlobStore(driver)
        self.manifest_cache = ManifestCache()

    def repository(self, name: str) -> Repository:
        return Repository(self, name)

    def check_writable(self) -> None:
        if self.readonly:
            raise ReadOnly()

    def check_deletable(self) -> None:
        self.check_writable()
        if not self.delete_enabled:
            raise Unsupported(None, "deletion is disabled (storage.delete.enabled)")

    async def catalog(self) -> list[str]:
        """Every repository, in lexical order: a directory holding `_manifests` is a repository,
        and names never descend into `_`-prefixed directories (distribution's walk)."""
        local = self.driver.local_path(paths.REPOSITORIES)
        if local is not None:
            return sorted(_walk_local(local))
        names: list[str] = []
        await self._walk(paths.REPOSITORIES, "", names)
        return sorted(names)

    async def purge_uploads(self, older_than: float, dry_run: bool = False) -> list[str]:
        """Remove upload sessions started more than `older_than` seconds ago (distribution's
        maintenance.uploadpurging)."""
        cutoff = time.time() - older_than
        purged = []
        for name in await self.all_repositories():
            base = paths.uploads(name)
            try:
                sessions = await self.driver.list(base)
            except PathNotFound:
                continue
            for session in sessions:
                started = await _started_at(self.driver, f"{session}/startedat")
                if started is None:
                    try:
                        started = (await self.driver.stat(session)).mtime
                    except PathNotFound:
                        continue
                if started < cutoff:
                    purged.append(session)
                    if not dry_run:
                        try:
                            await self.driver.delete(session)
                        except PathNotFound:
                            pass
        return purged

    async def all_repositories(self) -> list[str]:
        """Every repository with anything in it: manifests, layer links or uploads."""
        names: list[str] = []
        await self._walk(paths.REPOSITORIES, "", names, markers=("_manifests", "_layers", "_uploads"))
        return sorted(set(names))

    async def _walk(self, path: str, prefix: str, out: list[str],
                    markers: tuple[str, ...] = ("_manifests",)) -> None:
        try:
            children = await self.driver.list(path)
        except PathNotFound:
            return
        for child in sorted(children):
            base = child.rsplit("/", 1)[1]
            if base in markers:
                out.append(prefix.rstrip("/"))
            elif not base.startswith("_"):
                await self._walk(child, f"{prefix}{base}/", out, markers)


def _walk_local(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if "_manifests" in dirnames:
            found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
        dirnames[:] = [d for d in dirnames if not d.startswith("_") and ".tmp-" not in d]
    return found


async def _started_at(driver: StorageDriver, path: str) -> float | None:
    try:
        text = (await driver.get_content(path)).decode().strip()
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (PathNotFound, ValueError, UnicodeDecodeError):
        return None
