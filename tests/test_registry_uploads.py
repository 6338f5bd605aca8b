"""The upload stream (registry/uploads.py stream_into) on a real filesystem writer."""

import asyncio
import errno
import hashlib
import os
import random
import time

import pytest

from regserve import hashstate
from regserve.registry import uploads
from regserve.storage import directio
from regserve.storage.budget import ByteBudget
from regserve.storage.filesystem import FilesystemDriver

BATCH = uploads.BATCH_BYTES


async def test_stream_outlives_repeated_cancellation_until_its_threads_are_done(tmp_path):
    """Cancelled while the client stalls, the stream keeps what arrived: its threads finish
    their batches before the caller may close the writer, even when the task is cancelled again
    meanwhile (as aiohttp's shutdown may). Writes after the close would go to a closed (or
    reused) descriptor and a freed buffer."""
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "upload").mkdir()
    writer = await driver.append("/upload/data")
    real_write = writer.write_from_thread
    closing = False
    late_writes = []

    def slow_write(chunks, loop):
        time.sleep(0.05)  # a slow disk: the pipeline is still busy when the cancellations come
        if closing:
            late_writes.append(len(chunks))
            return
        real_write(chunks, loop)
    writer.write_from_thread = slow_write

    data = os.urandom(12 * BATCH)
    all_sent = asyncio.Event()

    async def body():
        for start in range(0, len(data), BATCH):
            yield [data[start:start + BATCH]]
        all_sent.set()
        await asyncio.Event().wait()  # the client stalls

    hasher = hashstate.Hasher("sha256")

    async def upload():
        nonlocal closing
        try:
            await uploads.stream_into(writer, [hasher], body())
        finally:  # as UploadSession.append does
            closing = True
            await writer.close()

    pipelines = []
    real_init = uploads._Pipeline.__init__

    def recording_init(self, *args):
        real_init(self, *args)
        pipelines.append(self)
    uploads._Pipeline.__init__ = recording_init
    try:
        task = asyncio.ensure_future(upload())
        await asyncio.wait_for(all_sent.wait(), 10)
        task.cancel()
        await asyncio.sleep(0.02)  # the stream is now settling: its threads drain
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    finally:
        uploads._Pipeline.__init__ = real_init
    # Settled before the writer was closed: nothing waits in the pools, nothing runs there.
    [pipe] = pipelines
    assert pipe.submitted == pipe.written == len(data)
    for _ in range(100):  # a runner may still be on its way out (it finds nothing more to do)
        if not pipe._hashing._running and not pipe._writing._running:
            break
        await asyncio.sleep(0.01)
    assert not pipe._hashing._running and not pipe._writing._running
    await asyncio.sleep(0.2)  # were anything still queued, it would write now
    assert late_writes == []
    assert (tmp_path / "upload/data").read_bytes() == data
    assert hasher.length == len(data)


async def test_stream_from_mid_block_in_odd_pieces_keeps_every_byte(tmp_path):
    """Through the real threads: an upload whose data so far ends mid-block, continued in pieces
    of every size around the block and buffer sizes. The file is exactly the bytes in order,
    and the hash is theirs."""
    driver = FilesystemDriver(str(tmp_path))
    first = os.urandom(5000)
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload/data").write_bytes(first)
    rng = random.Random(5)
    sizes = [1, 4095, 4096, 4097, 65536 + 7, BATCH, directio.BUFFER - 1, directio.BUFFER + 3]
    pieces = [os.urandom(rng.choice(sizes)) for _ in range(40)]
    writer = await driver.append("/upload/data")
    hasher = hashstate.Hasher("sha256")
    hasher.update(first)

    async def body():  # a few pieces at a time, as aiohttp buffers them
        for start in range(0, len(pieces), 3):
            yield pieces[start:start + 3]

    await uploads.stream_into(writer, [hasher], body())
    await writer.close()
    expected = first + b"".join(pieces)
    assert (tmp_path / "upload/data").read_bytes() == expected
    assert hasher.hexdigest() == hashlib.sha256(expected).hexdigest()
    assert writer.size == len(expected)


