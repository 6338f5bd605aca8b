"""The filesystem driver's streaming writer, against the kernel it runs on."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from regserve.storage import directio
from regserve.storage.filesystem import CACHE_BEHIND, WRITEBACK_STEP, FilesystemDriver

from .conftest import require_tool


async def _pipeline_write(writer, batch: list[bytes]) -> None:
    """As the upload pipeline does it: stage each piece on the event loop, take at the batch's
    end, write in a thread. What was taken to hash is the batch, byte for byte."""
    loop = asyncio.get_running_loop()
    for piece in batch:
        writer.stage(piece)
    to_hash, staged = writer.take_staged()
    assert b"".join(bytes(part) for part in to_hash) == b"".join(batch)
    await loop.run_in_executor(None, writer.write_from_thread, staged, loop)


def resident_bytes(fincore: str, path: Path) -> int:
    out = subprocess.check_output([fincore, "--bytes", "--noheadings", "--output", "RES", str(path)])
    return int(out.strip())


@pytest.mark.parametrize("per_writer", [96, 16], ids=["one writer", "a writer per 64 MiB PATCH"])
async def test_a_large_stream_keeps_only_its_tail_in_the_page_cache(tmp_path: Path, per_writer: int):
    """384 MiB in 4 MiB writes, as the upload pipeline's thread makes them; in one request, or
    in Content-Range PATCHes that each append with a writer of their own. Buffered writes, as on
    a filesystem without direct I/O."""
    fincore = require_tool("fincore", "page-cache residency of a written file")
    driver = FilesystemDriver(str(tmp_path), direct_io=False)
    digest = hashlib.sha256()
    for _ in range(96 // per_writer):
        writer = await driver.append("/stream")
        for _ in range(per_writer):
            block = os.urandom(4 << 20)
            digest.update(block)
            await _pipeline_write(writer, [block])
        await writer.close()
    assert (tmp_path / "stream").stat().st_size == 384 << 20
    assert resident_bytes(fincore, tmp_path / "stream") <= CACHE_BEHIND + 2 * WRITEBACK_STEP
    writer = await driver.append("/stream")
    await writer.commit("/final", writer.size)
    with open(tmp_path / "final", "rb") as f:  # dropped from the cache, not from the file
        check = hashlib.sha256()
        while chunk := f.read(8 << 20):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()
    await driver.close()


async def _write_stream(driver: FilesystemDriver, path: str, pieces: list[list[bytes]],
                        small_first: bytes = b"") -> None:
    """Each list of pieces is one writer (one PATCH), appended in the pipeline thread's way."""
    for index, batches in enumerate(pieces):
        writer = await driver.append(path)
        if index == 0 and small_first:
            await writer.write([small_first])  # a small body, written inline
        for batch in batches:
            await _pipeline_write(writer, [batch])
        await writer.close()


def _random_pieces(seed: int, writers: int) -> list[list[bytes]]:
    import random
    rng = random.Random(seed)
    sizes = [1, 4095, 4096, 4097, 65536 + 7, directio.BUFFER - 1, directio.BUFFER + 4096 + 3, 3 << 20]
    return [[os.urandom(rng.choice(sizes)) for _ in range(rng.randint(1, 6))] for _ in range(writers)]


@pytest.mark.parametrize("seed", range(6))
async def test_direct_appends_keep_every_byte_in_order(tmp_path: Path, seed: int):
    """Writers that start mid-block, batches of every size around the block and buffer size,
    a small inline write first: the file is exactly the bytes in order."""
    driver = FilesystemDriver(str(tmp_path))
    pieces = _random_pieces(seed, writers=4)
    small = os.urandom(seed * 1000 + 1)
    await _write_stream(driver, "/upload", pieces, small_first=small)
    expected = small + b"".join(b for batches in pieces for b in batches)
    assert (tmp_path / "upload").read_bytes() == expected
    await driver.close()


async def test_direct_stream_bypasses_the_page_cache(tmp_path: Path):
    fincore = require_tool("fincore", "page-cache residency of a written file")
    driver = FilesystemDriver(str(tmp_path))
    blocks = [os.urandom(4 << 20) for _ in range(32)]
    await _write_stream(driver, "/stream", [blocks[:16], blocks[16:]])
    # At most the partial blocks written through the cache at each writer's end and start.
    assert resident_bytes(fincore, tmp_path / "stream") <= 4 * directio.ALIGN
    writer = await driver.append("/stream")
    await writer.commit("/final", writer.size)
    assert hashlib.sha256((tmp_path / "final").read_bytes()).digest() == \
        hashlib.sha256(b"".join(blocks)).digest()
    await driver.close()


