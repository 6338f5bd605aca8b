"""Waiting out work that must not be abandoned half-way.

A task cancelled while it awaits a worker thread stops waiting, but the thread goes on. If the
task's cleanup then closes what the thread uses (a file descriptor, a writer, a mapped buffer),
the thread writes through a closed or reused descriptor: into another file or connection.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Await `work` until it is done, even if this task is cancelled meanwhile (once or more);
    a cancellation is raised after it."""
    future = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
            break
        except asyncio.CancelledError:
            if future.done():
                raise  # the work itself was cancelled
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result
