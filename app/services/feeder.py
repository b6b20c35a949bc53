"""Work on a retrieve's instances while the rest are still arriving.

A C-MOVE delivers a 300-slice CT over about half a second.  What a request
does with each instance (read it for NIfTI, encode it as DICOM JSON) runs on
one worker thread, in arrival order, in batches of whatever arrived while the
previous batch was handled (a cached series is one batch), so that when the
retrieve ends little is left to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BatchFeeder"]

T = TypeVar("T")


class BatchFeeder(Generic[T]):
    """``BatchFeeder(consume)``: ``push`` items on the loop; ``consume(batch)`` runs
    off the loop, one batch at a time, in order; ``finish`` waits for the last."""

    def __init__(self, consume: Callable[[list[T]], object]) -> None:
        self._consume = consume
        self._pending: list[T] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    def push(self, item: T) -> None:
        self._pending.append(item)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self._consume, batch)
            elif self._closed:
                return
            else:
                self._wake.clear()
                await self._wake.wait()

    async def finish(self) -> None:
        """Wait until every item pushed has been consumed (raises what ``consume`` raised)."""
        self._closed = True
        self._wake.set()
        await self._task

    def cancel(self) -> None:
        # A batch being consumed finishes on its thread; nothing is consumed after it.
        self._pending.clear()
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # retrieved: the error that matters is raised already
        else:
            self._task.cancel()
