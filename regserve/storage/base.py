"""The storage driver contract, in object-store terms.

Paths are absolute and '/'-separated, as distribution's drivers use them ("/docker/registry/v2/...").
Every component is non-empty, and none is "." or ".." or starts with "." (those names are the
driver's own, for its temporaries and locks, so they can never be confused with content: no name
a repository, tag, digest or upload may have starts with a dot). Directories are implied by the
objects below them, as prefixes are in S3.

What a driver offers, and nothing else is used above it:

* read: `get_content` (a small object), `reader` (ranged, streamed), `stat`, `list` (the direct
  children of a prefix), `list_many` (several prefixes at once);
* write: `put_content` (atomic replace, or create-if-absent), `create` (a new private object,
  streamed, published under its final name by `commit`), `append` (continue an object from its
  size: an upload), `move`, `delete` (an object or a whole prefix), `touch` (mark an object as
  used now, for garbage collection);
* ownership: `lock`, one owner of an object at a time across every process and replica that
  shares the storage;
* housekeeping: `purge_temporaries`, for what a crash (kill -9, a full disk) left behind.

Nothing a driver publishes is ever partial: `put_content` and `commit` make an object appear
complete or not at all. A driver never sees HTTP, and the registry layer never sees the
filesystem or S3 directly.

The registry reaches every driver through checked.CheckedDriver (path checks, metrics), and
tests/test_storage_contract.py holds every driver to this contract: the filesystem, and the
in-memory stand-in (inmemory.py) on which the API tests run a second time.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Any, AsyncContextManager, AsyncIterator, Sequence


class PathNotFound(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(f"path not found: {path}")
        self.path = path


class AlreadyExists(Exception):
    """`put_content(exclusive=True)` found an object at the path."""


class Busy(Exception):
    """Another owner holds the object (`lock` waited as long as it was told to)."""


class CommitMismatch(Exception):
    """What a writer would publish is not what its caller verified: another size, or another
    object than the one written (it was replaced or appended to meanwhile). Nothing was published."""


async def delete_if_there(driver: "StorageDriver", path: str) -> None:
    """Delete; what is gone already is what was wanted. Any other error propagates."""
    try:
        await driver.delete(path)
    except PathNotFound:
        pass


def check_path(path: str) -> str:
    """A path by the contract's rules, or ValueError. Drivers call it on every path they get."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"invalid storage path {path!r}")
    if path != "/":
        for part in path[1:].rstrip("/").split("/"):
            if not part or part.startswith("."):
                raise ValueError(f"invalid storage path {path!r}")
    return path


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float  # when the object was last written, touched, or moved into place
    is_dir: bool