async def test_a_write_failing_mid_stream_ends_it_with_that_error(tmp_path, monkeypatch):
    """The disk fills up while the event loop waits for the writes to catch up: the stream
    ends with the disk's error, promptly, and the file keeps a gapless prefix."""
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "upload").mkdir()
    writer = await driver.append("/upload/data")
    real_writev = os.writev
    calls = {"n": 0}

    def slow_then_full(fd: int, buffers) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        time.sleep(0.1)  # meanwhile the bytes in flight reach their bound, and the loop waits
        return real_writev(fd, buffers)
    monkeypatch.setattr(directio.os, "writev", slow_then_full)
    data = os.urandom(64 << 20)

    async def body():
        for start in range(0, len(data), BATCH):
            yield [data[start:start + BATCH]]

    with pytest.raises(OSError) as failure:
        await asyncio.wait_for(uploads.stream_into(writer, [hashstate.Hasher("sha256")], body()), 30)
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.undo()
    await writer.close()
    assert driver.staging.used == 0  # a failed write gives its budget back too
    on_disk = (tmp_path / "upload/data").read_bytes()
    assert 0 < len(on_disk) < len(data)
    assert on_disk == data[:len(on_disk)]


class _BufferCount:
    """Buffers of the process's staging pool out with uploads now, and at most: patched in for
    directio's _buffer and _give_back."""

    def __init__(self, monkeypatch) -> None:
        self.out = self.peak = 0
        self._take, self._back = directio._buffer, directio._give_back
        monkeypatch.setattr(directio, "_buffer", self.take)
        monkeypatch.setattr(directio, "_give_back", self.give_back)

    def take(self):
        self.out += 1
        self.peak = max(self.peak, self.out)
        return self._take()

    def give_back(self, buf) -> None:
        self.out -= 1
        self._back(buf)


async def test_a_slow_disk_holds_the_stream_to_its_buffers(tmp_path, monkeypatch):
    """The event loop stages as data arrives, and never waits for a buffer: the pipeline keeps
    few enough bytes unwritten that a written buffer is always there when one is needed. With a
    disk far slower than the body, a 96 MiB stream holds the buffers of the 20 MiB it may keep
    unwritten, and one or two more, at most; all go back at the end."""
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "upload").mkdir()
    writer = await driver.append("/upload/data")
    real_writev = os.writev
    buffers = _BufferCount(monkeypatch)

    def slow_writev(fd: int, buffers) -> int:
        time.sleep(0.01)
        return real_writev(fd, buffers)

    monkeypatch.setattr(directio.os, "writev", slow_writev)
    data = os.urandom(96 << 20)

    async def body():
        for start in range(0, len(data), 32 << 10):  # docker's frames, several at a time
            yield [data[start + i:start + i + (8 << 10)] for i in range(0, 32 << 10, 8 << 10)]

    hasher = hashstate.Hasher("sha256")
    await uploads.stream_into(writer, [hasher], body())
    await writer.close()
    assert 4 < buffers.peak <= uploads.IN_FLIGHT_BYTES // directio.BUFFER + 2
    assert buffers.out == 0
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "upload/data").read_bytes() == data
    assert driver.staging.used == 0


