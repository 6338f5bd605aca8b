"""The registry and its repositories."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import AsyncIterator

from ..errors import ReadOnly, RegistryError, Unsupported
from ..reference import COMPONENT, Digest, check_name, parse_digest
from ..storage import AlreadyExists, Busy, PathNotFound, StorageDriver, delete_if_there
from . import paths
from .blobs import BlobStore, RepositoryBlobs
from .manifests import ManifestCache, Manifests, Tags
from .uploads import Uploads

log = logging.getLogger("regserve.registry")
_COMPONENT_RE = re.compile(COMPONENT)
LIST_BATCH = 128  # directories a walk lists at once (in one call of the driver)


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
                 readonly: bool = False, proxied: bool = False) -> None:
        self.driver = driver
        self.delete_enabled = delete_enabled
        self.readonly = readonly
        self.proxied = proxied  # a pull-through cache: its content is the upstream's
        self.blob_store = BlobStore(driver)
        self.manifest_cache = ManifestCache()

    def repository(self, name: str) -> Repository:
        return Repository(self, name)

    def check_writable(self) -> None:
        if self.readonly:
            raise ReadOnly()
        if self.proxied:
            raise Unsupported(None, "the registry is a pull-through cache: push to its upstream")

    def check_deletable(self) -> None:
        self.check_writable()
        if not self.delete_enabled:
            raise Unsupported(None, "deletion is disabled (storage.delete.enabled)")

    async def catalog(self, limit: int | None = None, after: str | None = None) -> tuple[list[str], bool]:
        """Repository names in lexical order after `after`, at most `limit` of them, and whether
        more follow. A directory holding `_manifests` is a repository, and names never descend
        into `_`-prefixed directories (distribution's walk). The walk stops once the page is
        full and skips whole subtrees before `after`, so a page costs the same on a registry
        of twenty or twenty thousand repositories."""
        names = await walk_repositories(self.driver, ("_manifests",), after,
                                        None if limit is None else limit + 1)
        if limit is not None and len(names) > limit:
            return names[:limit], True
        return names, False

    async def purge_uploads(self, older_than: float, dry_run: bool = False) -> list[str]:
        """Remove upload sessions started more than `older_than` seconds ago (distribution's
        maintenance.uploadpurging), each as its owner: a session some request is writing to
        right now is left alone."""
        cutoff = time.time() - older_than
        purged = []
        for name in await self.all_repositories():
            base = paths.uploads(name)
            try:
                sessions = await self.driver.list(base)
            except PathNotFound:
                continue
            for session in sorted(sessions):
                started = await _started_at(self.driver, f"{session}/startedat")
                if started is None:  # no startedat: no session to own, only debris
                    try:
                        started = (await self.driver.stat(session)).mtime
                    except PathNotFound:
                        continue
                    if started < cutoff:
                        purged.append(session)
                        if not dry_run:
                            await delete_if_there(self.driver, session)
                    continue
                if started >= cutoff:
                    continue
                try:
                    async with self.driver.lock(f"{session}/startedat"):
                        purged.append(session)
                        if not dry_run:
                            await delete_if_there(self.driver, session)
                except (Busy, PathNotFound):
                    continue  # in use right now, or just finished
        return purged

    async def all_repositories(self) -> list[str]:
        """Every repository with anything in it: manifests, layer links or uploads."""
        return await walk_repositories(self.driver, ("_manifests", "_layers", "_uploads"))

    @asynccontextmanager
    async def collecting(self) -> AsyncIterator[None]:
        """One garbage collection at a time on a storage (RegistryBusy for another)."""
        await ensure_exists(self.driver, paths.GC_RUNNING)
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.driver.lock(paths.GC_RUNNING))
            except Busy:
                raise RegistryBusy("another garbage collection is running on this storage") from None
            yield


class RegistryBusy(Exception):
    """Another garbage collection is running on the same storage."""


async def walk_repositories(driver: StorageDriver, markers: tuple[str, ...], after: str | None = None,
                            limit: int | None = None) -> list[str]:
    """Repository names (directories holding one of `markers`) in lexical order, after `after`
    and at most `limit`.

    A name's subtree holds exactly the names that start with "<name>/". Ordering each
    directory's entries by "<child>" for the child itself and "<child>/" for its subtree gives
    the names in plain string order ("a" < "a-b" < "a/c", since '-' < '/'), so the walk can
    stop once it has `limit` names, and skip any subtree that lies wholly before `after`."""
    out: list[str] = []

    async def visit(path: str, prefix: str, children: list[str]) -> None:
        items = []
        for child in children:
            base = child.rsplit("/", 1)[1]
            if _COMPONENT_RE.fullmatch(base):
                items += [(prefix + base, 0, child), (prefix + base + "/", 1, child)]
        items.sort()
        # A directory's children are listed a batch at a time, in one call of the driver: one
        # listing costs more in waiting for a thread (or S3) than in work. A batch is no larger than the names
        # a page still needs, so a page that stops early lists nothing for nothing.
        wanted = [child for key, is_tree, child in items if not is_tree and (after is None or key > after)]
        position = {child: i for i, child in enumerate(wanted)}
        listed: dict[str, list[str]] = {}

        async def listing(child: str) -> list[str]:
            if child not in listed:
                start = position[child]
                size = LIST_BATCH if limit is None else max(1, min(LIST_BATCH, limit - len(out)))
                batch = [c for c in wanted[start:start + size] if c not in listed]
                for c, below in (await driver.list_many(batch)).items():
                    listed[c] = below or []
            return listed[child]

        for key, is_tree, child in items:
            if limit is not None and len(out) >= limit:
                return
            if is_tree:
                if after is not None and key < after and not after.startswith(key):
                    continue  # every name below lies before `after`
                below = listed.pop(child) if child in listed else await list_or_empty(driver, child)
                await visit(child, key, [c for c in below if not c.rsplit("/", 1)[1].startswith("_")])
            elif after is None or key > after:
                if any(c.rsplit("/", 1)[1] in markers for c in await listing(child)):
                    out.append(key)

    await visit(paths.REPOSITORIES, "", await list_or_empty(driver, paths.REPOSITORIES))
    return out


async def list_or_empty(driver: StorageDriver, path: str) -> list[str]:
    """The children of a prefix; none when it is not there (yet, or any more)."""
    try:
        return await driver.list(path)
    except PathNotFound:
        return []


async def digests_under(driver: StorageDriver, base: str) -> list[Digest]:
    """`<base>/<alg>/<hex>` entries (revision links, layer links), in order."""
    out = []
    for alg_dir in sorted(await list_or_empty(driver, base)):
        for entry in sorted(await list_or_empty(driver, alg_dir)):
            try:
                out.append(parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{entry.rsplit('/', 1)[1]}"))
            except RegistryError:
                continue  # not a digest's directory: not ours to judge
    return out


async def ensure_exists(driver: StorageDriver, path: str) -> None:
    """Create an empty object at `path` unless there is one (racing creators: one wins)."""
    try:
        await driver.stat(path)
    except PathNotFound:
        try:
            await driver.put_content(path, b"", exclusive=True)
        except AlreadyExists:
            pass  # another process made it first


async def _started_at(driver: StorageDriver, path: str) -> float | None:
    try:
        text = (await driver.get_content(path)).decode().strip()
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (PathNotFound, ValueError, UnicodeDecodeError):
        return None
