"""The S3 driver (`storage.s3`), on aiobotocore, in distribution's layout: the object for path P is
the key `rootdirectory + P` (leading slashes trimmed), so a bucket written by distribution holds
the same keys.

How the contract maps onto an object store:

* An appended object (an upload's data) is a series of **segments** at
  `<key>/.seg/<offset, 20 digits>-<token>`; its size is their sum (two writers appending at
  once, which the caller's lock forbids, show as two segments at one offset: no commit then).
  A writer streams its segment as a multipart upload (its body bytes within a budget, PART_SIZE
  doubling every 1,000 parts so that 10,000 reach far past 5 TiB), so a client cut off loses
  only what was not in a closed segment, and the size says so.
* A writer that closes on a part's end leaves its multipart upload **open**: a record
  `<key>/.open/<offset>-<size>-<token>` (each 20 digits) lists its parts' ETags, and the next
  writer (another PATCH, on any replica) goes on in the same upload. So an upload pushed in
  chunks that are whole parts (64 MiB, say) stays one multipart upload, and its commit is one
  CompleteMultipartUpload and one CopyObject, where joining segments copies every byte again
  (RGW: 4.5 s a GiB). The completion lists the recorded ETags: a part re-sent since by a writer
  that lost its lease fails it (InvalidPart), so a wrong blob is never published. A writer
  that ends mid-part, a read by the owner (hash state rebuilt after a crash), a `readable`
  appender or the commit **seal** the upload into a segment object.
* `commit` publishes one segment with a server-side copy, several with a multipart upload of
  server-side part copies (segments under S3's 5 MiB part minimum are read and sent again).
* `create` is a private object under `<root>/.regserve/tmp/`; a commit of less than a part is a
  single PUT straight to its name, else a server-side copy.
* Ownership (`lock`) is a lease object under `<root>/.regserve/locks/`, created with
  `If-None-Match: *` (one creator wins, on AWS S3 and on Ceph RGW), renewed while held and
  taken over only when expired, by a conditional PUT on its ETag. Shared owners hold a lease
  each; an exclusive owner waits until none is left.
* `touch` writes a small sidecar (`<key>/.touched`) instead of rewriting the object, whose
  LastModified `stat` then reports.

Dot names are this driver's own: the contract forbids them in paths, and listings hide them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Sequence

from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from .base import AlreadyExists, Busy, CommitMismatch, FileInfo, FileWriter, PathNotFound, StorageDriver, check_path
from .budget import ByteBudget

MIN_PART = 5 << 20          # S3's smallest part (but the last)
PART_SIZE = 8 << 20         # a writer's first part size (distribution: 10 MiB); doubles every 1,000 parts
COPY_PART = 1 << 30         # server-side copies of one object move at most this a part
ASSEMBLY_PART = 32 << 20    # the part size joining an upload's segments (a part that spans two is
                            # read and sent again): distribution's multipartcopychunksize
MAX_PARTS = 10_000
COPY_PARALLEL = 8           # parts of one server-side copy in flight
SINGLE_COPY_MAX = 5 << 30   # CopyObject's limit; above it, a multipart copy
PARALLEL_PARTS = 6         # parts of one writer in flight at once
PARTS_PER_SEGMENT = 1000   # then a new segment (multipart upload), with parts twice as large
# Body bytes all writers of a process (driver) hold before S3 has them: staged, in the part being
# filled, or in a part in flight. A writer takes a whole part's worth before it reads the bytes
# that start a part.
BUFFER_BUDGET = 96 << 20
LEASE_SECONDS = 9.0         # a lock's lease, renewed every third of it while held: shorter than a
                            # request's wait for an owner (10 s), so a retry after a crash waits, not fails
_MISSING = ("NoSuchKey", "404", "NotFound", "NoSuchUpload")


def _token(segment_key: str) -> str:
    """What names a segment's multipart upload and its records (`<offset>-<token>`)."""
    return segment_key.rsplit("-", 1)[1]


def _content_md5(request: Any, **_: Any) -> None:
    """Batch deletes carry Content-MD5: S3 once required it, and stricter engines (Swift's s3api,
    MinIO-derived ones) still refuse a DeleteObjects without it (botocore sends a CRC32 only)."""
    body = request.body if isinstance(request.body, bytes) else bytes(request.body or b"")
    request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


async def _both(first: Awaitable[Any], second: Awaitable[Any]) -> tuple[Any, Any]:
    """Two requests at once, both awaited to the end whatever happens to either (no request
    is left running unobserved); the first error is raised."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    return _result(a), _result(b)


def _result(outcome: Any) -> Any:
    """An outcome of gather(return_exceptions=True): its value, or its error raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _missing(e: ClientError) -> bool:
    return _code(e) in _MISSING


