"""The storage driver interface: object-store semantics, no in-place edits.

Paths are absolute, '/'-separated, as distribution's drivers use them ("/docker/registry/v2/...").
A driver never sees HTTP, and the registry layer never sees the filesystem or S3 directly.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence


class PathNotFound(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(f"path not found: {path}")
        self.path = path


class WriterBusy(Exception):
    """Another request is writing to the same upload right now."""


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float
    is_dir: bool


class FileWriter(abc.ABC):
    """A streaming writer. `close()` keeps what was written so a later writer can append to it;
    `commit(dest)` makes it durable under its final name; `cancel()` removes it.

    Writes are sequential: one at a time, each appended after the last. Bulk data comes from the
    upload pipeline: on the event loop it `stage()`s each piece of a body and `take_staged()`s at
    the end of each batch; its hashing thread hashes what was taken, its writing thread passes
    it to `write_from_thread()`. `write()` is for a body small enough that a thread handoff
    would cost more than the write. `size` counts the bytes written (or staged) so far."""

    size: int

    def __init__(self) -> None:
        self._staged: list[bytes] = []

    @abc.abstractmethod
    async def write(self, chunks: Sequence[bytes]) -> None: ...

    def stage(self, piece: bytes) -> None:
        """Take `piece` for writing, on the event loop: must not block. A writer that copies
        data before writing it (into aligned buffers for direct I/O) copies here. The caller
        keeps at most the pipeline's IN_FLIGHT_BYTES staged and not yet written. This default
        keeps the piece."""
        self._staged.append(piece)

    def take_staged(self) -> tuple[Sequence[bytes | memoryview], Sequence[Any]]:
        """What was staged since the last call: its bytes, to hash (the writer's copies, where
        it made them: what is written is what was hashed), and what is ready for
        `write_from_thread()`."""
        staged, self._staged = self._staged, []
        return staged, staged

    def write_from_thread(self, staged: Sequence[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Write what `take_staged()` returned, in the pipeline's writing thread. Drivers whose
        I/O blocks write right there; this default hands the chunks back to the event loop and
        waits."""
        asyncio.run_coroutine_threadsafe(self.write(staged), loop).result()

    @abc.abstractmethod
    async def commit(self, dest: str) -> None:
        """Make the object durable and publish it atomically as `dest` (it only ever appears
        complete there)."""

    @abc.abstractmethod
    async def cancel(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class StorageDriver(abc.ABC):
    name: str

    @abc.abstractmethod
    async def get_content(self, path: str) -> bytes:
        """A small object's bytes (links, manifests, state files)."""

    @abc.abstractmethod
    async def put_content(self, path: str, data: bytes, durable: bool = True) -> None:
        """Replace an object atomically; durably unless the caller can live without it after
        a crash (it will find the old object, or none)."""

    @abc.abstractmethod
    def reader(self, path: str, offset: int = 0, length: int | None = None,
               chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream `length` bytes (or to the end) from `offset`."""

    @abc.abstractmethod
    async def writer(self, path: str, append: bool = False) -> FileWriter: ...

    @abc.abstractmethod
    async def stat(self, path: str) -> FileInfo: ...

    @abc.abstractmethod
    async def list(self, path: str) -> list[str]:
        """Full paths of the direct children of a directory/prefix."""

    @abc.abstractmethod
    async def move(self, source: str, dest: str) -> None:
        """Atomically replace `dest` with `source`."""

    @abc.abstractmethod
    async def delete(self, path: str) -> None:
        """Remove an object or everything under a prefix."""

    async def prune(self, path: str) -> None:
        """Remove a directory if it is empty (object stores have none: nothing to do)."""

    def local_path(self, path: str) -> str | None:
        """A filesystem path to serve the object with sendfile, where the driver has one."""
        return None

    async def close(self) -> None:
        """Release resources (connections, threads)."""
