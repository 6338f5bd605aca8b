"""A pull-through cache (`proxy.remoteurl`): what is not here is fetched from the upstream, kept,
and served; pushes are refused.

**One upstream fetch per blob, streamed to every client.** A blob missing here is fetched into
an upload session of its repository whose id names the digest (`fetch-<alg>-<hex>`), so every
worker and replica on the storage finds the same one. Whoever owns the session's `fetcher`
object (`driver.lock`, without waiting) downloads; every request for the blob, the fetcher's
own included, streams the session's data as it grows, then the published blob. The download is
hashed as it arrives (the upload pipeline's), written in rounds of ROUND_BYTES (each one
visible to readers on every driver: on S3 a round is a published segment), and published only
when its digest verifies: the last bytes of every download wait for that, so a mismatch (which
removes the session) reaches no client whole; each download is cut short. A cut upstream
connection is resumed with a Range request from the bytes stored; a fetcher that dies (kill -9)
lets go of `fetcher`, and the next reader that sees no progress takes over, from there.

**Manifests.** By digest: immutable, fetched once. By tag: revalidated with a HEAD to the
upstream on every pull (cheap, and not counted by Docker Hub's rate limit); when the upstream
cannot be reached the cached tag is served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
from yarl import URL

from .. import metrics
from ..errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    UpstreamFailed,
)
from ..reference import TAG_RE, Digest, is_digest, parse_digest
from ..registry import Registry, Repository, paths
from ..registry.blobs import BlobInfo
from ..registry.manifests import MAX_MANIFEST_BYTES, compute_digest
from ..registry.uploads import ChunkRange, UploadSession
from ..storage import AlreadyExists, Busy, PathNotFound
from .upstream import MANIFEST_TYPES, Upstream, UpstreamDenied, UpstreamUnavailable

log = logging.getLogger("regserve.proxy")
ROUND_BYTES = 64 << 20     # a fetch publishes what it has at least this often (S3: one segment)
READ_CHUNK = 1 << 20
STALLED = 2.0              # a reader that sees no progress this long tries to take the fetch over
                           # (a try costs one lock attempt: Busy while the fetcher lives)
GIVE_UP = 60.0             # and gives up after this long
RETRIES = 5                # upstream failures in a row before a fetch stops (resumed by the next reader)
JOIN_WAIT = 5.0             # a request joining a fetch waits this long for its opener to say the size
TAG_PAGES = 100            # pages of an upstream's tags list followed at most
SIZE_NAME = "size"         # the fetch session's object holding the blob's size, once the upstream said


def fetch_id(d: Digest) -> str:
    return f"fetch-{d.algorithm}-{d.hex}"


class FetchFailed(Exception):
    """The blob's fetch ended without publishing it (upstream refused, digest mismatch)."""


@dataclass
class Growing:
    """A blob being fetched: its size, and where its bytes land."""
    digest: Digest
    size: int
    session: UploadSession