async def test_without_direct_io_the_writer_falls_back_to_buffered(tmp_path: Path, monkeypatch):
    """A filesystem that refuses O_DIRECT (some FUSE and network filesystems) still gets every
    byte, through the page cache."""
    def refuse(fd: int, on: bool) -> None:
        if on:
            raise OSError(22, "Invalid argument")
    monkeypatch.setattr(directio, "_set_direct", refuse)
    driver = FilesystemDriver(str(tmp_path))
    pieces = _random_pieces(7, writers=2)
    await _write_stream(driver, "/upload", pieces)
    assert (tmp_path / "upload").read_bytes() == b"".join(b for batches in pieces for b in batches)
    await driver.close()


def test_a_failed_direct_write_leaves_a_gapless_prefix(tmp_path: Path, monkeypatch):
    """The disk fills up in the middle of a write: what is on disk afterwards, flush included,
    is a prefix of the stream, no byte repeated or skipped, so a resumed upload continues from
    the file's size."""
    path = tmp_path / "upload"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    data = os.urandom(3 * directio.BUFFER + 1234)
    real_writev = os.writev
    calls = {"n": 0}

    def failing_writev(wfd: int, buffers) -> int:
        if wfd != fd:  # os.writev is patched process-wide: leave everyone else's writes alone
            return real_writev(wfd, buffers)
        calls["n"] += 1
        if calls["n"] == 1:  # a short write ...
            return real_writev(wfd, [buffers[0], memoryview(buffers[1])[:directio.ALIGN * 3]])
        if calls["n"] == 2:  # ... then the disk is full
            raise OSError(28, "No space left on device")
        return real_writev(wfd, buffers)

    appender = directio.DirectAppender(fd, 0)
    appender.stage(data)
    monkeypatch.setattr(directio.os, "writev", failing_writev)
    with pytest.raises(OSError):
        appender.write(appender.take()[1])
    monkeypatch.setattr(directio.os, "writev", real_writev)
    appender.flush()
    os.close(fd)
    assert calls["n"] == 2
    assert path.read_bytes() == data[:directio.BUFFER + 3 * directio.ALIGN]


def test_staging_never_waits_and_a_failed_write_stops_it(tmp_path: Path, monkeypatch):
    """Staging runs on the event loop, so it never waits for the device: with every buffer
    staged and none written yet, it makes another (the pipeline's bound on unwritten bytes
    keeps this from happening in a stream). After a failed write, staging fails at once, and
    nothing more reaches the file."""
    path = tmp_path / "upload"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    appender = directio.DirectAppender(fd, 0)
    data = os.urandom(directio.BUFFERS * directio.BUFFER + directio.ALIGN + 5)
    appender.stage(data)
    to_hash, ready = appender.take()
    assert b"".join(bytes(part) for part in to_hash) == data
    assert len({id(block.buffer) for block in ready}) == directio.BUFFERS + 1

    def full(wfd: int, buffers) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(directio.os, "writev", full)
    with pytest.raises(OSError):
        appender.write(ready)
    with pytest.raises(OSError) as later:
        appender.stage(b"z")
    assert later.value.errno == errno.EIO
    monkeypatch.undo()
    appender.flush()
    os.close(fd)
    assert path.read_bytes() == b""


async def test_a_device_that_refuses_the_alignment_gets_buffered_writes(tmp_path: Path, monkeypatch):
    """O_DIRECT accepted, but the device wants larger blocks than ALIGN: its first direct write
    fails with EINVAL, and the writer carries on through the page cache without losing a byte."""
    real_writev = os.writev

    def strict_writev(fd: int, buffers) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_writev(fd, buffers)
    monkeypatch.setattr(directio.os, "writev", strict_writev)
    driver = FilesystemDriver(str(tmp_path))
    pieces = _random_pieces(3, writers=3)
    await _write_stream(driver, "/upload", pieces, small_first=b"x" * 100)
    expected = b"x" * 100 + b"".join(b for batches in pieces for b in batches)
    assert (tmp_path / "upload").read_bytes() == expected
    await driver.close()


MOUNTINFO = """\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:40 / /srv/registry rw,relatime shared:9 - nfs4 fs:/export rw,vers=4.2
31 30 252:1 / /srv/registry/local rw,relatime shared:10 - xfs /dev/vdb rw
32 22 0:41 / /mnt/my\\040share rw,relatime shared:11 - fuse.sshfs host:/d rw
"""


@pytest.mark.parametrize("path,kind,direct", [
    ("/var/lib/registry", "ext4", True),
    ("/srv/registry/docker", "nfs4", False),
    ("/srv/registry/local/docker", "xfs", True),
    ("/srv/registryx", "ext4", True),           # a sibling, not inside the NFS mount
    ("/mnt/my share/registry", "fuse.sshfs", False),
])
def test_direct_io_is_chosen_by_filesystem_type(tmp_path: Path, path: str, kind: str, direct: bool):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    assert directio.filesystem_type(path, str(mountinfo)) == kind
    assert directio.direct_io_suits(path, str(mountinfo)) is direct


