"""Filesystem driver: distribution's on-disk layout under a root directory.

New objects are written as temporaries in `<root>/.regserve/tmp/`, fsynced and renamed into
place, so a crash never leaves a partial object behind a final name, and no temporary ever sits
among content (a directory listing of content never has to guess what is a temporary). Trees
being deleted are renamed there first, so readers never see half of one. Whatever a crash leaves
there is removed by `purge_temporaries`. Ownership (`lock`) is flock(2) on the object itself,
which every process on this host and every NFSv4 client honours. Blocking calls run in a thread
pool of the driver's own, so the event loop stays free and large writes overlap with hashing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import stat as stat_mod
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

from ..uncancellable import to_the_end
from . import pagecache
from .base import AlreadyExists, Busy, CommitMismatch, FileInfo, FileWriter, PathNotFound, StorageDriver, check_path
from .budget import ByteBudget
from .directio import DirectAppender, direct_io_suits

T = TypeVar("T")
IOV_MAX = 1024
PRIVATE = ".regserve"      # under the root: the driver's own (no content name starts with a dot)
REPLACE_ATTEMPTS = 8       # a rename whose new parent a concurrent delete keeps removing
# Temporaries of earlier regserve versions sat beside content as "<name>.tmp-<uuid hex>"; those
# of fixed content names (never a repository or tag name) are removed by purge_temporaries.
LIST_PER_HOP = 32         # directories one thread lists in a walk (list_many)
LEGACY_TEMP = re.compile(r"(?:data|link|startedat|\d+)\.tmp-[0-9a-f]{32}")
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
WRITEBACK_STEP = 8 << 20  # start writeback of this much at a time: large I/O, little dirty memory
CACHE_BEHIND = 64 << 20   # a stream keeps at most about this much of what it wrote in the page cache
# Body bytes all uploads of a process hold staged and not yet written. One push keeps up to
# 20 MiB in flight (registry/uploads.py); many at once share this, so that 16 concurrent pushes
# do not hold 16 times that (their throughput is bound by the CPU anyway).
STAGING_BUDGET = 32 << 20


def _load_sync_file_range():
    """sync_file_range(2): start writeback of what a stream has written so far, so the fsync at
    commit finds little left to flush. Absent (non-Linux), commits just fsync everything."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError, TypeError):
        return None


_sync_file_range = _load_sync_file_range()
_CAN_DROP = hasattr(os, "posix_fadvise")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    for i in range(0, len(chunks), IOV_MAX):
        batch = list(chunks[i:i + IOV_MAX])
        total = sum(map(len, batch))
        written = os.writev(fd, batch)
        while written < total:  # short write: finish it the slow way
            data = b"".join(batch)[written:]
            batch, total = [data], len(data)
            written = os.write(fd, data)


def _remove_tree(path: str) -> None:
    """rmtree for our own small trees (no symlinks followed), cheaper than shutil's fd dance.
    A tree being deleted was renamed out of sight first, but a writer that had looked up its
    directory just before still lands there (rename(2) resolves the parent first): such late
    arrivals are removed with the rest."""
    for attempt in range(REPLACE_ATTEMPTS):
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        _remove_tree(entry.path)
                    else:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or attempt == REPLACE_ATTEMPTS - 1:
                raise


def _replace_into(src: str, dst: str) -> None:
    """rename(2) `src` over `dst`, making `dst`'s parents. A concurrent delete of the parent
    (a DELETE of the manifest whose link a PUT is writing) between the two steps is retried:
    the later writer wins, as it would have a moment later."""
    parent = os.path.dirname(dst)
    for attempt in range(REPLACE_ATTEMPTS):
        try:
            os.makedirs(parent, exist_ok=True)
            os.replace(src, dst)
            return
        except (FileNotFoundError, FileExistsError):  # makedirs: made, then removed under it
            if not os.path.lexists(src) or attempt == REPLACE_ATTEMPTS - 1:
                raise