class PullThrough:
    def __init__(self, registry: Registry, upstream: Upstream) -> None:
        self.registry, self.upstream = registry, upstream
        self.driver = registry.driver
        self._fetches: dict[tuple[str, Digest], asyncio.Task[None]] = {}
        self._tried: dict[tuple[str, Digest], float] = {}  # when a reader last tried to take a fetch over

    async def close(self) -> None:
        for task in list(self._fetches.values()):
            task.cancel()
        await asyncio.gather(*self._fetches.values(), return_exceptions=True)
        await self.upstream.close()

    # -- manifests ------------------------------------------------------------------------------

    async def manifest(self, repo: Repository, reference: str) -> tuple[Digest, bytes, str]:
        if is_digest(reference):
            try:
                found = await repo.manifests.get(reference)
                metrics.proxied("manifest", "hit")
                return found
            except ManifestUnknown:
                pass
            try:
                d = parse_digest(reference)
            except RegistryError:  # malformed, or an algorithm not kept here: nothing to ask for
                raise ManifestUnknown({"reference": reference}) from None
            return await self._fetch_manifest(repo, d, None)
        if not TAG_RE.fullmatch(reference):  # what no tag can be is never sent upstream
            raise ManifestUnknown({"reference": reference})
        try:
            async with self.upstream.request("HEAD", f"/v2/{repo.name}/manifests/{reference}", repo.name,
                                             {"Accept": MANIFEST_TYPES}) as r:
                status, current = r.status, r.headers.get("Docker-Content-Digest")
        except (UpstreamUnavailable, UpstreamDenied) as e:
            log.warning("upstream: %s; serving %s:%s from the cache", e, repo.name, reference)
            try:
                found = await repo.manifests.get(reference)
            except ManifestUnknown:
                if isinstance(e, UpstreamDenied):
                    raise
                raise _unreachable(e) from None
            metrics.proxied("manifest", "hit")
            return found
        if status == 404:
            raise ManifestUnknown({"reference": reference})
        if status != 200:
            raise UpstreamFailed({"status": status})
        if current and is_digest(current):
            try:
                found = await repo.manifests.get(reference)
                if str(found[0]) == current:
                    metrics.proxied("manifest", "hit")
                    return found
            except ManifestUnknown:
                pass
            return await self._fetch_manifest(repo, parse_digest(current), reference)
        return await self._fetch_manifest(repo, None, reference)

    async def _fetch_manifest(self, repo: Repository, d: Digest | None, tag: str | None) -> tuple[Digest, bytes, str]:
        metrics.proxied("manifest", "miss")
        reference = str(d) if d is not None else str(tag)
        try:
            async with self.upstream.request("GET", f"/v2/{repo.name}/manifests/{reference}", repo.name,
                                             {"Accept": MANIFEST_TYPES}) as r:
                if r.status == 404:
                    raise ManifestUnknown({"reference": reference})
                if r.status != 200:
                    raise UpstreamFailed({"status": r.status})
                payload = await _read_at_most(r, MAX_MANIFEST_BYTES + 1)
                content_type = r.headers.get("Content-Type")
                named = r.headers.get("Docker-Content-Digest")
        except (UpstreamUnavailable, aiohttp.ClientError) as e:
            raise _unreachable(e) from None
        except UpstreamDenied as e:
            log.warning("upstream: %s", e)
            raise ManifestUnknown({"reference": reference}) from None
        metrics.upstream_bytes(len(payload))
        if d is None and named and is_digest(named):
            d = parse_digest(named)
        actual = compute_digest(payload, d.algorithm if d is not None else "sha256")
        if d is not None and actual != d:
            log.error("upstream sent %s for %s:%s: not caching it", actual, repo.name, reference)
            raise UpstreamFailed({"reason": "the upstream's manifest does not match its digest"})
        try:
            m = await repo.manifests.keep(payload, content_type, actual, tag)
        except ManifestInvalid as e:  # schema1, say, or more than a manifest may weigh
            log.error("the upstream's manifest %s:%s cannot be kept: %s", repo.name, reference, e.message)
            raise UpstreamFailed({"reason": f"the upstream's manifest cannot be kept: {e.message}"}) from None
        return m.digest, payload, m.media_type

    async def tags(self, repo: Repository) -> list[str]:
        """The upstream's tags of the repository (all of them, for the caller to page), or the
        cached ones when the upstream cannot be reached."""
        found: list[str] = []
        path: str | None = f"/v2/{repo.name}/tags/list"
        try:
            for _ in range(TAG_PAGES):  # the upstream's pages (GHCR, Harbor: `n` a page, a Link on)
                async with self.upstream.request("GET", str(path), repo.name) as r:
                    if r.status == 404:
                        raise NameUnknown({"name": repo.name})
                    doc = await r.json(content_type=None) if r.status == 200 else None
                    tags = doc.get("tags") if isinstance(doc, dict) else None
                    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                        log.warning("upstream answered the tags of %s with %d", repo.name, r.status)
                        return await repo.tags.all()
                    found += tags
                    path = _next_page(r.headers.get("Link"), repo.name)
                if path is None:
                    return sorted(set(found))
            log.warning("the upstream's tags of %s go on past %d pages: listing those", repo.name, TAG_PAGES)
            return sorted(set(found))
        except (UpstreamUnavailable, UpstreamDenied, aiohttp.ClientError, ValueError) as e:
            log.warning("upstream: %s; listing the cached tags of %s", e, repo.name)
        return await repo.tags.all()

    # -- blobs ----------------------------------------------------------------------------------

    async def blob(self, repo: Repository, d: Digest, head: bool = False) -> BlobInfo | Growing | int:
        """The blob here, or being fetched; for `head`, its size may come from the upstream
        alone (an int: nothing is fetched for a HEAD, as distribution's cache does)."""
        try:
            info = await repo.blobs.stat(d)
            metrics.proxied("blob", "hit")
            return info
        except BlobUnknown:
            pass
        session = UploadSession(repo.uploads, fetch_id(d))
        size = await self._recorded_size(session)
        result = "joined"  # a fetch under way
        if size is None:
            result = "miss"
            size = await self._upstream_size(repo, d)  # 404 and 502 come before anything is made
            if head:
                return size
            if await self.registry.blob_store.exists(d):  # another repository fetched it
                async with self.registry.blob_store.referencing():
                    await repo.blobs.link(d)
                metrics.proxied("blob", "hit")
                return await repo.blobs.stat(d)
            try:
                await self._open(session, size)
            except BlobUploadUnknown:  # a fetch under way ended just now
                return await repo.blobs.stat(d)
        metrics.proxied("blob", result)
        self._ensure_fetcher(repo, d, session)
        return Growing(d, size, session)

    async def _upstream_size(self, repo: Repository, d: Digest) -> int:
        try:
            async with self.upstream.request("HEAD", f"/v2/{repo.name}/blobs/{d}", repo.name) as r:
                if r.status == 200 and r.content_length is not None:
                    return r.content_length
                if r.status == 404:
                    raise BlobUnknown({"digest": str(d)})
                raise UpstreamFailed({"status": r.status})
        except UpstreamUnavailable as e:
            raise _unreachable(e) from None
        except UpstreamDenied as e:
            log.warning("upstream: %s", e)
            raise BlobUnknown({"digest": str(d)}) from None

    async def _open(self, session: UploadSession, size: int) -> None:
        """Open the fetch session, or join it: its size is the upstream's word, written by an
        owner of the session, so never into one that ended (BLOB_UPLOAD_UNKNOWN then)."""
        try:
            await session.uploads.create(session.id)
        except AlreadyExists:  # joined: its opener writes the size just after, without us
            deadline = time.monotonic() + JOIN_WAIT
            while time.monotonic() < deadline:
                if await self._recorded_size(session) is not None:
                    return
                if not await session.exists():
                    raise BlobUploadUnknown({"upload": session.id})
                await asyncio.sleep(self._poll(session))
        try:  # the opener, or one that waited for a size that never came (its opener died)
            await session.add_object(SIZE_NAME, str(size).encode())
        except BlobUploadInvalid:  # its owner held on for LOCK_WAIT_SECONDS
            raise TooManyRequests({"digest": str(session.id)}, "the blob is being fetched; retry",
                                  headers={"Retry-After": "1"}) from None

    async def _recorded_size(self, session: UploadSession) -> int | None:
        recorded = await session.read_object(SIZE_NAME)
        return int(recorded) if recorded is not None and recorded.isdigit() else None

    def _poll(self, session: UploadSession) -> float:
        """How often a reader looks for new bytes: a local file costs a stat, an object store a
        listing."""
        return 0.02 if self.driver.local_path(session.data_path) is not None else 0.2

    def _ensure_fetcher(self, repo: Repository, d: Digest, session: UploadSession) -> None:
        """Start a fetch in this process unless one runs here already; it only fetches if it can
        own the session's `fetcher` at once (no other worker or replica does)."""
        key = (repo.name, d)
        if key in self._fetches:
            return
        task = asyncio.get_running_loop().create_task(self._fetcher(repo, d, session))
        self._fetches[key] = task
        task.add_done_callback(lambda _: self._fetches.pop(key, None))

    async def _fetcher(self, repo: Repository, d: Digest, session: UploadSession) -> None:
        owner = session.object_path("fetcher")
        try:
            try:
                await self.driver.stat(owner)
            except PathNotFound:  # made by an owner of the session: never in one that ended
                await session.add_object("fetcher")
            async with self.driver.lock(owner, 0):
                if not await session.exists():
                    return  # finished by the owner before us
                if await self.registry.blob_store.exists(d) and await repo.blobs.is_linked(d):
                    await session.cancel()  # a session opened late, for a blob published meanwhile
                    return
                await self._fetch(repo, d, session)
        except (Busy, PathNotFound, BlobUploadUnknown, BlobUploadInvalid):
            return  # another process fetches it, or the session ended
        except Exception:  # noqa: BLE001 - a background task: its readers see the session end or stall
            log.exception("fetching %s@%s from the upstream failed", repo.name, d)

    async def _fetch(self, repo: Repository, d: Digest, session: UploadSession) -> None:
        failures = 0
        while True:
            offset = await session.size()
            try:
                total = await self._download(repo, d, session, offset)
            except (UpstreamUnavailable, aiohttp.ClientError, asyncio.TimeoutError) as e:
                failures = 1 if await session.size() > offset else failures + 1  # progress: a new count
                if failures > RETRIES:
                    log.error("fetching %s@%s: %s; giving up after %d attempts", repo.name, d, e, RETRIES)
                    return  # the session stays: the next reader resumes it
                log.warning("fetching %s@%s: %s; resuming from byte %d", repo.name, d, e, await session.size())
                await asyncio.sleep(min(0.2 * 2 ** failures, 5.0))
                continue
            except (UpstreamDenied, FetchFailed) as e:
                log.error("fetching %s@%s: %s", repo.name, d, e)
                await session.cancel()
                return
            if await session.size() == total:
                break
        try:
            await session.finish(d, None, None, repo.blobs)
            log.info("fetched %s@%s (%d bytes) from the upstream", repo.name, d, total)
        except DigestInvalid:  # finish removed the session: its readers are cut off
            log.error("the upstream's %s@%s does not match its digest: not kept", repo.name, d)

    async def _download(self, repo: Repository, d: Digest, session: UploadSession, offset: int) -> int:
        """Append the upstream's bytes from `offset` on, in rounds; returns the blob's size."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self.upstream.request("GET", f"/v2/{repo.name}/blobs/{d}", repo.name, headers) as r:
            if r.status == 404:
                raise FetchFailed("the upstream does not have it")
            if r.status == 416 and offset:  # everything is here already
                total = await self._recorded_size(session)
                if total is not None:
                    return total
            if r.status not in (200, 206):
                raise UpstreamUnavailable(f"upstream answered {r.status}")
            skip = offset if r.status == 200 else 0  # the upstream ignored Range: from the start
            total = _total(r)
            if total is None:
                raise FetchFailed("the upstream did not say the blob's size")
            recorded = await self._recorded_size(session)
            if recorded != total:
                raise FetchFailed(f"the upstream's size changed from {recorded} to {total}")
            chunks = _skipping(r.content.iter_chunked(READ_CHUNK), skip)
            position = offset
            while position < total:
                body = _round(chunks, ROUND_BYTES)
                position = await session.append(body, ChunkRange(position, total - 1), readable=True)
                if body.ended:  # type: ignore[attr-defined]
                    break
            return total

    def reader(self, blob: Growing, start: int, count: int) -> AsyncIterator[bytes]:
        """The blob's bytes [start, start+count) as the fetch writes them, then from the blob."""
        return self._follow(blob, start, count)

    def spans(self, blob: Growing, start: int, count: int) -> AsyncIterator[tuple[int, int, int]] | None:
        """reader() as (descriptor, offset, length) spans of a local file, to send with
        sendfile; None where the storage has no local files."""
        path = self.driver.local_path(blob.session.data_path)
        return None if path is None else self._local_spans(blob, start, count, path)

    async def _follow(self, blob: Growing, start: int, count: int) -> AsyncIterator[bytes]:
        session, driver = blob.session, self.driver
        position, end = start, start + count
        progress = time.monotonic()
        while position < end:
            try:
                available = (await driver.stat(session.data_path)).size
            except PathNotFound:
                available = 0
            if available >= blob.size:  # all there: the rest comes from the blob, once verified
                await self._verified(blob)
            elif available <= position:
                if not await self._no_progress(blob, progress):
                    continue
            else:
                try:
                    async for chunk in driver.reader(session.data_path, position, min(available, end) - position):
                        position += len(chunk)
                        yield chunk
                except PathNotFound:
                    continue  # published just now: the blob has it
                progress = time.monotonic()
                continue
            info = await self.registry.blob_store.stat(blob.digest)  # published
            async for chunk in self.registry.blob_store.reader(info, position, end - position):
                yield chunk
            return

    async def _local_spans(self, blob: Growing, start: int, count: int,
                           path: str) -> AsyncIterator[tuple[int, int, int]]:
        """_follow() on the filesystem: the session's data file is opened once and read as it
        grows; publishing renames that very file into the blob store, so the descriptor reads
        on to the end (it is reopened by its new name only if another copy was published)."""
        fd = _open(path)
        position, end = start, start + count
        progress = time.monotonic()
        verified = False
        try:
            while position < end:
                size = os.fstat(fd).st_size if fd is not None else 0
                if size >= blob.size and not verified:  # all there: the rest goes once it is verified
                    await self._verified(blob)
                    verified = True
                if size > position:
                    length = min(size, end) - position
                    yield fd, position, length  # type: ignore[misc]
                    position += length
                    progress = time.monotonic()
                    continue
                if await self._no_progress(blob, progress):
                    published = self.driver.local_path(paths.blob_data(blob.digest))
                    if fd is not None:
                        os.close(fd)
                    fd = _open(published) if published else None
                    if fd is None or os.fstat(fd).st_size < end:
                        raise FetchFailed(f"{blob.digest} was published and is gone again")
                elif fd is None:
                    fd = _open(path)  # the first bytes are on their way
        finally:
            if fd is not None:
                os.close(fd)

    async def _verified(self, blob: Growing) -> None:
        """Wait until the fetched bytes are published under their digest: the last of them are
        sent only then, so a blob that fails its digest never reaches a client whole (its
        download is cut short, FetchFailed)."""
        since = time.monotonic()
        while not await self._no_progress(blob, since):
            pass

    async def _no_progress(self, blob: Growing, since: float) -> bool:
        """Nothing new to read: True if the blob was published meanwhile. FetchFailed if the
        fetch ended without it, or made no progress for GIVE_UP; a reader that saw none for
        STALLED tries to take the fetch over (its fetcher died). Else it waits a poll."""
        store = self.registry.blob_store
        if await store.exists(blob.digest):
            return True
        if not await blob.session.exists():
            if await store.exists(blob.digest):  # published between the two looks
                return True
            raise FetchFailed(f"the fetch of {blob.digest} ended without the blob")
        idle = time.monotonic() - since
        if idle > GIVE_UP:
            raise FetchFailed(f"the fetch of {blob.digest} made no progress for {GIVE_UP:.0f} s")
        key = (blob.session.name, blob.digest)
        if idle > STALLED and time.monotonic() - self._tried.get(key, 0.0) > STALLED:
            self._tried[key] = time.monotonic()  # a try every STALLED at most, per process
            while len(self._tried) > 1000:
                del self._tried[next(iter(self._tried))]
            self._ensure_fetcher(self.registry.repository(blob.session.name), blob.digest, blob.session)
        await asyncio.sleep(self._poll(blob.session))
        return False