def test_filesystem_type_agrees_with_findmnt(tmp_path: Path):
    findmnt = require_tool("findmnt", "the filesystem type of a path, from util-linux")
    out = subprocess.check_output([findmnt, "-n", "-o", "FSTYPE", "--target", str(tmp_path)], text=True)
    assert directio.filesystem_type(str(tmp_path)) == out.strip()


def test_staging_buffers_may_be_huge_pages():
    """The aligned buffers are private mappings advised for transparent huge pages, which the
    kernel honours where THP is enabled always or on request (madvise)."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.exists() or "[never]" in setting.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    buf = directio._Buffer()
    try:
        mapping = Path("/proc/self/smaps").read_text().split(f"\n{buf.addr:x}-", 1)[1]
        eligible = re.search(r"^THPeligible:\s*(\d)", mapping, re.MULTILINE)  # its own, the first
        assert eligible is not None and eligible.group(1) == "1"
    finally:
        buf.close()


async def _commit_direct(driver: FilesystemDriver, data: bytes, dest: str) -> None:
    writer = await driver.create()
    await _pipeline_write(writer, [data])
    await writer.commit(dest, len(data), readonly=True)


@pytest.mark.parametrize("budget,warmed", [(None, 16 << 20), (4 << 20, 4 << 20), (0, 0)],
                         ids=["default budget", "budget of 4 MiB", "off"])
async def test_blobs_written_past_the_cache_are_read_back_after_a_while(tmp_path: Path, monkeypatch,
                                                                     budget, warmed):
    """A blob just committed is not in the page cache (it was written with O_DIRECT); a few
    seconds later it is, as far as the budget goes (and not at all with none)."""
    fincore = require_tool("fincore", "page-cache residency of a written file")
    from regserve.storage import filesystem
    monkeypatch.setattr(filesystem.Prewarmer, "DELAY", 0.2)
    driver = FilesystemDriver(str(tmp_path), prewarm=budget)
    data = os.urandom(16 << 20)
    await _commit_direct(driver, data, "/blob/data")
    blob = tmp_path / "blob/data"
    assert resident_bytes(fincore, blob) <= directio.ALIGN
    for _ in range(100):
        await asyncio.sleep(0.05)
        if warmed and resident_bytes(fincore, blob) >= warmed:
            break
    await asyncio.sleep(0.3)  # and no more than that
    assert warmed <= resident_bytes(fincore, blob) <= warmed + directio.ALIGN
    assert blob.read_bytes() == data
    await driver.close()


async def test_a_cold_download_asks_the_disk_ahead_of_the_socket(aiohttp_client, app_factory, data_dir,
                                                                monkeypatch):
    """A blob that is on disk only is read ahead of what the socket takes: the disk is asked
    for the whole blob, in order, a window ahead, and the bytes sent are exact."""
    from regserve.api import sendfile
    asked: list[tuple[int, int]] = []
    real = sendfile._advise
    monkeypatch.setattr(sendfile, "_advise", lambda fd, off, n: asked.append((off, n)) or real(fd, off, n))
    client = await aiohttp_client(app_factory(REGISTRY_STORAGE_FILESYSTEM_PREWARM="0"))
    data = os.urandom(48 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert (await client.post(f"/v2/a/blobs/uploads/?digest={digest}", data=data)).status == 201
    r = await client.get(f"/v2/a/blobs/{digest}")
    assert r.status == 200 and await r.read() == data
    assert asked and asked[0][0] == 0
    covered = sorted(asked)
    assert all(a[0] + a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    assert covered[-1][0] + covered[-1][1] == len(data)


async def test_a_layer_pushed_in_a_session_is_in_the_cache_soon_after(aiohttp_client, app_factory, data_dir,
                                                                    monkeypatch):
    """docker's way: the data goes in with a PATCH, the PUT that commits it carries none. The
    layer is read back into the page cache a little after the PUT, ready for the pulls that
    follow a push."""
    fincore = require_tool("fincore", "page-cache residency of a written file")
    from regserve.storage import filesystem
    monkeypatch.setattr(filesystem.Prewarmer, "DELAY", 0.2)
    client = await aiohttp_client(app_factory())
    data = os.urandom(24 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = await client.post("/v2/a/blobs/uploads/")
    r = await client.patch(r.headers["Location"], data=data)
    assert r.status == 202
    assert (await client.put(f"{r.headers['Location']}?digest={digest}")).status == 201
    h = digest.split(":")[1]
    blob = data_dir / f"docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"
    assert resident_bytes(fincore, blob) < 1 << 20  # written past the cache
    for _ in range(100):
        await asyncio.sleep(0.05)
        if resident_bytes(fincore, blob) == len(data):
            break
    assert resident_bytes(fincore, blob) == len(data)
