"""A series fetched for conversion, read by the converter while its instances arrive.

The instances of a C-MOVE (or C-GET) arrive one by one for about half a second
for a 300-slice CT.  Each is handed, as soon as it is in the cache, to a
:class:`~app.convert.intake.SeriesIntake` on a worker thread: one thread at a
time, the files in arrival order, in batches of whatever arrived while the
previous batch was read (a cached series is one batch).  When the retrieve has
ended only the checks and the assembly remain.  Only a complete series
converts: anything missing is :class:`RetrieveIncomplete`, whatever the files
that did arrive hold.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.config import PacsNode
from app.convert.intake import SeriesIntake
from app.errors import RetrieveIncomplete
from app.services.retrieve import Delivery, Retriever

__all__ = ["IntakeFeeder", "receive_series"]


class IntakeFeeder:
    """Feeds paths to an intake off the event loop, in order, one batch at a time."""

    def __init__(self, intake: SeriesIntake) -> None:
        self.intake = intake
        self._pending: list[Path] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    def push(self, path: Path) -> None:
        self._pending.append(path)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if self._pending:
                batch, self._pending = self._pending, []
                await asyncio.to_thread(self.intake.add, batch)
            elif self._closed:
                return
            else:
                self._wake.clear()
                await self._wake.wait()

    async def finish(self) -> None:
        """Wait until every path pushed has been read."""
        self._closed = True
        self._wake.set()
        await self._task

    def cancel(self) -> None:
        # A batch being read finishes on its thread; nothing is read after it.
        self._pending.clear()
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # retrieved: the error that matters is raised already
        else:
            self._task.cancel()


async def receive_series(
    retriever: Retriever, node: PacsNode, study: str, series: str
) -> SeriesIntake:
    """Fetch the series (cache or move), reading each file as it arrives.

    Raises what the retrieve raises, and :class:`RetrieveIncomplete` when
    instances are missing; conversion errors are left for
    :meth:`SeriesIntake.parts` to raise once the whole series is known.
    """
    delivery = Delivery(retriever, node, study, [series])
    warning = await delivery.prepare()
    intake = SeriesIntake()
    reader = IntakeFeeder(intake)
    try:
        async for instance in delivery:
            reader.push(instance.path)
        # A warning note alone (everything arrived) does not stop the conversion.
        if delivery.partial or not delivery.complete:
            raise RetrieveIncomplete(
                "; ".join(delivery.problems) or warning or "the series did not arrive whole",
                node=node.name,
            )
        await reader.finish()
    except BaseException:
        reader.cancel()
        raise
    return intake