async def _read_at_most(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` bytes and more: what a manifest must stay below."""
    parts, total = [], 0
    async for chunk in r.content.iter_any():
        parts.append(chunk)
        total += len(chunk)
        if total >= limit:
            break
    return b"".join(parts)


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _unreachable(e: Exception) -> UpstreamFailed:
    """What a client is told of an upstream failure: that it failed (the upstream's address and
    the error's words go to the log only)."""
    log.warning("upstream: %s", e)
    return UpstreamFailed()


def _next_page(link: str | None, name: str) -> str | None:
    """The path and query of a tags list's next page (`Link: </v2/<name>/tags/list?...>;
    rel="next"`), if it names this repository's list on the same upstream."""
    if not link:
        return None
    m = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', link)
    if not m:
        return None
    target = URL(m.group(1))
    if target.is_absolute() or target.path != f"/v2/{name}/tags/list":
        return None  # elsewhere: not followed, as the credentials would go with it
    return str(target)


def _total(r: aiohttp.ClientResponse) -> int | None:
    if r.status == 206:
        content_range = r.headers.get("Content-Range", "")
        size = content_range.rpartition("/")[2]
        return int(size) if size.isdigit() else None
    return r.content_length


async def _skipping(chunks: AsyncIterator[bytes], skip: int) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if skip:
            if len(chunk) <= skip:
                skip -= len(chunk)
                continue
            chunk, skip = chunk[skip:], 0
        metrics.upstream_bytes(len(chunk))
        yield chunk


class _round:
    """Up to `limit` bytes (whole chunks) of a shared chunk iterator, as an upload body;
    `ended` once the iterator is exhausted."""

    def __init__(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        self.chunks, self.left, self.ended = chunks, limit, False

    def __aiter__(self) -> "_round":
        return self

    async def __anext__(self) -> list[bytes]:
        if self.left <= 0:
            raise StopAsyncIteration
        try:
            chunk = await anext(self.chunks)
        except StopAsyncIteration:
            self.ended = True
            raise
        self.left -= len(chunk)
        return [chunk]
