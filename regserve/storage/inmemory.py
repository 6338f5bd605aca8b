"""A driver that keeps objects in this process's memory, with an object store's semantics: no
directories (a prefix exists while objects lie below it), atomic puts and publishes, ownership by
`lock`. It is a stand-in for tests: the driver contract suite (tests/test_storage_contract.py)
holds it to what the filesystem driver and the S3 driver do, and the fast registry and API tests
run on it. Its objects live as long as the process and hold their bytes in memory, so it is not
a storage for a registry anyone uses (it is not offered in the configuration)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from .base import AlreadyExists, Busy, CommitMismatch, FileInfo, FileWriter, PathNotFound, StorageDriver, check_path


@dataclass(eq=False)  # identity matters: a replaced object is another object
class _Object:
    data: bytearray = field(default_factory=bytearray)
    mtime: float = field(default_factory=time.time)
    readonly: bool = False


@dataclass
class _Owners:
    exclusive: bool = False
    shared: int = 0
    users: int = 0  # holders and waiters: the record stays while anyone needs it

    def free_for(self, shared: bool) -> bool:
        return not self.exclusive and (shared or self.shared == 0)


class InMemoryWriter(FileWriter):
    def __init__(self, driver: "InMemoryDriver", key: str, obj: _Object, private: bool) -> None:
        super().__init__()
        self._driver, self._key, self._obj, self._private = driver, key, obj, private
        self.size = len(obj.data)
        self._closed = False

    async def write(self, chunks: Sequence[bytes]) -> None:
        if self._closed:
            raise ValueError("write to a closed writer")
        for chunk in chunks:
            self._obj.data += chunk
            self.size += len(chunk)
        self._obj.mtime = time.time()

    async def commit(self, dest: str, size: int, readonly: bool = False) -> None:
        check_path(dest)
        table = self._driver._temps if self._private else self._driver._objects
        if table.get(self._key) is not self._obj:
            raise CommitMismatch(f"{self._key} was removed or replaced while being written")
        if len(self._obj.data) != size:
            raise CommitMismatch(f"holds {len(self._obj.data)} bytes, {size} were verified")
        del table[self._key]
        self._obj.readonly = readonly
        self._obj.mtime = time.time()
        self._driver._objects[dest] = self._obj
        await self.close()

    async def cancel(self) -> None:
        await self.close()
        if self._private and self._driver._temps.get(self._key) is self._obj:
            del self._driver._temps[self._key]

    async def close(self) -> None:
        self._closed = True


class InMemoryDriver(StorageDriver):
    name = "inmemory"

    def __init__(self) -> None:
        self._objects: dict[str, _Object] = {}
        self._temps: dict[str, _Object] = {}  # private objects from create(), by a random key
        self._owners: dict[str, _Owners] = {}

    def _below(self, prefix: str) -> list[str]:
        base = "/" if prefix == "/" else prefix.rstrip("/") + "/"
        return [k for k in self._objects if k.startswith(base)]

    def _object(self, path: str) -> _Object:
        obj = self._objects.get(check_path(path))
        if obj is None:
            raise PathNotFound(path)
        return obj

    # -- reading ------------------------------------------------------------------------------

    async def get_content(self, path: str) -> bytes:
        return bytes(self._object(path).data)

    async def reader(self, path: str, offset: int = 0, length: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        data = self._object(path).data
        end = len(data) if length is None else min(len(data), offset + length)
        while offset < end:
            piece = bytes(data[offset:min(end, offset + chunk_size)])
            offset += len(piece)
            yield piece
            await asyncio.sleep(0)

    async def stat(self, path: str) -> FileInfo:
        check_path(path)
        obj = self._objects.get(path)
        if obj is not None:
            return FileInfo(path, len(obj.data), obj.mtime, False)
        below = self._below(path)
        if not below and path != "/":
            raise PathNotFound(path)
        return FileInfo(path, 0, max((self._objects[k].mtime for k in below), default=0.0), True)

    async def list(self, path: str) -> list[str]:
        check_path(path)
        base = "" if path == "/" else path.rstrip("/")
        children = {base + "/" + k[len(base) + 1:].split("/", 1)[0] for k in self._below(path)}
        if not children and path != "/":
            raise PathNotFound(path)
        return list(children)

    # -- writing ------------------------------------------------------------------------------

    async def put_content(self, path: str, data: bytes, durable: bool = True,
                          exclusive: bool = False) -> None:
        check_path(path)
        if exclusive and path in self._objects:
            raise AlreadyExists(path)
        self._objects[path] = _Object(bytearray(data))

    async def create(self) -> FileWriter:
        key = uuid.uuid4().hex
        obj = self._temps[key] = _Object()
        return InMemoryWriter(self, key, obj, True)

    async def append(self, path: str, readable: bool = False) -> FileWriter:
        check_path(path)
        parent = path.rsplit("/", 1)[0]
        obj = self._objects.get(path)
        if obj is None:
            if parent and not self._below(parent):
                raise PathNotFound(path)
            obj = self._objects[path] = _Object()
        elif obj.readonly:  # committed content is never opened for writing again
            raise PermissionError(errno.EACCES, "object is read-only", path)
        return InMemoryWriter(self, path, obj, False)

    async def move(self, source: str, dest: str) -> None:
        obj = self._object(source)
        check_path(dest)
        del self._objects[source]
        obj.mtime = time.time()
        self._objects[dest] = obj

    async def delete(self, path: str) -> None:
        check_path(path)
        doomed = [path] if path in self._objects else self._below(path)
        if not doomed:
            raise PathNotFound(path)
        for key in doomed:
            del self._objects[key]

    async def touch(self, path: str) -> None:
        self._object(path).mtime = time.time()

    # -- ownership ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncIterator[None]:
        obj = self._object(path)
        owners = self._owners.setdefault(path, _Owners())
        owners.users += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            for delay in itertools.chain([0.001, 0.002, 0.005, 0.01, 0.02, 0.05], itertools.repeat(0.1)):
                if owners.free_for(shared):
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Busy(path)
                await asyncio.sleep(min(delay, remaining))
            if shared:
                owners.shared += 1
            else:
                owners.exclusive = True
            try:
                if self._objects.get(path) is not obj:  # the owner we waited for removed it
                    raise PathNotFound(path)
                yield
            finally:
                if shared:
                    owners.shared -= 1
                else:
                    owners.exclusive = False
        finally:
            owners.users -= 1
            if owners.users == 0:
                del self._owners[path]

    # -- housekeeping -------------------------------------------------------------------------

    async def purge_temporaries(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        old = [k for k, obj in self._temps.items() if obj.mtime < cutoff]
        for key in old:
            del self._temps[key]
        return len(old)