async def test_concurrent_streams_share_the_staging_budget(tmp_path, monkeypatch):
    """Many pushes at once on one process: the bytes they hold staged and not yet written stay
    within the driver's budget (the rest of each body waits, unread), so their buffers do too;
    every stream gets its bytes through intact, and all the budget comes back."""
    driver = FilesystemDriver(str(tmp_path))
    driver.staging = ByteBudget(4 << 20)
    real_writev, real_give = os.writev, driver.staging.give
    buffers, peak = _BufferCount(monkeypatch), [0]

    def slow_writev(fd: int, buffers) -> int:
        time.sleep(0.002)
        return real_writev(fd, buffers)

    def give(n: int) -> None:
        peak[0] = max(peak[0], driver.staging.used)
        real_give(n)
    monkeypatch.setattr(directio.os, "writev", slow_writev)
    monkeypatch.setattr(driver.staging, "give", give)
    streams = [os.urandom((24 << 20) + i * 4097) for i in range(8)]

    async def push(i: int, data: bytes) -> str:
        (tmp_path / f"u{i}").mkdir()
        writer = await driver.append(f"/u{i}/data")
        hasher = hashstate.Hasher("sha256")

        async def body():
            for start in range(0, len(data), 256 << 10):
                yield [data[start:start + (256 << 10)]]
                await asyncio.sleep(0)

        await uploads.stream_into(writer, [hasher], body())
        await writer.close()
        return hasher.hexdigest()

    digests = await asyncio.wait_for(asyncio.gather(*(push(i, d) for i, d in enumerate(streams))), 60)
    assert digests == [hashlib.sha256(d).hexdigest() for d in streams]
    for i, data in enumerate(streams):
        assert (tmp_path / f"u{i}/data").read_bytes() == data
    assert 0 < peak[0] <= 4 << 20 and driver.staging.used == 0
    # the staged bytes of all, and a buffer each is filling (and one it has just filled)
    assert buffers.peak <= (4 << 20) // directio.BUFFER + 2 * len(streams) and buffers.out == 0


async def test_a_client_gone_mid_body_gives_its_staging_budget_back(tmp_path):
    """The client goes away mid-body: what arrived is kept, and the writer's share of the
    process's staging budget comes back when it is closed."""
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "upload").mkdir()
    writer = await driver.append("/upload/data")
    data = os.urandom(8 << 20)

    async def body():
        for start in range(0, len(data), BATCH):
            yield [data[start:start + BATCH]]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await uploads.stream_into(writer, [hashstate.Hasher("sha256")], body())
    await writer.close()
    assert driver.staging.used == 0
    assert (tmp_path / "upload/data").read_bytes() == data


async def test_a_budget_waiter_cancelled_takes_nothing_and_blocks_no_one():
    """A push cancelled while it waits for room leaves the queue; one cancelled just as room was
    granted passes the room on to the next."""
    budget = ByteBudget(10)
    await budget.take(10)
    first = asyncio.ensure_future(budget.take(6))
    second = asyncio.ensure_future(budget.take(4))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    budget.give(10)
    await asyncio.wait_for(second, 1)
    assert budget.used == 4
    third = asyncio.ensure_future(budget.take(8))
    await asyncio.sleep(0)
    budget.give(4)  # grants the 8 ...
    third.cancel()  # ... just as its taker is cancelled: the room goes back
    await asyncio.gather(third, return_exceptions=True)
    assert budget.used == 0


@pytest.mark.parametrize("survives_crash", [True, False])
async def test_hash_states_are_saved_midway_only_where_a_crash_keeps_the_bytes(tmp_path, monkeypatch,
                                                                             survives_crash):
    """A state saved in the middle of a body is of use only if a crash leaves the data it
    describes: every CHECKPOINT_BYTES where written bytes survive (the filesystem), else (S3)
    once, at the end."""
    monkeypatch.setattr(uploads, "CHECKPOINT_BYTES", 1 << 20)
    driver = FilesystemDriver(str(tmp_path))
    (tmp_path / "upload").mkdir()
    (tmp_path / "upload/data").write_bytes(b"")
    writer = await driver.append("/upload/data")
    writer.survives_crash = survives_crash
    hasher = hashstate.Hasher("sha256")
    saved: list[int] = []

    async def checkpoint() -> None:
        saved.append(hasher.length)

    async def body():
        for _ in range(12):
            yield [os.urandom(BATCH), os.urandom(BATCH)]

    await uploads.stream_into(writer, [hasher], body(), checkpoint)
    await writer.close()
    total = 12 * 2 * BATCH
    assert saved[-1] == total
    if survives_crash:
        assert len(saved) >= 6 and saved == sorted(saved)
    else:
        assert saved == [total]
