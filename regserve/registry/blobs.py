"""Content-addressed blobs, and the per-repository links that make them visible."""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from ..errors import BlobUnknown, TooManyRequests
from ..reference import Digest
from ..storage import AlreadyExists, Busy, FileWriter, PathNotFound, StorageDriver
from . import paths

log = logging.getLogger("regserve.blobs")
REFERENCE_WAIT = 30.0  # a write waits this long for a garbage collection's batch of deletes


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int
    path: str  # storage path of the data


class LRU(OrderedDict):
    """A small bounded map for immutable lookups."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key, default=None):  # type: ignore[override]
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            return default

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class BlobStore:
    """The registry-wide store. A blob's bytes never change once committed, so its size is cached;
    a deleted blob is caught when opening it fails and evicted then."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self._sizes: LRU = LRU(100_000)
        self._gc_lock_ready = False

    @asynccontextmanager
    async def referencing(self) -> AsyncIterator[None]:
        """Held, shared, by every write that makes content referenced (a blob committed or
        linked, a mount, a manifest put), which touches what it references meanwhile. Garbage
        collection deletes in short batches holding it exclusively, and keeps what was touched
        since it began: so a blob is never deleted between a push's check that it is there and
        the write that references it."""
        await self._gc_lock()
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.driver.lock(paths.GC_LOCK, REFERENCE_WAIT, shared=True))
            except Busy:
                raise TooManyRequests(None, "garbage collection is deleting; retry",
                                      headers={"Retry-After": "1"}) from None
            yield

    @asynccontextmanager
    async def sweeping(self) -> AsyncIterator[None]:
        """Held, exclusively, by garbage collection while it deletes a batch: no reference is
        being written meanwhile."""
        await self._gc_lock()
        async with self.driver.lock(paths.GC_LOCK, float("inf")):
            yield

    async def _gc_lock(self) -> None:
        if not self._gc_lock_ready:
            try:
                await self.driver.stat(paths.GC_LOCK)
            except PathNotFound:
                try:
                    await self.driver.put_content(paths.GC_LOCK, b"", exclusive=True)
                except AlreadyExists:
                    pass
            self._gc_lock_ready = True

    async def touch(self, d: Digest) -> None:
        """Mark a blob as referenced now (see `referencing`); BLOB_UNKNOWN if it is gone."""
        try:
            await self.driver.touch(paths.blob_data(d))
        except PathNotFound:
            self.forget(d)
            raise BlobUnknown({"digest": str(d)}) from None

    async def stat(self, d: Digest, fresh: bool = False) -> BlobInfo:
        """Size and path of a blob. `fresh` bypasses the cache: writers must not trust it, since
        another process (a replica, garbage-collect) may have removed the blob meanwhile."""
        path = paths.blob_data(d)
        size = None if fresh else self._sizes.get(d)
        if size is None:
            try:
                info = await self.driver.stat(path)
            except PathNotFound:
                raise BlobUnknown({"digest": str(d)}) from None
            if info.is_dir:
                raise BlobUnknown({"digest": str(d)})
            size = info.size
            self._sizes.put(d, size)
        return BlobInfo(d, size, path)

    def forget(self, d: Digest) -> None:
        self._sizes.pop(d, None)

    async def exists(self, d: Digest, fresh: bool = True) -> bool:
        try:
            await self.stat(d, fresh)
            return True
        except BlobUnknown:
            return False

    async def put_small(self, d: Digest, data: bytes) -> None:
        """Store a small blob (a manifest) whose digest the caller has computed; the caller
        holds `referencing`."""
        writer = await self.driver.create()
        try:
            await writer.write([data])
            await self.publish(writer, d, len(data))
        finally:
            await writer.cancel()  # nothing to do once published

    async def publish(self, writer: FileWriter, d: Digest, size: int) -> bool:
        """Make a verified upload the blob `d`: the writer's own object, exactly `size` bytes
        (the length that was hashed), fsynced and renamed into place in one step, read-only.
        When the blob is already there with that size nothing is written (the caller discards
        its copy). Racing commits of one digest all hold identical bytes and the rename is
        atomic, so any winner is right. A blob of another size than its digest's content is
        damaged (its bytes cannot hash to its name): the verified upload replaces it. Returns
        whether this writer's object was published."""
        try:
            existing = await self.stat(d, fresh=True)
        except BlobUnknown:
            existing = None
        if existing is not None:
            if existing.size == size:
                await self.touch(d)  # pushed again: referenced anew, for garbage collection
                return False
            log.warning("blob %s holds %d bytes, a verified upload %d: replacing it", d, existing.size, size)
        await writer.commit(paths.blob_data(d), size, readonly=True)
        self.forget(d)
        return True

    def reader(self, info: BlobInfo, offset: int = 0,
               length: int | None = None) -> AsyncIterator[bytes]:
        return self.driver.reader(info.path, offset, length)

    def local_path(self, info: BlobInfo) -> str | None:
        return self.driver.local_path(info.path)

    async def redirect_url(self, info: BlobInfo) -> str | None:
        return await self.driver.redirect_url(info.path)

    async def read_small(self, d: Digest) -> bytes:
        try:
            return await self.driver.get_content(paths.blob_data(d))
        except PathNotFound:
            self.forget(d)
            raise BlobUnknown({"digest": str(d)}) from None


class RepositoryBlobs:
    """Blobs linked into one repository (pushed or mounted there)."""

    def __init__(self, driver: StorageDriver, store: BlobStore, name: str) -> None:
        self.driver, self.store, self.name = driver, store, name

    async def is_linked(self, d: Digest) -> bool:
        try:
            await self.driver.stat(paths.layer_link(self.name, d))
            return True
        except PathNotFound:
            return False

    async def stat(self, d: Digest) -> BlobInfo:
        if not await self.is_linked(d):
            raise BlobUnknown({"digest": str(d)})
        return await self.store.stat(d)

    async def link(self, d: Digest) -> None:
        """Make a blob visible here; the caller holds BlobStore.referencing."""
        await self.store.touch(d)
        if await self.is_linked(d):
            return  # links only ever hold their own digest: nothing to rewrite
        await self.driver.put_content(paths.layer_link(self.name, d), str(d).encode())

    async def unlink(self, d: Digest) -> None:
        try:
            await self.driver.delete(paths.layer_link(self.name, d).rsplit("/", 1)[0])
        except PathNotFound:
            raise BlobUnknown({"digest": str(d)}) from None

    async def mount(self, d: Digest, source: "RepositoryBlobs") -> BlobInfo | None:
        """Link a blob of `source` here; None when `source` does not have it."""
        async with self.store.referencing():
            try:
                info = await source.stat(d)
                await self.link(d)
            except BlobUnknown:
                return None
        return info
