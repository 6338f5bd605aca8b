"""The layer every driver passes through, for what all of them need once (as distribution's
base.Base wraps its drivers):

* every path is checked against the contract's rules (base.check_path) before a driver sees it,
  so no driver can be handed a path that escapes its root or names its own temporaries;
* every call is timed, and its failures counted, in the metrics
  (regserve_storage_operation_duration_seconds, regserve_storage_errors) when they are enabled.
  "Not found" is an answer, not a failure.

Writers are wrapped too, for their writes and commits; the pipeline's per-piece staging goes
straight to the driver's own writer."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

from .. import metrics
from .base import AlreadyExists, FileInfo, FileWriter, PathNotFound, StorageDriver, check_path

_ANSWERS = (PathNotFound, AlreadyExists)


class _Timed:
    def __init__(self, driver: str, operation: str) -> None:
        self.driver, self.operation = driver, operation

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        failed = error is not None and not isinstance(error, _ANSWERS)
        metrics.storage(self.driver, self.operation, time.perf_counter() - self.start, failed)


class CheckedDriver(StorageDriver):
    def __init__(self, inner: StorageDriver) -> None:
        self.inner = inner
        self.name = inner.name
        self.timestamp_resolution = inner.timestamp_resolution

    def _t(self, operation: str) -> _Timed:
        return _Timed(self.name, operation)

    async def get_content(self, path: str) -> bytes:
        with self._t("get_content"):
            return await self.inner.get_content(check_path(path))

    async def reader(self, path: str, offset: int = 0, length: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        chunks = self.inner.reader(check_path(path), offset, length, chunk_size)
        with self._t("reader"):  # the open and first read
            first = await anext(chunks, None)
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk

    async def stat(self, path: str) -> FileInfo:
        with self._t("stat"):
            return await self.inner.stat(check_path(path))

    async def list(self, path: str) -> list[str]:
        with self._t("list"):
            return await self.inner.list(check_path(path))

    async def list_many(self, paths: Sequence[str]) -> dict[str, list[str] | None]:
        with self._t("list_many"):
            return await self.inner.list_many([check_path(p) for p in paths])

    async def put_content(self, path: str, data: bytes, durable: bool = True, exclusive: bool = False) -> None:
        with self._t("put_content"):
            await self.inner.put_content(check_path(path), data, durable, exclusive)

    async def create(self) -> FileWriter:
        with self._t("create"):
            return _Writer(self.name, await self.inner.create())

    async def append(self, path: str, readable: bool = False) -> FileWriter:
        with self._t("append"):
            return _Writer(self.name, await self.inner.append(check_path(path), readable))

    async def move(self, source: str, dest: str) -> None:
        with self._t("move"):
            await self.inner.move(check_path(source), check_path(dest))

    async def delete(self, path: str) -> None:
        with self._t("delete"):
            await self.inner.delete(check_path(path))

    async def touch(self, path: str) -> None:
        with self._t("touch"):
            await self.inner.touch(check_path(path))

    @asynccontextmanager
    async def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncIterator[None]:
        owned = self.inner.lock(check_path(path), wait, shared)
        with self._t("lock"):
            await owned.__aenter__()
        try:
            yield
        except BaseException as e:
            if not await owned.__aexit__(type(e), e, e.__traceback__):
                raise
        else:
            await owned.__aexit__(None, None, None)

    async def purge_temporaries(self, older_than: float) -> int:
        with self._t("purge_temporaries"):
            return await self.inner.purge_temporaries(older_than)

    def local_path(self, path: str) -> str | None:
        return self.inner.local_path(check_path(path))

    async def redirect_url(self, path: str, expires: float = 1200) -> str | None:
        with self._t("redirect_url"):
            return await self.inner.redirect_url(check_path(path), expires)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # a driver's own extras (prewarm, direct_io, root)
        return getattr(self.inner, name)


class _Writer(FileWriter):
    def __init__(self, driver: str, inner: FileWriter) -> None:
        self._driver, self._inner = driver, inner
        self.stage = inner.stage  # type: ignore[method-assign]  # per piece: no wrapping
        self.stage_space = inner.stage_space  # type: ignore[method-assign]
        self.stages_in_place = inner.stages_in_place  # type: ignore[method-assign]
        self.staged = inner.staged  # type: ignore[method-assign]
        self.take_staged = inner.take_staged  # type: ignore[method-assign]
        self.release_staging = inner.release_staging  # type: ignore[method-assign]
        self.admit = inner.admit  # type: ignore[method-assign]
        self.ready = inner.ready  # type: ignore[method-assign]
        self.ready_now = inner.ready_now  # type: ignore[method-assign]
        self.survives_crash = inner.survives_crash

    @property
    def size(self) -> int:  # type: ignore[override]
        return self._inner.size

    async def write(self, chunks: Sequence[bytes]) -> None:
        with _Timed(self._driver, "write"):
            await self._inner.write(chunks)

    def write_from_thread(self, staged: Sequence[Any], loop: asyncio.AbstractEventLoop) -> None:
        with _Timed(self._driver, "write"):
            self._inner.write_from_thread(staged, loop)

    async def commit(self, dest: str, size: int, readonly: bool = False) -> None:
        with _Timed(self._driver, "commit"):
            await self._inner.commit(check_path(dest), size, readonly)

    async def cancel(self) -> None:
        await self._inner.cancel()

    async def close(self) -> None:
        await self._inner.close()
