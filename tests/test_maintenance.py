"""Upload purging (storage.maintenance.uploadpurging): abandoned sessions go, recent ones stay."""

import datetime as dt

from regserve.registry import Registry
from regserve.storage.filesystem import FilesystemDriver


async def test_purge_removes_only_old_sessions(data_dir):
    registry = Registry(FilesystemDriver(str(data_dir)))
    old = await registry.repository("team/app").uploads.create()
    fresh = await registry.repository("other").uploads.create()
    started = data_dir / f"docker/registry/v2/repositories/team/app/_uploads/{old.id}/startedat"
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8)
    started.write_text(long_ago.strftime("%Y-%m-%dT%H:%M:%SZ"))

    dry = await registry.purge_uploads(7 * 86400, dry_run=True)
    assert [p.rsplit("/", 1)[1] for p in dry] == [old.id]
    assert started.exists()
    purged = await registry.purge_uploads(7 * 86400)
    assert [p.rsplit("/", 1)[1] for p in purged] == [old.id]
    assert not started.parent.exists()
    assert (await registry.repository("other").uploads.open(fresh.id)).id == fresh.id


async def test_temporaries_left_by_a_crash_or_a_full_disk_are_reclaimed(data_dir, monkeypatch):
    """Temporaries live apart from content, so they are never mistaken for it; a full disk
    removes its own at once, and what a crash leaves is purged once it is stale."""
    import errno
    import os

    import pytest

    from regserve.storage.filesystem import PRIVATE
    driver = FilesystemDriver(str(data_dir))
    temp = data_dir / PRIVATE / "tmp"
    writer = await driver.create()  # a push whose process was killed: never committed
    await writer.write([b"half a layer"])
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        await driver.put_content("/docker/registry/v2/repositories/a/_layers/link", b"x")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert len(list(temp.iterdir())) == 1  # only the crashed one: the full disk cleaned up
    assert await driver.purge_temporaries(3600) == 0  # not stale yet: perhaps still written to
    assert await driver.purge_temporaries(0) == 1
    assert list(temp.iterdir()) == []
    await writer.close()


async def test_legacy_temporaries_beside_content_are_reclaimed_once(data_dir):
    """Earlier regserve versions put temporaries beside content ("link.tmp-<uuid>"): those of
    fixed content names are removed, once per data directory; names that are content stay."""
    blob = data_dir / ("docker/registry/v2/blobs/sha256/ab/ab12/data.tmp-" + "0" * 32)
    link = data_dir / ("docker/registry/v2/repositories/a/_manifests/tags/v1/current/link.tmp-" + "1" * 32)
    repo = data_dir / "docker/registry/v2/repositories/app.tmp-1/_manifests/tags/v1.tmp-2/current/link"
    for path in (blob, link, repo):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    driver = FilesystemDriver(str(data_dir))
    assert await driver.purge_temporaries(0) == 2
    assert not blob.exists() and not link.exists() and repo.exists()
    blob.write_bytes(b"x")
    assert await driver.purge_temporaries(0) == 0  # once: a later one is not looked for
