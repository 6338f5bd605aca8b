"""Asking the kernel to read parts of a file into the page cache ahead of need.

posix_fadvise(WILLNEED) queues the reads and returns, but Linux reads at most one readahead unit
of the file's device per call (the larger of its read_ahead_kb and max_sectors_kb, often 128 KiB
to 8 MiB): a larger range is silently cut. So a range is asked for in units of that size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os

DEFAULT_UNIT = 128 << 10  # the kernel's own default readahead


@functools.lru_cache(maxsize=64)
def _unit_of(device: int) -> int:
    """The readahead unit of a block device (st_dev), from sysfs; DEFAULT_UNIT where it has none
    (network and virtual filesystems)."""
    base = f"/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):  # a partition's queue is its disk's
        try:
            sizes = [int(open(f"{queue}/{name}").read()) for name in ("read_ahead_kb", "max_sectors_kb")]
        except (OSError, ValueError):
            continue
        return max(DEFAULT_UNIT, max(sizes) << 10)
    return DEFAULT_UNIT


def read_ahead(fd: int, offset: int, length: int) -> None:
    """Queue reads of [offset, offset + length) into the page cache; pages already there cost
    next to nothing. Returns once the reads are queued (it may wait for room in the device's
    queue), not done."""
    unit = _unit_of(os.fstat(fd).st_dev)
    end = offset + length
    while offset < end:
        n = min(unit, end - offset)
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)
        offset += n


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def missing(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The runs of [offset, offset + length) not in the page cache, as (start, end): mincore(2)
    on a mapping of the range, which reads nothing. `offset` is page-aligned. Without mincore,
    the whole range."""
    if _libc is None or length <= 0:
        return [(offset, offset + length)] if length > 0 else []
    page = mmap.PAGESIZE
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, _MAP_FAILED):
        return [(offset, offset + length)]
    try:
        pages = (length + page - 1) // page
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(addr, length, vec) != 0:
            return [(offset, offset + length)]
        runs: list[tuple[int, int]] = []
        start = None
        for i, flag in enumerate(vec.raw):
            if not flag & 1 and start is None:
                start = i
            elif flag & 1 and start is not None:
                runs.append((offset + start * page, offset + i * page))
                start = None
        if start is not None:
            runs.append((offset + start * page, offset + length))
        return runs
    finally:
        _libc.munmap(addr, length)
