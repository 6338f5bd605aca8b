"""The filesystem driver's streaming writer, against the kernel it runs on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from regserve.storage.filesystem import CACHE_BEHIND, WRITEBACK_STEP, FilesystemDriver

from .conftest import require_tool


def resident_bytes(fincore: str, path: Path) -> int:
    out = subprocess.check_output([fincore, "--bytes", "--noheadings", "--output", "RES", str(path)])
    return int(out.strip())


@pytest.mark.parametrize("per_writer", [96, 16], ids=["one writer", "a writer per 64 MiB PATCH"])
async def test_a_large_stream_keeps_only_its_tail_in_the_page_cache(tmp_path: Path, per_writer: int):
    """384 MiB in 4 MiB writes, as the upload pipeline's thread makes them; in one request, or
    in Content-Range PATCHes that each append with a writer of their own."""
    fincore = require_tool("fincore", "page-cache residency of a written file")
    driver = FilesystemDriver(str(tmp_path))
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    for _ in range(96 // per_writer):
        writer = await driver.writer("/stream", append=True)
        for _ in range(per_writer):
            block = os.urandom(4 << 20)
            digest.update(block)
            await loop.run_in_executor(None, writer.write_from_thread, [block], loop)
        await writer.close()
    assert (tmp_path / "stream").stat().st_size == 384 << 20
    assert resident_bytes(fincore, tmp_path / "stream") <= CACHE_BEHIND + 2 * WRITEBACK_STEP
    writer = await driver.writer("/stream", append=True)
    await writer.commit("/final")
    with open(tmp_path / "final", "rb") as f:  # dropped from the cache, not from the file
        check = hashlib.sha256()
        while chunk := f.read(8 << 20):
            check.update(chunk)
    assert check.hexdigest() == digest.hexdigest()
    await driver.close()
