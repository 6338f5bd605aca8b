"""proxy.ttl: what a pull-through cache fetched expires; expiry deletes, so it fails closed."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from regserve.proxy.expiry import expire
from regserve.reference import parse_digest
from regserve.registry import Registry
from regserve.storage.filesystem import FilesystemDriver

from .conftest import digest_of, image_manifest
from .faults import FaultyDriver

CONFIG = b'{"architecture":"amd64","os":"linux"}'
TTL = 3600.0


async def body(data: bytes):
    yield [data]


async def cache(registry: Registry, name: str, tag: str, layer: bytes) -> str:
    """What a fetch leaves: blobs linked, a manifest kept and tagged."""
    repo = registry.repository(name)
    for data in (CONFIG, layer):
        await repo.uploads.put_whole(parse_digest(digest_of(data)), body(data), repo.blobs)
    manifest = image_manifest(digest_of(CONFIG), len(CONFIG), [(digest_of(layer), len(layer))])
    m = await repo.manifests.keep(manifest, "application/vnd.oci.image.manifest.v1+json",
                                  parse_digest(digest_of(manifest)), tag)
    return str(m.digest)


def links(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("link"))


async def test_what_was_fetched_before_the_ttl_loses_its_links_and_nothing_else(data_dir):
    registry = Registry(FilesystemDriver(str(data_dir)))
    await cache(registry, "team/app", "v1", b"layer")
    before = links(data_dir)
    assert len(before) == 5  # two layer links, a revision, a tag's current and index link
    assert await expire(registry, TTL) == type(await expire(registry, TTL))()  # nothing expired yet
    assert links(data_dir) == before
    expired = await expire(registry, TTL, now=time.time() + TTL + 1)
    assert (expired.manifests, expired.layers) == (1, 2)
    assert links(data_dir) == []
    blobs = list((data_dir / "docker/registry/v2/blobs").rglob("data"))
    assert len(blobs) == 3  # the bytes go with garbage collection, not here


@pytest.mark.parametrize("op,path", [("stat", "/_layers/"), ("stat", "/_manifests/revisions/"),
                                     ("list", "/_layers/"), ("delete", "/_layers/"),
                                     ("delete", "/_manifests/revisions/"), ("list", "/repositories")])
async def test_expiry_stops_at_any_error_but_not_found(data_dir, op, path):
    driver = FaultyDriver(FilesystemDriver(str(data_dir)))
    registry = Registry(driver)
    await cache(registry, "a", "v1", b"one")
    await cache(registry, "b", "v1", b"two")
    driver.inject(op, errno.EIO, path)
    before = links(data_dir)
    with pytest.raises(OSError):
        await expire(registry, TTL, now=time.time() + TTL + 1)
    assert any(p for o, p in driver.calls if o == op and path in p)  # the fault was met
    after = links(data_dir)
    # Nothing after the failure was removed: repository "b" (walked second) keeps every link.
    assert [p for p in after if "/repositories/b/" in p] == [p for p in before if "/repositories/b/" in p]
