"""to_the_end: work handed to a thread is waited out, whatever the cancellations."""

import asyncio
import threading

import pytest

from regserve.storage.filesystem import FilesystemDriver
from regserve.uncancellable import to_the_end


async def cancel_then_release(task: asyncio.Future, release: threading.Event, times: int = 1) -> None:
    """Cancel `task` `times` times: it must still be waiting; then let the work end, and the
    task end cancelled."""
    await asyncio.sleep(0.01)
    for _ in range(times):
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancellations_wait_for_the_work_then_are_raised():
    release, done = threading.Event(), threading.Event()

    def work():
        assert release.wait(10)
        done.set()
        return "result"
    task = asyncio.ensure_future(to_the_end(asyncio.to_thread(work)))
    await cancel_then_release(task, release, times=3)
    assert done.is_set()


async def test_result_and_error_pass_through():
    assert await to_the_end(asyncio.sleep(0, "value")) == "value"
    with pytest.raises(ZeroDivisionError):
        await to_the_end(asyncio.to_thread(lambda: 1 / 0))


async def test_filesystem_calls_are_not_abandoned(tmp_path):
    """The driver's thread calls are waited out: a cancelled commit does not let the caller
    close the writer (and its descriptor) while the thread still fsyncs and renames."""
    driver = FilesystemDriver(str(tmp_path))
    release = threading.Event()
    await cancel_then_release(asyncio.ensure_future(driver._run(release.wait, 10)), release)
