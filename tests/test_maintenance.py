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
