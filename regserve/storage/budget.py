"""A byte budget the upload writers of one process share (per driver), taken on the event loop.

Each writer takes room before the pipeline reads on in a body (FileWriter.admit) and gives it
back once the bytes are out of its hands (on S3: acknowledged in a part; on a filesystem:
written), so concurrent pushes wait for room, their bodies unread, instead of growing the
process. Waiting holds no thread.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """`limit` bytes; a request larger than the limit is granted alone (when nothing is held),
    so it is slow, never stuck. Waiters are served in order: no small request starves a large
    one."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.used == 0

    async def take(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(n)  # granted as we were cancelled: pass it on
            else:
                self._waiters.remove((n, waiter))
            raise

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiters and self._fits(self._waiters[0][0]):
            n, waiter = self._waiters.pop(0)
            if not waiter.done():
                self.used += n
                waiter.set_result(None)