def _link_into(src: str, dst: str, path: str) -> None:
    """link(2) `src` as `dst`, which must not exist yet (AlreadyExists): create-if-absent."""
    for attempt in range(REPLACE_ATTEMPTS):
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(src, dst)
            return
        except FileExistsError:
            if os.path.lexists(dst):
                raise AlreadyExists(path) from None
            if attempt == REPLACE_ATTEMPTS - 1:  # makedirs: made, then removed under it
                raise
        except FileNotFoundError:
            if attempt == REPLACE_ATTEMPTS - 1:
                raise


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Prewarmer:
    """Reads blobs just committed back into the page cache, in a thread of its own. Upload data
    is written past the cache (O_DIRECT), so without this the pull that usually follows a push
    a while later would read the disk, where distribution, which writes through the cache, would
    serve it from memory. It waits DELAY first: a pull that comes at once reads ahead for itself
    (api/sendfile.py), and a second stream of reads of the same file only slows it (1 GiB pulled
    at once: 1,765 MiB/s with an immediate pre-warm, 1,975 without). Then it asks the kernel to
    read (pagecache.read_ahead) what is not cached yet, the blob's head first, STEP at a time in
    turn with other blobs, and at most `budget` bytes a minute of such reads, so a stream of
    large pushes cannot evict the rest of what the host caches (0: never)."""

    STEP = 64 << 20  # looked at, and asked for, at a time: the next blob's turn comes soon
    DELAY = 3.0
    MIN_SIZE = 1 << 20  # smaller blobs are mostly written through the cache anyway

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._window = 0.0
        self._spent = 0
        self._lock = threading.Lock()
        self._timers: set[threading.Timer] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prewarm")

    def schedule(self, full: str, size: int) -> None:
        if size < self.MIN_SIZE:
            return
        timer = threading.Timer(self.DELAY, self._submit, (full, 0, size))
        timer.daemon = True
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive()} | {timer}
        timer.start()

    def _submit(self, full: str, offset: int, size: int) -> None:
        try:
            self._pool.submit(self._warm, full, offset, size)
        except RuntimeError:
            pass  # closed meanwhile

    def _allow(self, wanted: int) -> int:
        """How much of `wanted` bytes of reads this minute's budget still allows (and spend it)."""
        with self._lock:
            now = time.monotonic()
            if now - self._window >= 60.0:
                self._window, self._spent = now, 0
            allowed = max(0, min(wanted, self.budget - self._spent))
            self._spent += allowed
            return allowed

    def _warm(self, full: str, offset: int, size: int) -> None:
        """Ask for what is missing of the next STEP, then queue the rest behind the blobs
        waiting meanwhile."""
        try:
            fd = os.open(full, os.O_RDONLY)
        except OSError:
            return  # deleted meanwhile
        try:
            for start, end in pagecache.missing(fd, offset, min(self.STEP, size - offset)):
                allowed = self._allow(end - start)
                if allowed:
                    pagecache.read_ahead(fd, start, allowed)
                if allowed < end - start:
                    return  # this minute's budget is spent
        except OSError:
            return  # only a hint
        finally:
            os.close(fd)
        if offset + self.STEP < size:
            self._submit(full, offset + self.STEP, size)

    def close(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        self._pool.shutdown(wait=False)


def default_prewarm_budget() -> int:
    """An eighth of the memory this process may use (its cgroup's limit, else the host's), at
    most 4 GiB, a minute."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return min(total // 8, 4 << 30)


class FilesystemWriter(FileWriter):
    def __init__(self, driver: "FilesystemDriver", full: str, fd: int, private: bool) -> None:
        super().__init__()
        self._driver, self._full, self._fd, self._private = driver, full, fd, private
        self.size = os.fstat(fd).st_size
        self._unflushed = self.size  # where writeback has not been started yet
        # Pages before here are dropped from the cache (or were, by an earlier writer: an upload
        # sent as many Content-Range PATCHes is one stream across writers).
        self._cached_from = max(0, self.size - CACHE_BEHIND)
        # Bulk data goes past the page cache where the filesystem allows (directio.py); else
        # through it, with the writeback and drop-behind below.
        self._direct: DirectAppender | None = None
        self._direct_tried = not driver.direct_io
        self._admitted = 0  # bytes of the driver's staging budget this writer holds

    def _write(self, chunks: Sequence[bytes]) -> None:
        _write_all(self._fd, chunks)
        self.size += sum(map(len, chunks))
        if _sync_file_range is not None and self.size - self._unflushed >= WRITEBACK_STEP:
            _sync_file_range(self._fd, self._unflushed, self.size - self._unflushed, SYNC_FILE_RANGE_WRITE)
            self._unflushed = self.size
            self._drop_behind()

    def _drop_behind(self) -> None:
        """Keep a large upload from filling the page cache: what lies CACHE_BEHIND before the
        end is written by now (or soon: wait for it) and its pages are dropped. A 10 GiB layer
        would otherwise evict everything else the host caches, and the kernel's reclaim of it
        costs more CPU than the upload (4 GiB pushes here: 1.8-2.9 CPU-s per GiB instead of 1.2).
        The last CACHE_BEHIND stays cached; data is durable only at commit, as before."""
        end = self._unflushed - CACHE_BEHIND
        if end - self._cached_from < WRITEBACK_STEP or not _CAN_DROP:
            return
        _sync_file_range(self._fd, self._cached_from, end - self._cached_from,
                         SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
        os.posix_fadvise(self._fd, self._cached_from, end - self._cached_from, os.POSIX_FADV_DONTNEED)
        self._cached_from = end

    async def write(self, chunks: Sequence[bytes]) -> None:
        self._end_direct()
        self._write(chunks)  # small: cheaper than a thread handoff

    def _appender(self) -> DirectAppender | None:
        if not self._direct_tried:
            self._direct_tried = True
            try:
                self._direct = DirectAppender(self._fd, self.size)
            except OSError:  # no direct I/O here (some FUSE and network filesystems)
                pass
        return self._direct

    def stage(self, piece: bytes) -> None:
        direct = self._appender()
        if direct is None:
            super().stage(piece)
            return
        direct.stage(piece)
        self.size += len(piece)

    def stage_space(self) -> memoryview | None:
        direct = self._appender()
        return None if direct is None else direct.space()

    def staged(self, nbytes: int) -> None:
        assert self._direct is not None
        self._direct.filled(nbytes)
        self.size += nbytes

    def take_staged(self) -> tuple[Sequence[bytes | memoryview], Sequence[Any]]:
        return super().take_staged() if self._direct is None else self._direct.take()

    def write_from_thread(self, staged: Sequence[Any], loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._direct is None:
                self._write(staged)
            else:
                self._direct.write(staged)
        finally:  # before the pipeline counts these bytes written (also on the loop, after this)
            loop.call_soon_threadsafe(self._give, sum(map(len, staged)))

    async def admit(self, nbytes: int) -> None:
        await self._driver.staging.take(nbytes)
        self._admitted += nbytes

    def _give(self, nbytes: int) -> None:
        """On the event loop: `nbytes` admitted are out of our hands (the last partial block of
        a stream is written, and given back, at its end)."""
        nbytes = min(nbytes, self._admitted)
        self._admitted -= nbytes
        self._driver.staging.give(nbytes)

    async def release_staging(self) -> None:
        self._end_direct()
        self._direct_tried = not self._driver.direct_io  # direct again with the next piece
        self._give(self._admitted)

    def _end_direct(self) -> None:
        if self._direct is not None:
            direct, self._direct = self._direct, None
            direct.flush()

    async def commit(self, dest: str, size: int, readonly: bool = False) -> None:
        await self._driver._run(self._publish, self._driver._full(dest), size, readonly)
        await self.close()

    def _publish(self, dest_full: str, size: int, readonly: bool) -> None:
        """Publish this writer's file as `dest_full` if it is still the file at our name and
        holds exactly `size` bytes: a file someone else appended to, truncated or replaced is
        never published."""
        self._end_direct()
        mine = os.fstat(self._fd)
        try:
            named = os.stat(self._full)
        except FileNotFoundError:
            raise CommitMismatch(f"{self._full} was removed while being written") from None
        if not _same_file(mine, named):
            raise CommitMismatch(f"{self._full} was replaced while being written")
        if mine.st_size != size:
            raise CommitMismatch(f"holds {mine.st_size} bytes, {size} were verified")
        os.fsync(self._fd)
        if readonly:  # content addressed: no one may open it for writing again
            os.fchmod(self._fd, 0o444)
        _replace_into(self._full, dest_full)
        _fsync_dir(os.path.dirname(dest_full))
        self._full = dest_full
        self._private = False
        if readonly and self._driver.prewarm is not None:  # uploads go past the cache
            self._driver.prewarm.schedule(dest_full, size)

    async def cancel(self) -> None:
        await self.close()
        if self._private:  # an upload's data stays for its session to decide
            try:
                os.unlink(self._full)
            except FileNotFoundError:
                pass

    async def close(self) -> None:
        if self._fd >= 0:
            try:
                self._end_direct()  # the last partial block
            finally:
                fd, self._fd = self._fd, -1
                os.close(fd)
                self._give(self._admitted)


class FilesystemDriver(StorageDriver):
    name = "filesystem"

    def __init__(self, rootdirectory: str, maxthreads: int = 100,
                 direct_io: bool | None = None, prewarm: int | None = None) -> None:
        """`direct_io`: write uploads with O_DIRECT; None chooses by the filesystem's type.
        `prewarm`: bytes a minute of blobs just committed read back into the page cache
        (Prewarmer); None for the default budget, 0 for none."""
        self.root = os.path.abspath(rootdirectory)
        self._temp = os.path.join(self.root, PRIVATE, "tmp")
        os.makedirs(self._temp, exist_ok=True)
        self.direct_io = direct_io_suits(self.root) if direct_io is None else direct_io
        self._pool = ThreadPoolExecutor(max_workers=max(4, maxthreads), thread_name_prefix="fs")
        self._local = _LocalLocks()
        self.staging = ByteBudget(STAGING_BUDGET)
        budget = default_prewarm_budget() if prewarm is None else prewarm
        self.prewarm = Prewarmer(budget) if budget > 0 and self.direct_io and _CAN_DROP else None

    def _full(self, path: str) -> str:
        check_path(path)
        return self.root + path.rstrip("/") if path != "/" else self.root

    def _temp_name(self) -> str:
        return os.path.join(self._temp, uuid.uuid4().hex)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        # Never abandoned: the caller's cleanup may close the descriptor or writer fn uses.
        return await to_the_end(asyncio.get_running_loop().run_in_executor(self._pool, fn, *args))

    def local_path(self, path: str) -> str | None:
        return self._full(path)

    # -- reading ------------------------------------------------------------------------------

    async def get_content(self, path: str) -> bytes:
        full = self._full(path)
        try:
            with open(full, "rb") as f:  # small files: a thread handoff costs more than the read
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise PathNotFound(path) from None

    async def reader(self, path: str, offset: int = 0, length: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        full = self._full(path)
        try:
            fd = os.open(full, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        try:
            remaining = length if length is not None else os.fstat(fd).st_size - offset
            while remaining > 0:
                data = await self._run(os.pread, fd, min(chunk_size, remaining), offset)
                if not data:
                    break
                offset += len(data)
                remaining -= len(data)
                yield data
        finally:
            os.close(fd)

    async def stat(self, path: str) -> FileInfo:
        try:
            st = os.stat(self._full(path))
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        # Moved into place counts as written: rename(2) updates ctime, not mtime.
        return FileInfo(path, st.st_size, max(st.st_mtime, st.st_ctime), stat_mod.S_ISDIR(st.st_mode))

    async def list(self, path: str) -> list[str]:
        return await self._run(self._list_sync, path)

    async def list_many(self, paths: Sequence[str]) -> dict[str, list[str] | None]:
        # Some directories per thread hop: warm, the hop is what a listing costs; cold, the disk
        # reads several at once faster. A walk of 10,000 repositories, cold/warm: one directory
        # a hop 1.8-2.3/1.2 s; 16 a hop 0.9-1.1/0.5-0.6; 32 1.0-1.1/0.3-0.4; 128 1.7/0.25.
        paths = list(paths)
        batches = await asyncio.gather(*(self._run(self._list_many_sync, paths[i:i + LIST_PER_HOP])
                                         for i in range(0, len(paths), LIST_PER_HOP)))
        return {path: children for batch in batches for path, children in batch.items()}

    def _list_many_sync(self, paths: list[str]) -> dict[str, list[str] | None]:
        out: dict[str, list[str] | None] = {}
        for path in paths:
            try:
                out[path] = self._list_sync(path)
            except PathNotFound:
                out[path] = None
        return out

    def _list_sync(self, path: str) -> list[str]:
        try:
            names = os.listdir(self._full(path))
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        base = path.rstrip("/")
        return [f"{base}/{n}" for n in names if not n.startswith(".")]  # dot names: ours

    # -- writing ------------------------------------------------------------------------------

    async def put_content(self, path: str, data: bytes, durable: bool = True,
                          exclusive: bool = False) -> None:
        await self._run(self._put_sync, self._full(path), data, durable, exclusive, path)

    def _put_sync(self, full: str, data: bytes, durable: bool, exclusive: bool, path: str) -> None:
        tmp = self._temp_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, [data])
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                _link_into(tmp, full, path)
                os.unlink(tmp)
            else:
                _replace_into(tmp, full)
        except BaseException:
            try:
                os.unlink(tmp)  # a full disk must not leave half an object behind
            except FileNotFoundError:
                pass
            raise

    async def create(self) -> FileWriter:
        path = self._temp_name()
        return FilesystemWriter(self, path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), True)

    async def append(self, path: str, readable: bool = False) -> FileWriter:
        full = self._full(path)
        try:
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        return FilesystemWriter(self, full, fd, False)

    async def move(self, source: str, dest: str) -> None:
        await self._run(self._move_sync, self._full(source), self._full(dest), source)

    async def touch(self, path: str) -> None:
        try:
            os.utime(self._full(path))  # a syscall: cheaper here than a thread handoff
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None

    @staticmethod
    def _move_sync(src: str, dst: str, source: str) -> None:
        try:
            _replace_into(src, dst)
        except FileNotFoundError:
            if not os.path.lexists(src):
                raise PathNotFound(source) from None
            raise
        _fsync_dir(os.path.dirname(dst))

    async def delete(self, path: str) -> None:
        await self._run(self._delete_sync, self._full(path), path)

    def _delete_sync(self, full: str, path: str) -> None:
        try:
            st = os.lstat(full)
            if not stat_mod.S_ISDIR(st.st_mode):
                os.unlink(full)
                return
            try:
                os.rmdir(full)  # the common case after a commit moved the data out: empty
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # Out of sight first, so readers never see a half-deleted tree (and what a crash
            # leaves of it is a temporary, purged later).
            doomed = self._temp_name()
            try:
                os.rename(full, doomed)
            except OSError as e:
                if e.errno != errno.EXDEV:  # the tree is on another mount: remove it where it is
                    raise
                doomed = full
            _remove_tree(doomed)
        except FileNotFoundError:
            raise PathNotFound(path) from None
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise PathNotFound(path) from None
            raise

    # -- ownership ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncIterator[None]:
        full = self._full(path)
        async with AsyncExitStack() as stack:
            deadline = asyncio.get_running_loop().time() + wait
            if not shared:  # waiters in this process queue here, in order, instead of polling
                await stack.enter_async_context(self._local.held(full, wait, path))
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            await stack.enter_async_context(self._flocked(full, remaining, shared, path))
            yield

    @asynccontextmanager
    async def _flocked(self, full: str, wait: float, shared: bool, path: str) -> AsyncIterator[None]:
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise PathNotFound(path) from None
        try:
            await _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait, path)
            # The owner we waited for may have removed (or replaced) the object: then it is
            # gone for us too.
            try:
                named = os.stat(full)
            except (FileNotFoundError, NotADirectoryError):
                raise PathNotFound(path) from None
            if not _same_file(named, os.fstat(fd)):
                raise PathNotFound(path)
            yield
        finally:
            os.close(fd)  # also drops the flock

    # -- housekeeping -------------------------------------------------------------------------

    async def purge_temporaries(self, older_than: float) -> int:
        return await self._run(self._purge_sync, older_than)

    def _purge_sync(self, older_than: float) -> int:
        removed = 0
        now = time.time()
        os.makedirs(self._temp, exist_ok=True)
        with os.scandir(self._temp) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if now - max(st.st_mtime, st.st_ctime) < older_than:
                        continue  # being written, or a tree being deleted right now
                    if entry.is_dir(follow_symlinks=False):
                        _remove_tree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    continue
        return removed + self._purge_legacy(now - older_than)

    def _purge_legacy(self, cutoff: float) -> int:
        """Once per data directory: temporaries an earlier regserve left beside content."""
        marker = os.path.join(self.root, PRIVATE, "legacy-temporaries-purged")
        if os.path.exists(marker):
            return 0
        removed = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != PRIVATE]
            for name in filenames:
                if LEGACY_TEMP.fullmatch(name):
                    full = os.path.join(dirpath, name)
                    try:
                        if os.lstat(full).st_mtime < cutoff:
                            os.unlink(full)
                            removed += 1
                    except FileNotFoundError:
                        continue
        with open(marker, "w") as f:
            f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        return removed

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.prewarm is not None:
            self.prewarm.close()


class _LocalLocks:
    """An asyncio lock per path while anyone in this process holds or waits for it: they queue
    in order, and only the one at the head polls flock(2), which other processes hold."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def held(self, key: str, wait: float, path: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            if wait <= 0 and lock.locked():
                raise Busy(path)
            try:
                await asyncio.wait_for(lock.acquire(), wait if 0 < wait < 1e9 else None)
            except (TimeoutError, asyncio.TimeoutError):
                raise Busy(path) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


async def _flock(fd: int, kind: int, wait: float, path: str) -> None:
    """flock(2) without holding a thread: try, and back off on the event loop while the
    present owner holds it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    delay = 0.002
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Busy(path) from None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
