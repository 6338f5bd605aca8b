"""Manifest parsing and validation, and the per-repository manifest, tag and referrer stores."""

from __future__ import annotations

import hashlib
import json
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..errors import (
    BlobUnknown,
    DamagedContent,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestTooBig,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
)
from ..reference import TAG_RE, Digest, check_tag, is_digest, parse_digest
from ..storage import AlreadyExists, Busy, PathNotFound, StorageDriver
from . import paths
from .blobs import LRU, BlobStore, RepositoryBlobs

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1 = {"application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws"}
IMAGE_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
MAX_MANIFEST_BYTES = 4 << 20
LOCK_WAIT_SECONDS = 10.0  # a manifest or tag change waits this long for the repository's owner
# Layers a registry is not expected to hold (pulled from their `urls` instead).
FOREIGN_LAYERS = {
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()


@dataclass
class Manifest:
    digest: Digest
    media_type: str
    payload: bytes
    blobs: list[Descriptor] = field(default_factory=list)      # config and layers
    manifests: list[Descriptor] = field(default_factory=list)  # children of an index
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None


def compute_digest(payload: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, payload).hexdigest())


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid({"field": where}, f"{where}: descriptor must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid({"field": where}, f"{where}: mediaType missing")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid({"field": where}, f"{where}: size invalid")
    if not isinstance(digest, str):
        raise ManifestInvalid({"field": where}, f"{where}: digest missing")
    try:
        d = parse_digest(digest)
    except RegistryError:
        raise ManifestInvalid({"field": where, "digest": digest}, f"{where}: digest invalid") from None
    urls = value.get("urls") or ()
    return Descriptor(media_type, d, size, tuple(urls) if isinstance(urls, list) else ())


def parse_manifest(payload: bytes, content_type: str | None, digest: Digest | None = None) -> Manifest:
    """Validate a manifest as pushed; the stored bytes are `payload`, unchanged."""
    if len(payload) > MAX_MANIFEST_BYTES:
        raise ManifestTooBig({"size": len(payload), "limit": MAX_MANIFEST_BYTES})
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestInvalid({"reason": str(e)}, "manifest is not valid JSON") from None
    except RecursionError:  # nested deeper than any manifest: a document built to hurt
        raise ManifestInvalid(None, "manifest is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid(None, "manifest must be a JSON object")
    content_type = (content_type or "").split(";")[0].strip() or None
    declared = doc.get("mediaType")
    if content_type in SCHEMA1 or declared in SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestInvalid({"mediaType": content_type or declared},
                              "Docker schema1 manifests are not supported; push schema2 or OCI")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid({"schemaVersion": doc.get("schemaVersion")}, "schemaVersion must be 2")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid(None, "mediaType must be a string")
    if declared and content_type and declared != content_type:
        raise ManifestInvalid({"mediaType": declared, "contentType": content_type},
                              "manifest mediaType does not match Content-Type")
    media_type = declared or content_type or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise ManifestInvalid({"mediaType": media_type}, f"unsupported manifest media type {media_type}")
    if media_type in (DOCKER_MANIFEST, DOCKER_LIST) and not declared:
        raise ManifestInvalid({"mediaType": media_type}, "Docker manifests must declare mediaType")

    m = Manifest(digest or compute_digest(payload), media_type, payload)
    if media_type in IMAGE_TYPES:
        if "manifests" in doc:
            raise ManifestInvalid(None, "an image manifest has no 'manifests'")
        m.blobs.append(_descriptor(doc.get("config"), "config"))
        layers = doc.get("layers", [])
        if not isinstance(layers, list):
            raise ManifestInvalid({"field": "layers"}, "layers must be an array")
        m.blobs += [_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers)]
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid({"field": "manifests"}, "manifests must be an array")
        m.manifests = [_descriptor(c, f"manifests[{i}]") for i, c in enumerate(children)]
    if doc.get("subject") is not None:
        m.subject = _descriptor(doc["subject"], "subject")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid({"field": "artifactType"}, "artifactType must be a string")
    config = doc.get("config")
    if artifact_type is None and media_type == OCI_MANIFEST and isinstance(config, dict):
        artifact_type = config.get("mediaType")
    m.artifact_type = artifact_type
    annotations = doc.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        raise ManifestInvalid({"field": "annotations"}, "annotations must be an object")
    m.annotations = annotations
    return m


def media_type_of(payload: bytes) -> str:
    """The media type of stored bytes (validated when pushed)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return OCI_MANIFEST
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST


class ManifestCache:
    """Manifests by digest are immutable: keep the bytes and media type of recent ones."""

    def __init__(self, capacity: int = 4096) -> None:
        self._lru: LRU = LRU(capacity)

    def get(self, d: Digest) -> tuple[bytes, str] | None:
        return self._lru.get(d)

    def put(self, d: Digest, payload: bytes, media_type: str) -> None:
        if len(payload) <= 256 << 10:
            self._lru.put(d, (payload, media_type))


def read_link(link: bytes, path: str) -> Digest:
    """The digest a link object holds."""
    try:
        return parse_digest(link.decode().strip())
    except (UnicodeDecodeError, RegistryError):
        raise DamagedContent(f"{path} holds no digest") from None


class Tags:
    def __init__(self, driver: StorageDriver, name: str) -> None:
        self.driver, self.name = driver, name

    async def resolve(self, tag: str) -> Digest:
        """The digest a tag points to; MANIFEST_UNKNOWN only when there is no such tag."""
        path = paths.tag_current(self.name, tag)
        try:
            link = await self.driver.get_content(path)
        except PathNotFound:
            raise ManifestUnknown({"tag": tag}) from None
        return read_link(link, path)

    async def tag(self, tag: str, d: Digest) -> None:
        link = str(d).encode()
        await self.driver.put_content(paths.tag_index_link(self.name, tag, d), link)
        await self.driver.put_content(paths.tag_current(self.name, tag), link)

    async def untag(self, tag: str) -> None:
        try:
            await self.driver.delete(paths.tag_dir(self.name, tag))
        except PathNotFound:
            raise ManifestUnknown({"tag": tag}) from None

    async def all(self) -> list[str]:
        try:
            entries = await self.driver.list(paths.tags(self.name))
        except PathNotFound:
            if not await self._repo_exists():
                raise NameUnknown({"name": self.name}) from None
            return []
        return sorted(e.rsplit("/", 1)[1] for e in entries)

    async def _repo_exists(self) -> bool:
        try:
            await self.driver.stat(paths.repo(self.name))
            return True
        except PathNotFound:
            return False

    async def pointing_to(self, d: Digest) -> list[str]:
        found = []
        try:
            names = await self.all()
        except NameUnknown:
            return []
        for tag in names:
            try:
                if await self.resolve(tag) == d:
                    found.append(tag)
            except ManifestUnknown:
                continue
        return found


class Manifests:
    def __init__(self, driver: StorageDriver, store: BlobStore, blobs: RepositoryBlobs,
                 tags: Tags, cache: ManifestCache, name: str) -> None:
        self.driver, self.store, self.blobs, self.tags = driver, store, blobs, tags
        self.cache, self.name = cache, name

    async def resolve(self, reference: str) -> Digest:
        """The digest a reference names in this repository. A tag that cannot exist (bad
        grammar) is simply unknown: GET/HEAD/DELETE answer 404, only PUT says TAG_INVALID."""
        if is_digest(reference):
            try:
                d = parse_digest(reference)
            except DigestInvalid:  # no manifest can exist under it
                raise ManifestUnknown({"reference": reference}) from None
        elif not TAG_RE.fullmatch(reference):
            raise ManifestUnknown({"reference": reference})
        else:
            d = await self.tags.resolve(reference)
        try:
            await self.driver.stat(paths.revision_link(self.name, d))
        except PathNotFound:
            raise ManifestUnknown({"reference": reference}) from None
        return d

    async def get(self, reference: str) -> tuple[Digest, bytes, str]:
        d = await self.resolve(reference)
        cached = self.cache.get(d)
        if cached is not None:
            return d, cached[0], cached[1]
        try:
            payload = await self.store.read_small(d)
        except BlobUnknown:
            raise ManifestUnknown({"reference": reference}) from None
        media_type = media_type_of(payload)
        self.cache.put(d, payload, media_type)
        return d, payload, media_type

    async def put(self, reference: str, payload: bytes, content_type: str | None) -> Manifest:
        if is_digest(reference):
            expected = parse_digest(reference)
            actual = compute_digest(payload, expected.algorithm)
            if actual != expected:
                raise DigestInvalid({"expected": str(expected), "actual": str(actual)},
                                    "manifest digest did not match the reference")
            tag = None
        else:
            tag = check_tag(reference)
            expected = None
        return await self._store(parse_manifest(payload, content_type, expected), tag, check_references=True)

    async def keep(self, payload: bytes, content_type: str | None, d: Digest, tag: str | None) -> Manifest:
        """Store a manifest a pull-through cache fetched (its digest verified by the caller),
        and tag it: without the check that what it references is here, which comes when pulled."""
        return await self._store(parse_manifest(payload, content_type, d), tag, check_references=False)

    async def _store(self, m: Manifest, tag: str | None, check_references: bool) -> Manifest:
        async with self.store.referencing(), self._owned():  # in this order, as garbage collection
            if check_references:
                await self._check_references(m)  # touches what it references
            await self.store.put_small(m.digest, m.payload)
            await self._link(m)
            if tag is not None:
                await self.tags.tag(tag, m.digest)
        self.cache.put(m.digest, m.payload, m.media_type)
        return m

    @asynccontextmanager
    async def _owned(self) -> AsyncIterator[None]:
        """Own this repository's manifests and tags: a PUT, a DELETE by digest (which untags
        every tag pointing at it) and a DELETE of a tag are one transition each, taken by one
        request at a time across every worker and replica. So a tag never points at a manifest
        a DELETE removed, and a DELETE never removes a tag a PUT just moved elsewhere."""
        lock = paths.manifests_lock(self.name)
        try:
            await self.driver.stat(lock)
        except PathNotFound:
            try:
                await self.driver.put_content(lock, b"", exclusive=True)
            except AlreadyExists:
                pass
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.driver.lock(lock, LOCK_WAIT_SECONDS))
            except Busy:
                raise TooManyRequests({"repository": self.name}, "the repository is busy; retry",
                                      headers={"Retry-After": "1"}) from None
            yield

    async def _link(self, m: Manifest) -> None:
        await self.driver.put_content(paths.revision_link(self.name, m.digest), str(m.digest).encode())
        if m.subject is not None:
            await self.driver.put_content(paths.referrer_link(self.name, m.subject.digest, m.digest),
                                          str(m.digest).encode())

    async def _check_references(self, m: Manifest) -> None:
        """Every blob and child manifest the manifest names is here, and touched (referenced
        now, for garbage collection; the caller holds BlobStore.referencing)."""
        missing = []
        for desc in m.blobs:
            if desc.media_type in FOREIGN_LAYERS or desc.urls:
                continue
            try:
                if not await self.blobs.is_linked(desc.digest):
                    raise BlobUnknown(None)
                await self.store.touch(desc.digest)
            except BlobUnknown:
                missing.append(str(desc.digest))
        for desc in m.manifests:
            try:
                await self.driver.stat(paths.revision_link(self.name, desc.digest))
                await self.store.touch(desc.digest)
            except (PathNotFound, BlobUnknown):
                missing.append(str(desc.digest))
        if missing:
            raise ManifestBlobUnknown({"digests": missing})

    async def delete(self, reference: str) -> None:
        """By tag: remove the tag. By digest: remove the revision and every tag pointing to it.
        What is not there is refused before the repository's lock is taken: a refused DELETE
        (of any name a client makes up) leaves nothing behind, not even a lock file."""
        if not is_digest(reference):
            if not TAG_RE.fullmatch(reference):
                raise ManifestUnknown({"reference": reference})
            await self.tags.resolve(reference)
            async with self._owned():
                await self.tags.untag(reference)
            return
        await self.resolve(reference)
        async with self._owned():
            d = await self.resolve(reference)  # again: another owner may have removed it meanwhile
            await self._untag_all(d)
            subject = await self._subject_of(d)
            try:
                await self.driver.delete(paths.revision_link(self.name, d).rsplit("/", 1)[0])
            except PathNotFound:  # removed behind our back (a replica without our lock)
                raise ManifestUnknown({"reference": reference}) from None
            if subject is not None:
                try:
                    await self.driver.delete(
                        paths.referrer_link(self.name, subject, d).rsplit("/", 1)[0])
                except PathNotFound:
                    pass

    async def _untag_all(self, d: Digest) -> None:
        for tag in await self.tags.pointing_to(d):
            try:
                await self.tags.untag(tag)
            except ManifestUnknown:
                pass

    async def _subject_of(self, d: Digest) -> Digest | None:
        """The subject a stored manifest names, to remove its referrer link with it. A manifest
        whose bytes are gone names none; read errors propagate (a delete fails closed)."""
        try:
            payload = await self.store.read_small(d)
        except BlobUnknown:
            return None
        try:
            subject = parse_manifest(payload, None, d).subject
        except ManifestInvalid:
            return None
        return subject.digest if subject is not None else None

    async def referrers(self, subject: Digest, artifact_type: str | None) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose subject is `subject`, by digest order."""
        found: list[dict[str, Any]] = []
        base = paths.referrers(self.name, subject)
        try:
            algorithms = await self.driver.list(base)
        except PathNotFound:
            return found
        for alg_dir in algorithms:
            try:
                entries = await self.driver.list(alg_dir)
            except PathNotFound:
                continue
            for entry in sorted(entries):
                try:
                    ref = str(parse_digest(f"{alg_dir.rsplit('/', 1)[1]}:{entry.rsplit('/', 1)[1]}"))
                except RegistryError:
                    continue  # not a digest's directory: not ours
                try:
                    d, payload, _ = await self.get(ref)
                    m = parse_manifest(payload, None, d)
                except (ManifestUnknown, ManifestInvalid):
                    continue  # deleted since, or not a manifest
                if artifact_type is not None and m.artifact_type != artifact_type:
                    continue
                desc: dict[str, Any] = {"mediaType": m.media_type, "digest": str(d),
                                        "size": len(payload)}
                if m.artifact_type:
                    desc["artifactType"] = m.artifact_type
                if m.annotations:
                    desc["annotations"] = m.annotations
                found.append(desc)
        return found
