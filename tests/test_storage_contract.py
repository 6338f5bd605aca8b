"""The storage driver contract (regserve/storage/base.py), one suite run against every driver, as
distribution's storagedriver testsuites are: the filesystem driver, the in-memory stand-in the
fast tests use, each bare and through the CheckedDriver layer the registry always puts around
them. A new driver joins by adding a factory to DRIVERS; what passes here is what the registry
layer may rely on, and nothing else."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from regserve.storage import AlreadyExists, Busy, CommitMismatch, PathNotFound, StorageDriver
from regserve.storage.checked import CheckedDriver
from regserve.storage.filesystem import FilesystemDriver
from regserve.storage.inmemory import InMemoryDriver


def s3_driver(request: Any) -> StorageDriver:
    """S3 on the real Ceph RGW, each test in a root directory of its own in the shared bucket."""
    from regserve.storage.s3 import S3Driver
    rgw = request.getfixturevalue("rgw")
    return S3Driver(rgw["S3_BUCKET"], regionendpoint=rgw["S3_ENDPOINT"], accesskey=rgw["S3_ACCESS_KEY"],
                    secretkey=rgw["S3_SECRET_KEY"], rootdirectory=f"/contract-{uuid.uuid4().hex[:12]}")


DRIVERS: dict[str, Callable[[Path, Any], StorageDriver]] = {
    "filesystem": lambda tmp, rq: FilesystemDriver(str(tmp / "root"), direct_io=False, prewarm=0),
    "filesystem-directio": lambda tmp, rq: FilesystemDriver(str(tmp / "root"), direct_io=True, prewarm=0),
    "inmemory": lambda tmp, rq: InMemoryDriver(),
    "inmemory-checked": lambda tmp, rq: CheckedDriver(InMemoryDriver()),
    "filesystem-checked": lambda tmp, rq: CheckedDriver(FilesystemDriver(str(tmp / "root"), prewarm=0)),
    "s3": lambda tmp, rq: s3_driver(rq),
}


@pytest.fixture(params=sorted(DRIVERS))
async def driver(request, tmp_path):
    d = DRIVERS[request.param](tmp_path, request)
    yield d
    await d.close()


async def read_all(d: StorageDriver, path: str, offset: int = 0, length: int | None = None,
                   chunk_size: int = 1 << 20) -> bytes:
    return b"".join([c async for c in d.reader(path, offset, length, chunk_size)])


async def stream(d: StorageDriver, writer: Any, data: bytes, piece: int = 7000) -> None:
    """As the upload pipeline writes: staged pieces, taken and written from a thread."""
    loop = asyncio.get_running_loop()
    for i in range(0, len(data), piece):
        writer.stage(data[i:i + piece])
    hashed, ready = writer.take_staged()
    assert b"".join(bytes(h) for h in hashed) == data  # what is hashed is what is written
    await loop.run_in_executor(None, writer.write_from_thread, ready, loop)
    await writer.release_staging()


# -- reading and writing small objects -------------------------------------------------------

async def test_put_get_stat(driver):
    await driver.put_content("/a/b/c", b"hello")
    assert await driver.get_content("/a/b/c") == b"hello"
    info = await driver.stat("/a/b/c")
    assert (info.size, info.is_dir) == (5, False) and abs(info.mtime - time.time()) < 60
    assert (await driver.stat("/a/b")).is_dir and (await driver.stat("/a")).is_dir
    await driver.put_content("/a/b/c", b"replaced")
    assert await driver.get_content("/a/b/c") == b"replaced"
    for missing in ("/a/b/d", "/x", "/a/b/c/d"):
        with pytest.raises(PathNotFound):
            await driver.get_content(missing)
        with pytest.raises(PathNotFound):
            await driver.stat(missing)
    with pytest.raises(PathNotFound):  # a prefix is not an object
        await driver.get_content("/a/b")


async def test_list_gives_direct_children_as_full_paths(driver):
    for p in ("/r/one", "/r/two/x", "/r/two/y", "/r/three/deep/z", "/other"):
        await driver.put_content(p, b".")
    assert sorted(await driver.list("/r")) == ["/r/one", "/r/three", "/r/two"]
    assert sorted(await driver.list("/r/two/")) == ["/r/two/x", "/r/two/y"]
    assert {"/r", "/other"} <= set(await driver.list("/"))
    with pytest.raises(PathNotFound):
        await driver.list("/nothing")


async def test_list_many_lists_each_prefix_as_list_does(driver):
    for p in ("/r/one", "/r/two/x", "/r/two/y", "/r/three/deep/z"):
        await driver.put_content(p, b".")
    wanted = ["/r", "/r/two", "/r/three/deep", "/nothing", "/r/gone"]
    listed = await driver.list_many(wanted)
    assert list(listed) == wanted
    assert {k: sorted(v) if v is not None else None for k, v in listed.items()} == {
        "/r": ["/r/one", "/r/three", "/r/two"], "/r/two": ["/r/two/x", "/r/two/y"],
        "/r/three/deep": ["/r/three/deep/z"], "/nothing": None, "/r/gone": None}
    assert await driver.list_many([]) == {}
    with pytest.raises(ValueError):  # paths are checked as for every call
        await driver.list_many(["/r", "relative"])


async def test_exclusive_put_has_exactly_one_winner(driver):
    await driver.put_content("/once", b"first", exclusive=True)
    with pytest.raises(AlreadyExists):
        await driver.put_content("/once", b"second", exclusive=True)
    assert await driver.get_content("/once") == b"first"

    async def create(i: int) -> int | None:
        try:
            await driver.put_content("/race/tag", str(i).encode(), exclusive=True)
            return i
        except AlreadyExists:
            return None
    results = await asyncio.gather(*(create(i) for i in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await driver.get_content("/race/tag") == str(winners[0]).encode()


async def test_ranged_reads(driver):
    data = os.urandom(3 * 65536 + 123)
    await driver.put_content("/blob", data)
    assert await read_all(driver, "/blob", chunk_size=65536) == data
    assert await read_all(driver, "/blob", offset=70000) == data[70000:]
    assert await read_all(driver, "/blob", offset=100, length=100000, chunk_size=4096) == data[100:100100]
    assert await read_all(driver, "/blob", offset=len(data)) == b""
    chunks = driver.reader("/missing")
    with pytest.raises(PathNotFound):  # before any chunk
        await anext(chunks)


# -- streaming writers -------------------------------------------------------------------------

async def test_create_is_private_until_its_commit_publishes_it(driver):
    await driver.put_content("/repo/marker", b"m")
    before = sorted(await driver.list("/"))
    data = os.urandom(200000)
    writer = await driver.create()
    await stream(driver, writer, data)
    assert sorted(await driver.list("/")) == before  # not visible under any name
    await writer.commit("/blobs/ab/data", len(data), readonly=True)
    assert await read_all(driver, "/blobs/ab/data") == data
    assert (await driver.stat("/blobs/ab/data")).size == len(data)


async def test_commit_refuses_what_was_not_verified(driver):
    writer = await driver.create()
    await writer.write([b"12345"])
    with pytest.raises(CommitMismatch):
        await writer.commit("/dest", 4)
    with pytest.raises(PathNotFound):
        await driver.stat("/dest")
    await writer.cancel()
    assert await driver.purge_temporaries(0) == 0  # cancel removed it


async def test_append_continues_a_session_and_commits_it(driver):
    await driver.put_content("/uploads/u1/startedat", b"now")
    first = await driver.append("/uploads/u1/data")
    assert first.size == 0
    await first.write([b"abc"])
    await first.close()
    second = await driver.append("/uploads/u1/data")  # another request, process or replica
    assert second.size == 3
    await stream(driver, second, b"defgh")
    assert second.size == 8
    await second.close()
    assert (await driver.stat("/uploads/u1/data")).size == 8  # what was written can be read back
    assert await read_all(driver, "/uploads/u1/data") == b"abcdefgh"
    assert await read_all(driver, "/uploads/u1/data", offset=2, length=4) == b"cdef"
    third = await driver.append("/uploads/u1/data")
    await third.commit("/blobs/x/data", 8, readonly=True)
    assert await driver.get_content("/blobs/x/data") == b"abcdefgh"
    with pytest.raises(PathNotFound):
        await driver.stat("/uploads/u1/data")  # moved, not copied


async def test_append_needs_its_session(driver):
    await driver.put_content("/uploads/u2/startedat", b"now")
    await driver.delete("/uploads/u2")
    with pytest.raises(PathNotFound):
        await driver.append("/uploads/u2/data")


@pytest.mark.parametrize("meddle", ["replaced", "removed", "appended"])
async def test_commit_publishes_only_the_object_it_wrote(driver, meddle):
    await driver.put_content("/uploads/u3/startedat", b"now")
    writer = await driver.append("/uploads/u3/data")
    await writer.write([b"verified"])
    if meddle == "replaced":
        await driver.put_content("/uploads/u3/data", b"verified")
    elif meddle == "removed":
        await driver.delete("/uploads/u3")
    else:
        other = await driver.append("/uploads/u3/data")
        await other.write([b"+tail"])
        await other.close()
    with pytest.raises(CommitMismatch):
        await writer.commit("/blobs/y/data", len(b"verified"))
    with pytest.raises(PathNotFound):
        await driver.stat("/blobs/y/data")
    await writer.close()


# -- moving, deleting, touching ----------------------------------------------------------------

async def test_move_replaces_and_delete_removes_prefixes(driver):
    await driver.put_content("/src", b"new")
    await driver.put_content("/deep/dst", b"old")
    await driver.move("/src", "/deep/dst")
    assert await driver.get_content("/deep/dst") == b"new"
    with pytest.raises(PathNotFound):
        await driver.stat("/src")
    await driver.move("/deep/dst", "/made/on/the/way")
    with pytest.raises(PathNotFound):
        await driver.move("/src", "/elsewhere")

    for p in ("/tree/a", "/tree/b/c", "/tree/b/d", "/treetop"):
        await driver.put_content(p, b".")
    await driver.delete("/tree/a")
    await driver.delete("/tree")
    for gone in ("/tree", "/tree/b/c"):
        with pytest.raises(PathNotFound):
            await driver.stat(gone)
    assert await driver.get_content("/treetop") == b"."  # a sibling sharing the name's start
    with pytest.raises(PathNotFound):
        await driver.delete("/tree")


async def test_touch_marks_an_object_used_now(driver):
    await driver.put_content("/linked", b"x")
    before = (await driver.stat("/linked")).mtime
    await asyncio.sleep(0.05 + driver.timestamp_resolution)
    await driver.touch("/linked")
    after = await driver.stat("/linked")
    assert after.mtime > before and await driver.get_content("/linked") == b"x"
    with pytest.raises(PathNotFound):
        await driver.touch("/unlinked")


# -- ownership ---------------------------------------------------------------------------------

async def test_exclusive_and_shared_owners(driver):
    await driver.put_content("/session", b"s")
    async with driver.lock("/session"):
        with pytest.raises(Busy):
            async with driver.lock("/session"):
                pass
        with pytest.raises(Busy):
            async with driver.lock("/session", shared=True):
                pass
    async with driver.lock("/session", shared=True):
        async with driver.lock("/session", shared=True):
            with pytest.raises(Busy):
                async with driver.lock("/session", wait=0.05):
                    pass
    with pytest.raises(PathNotFound):
        async with driver.lock("/no-session"):
            pass


async def test_waiters_take_turns_one_owner_at_a_time(driver):
    await driver.put_content("/counter/owner", b"")  # the owned object, not the one rewritten
    await driver.put_content("/counter/value", b"0")
    inside = 0

    async def bump() -> None:
        nonlocal inside
        async with driver.lock("/counter/owner", wait=30):
            inside += 1
            assert inside == 1
            n = int(await driver.get_content("/counter/value"))
            await asyncio.sleep(0.001)
            await driver.put_content("/counter/value", str(n + 1).encode())
            inside -= 1
    await asyncio.gather(*(bump() for _ in range(25)))
    assert await driver.get_content("/counter/value") == b"25"


async def test_an_owner_that_removes_the_object_ends_it_for_waiters(driver):
    await driver.put_content("/uploads/u4/startedat", b"now")
    got: list[str] = []

    async def waiter() -> None:
        try:
            async with driver.lock("/uploads/u4/startedat", wait=10):
                got.append("owned")
        except PathNotFound:
            got.append("gone")
    async with driver.lock("/uploads/u4/startedat"):
        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)
        await driver.delete("/uploads/u4")
    await task
    assert got == ["gone"]


# -- housekeeping and paths --------------------------------------------------------------------

async def test_temporaries_left_behind_are_purged(driver):
    writer = await driver.create()
    await writer.write([b"abandoned"])
    await writer.close()  # a crash: never committed, never cancelled
    assert await driver.purge_temporaries(3600) == 0  # young: may be in use
    assert await driver.purge_temporaries(0) == 1
    assert await driver.purge_temporaries(0) == 0


@pytest.mark.parametrize("bad", ["relative/path", "/a/../b", "/a/./b", "/a//b", "/.hidden", "/a/.tmp-x",
                                 "", "/a\0b"])
async def test_paths_outside_the_contract_are_refused(driver, bad):
    calls = [driver.get_content(bad), driver.stat(bad), driver.list(bad), driver.put_content(bad, b"x"),
             driver.delete(bad), driver.touch(bad), driver.append(bad), driver.move("/ok", bad)]
    await driver.put_content("/ok", b"x")
    for call in calls:
        with pytest.raises(ValueError):
            await call
    with pytest.raises(ValueError):
        async with driver.lock(bad):
            pass
    writer = await driver.create()
    await writer.write([b"x"])
    with pytest.raises(ValueError):
        await writer.commit(bad, 1)
    await writer.cancel()
    assert await driver.get_content("/ok") == b"x"


async def test_the_checked_layer_stops_bad_paths_before_any_driver():
    seen: list[str] = []

    class Recording(InMemoryDriver):
        async def get_content(self, path: str) -> bytes:
            seen.append(path)
            return b""
    checked = CheckedDriver(Recording())
    with pytest.raises(ValueError):
        await checked.get_content("/a/../../etc/passwd")
    await checked.get_content("/fine")
    assert seen == ["/fine"]
