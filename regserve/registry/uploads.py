"""Resumable upload sessions whose whole state lives in storage.

A session is distribution's `_uploads/<id>/` directory: `data` (the bytes so far), `startedat`,
and `hashstates/<alg>/<offset>` (the digest state after `offset` bytes, in Go's format). Any
process that shares the storage can continue a session: it restores the newest hash state at or
below the data's size and hashes only the bytes after it. Bytes are hashed and written as they
arrive, hashing and writing in two threads while the event loop reads the next batch.

A session's states, and who moves it from one to the next:

    open --PATCH--> appending --the request ends, hash state saved--> open
    open --PUT----> committing --digest verified, data renamed into the blob store--> committed
    open --DELETE, purge, or a PUT with a wrong digest--> cancelled

Committed and cancelled sessions are removed: later requests get BLOB_UPLOAD_UNKNOWN. Every
transition belongs to whoever owns the session: `driver.lock` on its `startedat`, which every
worker and every replica on the same storage obeys. An owner first checks that the session
still exists (the owner before it may have committed or cancelled it); only an owner opens
`data` for appending; and a commit publishes only the very file this owner appended to, at
exactly the length it hashed. So a committed blob can never be written to, and no byte that was
not hashed is ever published. A request that finds the session owned waits up to
LOCK_WAIT_SECONDS (a retried PATCH behind one still draining), then gets BLOB_UPLOAD_INVALID.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence

from .. import hashstate
from ..errors import BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, UploadRangeInvalid
from ..reference import Digest
from ..storage import AlreadyExists, Busy, FileWriter, PathNotFound, StorageDriver, delete_if_there
from ..uncancellable import to_the_end
from . import paths
from .blobs import BlobInfo, BlobStore, RepositoryBlobs

UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
BATCH_BYTES = 512 << 10       # handed to the hash/write threads at a time
RECEIVED_BATCH_BYTES = 2 << 20  # the same, for a body received in place (one staging buffer)
EARLY_HAND_OVER = 1 << 20     # or this much, when the client has sent nothing more yet
IN_FLIGHT_BYTES = 20 << 20    # received, not written yet: bounds memory, and the tail a PATCH waits for
WRITE_GATHER_BYTES = 8 << 20  # at most this much of what is ready is written with one call
CHECKPOINT_BYTES = 256 << 20     # hash state saved this often within one long request
LOCK_WAIT_SECONDS = 10.0      # a request waits this long for the session's present owner
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# Every upload of the process shares these: hashing is CPU work, one thread a core; writing
# waits for the device, so a few more.
_HASHING = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="upload-hash")
_WRITING = ThreadPoolExecutor(max_workers=2 * _CORES + 2, thread_name_prefix="upload-write")
_hash_pool = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="hash")  # resume/fallback re-hash


@dataclass(frozen=True)
class ChunkRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def _hash_batch(hashers: list[hashstate.Hasher], batch: Sequence[bytes | memoryview]) -> None:
    for h in hashers:
        for chunk in batch:
            h.update(chunk)


class ReceivedBody(Protocol):
    """A body that can be received straight into the writer's staging buffers
    (api.common.RequestBody, with receiver.py): no copy on the way."""

    ended: bool

    def receive_directly(self) -> bool: ...
    async def fill(self, view: memoryview) -> int: ...
    def pending(self) -> bool: ...
    async def wait_data(self) -> None: ...
    def done(self) -> None: ...


def _saves_midway(writer: FileWriter, since: int) -> bool:
    """Whether to save the hash state in the middle of a body, `since` bytes after the last
    save: only where a crash would leave the data it describes (`FileWriter.survives_crash`).
    On S3 it would not, and each save stopped the body for a drain and a round trip: 2–6% of a
    streamed push."""
    return writer.survives_crash and since >= CHECKPOINT_BYTES


async def stream_into(writer: FileWriter, hashers: list[hashstate.Hasher],
                      body: AsyncIterator[Sequence[bytes]],
                      checkpoint: Callable[[], Awaitable[None]] | None = None) -> None:
    """Hash and write a body (pieces, as they arrive; or received into the writer's buffers,
    where both can). `checkpoint` (saving the hash state) runs every CHECKPOINT_BYTES where the
    writer's bytes survive a crash (`_saves_midway`), and at the end, also when the client goes
    away mid-body: every byte that arrived is kept. A body that says its client went quiet
    (`on_idle`, see api.common.RequestBody) gets everything received so far written, and the
    writer's staging buffers given back, until more arrives."""
    if hasattr(body, "receive_directly") and writer.stages_in_place() and body.receive_directly():
        await _receive_into(writer, hashers, body, checkpoint)
        return
    pipe: _Pipeline | None = None  # threads start once the body outgrows one batch
    batch: list[bytes] = []
    batched = 0
    since_checkpoint = 0
    checkpointed = False  # and nothing arrived since: the state on disk is already the last one
    handing = asyncio.Lock()  # one of the loop and the idle hook hands batches over at a time

    async def hand_over() -> None:
        nonlocal pipe, batch, batched, since_checkpoint
        if pipe is None:
            pipe = _Pipeline(writer, hashers)
        pending, nbytes = batch, batched
        batch, batched = [], 0
        await writer.admit(nbytes)
        await pipe.submit(pending, nbytes)
        since_checkpoint += nbytes

    async def on_idle() -> None:
        if handing.locked():  # a batch waits for the writer's room: the client is not idle, we are
            return
        async with handing:
            try:
                if batch:
                    await hand_over()
                if pipe is not None:
                    await pipe.drain()
            except Exception:  # noqa: BLE001 - the stream meets the same error next, and raises it
                return
            await writer.release_staging()

    if hasattr(body, "on_idle"):
        body.on_idle = on_idle
    try:
        await writer.ready()
        async for pieces in body:
            batch += pieces
            batched += sum(map(len, pieces))
            del pieces  # held by `batch` alone, which is handed over when the client goes quiet
            checkpointed = checkpointed and not batched
            if batched >= BATCH_BYTES:
                async with handing:
                    await hand_over()
                    await writer.ready()
                    if checkpoint is not None and _saves_midway(writer, since_checkpoint):
                        assert pipe is not None
                        await pipe.drain()
                        await checkpoint()
                        since_checkpoint, checkpointed = 0, True
    finally:
        if hasattr(body, "on_idle"):
            body.on_idle = None

        async def settle() -> None:
            async with handing:
                if pipe is None:
                    if batch:  # a small body: inline, no threads
                        _hash_batch(hashers, batch)
                        await writer.write(batch)
                else:
                    try:
                        if batch:
                            await writer.admit(batched)
                            await pipe.submit(batch, batched)
                    finally:
                        await pipe.drain()  # even after an error: no thread may outlive the writer
                if checkpoint is not None and not checkpointed:
                    await checkpoint()
        await to_the_end(settle())  # the caller closes the writer next


