"""The filesystem driver's streaming writer, against the kernel it runs on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

from regserve.storage.filesystem import CACHE_BEHIND, WRITEBACK_STEP, FilesystemDriver

from .conftest import require_tool


def resident_bytes(fincore: str, path: Path) -> int:
    out = subprocess.check_output([fincore, "--bytes", "--noheadings", "--output", "RES", str(path)])
    return int(out.strip())


async def test_a_large_stream_keeps_only_its_tail_in_the_page_cache(tmp_path: Path):
    fincore = require_tool("fincore", "page-cache residency of a written file")
    driver = FilesystemDriver(str(tmp_path))
    writer = await driver.writer("/stream")
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    for _ in range(96):  # 384 MiB in 4 MiB writes, as the upload pipeline's thread makes them
        block = os.urandom(4 << 20)
        digest.update(block)
        await loop.run_in_executor(None, writer.write_from_thread, [block], loop)
    assert writer.size == 384 << 20
    assert resident_bytes(fincore, tmp_path / "stream") <= CACHE_BEHIND + 2 * WRITEBACK_STEP
    await writer.commit("/final")
    with open(tmp_path / "final", "rb") as f:  # dropped from the cache, not from the file
        check = hashlib.sha256()
        while chunk := f.read(8 << 20):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()
    await driver.close()