class PartBuffers:
    """Part buffers, reused: a part is filled in place (not grown by reallocation, which faulted
    fresh pages in for every part and cost as much CPU as SHA-256) and sent as a view of it (no
    copy in the HTTP client). A buffer comes back once S3 has its part; up to `keep` bytes of
    them wait idle for the next part (the budget's worth: what pushes held at once anyway)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: dict[int, list[bytearray]] = {}  # by size: only sizes handed out (a part
        self._idle_bytes = 0                          # grown in place may be any)

    def get(self, size: int) -> bytearray:
        idle = self._idle.setdefault(size, [])
        if idle:
            self._idle_bytes -= size
            return idle.pop()
        return bytearray(size)

    def put(self, buffer: bytearray) -> None:
        idle = self._idle.get(len(buffer))
        if idle is not None and self._idle_bytes + len(buffer) <= self._keep:
            idle.append(buffer)
            self._idle_bytes += len(buffer)


class S3Driver(StorageDriver):
    name = "s3"
    timestamp_resolution = 1.0  # LastModified is in whole seconds

    def __init__(self, bucket: str, region: str = "us-east-1", regionendpoint: str | None = None,
                 accesskey: str | None = None, secretkey: str | None = None, rootdirectory: str = "",
                 secure: bool = True, skipverify: bool = False, forcepathstyle: bool = True,
                 chunksize: int = PART_SIZE, storageclass: str | None = None, encrypt: bool = False,
                 keyid: str | None = None, sessiontoken: str | None = None,
                 multipartcopychunksize: int | None = None, multipartcopymaxconcurrency: int | None = None,
                 multipartcopythresholdsize: int | None = None) -> None:
        """distribution's storage.s3 keys. Without accesskey and secretkey: the standard AWS
        credential chain (environment, profile, instance role). The multipartcopy* keys, when
        set, shape server-side copies as in distribution; unset, copies take 1 GiB parts, 8 at
        a time, and objects up to 5 GiB go in one CopyObject."""
        self.bucket = bucket
        self.root = rootdirectory.strip("/")
        self._private = (self.root + "/" if self.root else "") + ".regserve"
        self._part = max(MIN_PART, int(chunksize))
        self._copy_part = max(MIN_PART, min(SINGLE_COPY_MAX, int(multipartcopychunksize or COPY_PART)))
        self._assembly_part = max(MIN_PART, min(SINGLE_COPY_MAX, int(multipartcopychunksize or ASSEMBLY_PART)))
        self._copy_parallel = max(1, int(multipartcopymaxconcurrency or COPY_PARALLEL))
        self._copy_threshold = min(SINGLE_COPY_MAX, int(multipartcopythresholdsize or SINGLE_COPY_MAX))
        self.buffers = ByteBudget(max(BUFFER_BUDGET, 2 * self._part))
        self.parts = PartBuffers(self.buffers.limit)
        # What every object written gets: distribution's storageclass and encrypt/keyid.
        self._extra: dict[str, str] = {}
        if storageclass and storageclass != "NONE":
            self._extra["StorageClass"] = storageclass
        if encrypt:
            self._extra["ServerSideEncryption"] = "aws:kms" if keyid else "AES256"
            if keyid:
                self._extra["SSEKMSKeyId"] = keyid
        endpoint = regionendpoint
        if endpoint and "://" not in endpoint:
            endpoint = ("https://" if secure else "http://") + endpoint
        self._client_args: dict[str, Any] = {
            "region_name": region, "endpoint_url": endpoint,
            "aws_access_key_id": accesskey or None, "aws_secret_access_key": secretkey or None,
            "aws_session_token": sessiontoken or None,
            "verify": False if skipverify else None,
            # No SHA-256 of each body for the signature (botocore would compute it on the event
            # loop, over plain HTTP always): uploads are hashed by the registry as they arrive.
            # No parameter validation: it refuses a memoryview as a body, and parts are sent as
            # views of their buffers (the calls here are fixed, not user input).
            "config": BotoConfig(s3={"addressing_style": "path" if forcepathstyle else "auto",
                                     "payload_signing_enabled": False},
                                 parameter_validation=False,
                                 retries={"max_attempts": 5, "mode": "standard"},
                                 request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required",
                                 max_pool_connections=64)}
        self._clients: dict[asyncio.AbstractEventLoop, tuple[Any, Any]] = {}

    async def _s3(self) -> Any:
        """A client for the running loop (aiobotocore clients belong to one)."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            context = get_session().create_client("s3", **self._client_args)
            entry = self._clients[loop] = (context, await context.__aenter__())
            entry[1].meta.events.register("before-sign.s3.DeleteObjects", _content_md5)
        return entry[1]

    def _key(self, path: str) -> str:
        check_path(path)
        return (self.root + path).strip("/") if path != "/" else self.root

    def _prefix(self, path: str) -> str:
        key = self._key(path)
        return key + "/" if key else ""

    # -- reading ------------------------------------------------------------------------------

    async def get_content(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.reader(path, chunk_size=8 << 20)])

    async def reader(self, path: str, offset: int = 0, length: int | None = None,
                     chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        key = self._key(path)
        whole = self._read_range(path, key, offset, length, chunk_size)
        try:
            first = await anext(whole, None)
        except PathNotFound:
            pieces = await self._segments(key)  # an upload's data, being written
            if not pieces:
                raise
        else:
            if first is not None:
                yield first
                async for chunk in whole:
                    yield chunk
            return
        end = sum(s for _, s, _ in pieces) if length is None else offset + length
        for start, size, k in pieces:  # an upload's data, read across its segments
            lo, hi = max(offset, start), min(end, start + size)
            if lo < hi:
                if "/.open/" in k:
                    k = await self._seal(k)
                async for chunk in self._read_range(path, k, lo - start, hi - lo, chunk_size):
                    yield chunk

    async def _read_range(self, path: str, key: str, offset: int, length: int | None,
                          chunk_size: int) -> AsyncIterator[bytes]:
        if length == 0:
            if await self._head(key) is None:
                raise PathNotFound(path)
            return
        s3 = await self._s3()
        extra = {}
        if offset or length is not None:
            extra["Range"] = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        try:
            r = await s3.get_object(Bucket=self.bucket, Key=key, **extra)
        except ClientError as e:
            if _missing(e):
                raise PathNotFound(path) from None
            if _code(e) == "InvalidRange":  # from the very end: nothing to send
                return
            raise
        async with r["Body"] as body:
            while chunk := await body.read(chunk_size):
                yield chunk

    async def _head(self, key: str) -> dict | None:
        s3 = await self._s3()
        try:
            return await s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _missing(e):
                return None
            raise

    async def _listed(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[tuple[str, dict]]:
        """(key, entry) of every object under `prefix`, or ("prefix/", {}) for common prefixes,
        page by page."""
        s3 = await self._s3()
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        async for page in s3.get_paginator("list_objects_v2").paginate(**args):
            for entry in page.get("Contents", ()):
                yield entry["Key"], entry
            for entry in page.get("CommonPrefixes", ()):
                yield entry["Prefix"], {}

    async def _segments(self, key: str) -> list[tuple[int, int, str]]:
        """(offset, size, key) of an appended object's segments, in order: a segment object's
        key, or for an open one (see the module's docstring) its newest record's. A record that
        a newer one of its upload replaced is left over from a crash between two steps. So is
        one of a sealed segment, or it says how much of the object is the segment: what parts
        a killed writer never recorded added is not."""
        sealed: dict[str, tuple[int, int, str]] = {}
        records: dict[str, tuple[int, int, str]] = {}
        async for k, entry in self._listed(key + "/."):
            kind, _, name = k[len(key) + 2:].partition("/")
            if kind == "seg":
                offset, _, token = name.partition("-")
                sealed[token] = (int(offset), int(entry["Size"]), k)
            elif kind == "open":
                offset, size, token = name.split("-", 2)
                if token not in records or int(size) > records[token][1]:
                    records[token] = (int(offset), int(size), k)
        for token, (offset, size, k) in sealed.items():
            if token in records:
                sealed[token] = (offset, min(size, records.pop(token)[1]), k)
        return sorted([*sealed.values(), *records.values()])

    @staticmethod
    def _open_segment(record_key: str) -> tuple[str, str, int]:
        """An open segment's record key, read: the appended object's key, the key its multipart
        upload completes to (the segment object's), and the size it records."""
        key, _, name = record_key.rpartition("/.open/")
        offset, size, token = name.split("-", 2)
        return key, f"{key}/.seg/{offset}-{token}", int(size)

    async def _record(self, record_key: str) -> dict:
        """An open segment's record: its multipart upload, part size and parts' ETags."""
        return json.loads(await self._read_key(record_key))

    async def _seal(self, record_key: str) -> str:
        """Complete an open segment's multipart upload with the parts its record lists, and
        forget its records (unless the object holds more: then they keep its true length); the
        segment object's key."""
        _, target, size = self._open_segment(record_key)
        try:
            record = await self._record(record_key)
        except ClientError as e:
            if not _missing(e) or await self._head(target) is None:
                raise
            return target  # sealed just now by another
        parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(record["etags"])]
        if await self._complete(target, record["upload"], parts, size):
            await self._drop_records(target)  # else they say how much of it is the segment
        return target

    async def _complete(self, target: str, upload: str, parts: list[dict], size: int) -> bool:
        """Complete an upload that several writers added parts to, whose first `size` bytes are
        `parts`: their ETags the stored parts must still have (CommitMismatch if one was re-sent
        since: a writer that lost its lease). Whether the object is exactly those bytes: parts
        stored past them (a writer killed before it recorded them) go in too, since RGW refuses
        a completion that leaves any out, and the caller keeps a record of the true length."""
        s3 = await self._s3()
        try:
            stored = [p async for page in s3.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=target, UploadId=upload) for p in page.get("Parts", ())]
        except ClientError as e:
            head = await self._head(target) if _missing(e) else None
            if head is None:
                raise
            return int(head["ContentLength"]) == size  # completed just now by another
        mine = {p["PartNumber"]: p["ETag"].strip('"') for p in parts}
        have = {p["PartNumber"]: p["ETag"].strip('"') for p in stored}
        if any(have.get(n) != etag for n, etag in mine.items()):
            raise CommitMismatch(f"{target}: a part of its upload changed after it was recorded")
        listed = parts if len(have) == len(mine) else [
            {"PartNumber": n, "ETag": p["ETag"]} for n, p in sorted((p["PartNumber"], p) for p in stored)]
        try:
            await s3.complete_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload,
                                               MultipartUpload={"Parts": listed})
        except ClientError as e:
            if _code(e) == "InvalidPart":
                raise CommitMismatch(f"{target}: a part of its upload changed while it was completed") from None
            raise
        return listed is parts

    async def _past_record(self, target: str, record: dict) -> bool:
        """Whether an open segment's upload holds parts its record does not list."""
        s3 = await self._s3()
        r = await s3.list_parts(Bucket=self.bucket, Key=target, UploadId=record["upload"],
                                PartNumberMarker=len(record["etags"]), MaxParts=1)
        return bool(r.get("Parts"))

    async def _records_of(self, segment_key: str) -> list[str]:
        """The records of the open segment that completes to `segment_key`."""
        key = segment_key.rpartition("/.seg/")[0]
        return [k async for k, _ in self._listed(key + "/.open/") if k.endswith("-" + _token(segment_key))]

    async def _drop_records(self, segment_key: str) -> None:
        await self._delete_keys(await self._records_of(segment_key))

    async def stat(self, path: str) -> FileInfo:
        key = self._key(path)
        head, touched = await _both(self._head(key), self._head(key + "/.touched")) if key else (None, None)
        if head is not None:
            mtime = head["LastModified"].timestamp()
            if touched is not None:
                mtime = max(mtime, touched["LastModified"].timestamp())
            return FileInfo(path, int(head["ContentLength"]), mtime, False)
        segments = await self._segments(key) if key else []
        if segments:
            return FileInfo(path, sum(s for _, s, _ in segments), time.time(), False)
        async for _ in self._listed(self._prefix(path)):
            return FileInfo(path, 0, 0.0, True)
        if path == "/":
            return FileInfo(path, 0, 0.0, True)
        raise PathNotFound(path)

    async def list(self, path: str) -> list[str]:
        prefix = self._prefix(path)
        base = path.rstrip("/")
        children = []
        async for k, _ in self._listed(prefix, "/"):
            name = k[len(prefix):].rstrip("/")
            if name and not name.startswith("."):
                children.append(f"{base}/{name}")
        if not children and path != "/":
            raise PathNotFound(path)
        return children

    async def redirect_url(self, path: str, expires: float = 1200) -> str | None:
        """A presigned GET (signed here, no request to S3): distribution's default for blobs."""
        s3 = await self._s3()
        return await s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._key(path)},
                                               ExpiresIn=int(expires))

    # -- writing ------------------------------------------------------------------------------

    async def put_content(self, path: str, data: bytes, durable: bool = True,
                          exclusive: bool = False) -> None:
        s3 = await self._s3()
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            await s3.put_object(Bucket=self.bucket, Key=self._key(path), Body=data, **extra, **self._extra)
        except ClientError as e:
            if exclusive and _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise AlreadyExists(path) from None
            raise

    async def create(self) -> FileWriter:
        key = f"{self._private}/tmp/{uuid.uuid4().hex}"
        return S3Writer(self, key, key, 0, [], private=True, session=None)

    async def append(self, path: str, readable: bool = False) -> FileWriter:
        key = self._key(path)
        parent = path.rstrip("/").rsplit("/", 1)[0]
        whole, segments = await _both(self._head(key), self._segments(key))
        if whole is not None:  # a whole object: not an upload's
            raise CommitMismatch(f"{path} is a published object, not an upload")
        if not segments and parent:
            try:
                await self.stat(parent)
            except PathNotFound:
                raise PathNotFound(path) from None
        going_on = None  # the record of the open segment the writer goes on in
        for i, (offset, size, k) in enumerate(segments):
            if "/.open/" not in k:
                continue
            if i == len(segments) - 1 and not readable:  # only the last may stay open
                record = await self._record(k)
                if len(record["etags"]) < PARTS_PER_SEGMENT and \
                        not await self._past_record(self._open_segment(k)[1], record):
                    going_on = record
                    continue
            # full, or a writer was killed in it: sealed, and the writer starts a segment
            segments[i] = (offset, size, await self._seal(k))
        size = sum(s for _, s, _ in segments)
        writer = S3Writer(self, key, f"{key}/.seg/{size:020d}-{uuid.uuid4().hex}", size, segments,
                          private=False, session=parent or None, readable=readable)
        if going_on is not None:
            writer.go_on(segments[-1], going_on)
        return writer

    async def _copy(self, source: str, dest: str, size: int) -> None:
        """A server-side copy: one request up to 5 GiB, else a multipart copy in parallel."""
        s3 = await self._s3()
        if size <= self._copy_threshold:
            await s3.copy_object(Bucket=self.bucket, Key=dest, CopySource={"Bucket": self.bucket, "Key": source},
                                 MetadataDirective="REPLACE", **self._extra)
            return
        await self._assemble(dest, [(0, size, source)], self._copy_part)

    async def _assemble(self, dest: str, pieces: list[tuple[int, int, str]], part: int) -> None:
        """One object at `dest` from `pieces` (offset, size, key), by a multipart upload of equal
        parts of at least `part` bytes but the last (R2 refuses unequal ones; 10,000 at most): a
        part that lies within one piece is copied server-side, one that spans pieces is read
        and sent again, within the budget."""
        s3 = await self._s3()
        total = sum(size for _, size, _ in pieces)
        part = max(part, MIN_PART, -(-total // MAX_PARTS))
        jobs: list[Any] = []
        for start in range(0, total, part):
            end = min(total, start + part)
            spans = [(key, max(start, off) - off, min(end, off + size) - off - 1)
                     for off, size, key in pieces if off < end and start < off + size]
            jobs.append(("copy", *spans[0]) if len(spans) == 1 else ("send", spans))
        upload = (await s3.create_multipart_upload(Bucket=self.bucket, Key=dest, **self._extra))["UploadId"]
        try:
            limit = asyncio.Semaphore(self._copy_parallel)

            async def run(number: int, job: Any) -> dict:
                async with limit:
                    if job[0] == "copy":
                        r = await s3.upload_part_copy(
                            Bucket=self.bucket, Key=dest, UploadId=upload, PartNumber=number,
                            CopySource={"Bucket": self.bucket, "Key": job[1]},
                            CopySourceRange=f"bytes={job[2]}-{job[3]}")
                        return {"PartNumber": number, "ETag": r["CopyPartResult"]["ETag"]}
                    need = sum(last - first + 1 for _, first, last in job[1])
                    await self.buffers.take(need)  # read back and sent again: within the budget
                    try:
                        data = b"".join([await self._read_key(k, first, last) for k, first, last in job[1]])
                        r = await s3.upload_part(Bucket=self.bucket, Key=dest, UploadId=upload,
                                                 PartNumber=number, Body=data)
                    finally:
                        self.buffers.give(need)
                    return {"PartNumber": number, "ETag": r["ETag"]}
            parts = await asyncio.gather(*(run(i + 1, job) for i, job in enumerate(jobs)))
            if not parts:  # an empty object
                parts = [await run(1, ("send", []))]
            await s3.complete_multipart_upload(Bucket=self.bucket, Key=dest, UploadId=upload,
                                               MultipartUpload={"Parts": list(parts)})
        except BaseException:
            await asyncio.shield(self._abort(dest, upload))
            raise

    async def _abort(self, key: str, upload: str) -> None:
        s3 = await self._s3()
        try:
            await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except ClientError as e:
            if not _missing(e):
                raise

    async def _read_key(self, key: str, first: int = 0, last: int | None = None) -> bytes:
        s3 = await self._s3()
        extra = {"Range": f"bytes={first}-{last}"} if last is not None else {}
        r = await s3.get_object(Bucket=self.bucket, Key=key, **extra)
        async with r["Body"] as body:
            return await body.read()

    async def move(self, source: str, dest: str) -> None:
        info = await self.stat(source)
        if info.is_dir:
            raise PathNotFound(source)
        src, dst = self._key(source), self._key(dest)
        await self._copy(src, dst, info.size)
        await self._delete_keys([src, src + "/.touched"])

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        """Batch deletes, 1,000 a request, with Content-MD5 (stricter engines require it)."""
        s3 = await self._s3()
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            r = await s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in r.get("Errors", ()) if e.get("Code") not in ("NoSuchKey",)]
            if errors:
                raise OSError(f"S3 delete failed: {errors[0].get('Code')} {errors[0].get('Key')}")

    async def delete(self, path: str) -> None:
        key = self._key(path)

        async def below() -> list[str]:
            return [k async for k, _ in self._listed(self._prefix(path))]
        keys, head = await _both(below(), self._head(key) if key else asyncio.sleep(0))
        if head is not None:
            keys.append(key)
        if not keys:
            raise PathNotFound(path)
        for k in keys:  # an open segment's upload goes with it (else with purge_temporaries)
            if "/.open/" in k:
                try:
                    record = await self._record(k)
                except ClientError as e:
                    if not _missing(e):
                        raise
                    continue
                await self._abort(self._open_segment(k)[1], record["upload"])
        await self._delete_keys(keys)

    async def touch(self, path: str) -> None:
        key = self._key(path)
        if await self._head(key) is None:
            raise PathNotFound(path)
        s3 = await self._s3()
        await s3.put_object(Bucket=self.bucket, Key=key + "/.touched", Body=b"")

    # -- ownership ----------------------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, path: str, wait: float = 0.0, shared: bool = False) -> AsyncIterator[None]:
        key = self._key(path)
        base = f"{self._private}/locks/{key}/"
        mine = base + (f"s/{uuid.uuid4().hex}" if shared else "x")
        etag = await self._acquire(path, key, base, mine, shared, wait)
        renewal = asyncio.ensure_future(self._renew(mine, etag))
        try:
            yield
        finally:
            renewal.cancel()
            await asyncio.shield(self._drop_lease(mine))

    async def _acquire(self, path: str, key: str, base: str, mine: str, shared: bool, wait: float) -> str:
        """Take the lease `mine` on `key`, waiting up to `wait` s for other holders; its ETag.
        The path is looked at as the first try goes out, and again, with the check for other
        holders, once the lease is ours (one round trip each: a chunked push takes a lock every
        PATCH). PathNotFound if it is not there, or was removed or replaced meanwhile (by the
        owner we waited for); on any error no lease is left behind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.005
        head, lease = await asyncio.gather(self._head(key), self._take_lease(mine), return_exceptions=True)
        held = lease if isinstance(lease, str) else None
        try:
            before = _result(head)
            _result(lease)
            while True:
                if before is None:
                    raise PathNotFound(path)
                if held is not None:
                    others, after = await _both(self._others(base, mine, shared), self._head(key))
                    if not others:
                        if after is None or after.get("ETag") != before.get("ETag"):
                            raise PathNotFound(path)
                        return held
                    await self._drop_lease(mine)
                    held = None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Busy(path)
                await asyncio.sleep(min(remaining, delay * (0.5 + uuid.uuid4().int % 1000 / 1000)))
                delay = min(delay * 2, 0.2)
                held = await self._take_lease(mine)
        except BaseException:
            if held is not None:
                await asyncio.shield(self._drop_lease(mine))
            raise

    async def _take_lease(self, key: str) -> str | None:
        """Create the lease, or take it over once expired; its ETag, or None if someone holds it."""
        s3 = await self._s3()
        body = json.dumps({"expires": time.time() + LEASE_SECONDS}).encode()
        try:
            return (await s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"))["ETag"]
        except ClientError as e:
            if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        try:
            r = await s3.get_object(Bucket=self.bucket, Key=key)
            async with r["Body"] as stream:
                held = json.loads(await stream.read())
        except ClientError as e:
            if _missing(e):
                return None  # released meanwhile: try again
            raise
        except ValueError:
            held = {"expires": 0}
        if held.get("expires", 0) > time.time():
            return None
        return await self._replace_lease(key, r["ETag"], body)

    async def _replace_lease(self, key: str, etag: str, body: bytes) -> str | None:
        """A PUT only if the lease is still the one with `etag` (RGW wants the ETag unquoted,
        AWS quoted: a form the engine does not match just fails, so both are tried)."""
        s3 = await self._s3()
        for form in (etag, etag.strip('"')):
            try:
                return (await s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=form))["ETag"]
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict") and not _missing(e):
                    raise
        return None

    async def _others(self, base: str, mine: str, shared: bool) -> bool:
        """Whether a live lease conflicts with ours: for shared owners the exclusive one, for
        the exclusive owner any shared one."""
        now = time.time()
        keys = [base + "x"] if shared else [k async for k, _ in self._listed(base + "s/")]
        for k in keys:
            if k == mine:
                continue
            try:
                r = await (await self._s3()).get_object(Bucket=self.bucket, Key=k)
                async with r["Body"] as stream:
                    if json.loads(await stream.read()).get("expires", 0) > now:
                        return True
            except ClientError as e:
                if not _missing(e):
                    raise
            except ValueError:
                return True
        return False

    async def _renew(self, key: str, etag: str) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            body = json.dumps({"expires": time.time() + LEASE_SECONDS}).encode()
            renewed = await self._replace_lease(key, etag, body)
            if renewed is None:
                return  # taken over: it had expired (a stalled process); nothing more to do
            etag = renewed

    async def _drop_lease(self, key: str) -> None:
        s3 = await self._s3()
        try:
            await s3.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if not _missing(e):
                raise

    # -- housekeeping -------------------------------------------------------------------------

    async def purge_temporaries(self, older_than: float) -> int:
        """Private objects and multipart uploads (segments being written, assemblies) untouched
        for `older_than` seconds, and expired leases."""
        s3 = await self._s3()
        cutoff = time.time() - older_than
        old = [k async for k, e in self._listed(self._private + "/tmp/") if e["LastModified"].timestamp() < cutoff]
        await self._delete_keys(old)
        removed = len(old)
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.root + "/" if self.root else ""}
        async for page in s3.get_paginator("list_multipart_uploads").paginate(**args):
            for u in page.get("Uploads", ()):
                if u["Initiated"].timestamp() < cutoff and not await self._recorded(u["Key"]):
                    await self._abort(u["Key"], u["UploadId"])
                    removed += 1
        return removed

    async def _recorded(self, upload_key: str) -> bool:
        """Whether a multipart upload is an open segment's, which lives as long as its upload
        session (purged with it): its age says nothing about a client pausing between chunks."""
        return "/.seg/" in upload_key and bool(await self._records_of(upload_key))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(loop, None)
        if entry is not None:
            await entry[0].__aexit__(None, None, None)


class _Received:
    """Body bytes received in place into a part buffer (stage_space), which the writer then
    only counts as written: the pipeline hashed them there."""

    __slots__ = ("buffer", "start", "length")

    def __init__(self, buffer: bytearray, start: int, length: int) -> None:
        self.buffer, self.start, self.length = buffer, start, length

    def __len__(self) -> int:
        return self.length


class S3Writer(FileWriter):
    """Streams one object (a private one, or an appended object's segments) as multipart
    uploads, one part being filled (by copy, or by the socket itself: stage_space), parts in
    flight sent as views of their pooled buffers. Every body byte it holds is covered by the
    driver's process-wide budget (`ready`, `admit`). An appended object's writer ends a segment and starts the
    next when its client goes quiet (what arrived becomes durable, and the budget goes back)
    and every PARTS_PER_SEGMENT parts (the next segment's parts are twice as large, so each
    multipart upload has equal parts but its last, as R2 requires, and 10,000 parts of the
    final object reach far past 5 TiB)."""

    survives_crash = False  # its parts are found once it closes, or its segment ends

    def __init__(self, driver: S3Driver, key: str, target: str, start: int,
                 segments: list[tuple[int, int, str]], private: bool, session: str | None,
                 readable: bool = False) -> None:
        super().__init__()
        self._driver, self._key, self._target, self._session = driver, key, target, session
        self._segments, self._private, self._readable = list(segments), private, readable
        self._record: str | None = None  # the open segment's record this writer goes on from
        self._start = start
        self.size = start
        self._buffer: bytearray | None = None  # the part being filled, and its bytes so far
        self._filled = 0
        # A body received in place (stage_space) fills the part's buffer ahead of the writing:
        # `_received` bytes of it, then whole buffers of the next parts ([buffer, received]).
        self._received = 0
        self._ahead: list[list[Any]] = []
        self._in_place: list[_Received] = []  # staged, not yet taken
        self._upload: str | None = None
        self._parts: list[dict] = []
        self._part_size = driver._part
        self._numbered = 0
        self._inflight: set[asyncio.Future[None]] = set()
        self._done = False
        self._admitted = start  # the body's offset up to which bytes are covered by the budget
        self._held = 0          # budget this writer holds
        self._unsent = 0        # admitted bytes S3 does not have yet
        self._error: BaseException | None = None

    def go_on(self, segment: tuple[int, int, str], record: dict) -> None:
        """Write on in the open segment (the last of `segments`) that `record` describes."""
        offset, _, self._record = segment
        assert self._segments[-1] == segment and self.size == offset + len(record["etags"]) * record["part"]
        self._segments.pop()
        self._start, self._part_size, self._upload = offset, record["part"], record["upload"]
        self._target = self._driver._open_segment(self._record)[1]
        self._parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(record["etags"])]
        self._numbered = len(self._parts)

    def ready_now(self) -> bool:
        return self._unsent < self._held

    async def ready(self) -> None:
        while not self.ready_now():  # see admit
            await self._driver.buffers.take(self._part_size)
            self._held += self._part_size

    async def admit(self, nbytes: int) -> None:
        # A new part's worth is taken, whole, only once the bytes admitted so far fill what is
        # held: those bytes then make up whole parts, which go to S3 and give their budget back
        # without needing any more. (Waiting while a part is only partly covered, or for a
        # batch that straddles a part's end, deadlocked: every holder waiting for room that
        # only its own unfinished part would free.) A batch may so run past what is held by
        # less than itself.
        await self.ready()
        self._admitted += nbytes
        self._unsent += nbytes

    def _give(self, n: int) -> None:
        self._held -= n
        self._driver.buffers.give(n)

    # -- a body received in place: into the part buffers, then counted as written -------------

    def stages_in_place(self) -> bool:
        return True  # without taking a buffer, as stage_space() would, before the budget covers it

    def stage_space(self) -> memoryview:
        """The rest of the buffer receiving now, or a new part's buffer once it is full. The
        pipeline awaits ready() first, so the budget covers a new part (whole parts are all
        that is unsent then). A part that starts the next segment gets that segment's size."""
        if self._ahead:
            buffer, used = self._ahead[-1]
        else:
            if self._buffer is None:
                self._buffer, self._received = self._driver.parts.get(self._part_size), 0
            buffer, used = self._buffer, self._received
        if used < len(buffer):
            return memoryview(buffer)[used:]
        number = self._numbered + 2 + len(self._ahead)  # the new buffer's part, in this segment
        size = self._part_size * (2 if number > PARTS_PER_SEGMENT else 1)
        self._ahead.append([self._driver.parts.get(size), 0])
        return memoryview(self._ahead[-1][0])

    def staged(self, nbytes: int) -> None:
        if self._ahead:
            entry = self._ahead[-1]
            buffer, start = entry
            entry[1] += nbytes
        else:
            assert self._buffer is not None
            buffer, start = self._buffer, self._received
            self._received += nbytes
        self._in_place.append(_Received(buffer, start, nbytes))

    def take_staged(self) -> tuple[Sequence[bytes | memoryview], Sequence[Any]]:
        if not self._in_place:
            return super().take_staged()
        taken, self._in_place = self._in_place, []
        return [memoryview(r.buffer)[r.start:r.start + r.length] for r in taken], taken

    async def _written_in_place(self, received: _Received) -> None:
        assert received.buffer is self._buffer and received.start == self._filled, "written out of order"
        self._filled += received.length
        self.size += received.length
        if self._filled == len(received.buffer):
            await self._part_filled()

    # -- writing ------------------------------------------------------------------------------

    async def write(self, chunks: Sequence[Any]) -> None:
        if self._done:
            raise ValueError("write to a closed writer")
        if self._error is not None:
            raise self._error
        for chunk in chunks:
            if isinstance(chunk, _Received):
                await self._written_in_place(chunk)
                continue
            view = memoryview(chunk).cast("B")
            while view:
                n = min(self._part_size - self._filled, len(view))
                if self.size + n > self._admitted:  # not from the pipeline, which admits first
                    await self.admit(self.size + n - self._admitted)
                self._part_buffer()
                assert self._buffer is not None
                self._buffer[self._filled:self._filled + n] = view[:n]
                self._filled += n
                self.size += n
                view = view[n:]
                if self._filled == self._part_size:
                    await self._part_filled()

    async def _part_filled(self) -> None:
        await self._send(self._take_partial())
        if self._numbered % PARTS_PER_SEGMENT == 0:
            if self._private:
                self._part_size *= 2  # one upload: its parts grow (private objects are small)
            else:
                await self._next_segment(grow=True)

    def _part_buffer(self) -> None:
        """Give the part being filled a whole part's buffer from the pool once the budget covers
        the part (bytes already in it move over). Until then, which happens after a batch that
        straddles a part's end ran past what is held (see admit), the part grows as bytes come:
        every waiting push holding a whole uncovered part grew 32 pushes by 170 MB."""
        if self._buffer is not None and len(self._buffer) == self._part_size:
            return  # a whole part's (a part growing in place is sent the moment it is whole)
        in_parts_sent = self._unsent - self._filled - (self._admitted - self.size)
        if self._held - in_parts_sent >= self._part_size:
            buffer = self._driver.parts.get(self._part_size)
            if self._filled:
                assert self._buffer is not None
                buffer[:self._filled] = self._buffer
            self._buffer = buffer
        elif self._buffer is None:
            self._buffer = bytearray()

    def _all_written(self) -> None:
        """Before a segment ends but at a part's end (a client gone quiet, the writer closing):
        the pipeline has written every byte received in place."""
        if self._ahead or self._received > self._filled:
            raise RuntimeError("body bytes received in place were not written")

    def _take_partial(self) -> tuple[bytearray | None, int]:
        """The part being filled and its length; the writer starts a new one (with the bytes
        received ahead for it, if any)."""
        taken = (self._buffer, self._filled)
        if self._ahead:
            self._buffer, self._received = self._ahead.pop(0)
        else:
            self._buffer, self._received = None, 0
        self._filled = 0
        return taken

    async def _send(self, part: tuple[bytearray | None, int]) -> None:
        """Upload `part` in the background, with up to PARALLEL_PARTS in flight: receiving and
        hashing go on while parts travel."""
        s3 = await self._driver._s3()
        if self._upload is None:
            self._upload = (await s3.create_multipart_upload(Bucket=self._driver.bucket, Key=self._target,
                                                             **self._driver._extra))["UploadId"]
        self._numbered += 1
        self._inflight.add(asyncio.ensure_future(self._upload_part(self._upload, self._numbered, part)))
        while len(self._inflight) >= PARALLEL_PARTS:
            await self._settle(asyncio.FIRST_COMPLETED)

    async def _upload_part(self, upload: str, number: int, part: tuple[bytearray | None, int]) -> None:
        buffer, length = part
        try:
            r = await (await self._driver._s3()).upload_part(
                Bucket=self._driver.bucket, Key=self._target, UploadId=upload, PartNumber=number,
                Body=memoryview(buffer or b"")[:length])
            self._parts.append({"PartNumber": number, "ETag": r["ETag"]})
        except BaseException as e:
            # Completing the upload now would publish the segment with this part's bytes
            # missing and those after them shifted (S3 accepts gaps in part numbers): the
            # writer is broken, and its segment is aborted rather than published.
            self._error = self._error or e
            raise
        finally:
            if buffer is not None:
                self._driver.parts.put(buffer)
            self._unsent -= min(length, self._unsent)
            self._give(min(length, self._held))

    async def _settle(self, when: str = asyncio.ALL_COMPLETED) -> None:
        """Wait for parts in flight (one, or all); a part that failed fails the writer."""
        if not self._inflight:
            return
        done, self._inflight = await asyncio.wait(self._inflight, return_when=when)
        for task in done:
            task.result()

    async def _publish(self) -> None:
        """Make what was written an object at the target: the last part, or one PUT."""
        s3 = await self._driver._s3()
        if self._upload is None:
            buffer, length = self._take_partial()
            try:
                await s3.put_object(Bucket=self._driver.bucket, Key=self._target,
                                    Body=memoryview(buffer or b"")[:length], **self._driver._extra)
            finally:
                if buffer is not None:
                    self._driver.parts.put(buffer)
                self._unsent -= min(length, self._unsent)
        else:
            if self._filled:
                await self._send(self._take_partial())
            await self._settle()
            parts = sorted(self._parts, key=lambda p: p["PartNumber"])
            if self._record is None:  # this writer's own upload: no one else added to it
                await s3.complete_multipart_upload(Bucket=self._driver.bucket, Key=self._target,
                                                   UploadId=self._upload, MultipartUpload={"Parts": parts})
            elif await self._driver._complete(self._target, self._upload, parts, self.size - self._start):
                await self._driver._drop_records(self._target)
                self._record = None
            else:  # parts came from elsewhere (a writer that lost its lease): the record's size
                raise CommitMismatch(f"{self._key}: another writer added to its upload")  # stands
            self._upload, self._parts, self._numbered = None, [], 0
        self._release_slack()

    async def _leave_open(self) -> None:
        """Record the segment's multipart upload, all of whose parts are whole and in, for the
        next writer to go on in (see the module's docstring)."""
        await self._settle()
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        if [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)) \
                or self.size - self._start != len(parts) * self._part_size:
            raise RuntimeError(f"{self._key}: the parts of an open segment do not add up")
        record = f"{self._key}/.open/{self._start:020d}-{self.size:020d}-{_token(self._target)}"
        if record == self._record:
            return  # nothing new
        body = json.dumps({"upload": self._upload, "part": self._part_size,
                           "etags": [p["ETag"] for p in parts]}).encode()
        await (await self._driver._s3()).put_object(Bucket=self._driver.bucket, Key=record, Body=body)
        if self._record is not None:
            await self._driver._delete_keys([self._record])
        self._record = record

    def _release_all(self) -> None:
        """The writer is done: whatever it holds goes back (parts still in flight give none),
        buffers too: the one a body's last fill was offered and left empty, say. (Left to the
        garbage collector, a buffer a push fragmented the heap with: 32 pushes at once on one
        worker grew from 339 to 736 MB over three rounds.)"""
        self._unsent = 0
        self._release_slack()
        while self._buffer is not None:
            buffer, _ = self._take_partial()
            self._driver.parts.put(buffer)

    def _release_slack(self) -> None:
        """Give back budget that covers nothing still to be sent."""
        if self._held > self._unsent:
            self._give(self._held - self._unsent)

    async def _next_segment(self, grow: bool) -> None:
        """Publish the segment written so far and continue in a new one at the current size."""
        if self.size > self._start:
            if not await self._keepable():
                raise CommitMismatch(f"{self._key}: its upload was removed while being written")
            await self._publish()
            self._segments.append((self._start, self.size - self._start, self._target))
            self._start = self.size
            self._target = f"{self._key}/.seg/{self.size:020d}-{uuid.uuid4().hex}"
        if grow:
            self._part_size *= 2
        self._release_slack()

    async def release_staging(self) -> None:
        """The client went quiet: what it sent becomes a segment, and the budget goes back."""
        if self._private or self._done or self._error is not None:
            return
        try:
            self._all_written()
            await self._next_segment(grow=False)
        except Exception as e:  # noqa: BLE001 - the body's next write or the commit raises it
            self._error = e

    async def commit(self, dest: str, size: int, readonly: bool = False) -> None:
        if self._error is not None:
            raise self._error
        driver = self._driver
        dest_key = driver._key(dest)
        if self._private:
            if self.size != size:
                raise CommitMismatch(f"holds {self.size} bytes, {size} were verified")
            try:
                if self._upload is None:  # small: straight to its name
                    self._target = dest_key
                    await self._publish()
                else:
                    await self._publish()
                    await driver._copy(self._target, dest_key, size)
                    await driver._delete_keys([self._target])
            finally:
                self._release_all()
            self._done = True
            return
        try:
            finished = await self._finish(seal=True)  # our segment first
        finally:
            self._release_all()
        if not finished:
            raise CommitMismatch(f"{self._key}: its upload was removed while being written")
        segments = await driver._segments(self._key)
        if any("/.open/" in k for _, _, k in segments):
            raise CommitMismatch(f"{self._key} was appended to while being committed")
        mine = self._segments + ([(self._start, self.size - self._start, self._target)]
                                 if self.size > self._start else [])
        if [(o, s) for o, s, _ in segments] != [(o, s) for o, s, _ in mine] or await driver._head(self._key):
            raise CommitMismatch(f"{self._key} was appended to, replaced or removed while being written")
        if self.size != size:
            raise CommitMismatch(f"holds {self.size} bytes, {size} were verified")
        head = await driver._head(segments[0][2]) if len(segments) == 1 else None
        if head is not None and int(head["ContentLength"]) == size:
            await driver._copy(segments[0][2], dest_key, size)
        else:
            await driver._assemble(dest_key, segments, driver._assembly_part)
        await driver._delete_keys([k for _, _, k in segments])

    async def cancel(self) -> None:
        self._done = True
        for task in self._inflight:
            task.cancel()  # each gives its budget back
        await asyncio.gather(*self._inflight, return_exceptions=True)
        self._inflight = set()
        self._release_all()
        if self._upload is not None and self._record is None:  # a recorded one keeps its parts:
            await self._driver._abort(self._target, self._upload)  # the client resends from there
        self._upload = None

    async def close(self) -> None:
        try:
            await self._finish()
        finally:
            self._release_all()

    async def _finish(self, seal: bool = False) -> bool:
        """Publish what was written (False: an appended object's upload is gone; nothing was):
        an appended object's segment is left open where it ends on a part's end (and `seal`
        does not ask for an object), else sealed."""
        if self._done:
            return True
        self._done = True
        if self._error is not None:  # a part or a segment's end failed: what it holds is not kept
            await self.cancel()
            return True
        self._all_written()
        if self._private:
            if self._upload is not None or self._filled:
                await self._publish()  # kept as a temporary: purged if never committed
            return True
        if not await self._keepable():
            return False
        if self.size > self._start:
            if seal or self._readable or self._filled or self._upload is None:
                await self._publish()  # the segment becomes part of the object
            else:
                await self._leave_open()
        return True

    async def _keepable(self) -> bool:
        """Whether the upload this writer appends to is still there, asked while the parts in
        flight land (the writer publishes next, after them: one round trip less); if not, the
        writer is cancelled (no segment resurrects a removed upload)."""
        if self._session is None:
            return True
        _, there = await _both(self._settle(), self._session_there())
        if there:
            return True
        await self.cancel()
        return False

    async def _session_there(self) -> bool:
        assert self._session is not None
        async for _ in self._driver._listed(self._driver._prefix(self._session)):
            return True  # one listing: a stat would ask for an object and its segments first
        return False