async def _receive_into(writer: FileWriter, hashers: list[hashstate.Hasher], body: ReceivedBody,
                        checkpoint: Callable[[], Awaitable[None]] | None) -> None:
    """stream_into() for a body received into the writer's staging space, BATCH_BYTES at a
    time, handed to the threads RECEIVED_BATCH_BYTES at a time (a thread handoff per 512 KiB
    cost 9x the futex calls of one per 2 MiB, and 10% more CPU), or from EARLY_HAND_OVER on
    when the client has sent nothing more yet: what arrived is written meanwhile. A fill is paid for (`admit`)
    once its bytes are in, so one waiting for its client holds none of the budget, and no
    client keeps others waiting by going slow or quiet; an upload holds at most one fill beyond
    the budget (where aiohttp held up to two read buffers, 2 MiB, per connection). A fill cut
    short before the end means the client went quiet: the staging is given back until more
    comes."""
    pipe = _Pipeline(writer, hashers)
    batched = since_checkpoint = 0
    checkpointed = False

    async def hand_over() -> None:
        nonlocal batched, since_checkpoint, checkpointed
        pipe.hand(batched)
        since_checkpoint += batched
        batched, checkpointed = 0, False

    try:
        while True:
            if batched and not writer.ready_now():
                await hand_over()  # what frees the writer's room may be in this batch
            if not batched:
                await pipe.room(RECEIVED_BATCH_BYTES)
                await writer.ready()
            want = min(BATCH_BYTES, RECEIVED_BATCH_BYTES - batched)
            space = writer.stage_space()
            assert space is not None  # a writer that stages in place does so for the whole stream
            space = space[:want]
            n = await body.fill(space)
            writer.staged(n)
            batched += n
            await writer.admit(n)
            if body.ended:
                break
            if batched >= RECEIVED_BATCH_BYTES \
                    or (n == len(space) and batched >= EARLY_HAND_OVER and not body.pending()):
                await hand_over()
                if checkpoint is not None and _saves_midway(writer, since_checkpoint):
                    await pipe.drain()
                    await checkpoint()
                    since_checkpoint, checkpointed = 0, True
            elif n < len(space):  # the client went quiet
                await hand_over()
                await pipe.drain()
                await writer.release_staging()
                await body.wait_data()
    finally:
        body.done()

        async def settle() -> None:
            try:
                if batched:
                    await hand_over()
            finally:
                await pipe.drain()  # even after an error: no thread may outlive the writer
            if checkpoint is not None and not checkpointed:
                await checkpoint()
        await to_the_end(settle())  # the caller closes the writer next


