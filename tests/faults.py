"""A storage driver wrapper that fails chosen calls, for tests of what errors leave behind.

Every call of the driver contract (and of the writers and locks it hands out) is recorded as
(operation, path) and may be made to fail: ENOENT as the driver contract reports it
(PathNotFound), anything else as the OSError a real filesystem or object store would raise.
"""

from __future__ import annotations

import asyncio
import errno
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from regserve.storage import FileInfo, FileWriter, PathNotFound, StorageDriver


@dataclass
class Fault:
    op: str            # "get_content", "writer.commit", ...; "*" for any
    error: int         # an errno
    path: str = ""     # only calls whose path contains this
    skip: int = 0      # matching calls to let through first
    times: int = 1     # matching calls to fail after that (-1: all)
    pause: asyncio.Event | None = None  # instead of failing: wait for this event (a gate)


class FaultyDriver(StorageDriver):
    def __init__(self, inner: StorageDriver) -> None:
        self.inner = inner
        self.name = inner.name
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str]] = []

    def inject(self, op: str, error: int = errno.EIO, path: str = "", skip: int = 0,
               times: int = 1) -> Fault:
        fault = Fault(op, error, path, skip, times)
        self.faults.append(fault)
        return fault

    def gate(self, op: str, path: str = "", skip: int = 0) -> asyncio.Event:
        """Make the next matching call wait until the returned event is set."""
        event = asyncio.Event()
        self.faults.append(Fault(op, 0, path, skip, 1, event))
        return event

    def _due(self, op: str, path: str) -> Fault | None:
        self.calls.append((op, path))
        for fault in self.faults:
            if fault.op in (op, "*") and fault.path in path and fault.times != 0:
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                if fault.times > 0:
                    fault.times -= 1
                return fault
        return None

    def check(self, op: str, path: str = "") -> None:
        """Fail now if a fault is due (for calls that cannot wait: threads, sync methods)."""
        fault = self._due(op, path)
        if fault is not None and fault.pause is None:
            raise _error(fault, path)

    async def acheck(self, op: str, path: str = "") -> None:
        fault = self._due(op, path)
        if fault is None:
            return
        if fault.pause is not None:
            await fault.pause.wait()
            return
        raise _error(fault, path)

    # -- the contract, checked then delegated -----------------------------------------------

    async def get_content(self, path: str) -> bytes:
        await self.acheck("get_content", path)
        return await self.inner.get_content(path)

    async def reader(self, path: str, offset: int = 0, length: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        await self.acheck("reader", path)
        async for chunk in self.inner.reader(path, offset, length, chunk_size):
            yield chunk

    async def stat(self, path: str) -> FileInfo:
        await self.acheck("stat", path)
        return await self.inner.stat(path)

    async def list(self, path: str) -> list[str]:
        await self.acheck("list", path)
        return await self.inner.list(path)

    async def put_content(self, path: str, data: bytes, durable: bool = True, exclusive: bool = False) -> None:
        await self.acheck("put_content", path)
        await self.inner.put_content(path, data, durable, exclusive)

    async def create(self) -> FileWriter:
        await self.acheck("create")
        return FaultyWriter(self, await self.inner.create(), "")

    async def append(self, path: str, readable: bool = False) -> FileWriter:
        await self.acheck("append", path)
        return FaultyWriter(self, await self.inner.append(path, readable), path)

    async def move(self, source: str, dest: str) -> None:
        await self.acheck("move", f"{source} -> {dest}")
        await self.inner.move(source, dest)

    async def delete(self, path: str) -> None:
        await self.acheck("delete", path)
        await self.inner.delete(path)

    async def touch(self, path: str) -> None:
        await self.acheck("touch", path)
        await self.inner.touch(path)

    @asynccontextmanager
    async def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncIterator[None]:
        await self.acheck("lock", path)
        async with self.inner.lock(path, wait, shared):
            yield

    async def purge_temporaries(self, older_than: float) -> int:
        await self.acheck("purge_temporaries")
        return await self.inner.purge_temporaries(older_than)

    def local_path(self, path: str) -> str | None:
        return self.inner.local_path(path)

    async def close(self) -> None:
        await self.inner.close()


class FaultyWriter(FileWriter):
    def __init__(self, driver: FaultyDriver, inner: FileWriter, path: str) -> None:
        self._driver, self._inner, self._path = driver, inner, path
        self.survives_crash = inner.survives_crash

    @property
    def size(self) -> int:  # type: ignore[override]
        return self._inner.size

    async def write(self, chunks: Sequence[bytes]) -> None:
        await self._driver.acheck("writer.write", self._path)
        await self._inner.write(chunks)

    def stage(self, piece: bytes) -> None:
        self._inner.stage(piece)

    def stage_space(self) -> memoryview | None:
        return self._inner.stage_space()

    def stages_in_place(self) -> bool:
        return self._inner.stages_in_place()

    def staged(self, nbytes: int) -> None:
        self._inner.staged(nbytes)

    def take_staged(self) -> tuple[Sequence[bytes | memoryview], Sequence[Any]]:
        return self._inner.take_staged()

    def write_from_thread(self, staged: Sequence[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._driver.check("writer.write", self._path)
        self._inner.write_from_thread(staged, loop)

    async def admit(self, nbytes: int) -> None:
        await self._inner.admit(nbytes)

    async def ready(self) -> None:
        await self._inner.ready()

    def ready_now(self) -> bool:
        return self._inner.ready_now()

    async def release_staging(self) -> None:
        await self._inner.release_staging()

    async def commit(self, dest: str, size: int, readonly: bool = False) -> None:
        await self._driver.acheck("writer.commit", dest)
        await self._inner.commit(dest, size, readonly)

    async def cancel(self) -> None:
        await self._inner.cancel()

    async def close(self) -> None:
        await self._inner.close()


def _error(fault: Fault, path: str) -> Exception:
    if fault.error == errno.ENOENT:
        return PathNotFound(path)
    return OSError(fault.error, os.strerror(fault.error), path)