class FileWriter(abc.ABC):
    """A streaming writer, from `StorageDriver.create` (a new private object) or `append` (an
    existing one, continued from its size).

    Writes are sequential: one at a time, each appended after the last. Bulk data comes from the
    upload pipeline: on the event loop it `admit()`s each batch of a body (before reading on),
    `stage()`s its pieces (or receives them into `stage_space()`) and `take_staged()`s them;
    its hashing thread hashes what was taken, its
    writing thread passes it to `write_from_thread()`, which may then not wait for a budget.
    `write()` is for a body small enough that a thread handoff would cost more than the write.
    `size` counts the bytes written (or staged, where staging copies).

    `commit(dest, size)` makes the object durable and publishes it atomically as `dest`, but only
    if it is exactly what was written through this writer and `size` bytes long: the caller passes
    the length it hashed, so a publish can never carry bytes nobody verified (CommitMismatch
    otherwise, with nothing published). `readonly` marks content that must never change again
    (blob data). `close()` keeps what was written (an upload continues later); `cancel()` removes
    a private object."""

    size: int
    # Whether bytes this writer has written would be found by a session resumed after this
    # process is killed (the filesystem: they are in the kernel's cache, but for a direct-I/O
    # tail of under one block, written at close). Where not (S3: parts of a multipart upload
    # are found only once the writer closes or ends a segment), a hash state saved in the
    # middle of a body lies past the data a crash leaves, and can never be used: the upload
    # pipeline saves one only at the body's end.
    survives_crash: bool = True

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

    def stage_space(self) -> memoryview | None:
        """Room to receive the next bytes of a body straight into, on the event loop (a socket's
        recv_into: no copy at all), to be staged with `staged(nbytes)` before anything else
        happens to the writer; None where this writer stages by copy only (`stage`). A writer
        answers the same way for the whole stream."""
        return None

    def stages_in_place(self) -> bool:
        """Whether a body may be received into stage_space() (asked once, before a stream)."""
        return self.stage_space() is not None

    def staged(self, nbytes: int) -> None:
        """The first `nbytes` of the last `stage_space()` hold body bytes: stage them."""
        raise NotImplementedError

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

    async def admit(self, nbytes: int) -> None:
        """Called on the event loop before the pipeline takes `nbytes` more of a body. A driver
        that holds body bytes before they are out of its hands (S3 parts; the filesystem's
        staging buffers) waits here for room in a budget its writers share (storage/budget.py),
        so the body is not read further meanwhile; no pool thread is held while waiting."""

    async def ready(self) -> None:
        """Called on the event loop before the pipeline reads on in a body, for a driver that
        wants room in its budget before bytes arrive rather than after (S3: a push waiting for
        room then holds none of its body; `admit` still counts what came)."""

    def ready_now(self) -> bool:
        """Whether ready() would return at once. A caller holding body bytes it has not handed
        to the writing yet hands them over before it awaits ready(): they may be what frees
        the room."""
        return True

    async def release_staging(self) -> None:
        """The stream has gone quiet: write out what staging holds and give its buffers back
        (staging starts again with the next piece). On the event loop, with nothing in flight."""

    @abc.abstractmethod
    async def commit(self, dest: str, size: int, readonly: bool = False) -> None: ...

    @abc.abstractmethod
    async def cancel(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class StorageDriver(abc.ABC):
    name: str
    timestamp_resolution: float = 0.0  # how coarse `stat().mtime` is (S3: whole seconds)

    # -- reading ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_content(self, path: str) -> bytes:
        """A small object's bytes (links, manifests, state files)."""

    @abc.abstractmethod
    def reader(self, path: str, offset: int = 0, length: int | None = None,
               chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Stream `length` bytes (or to the end) from `offset`. PathNotFound comes before the
        first chunk."""

    @abc.abstractmethod
    async def stat(self, path: str) -> FileInfo:
        """An object's size, or a prefix (is_dir) that has objects below it."""

    @abc.abstractmethod
    async def list(self, path: str) -> list[str]:
        """Full paths of the direct children (objects and prefixes) of a prefix, in no order."""

    async def list_many(self, paths: Sequence[str]) -> dict[str, list[str] | None]:
        """`list` of each prefix (None for one that is not there), for walks of thousands of
        directories: a driver may answer them in one call (the filesystem, in one thread
        hop instead of one per directory). Any error but not-found propagates."""
        async def one(path: str) -> list[str] | None:
            try:
                return await self.list(path)
            except PathNotFound:
                return None
        return dict(zip(paths, await asyncio.gather(*(one(p) for p in paths))))

    # -- writing ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_content(self, path: str, data: bytes, durable: bool = True,
                          exclusive: bool = False) -> None:
        """Replace an object atomically; durably unless the caller can live without it after
        a crash (it will find the old object, or none). `exclusive`: only create it, atomically
        (AlreadyExists if there is one): of racing creators, exactly one succeeds."""

    @abc.abstractmethod
    async def create(self) -> FileWriter:
        """A writer for a new private object that no one else can see or name until its
        `commit` publishes it."""

    @abc.abstractmethod
    async def append(self, path: str, readable: bool = False) -> FileWriter:
        """A writer that continues the object at `path` from its size (an empty object if there
        is none yet, PathNotFound if its parent prefix is gone). The caller must own `path`'s
        session through `lock`: the driver does not stop two appenders. What a writer appended
        is durable once it is closed, and readable (`reader`) by its session's owner; `readable`
        asks for it to be cheap to read by anyone at once, while the next appender goes on (a
        pull-through fetch read by its followers): an object store may otherwise keep an
        upload's recent bytes where only the next appender, the commit, or a read by the owner
        turns them into an object."""

    @abc.abstractmethod
    async def move(self, source: str, dest: str) -> None:
        """Atomically replace `dest` with `source`."""

    @abc.abstractmethod
    async def delete(self, path: str) -> None:
        """Remove an object or everything under a prefix; PathNotFound if there is nothing."""

    @abc.abstractmethod
    async def touch(self, path: str) -> None:
        """Mark the object as used now: its `stat().mtime` becomes the present time (its bytes
        do not change). Online garbage collection keeps what was touched after it began."""

    # -- ownership ----------------------------------------------------------------------------

    @abc.abstractmethod
    def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncContextManager[None]:
        """Own the object at `path` while the context lasts, across every process and replica
        on this storage: exclusively, or (`shared`) together with other shared owners only.
        Waits up to `wait` seconds for the present owner (Busy after that), without holding a
        thread. PathNotFound if the object does not exist, or stopped existing while this
        waited: an owner that removes an object ends it for everyone waiting on it."""

    # -- housekeeping -------------------------------------------------------------------------

    async def purge_temporaries(self, older_than: float) -> int:
        """Remove the driver's temporaries (private objects never committed, trees half
        deleted) untouched for `older_than` seconds: what a crash or a full disk left behind.
        Returns how many were removed."""
        return 0

    def local_path(self, path: str) -> str | None:
        """A filesystem path to serve the object with sendfile, where the driver has one."""
        return None

    async def redirect_url(self, path: str, expires: float = 1200) -> str | None:
        """A URL from which a client may GET the object itself for `expires` seconds (an object
        store's presigned URL), where the driver has one: downloads then bypass the registry."""
        return None

    async def close(self) -> None:
        """Release resources (connections, threads)."""