class _Serial:
    """Work items run in order, one at a time, on a shared pool. An upload's hashing (or
    writing) holds a pool thread while it has work and none while it waits for its client, so
    uploads cost threads by the cores, not by their number, and a stalled one costs none. A
    busy stream gives its thread up every TURN items, so that others get their turn."""

    TURN = 16

    def __init__(self, pool: ThreadPoolExecutor, work: Callable[[Any], None]) -> None:
        self._pool, self._work = pool, work
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._running = False

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._running:
                return
            self._running = True
        self._pool.submit(self._run)

    def take(self) -> Any:
        """The next item, if one is waiting (for the work to gather it), else None."""
        with self._lock:
            return self._items.popleft() if self._items else None

    def _run(self) -> None:
        for _ in range(self.TURN):
            with self._lock:
                if not self._items:
                    self._running = False
                    return
                item = self._items.popleft()
            self._work(item)
        self._pool.submit(self._run)


class _Pipeline:
    """Hashing and writing of one stream, overlapping each other and the event loop's reading
    of the next batch. The loop stages each batch with the writer (copying it into aligned
    buffers, for direct I/O), a hashing thread hashes what was staged, a writing thread writes
    it: threads of two pools every upload of the process shares (`_Serial`). The loop is woken
    only when it must wait, or at the end. It waits before staging a batch that would leave more
    than IN_FLIGHT_BYTES not written yet (bounding memory whatever the blob size; the slack
    absorbs the device's slow moments), until half of that is written."""

    def __init__(self, writer: FileWriter, hashers: list[hashstate.Hasher]) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer, self.hashers = writer, hashers
        self.submitted = self.written = 0  # bytes (written: or skipped after an error)
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._wake_below = 0  # the waiter is woken when fewer bytes than this are unwritten
        self._hashing = _Serial(_HASHING, self._hash)
        self._writing = _Serial(_WRITING, self._write)

    def _hash(self, item: tuple[Sequence[Any], Sequence[Any], int]) -> None:
        data, staged, nbytes = item
        if self.error is None:  # after an error, batches are only counted off
            try:
                _hash_batch(self.hashers, data)
            except BaseException as e:  # noqa: BLE001 - handed to the request
                self._fail(e)
        self._writing.put((staged, nbytes))

    def _write(self, item: tuple[Sequence[Any], int]) -> None:
        staged, nbytes = list(item[0]), item[1]
        while nbytes < WRITE_GATHER_BYTES:  # what else is ready goes in the same write
            more = self._writing.take()
            if more is None:
                break
            staged += more[0]
            nbytes += more[1]
        if self.error is None and staged:
            try:
                self.writer.write_from_thread(staged, self.loop)
            except BaseException as e:  # noqa: BLE001 - handed to the request
                self._fail(e)
        self._count_written(nbytes)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:  # the first one is the cause
                self.error = error

    def _count_written(self, nbytes: int) -> None:
        with self._lock:
            self.written += nbytes
            waiter = self._waiter
            if waiter is not None and self.submitted - self.written < self._wake_below:
                self._waiter = None
                self.loop.call_soon_threadsafe(_wake, waiter)

    async def submit(self, pieces: list[bytes], nbytes: int) -> None:
        """Stage a batch and hand it to the threads (after room())."""
        await self.room(nbytes)
        for piece in pieces:
            self.writer.stage(piece)
        self.hand(nbytes)

    async def room(self, nbytes: int) -> None:
        """Before staging `nbytes` more: if they would leave more than IN_FLIGHT_BYTES
        unwritten, wait until half of that is written."""
        self._raise_error()
        if self.submitted - self.written + nbytes > IN_FLIGHT_BYTES:
            await self._wait_below(IN_FLIGHT_BYTES // 2 + 1)
            self._raise_error()

    def hand(self, nbytes: int) -> None:
        """Hand what was staged since the last call (`nbytes`) to the threads."""
        data, staged = self.writer.take_staged()
        with self._lock:
            self.submitted += nbytes
        self._hashing.put((data, staged, nbytes))

    async def drain(self) -> None:
        """Wait until every batch submitted is done (or skipped after an error), then raise
        that error."""
        await self._wait_below(1)
        self._raise_error()

    async def _wait_below(self, unwritten: int) -> None:
        with self._lock:
            if self.submitted - self.written < unwritten:
                return
            self._wake_below = unwritten
            self._waiter = waiter = self.loop.create_future()
        await waiter

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class UploadSession:
    def __init__(self, uploads: "Uploads", upload_id: str) -> None:
        self.uploads = uploads
        self.id = upload_id
        self.name = uploads.name
        self.driver = uploads.driver
        self.data_path = paths.upload_data(self.name, upload_id)

    async def size(self) -> int:
        try:
            return (await self.driver.stat(self.data_path)).size
        except PathNotFound:
            return 0

    @asynccontextmanager
    async def _owned(self, wait: float = LOCK_WAIT_SECONDS) -> AsyncIterator[None]:
        """Own the session (see the module's docstring) while the context lasts."""
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(
                    self.driver.lock(paths.upload_startedat(self.name, self.id), wait))
            except PathNotFound:
                raise BlobUploadUnknown({"upload": self.id}) from None
            except Busy:
                raise BlobUploadInvalid({"upload": self.id}, "another request is writing to this upload") from None
            yield

    async def exists(self) -> bool:
        try:
            await self.driver.stat(paths.upload_startedat(self.name, self.id))
            return True
        except PathNotFound:
            return False

    # A session's objects of a pull-through cache's fetch: the blob's size, and the object its
    # downloader owns (`driver.lock`).

    def object_path(self, name: str) -> str:
        return f"{paths.upload_dir(self.name, self.id)}/{name}"

    async def read_object(self, name: str) -> bytes | None:
        try:
            return await self.driver.get_content(self.object_path(name))
        except PathNotFound:
            return None

    async def add_object(self, name: str, data: bytes = b"") -> str:
        """An object `name` in the session's directory, created by an owner (so never after the
        session ended: BLOB_UPLOAD_UNKNOWN then) unless it is there; its path."""
        path = self.object_path(name)
        async with self._owned():
            try:
                await self.driver.put_content(path, data, exclusive=True)
            except AlreadyExists:
                pass
        return path

    async def _open(self, readable: bool = False) -> tuple[FileWriter, dict[str, list[int]]]:
        """The session's data, for its owner to append to (`readable`: see StorageDriver.append),
        and its saved hash states: asked at once, since on an object store each is round trips."""
        opening = asyncio.ensure_future(self._open_data(readable))
        try:
            saved = await self._saved_states()
        except BaseException:
            writer = (await asyncio.gather(opening, return_exceptions=True))[0]
            if isinstance(writer, FileWriter):
                await writer.close()
            raise
        return await opening, saved

    async def _open_data(self, readable: bool) -> FileWriter:
        try:
            return await self.driver.append(self.data_path, readable)
        except PathNotFound:  # the owner removed it just now: cannot happen while we own it
            raise BlobUploadUnknown({"upload": self.id}) from None

    # -- hash state -------------------------------------------------------------------------

    async def _saved_states(self) -> dict[str, list[int]]:
        """The offsets of the saved hash states, by algorithm: sha256 alone where none were
        saved. One listing round: on an object store, each listing is a round trip of a
        chunked push's every PATCH."""
        dirs = {a: paths.upload_hashstates(self.name, self.id, a) for a in ("sha256", "sha512")}
        listed = await self.driver.list_many(list(dirs.values()))
        saved = {}
        for algorithm, d in dirs.items():
            if listed[d] is not None:
                names = [p.rsplit("/", 1)[1] for p in listed[d]]
                saved[algorithm] = sorted(int(n) for n in names if n.isdigit())
        return saved or {"sha256": []}

    async def _resume_hashers(self, size: int, saved: dict[str, list[int]]) -> list[hashstate.Hasher]:
        """Hashers positioned at `size`: from the newest usable saved state, then the gap."""
        hashers = []
        for algorithm, offsets in sorted(saved.items()):
            hasher = hashstate.Hasher(algorithm)
            for offset in reversed(offsets):
                if offset > size or not hasher.resumable:
                    continue
                try:
                    state = await self.driver.get_content(
                        f"{paths.upload_hashstates(self.name, self.id, algorithm)}/{offset}")
                    hasher = hashstate.Hasher.restore(algorithm, state)
                    break
                except (PathNotFound, ValueError):
                    continue
            await self._hash_stored(hasher, hasher.length, size)
            hashers.append(hasher)
        return hashers

    async def _hash_stored(self, hasher: hashstate.Hasher, start: int, end: int) -> None:
        if end <= start:
            return
        loop = asyncio.get_running_loop()
        async for chunk in self.driver.reader(self.data_path, start, end - start, 8 << 20):
            await loop.run_in_executor(_hash_pool, hasher.update, chunk)

    async def _save_states(self, hashers: list[hashstate.Hasher], saved: dict[str, list[int]]) -> None:
        """Save each hasher's state, then remove the older ones. `saved` is what the owner
        listed when it began and has saved since (no one else saves meanwhile), kept up to date."""
        for h in hashers:
            if not h.resumable:
                continue
            base = paths.upload_hashstates(self.name, self.id, h.algorithm)
            old = [o for o in saved.get(h.algorithm, ()) if o != h.length]
            saved[h.algorithm] = [h.length]
            # At once (on an object store, each is round trips of every PATCH): whatever of it a
            # crash undoes, restoring finds the newest state not past the data, or none, and
            # hashes the gap from the data. Not fsynced, for the same reason.
            await asyncio.gather(self.driver.put_content(f"{base}/{h.length}", h.save(), durable=False),
                                 *(delete_if_there(self.driver, f"{base}/{o}") for o in old))

    # -- data -------------------------------------------------------------------------------

    async def _positioned(self, writer: FileWriter, chunk: ChunkRange | None,
                          saved: dict[str, list[int]]) -> list[hashstate.Hasher]:
        """Check that a chunk continues the upload, and bring the hashers to its end."""
        if chunk is not None and chunk.start != writer.size:
            raise UploadRangeInvalid(writer.size, {"expected_start": writer.size,
                                                   "content_range_start": chunk.start})
        return await self._resume_hashers(writer.size, saved)

    async def append(self, body: AsyncIterator[bytes], chunk: ChunkRange | None = None,
                     readable: bool = False) -> int:
        """Stream a request body onto the session; returns the new size. Whatever arrives before
        a disconnect is kept (and its hash state saved), so the client can resume from there.
        `readable`: others read the data as it grows (StorageDriver.append)."""
        async with self._owned():
            writer, saved = await self._open(readable)
            try:
                hashers = await self._positioned(writer, chunk, saved)
                await self._stream(writer, hashers, body, saved)
                return writer.size
            finally:
                await writer.close()

    async def _stream(self, writer: FileWriter, hashers: list[hashstate.Hasher],
                      body: AsyncIterator[bytes], saved: dict[str, list[int]]) -> None:
        await stream_into(writer, hashers, body, lambda: self._save_states(hashers, saved))

    async def finish(self, digest: Digest, body: AsyncIterator[bytes] | None,
                     chunk: ChunkRange | None, blobs: RepositoryBlobs) -> BlobInfo:
        """Append an optional last chunk, verify the digest and commit the blob atomically."""
        async with self._owned():
            writer, saved = await self._open()
            try:
                hashers = await self._positioned(writer, chunk, saved)
                if body is not None:
                    await self._stream(writer, hashers, body, saved)
                size = writer.size
                actual = await self._digest_of(hashers, digest.algorithm, size)
                if actual != digest.hex:
                    await writer.close()
                    await self._remove()
                    raise DigestInvalid({"expected": str(digest), "actual": f"{digest.algorithm}:{actual}"})
                async with self.uploads.store.referencing():
                    await self.uploads.store.publish(writer, digest, size)
                    await blobs.link(digest)
            finally:
                await writer.close()
            await self._remove()  # the session's state, and its data if the blob already existed
        return BlobInfo(digest, size, paths.blob_data(digest))

    async def _digest_of(self, hashers: list[hashstate.Hasher], algorithm: str, size: int) -> str:
        for h in hashers:
            if h.algorithm == algorithm:
                if h.length != size:  # every byte written is hashed: anything else is a bug
                    raise RuntimeError(f"upload {self.id}: {size} bytes written, {h.length} hashed")
                return h.hexdigest()
        hasher = hashstate.Hasher(algorithm)  # not tracked incrementally: read it back once
        await self._hash_stored(hasher, 0, size)
        return hasher.hexdigest()

    async def cancel(self) -> None:
        async with self._owned():
            await self._remove()

    async def _remove(self) -> None:
        """End the session, for its owner."""
        try:
            await self.driver.delete(paths.upload_dir(self.name, self.id))
        except PathNotFound:
            pass


class Uploads:
    def __init__(self, driver: StorageDriver, store: BlobStore, name: str) -> None:
        self.driver, self.store, self.name = driver, store, name

    async def create(self, upload_id: str | None = None) -> UploadSession:
        """A new session: just `startedat` (no saved hash state means: start from zero). With an
        `upload_id` of the caller's (a pull-through cache's fetch), only if there is none by that
        id yet: AlreadyExists otherwise, so of racing creators exactly one creates it."""
        named, upload_id = upload_id is not None, upload_id or str(uuid.uuid4())
        started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.driver.put_content(paths.upload_startedat(self.name, upload_id), started.encode(),
                                      exclusive=named)
        return UploadSession(self, upload_id)

    async def put_whole(self, digest: Digest, body: AsyncIterator[bytes], blobs: RepositoryBlobs) -> BlobInfo:
        """A blob sent whole in one request (POST ?digest=). The client never sees a session, so
        none is kept: the body goes to a new private object, is verified and made durable, then
        published under its digest; on any failure it is removed."""
        writer = await self.driver.create()
        try:
            hasher = hashstate.Hasher(digest.algorithm)
            await stream_into(writer, [hasher], body)
            if hasher.hexdigest() != digest.hex:
                raise DigestInvalid({"expected": str(digest), "actual": hasher.digest()})
            size = writer.size
            async with self.store.referencing():
                await self.store.publish(writer, digest, size)
                await blobs.link(digest)
        finally:
            await writer.cancel()  # nothing left to remove once published
        return BlobInfo(digest, size, paths.blob_data(digest))

    async def open(self, upload_id: str) -> UploadSession:
        if not UPLOAD_ID_RE.fullmatch(upload_id):
            raise BlobUploadUnknown({"upload": upload_id})
        try:
            await self.driver.stat(paths.upload_startedat(self.name, upload_id))
        except PathNotFound:
            raise BlobUploadUnknown({"upload": upload_id}) from None
        return UploadSession(self, upload_id)
