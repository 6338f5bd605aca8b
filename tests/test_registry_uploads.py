"""The upload stream (registry/uploads.py stream_into) on a real filesystem writer."""

import asyncio
import os
import threading
import time

import pytest

from regserve import hashstate
from regserve.registry import uploads
from regserve.storage.filesystem import FilesystemDriver

BATCH = uploads.BATCH_BYTES


async def test_stream_outlives_repeated_cancellation_until_its_threads_are_done(tmp_path):
    """Cancelled while the client stalls, the stream keeps what arrived: its threads finish
    their batches before the caller may close the writer, even when the task is cancelled again
    meanwhile (as aiohttp's shutdown may). Writes after the close would go to a closed (or
    reused) descriptor and a freed buffer."""
    driver = FilesystemDriver(str(tmp_path))
    writer = await driver.writer("/upload/data")
    real_write = writer.write_from_thread
    closing = False
    late_writes = []

    def slow_write(chunks, loop):
        time.sleep(0.05)  # a slow disk: the pipeline is still busy when the cancellations come
        if closing:
            late_writes.append(sum(map(len, chunks)))
            return
        real_write(chunks, loop)
    writer.write_from_thread = slow_write

    data = os.urandom(12 * BATCH)
    all_sent = asyncio.Event()

    async def body():
        for start in range(0, len(data), BATCH):
            yield data[start:start + BATCH]
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

    task = asyncio.ensure_future(upload())
    await asyncio.wait_for(all_sent.wait(), 10)
    task.cancel()
    await asyncio.sleep(0.02)  # the stream is now settling: its threads drain
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    for thread in threading.enumerate():  # with the writer closed too early, they go on
        if thread.name.startswith("upload-"):
            await asyncio.to_thread(thread.join, 10)
    assert late_writes == []
    assert (tmp_path / "upload/data").read_bytes() == data
    assert hasher.length == len(data)
