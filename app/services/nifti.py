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

from pathlib import Path

from app.config import PacsNode
from app.convert.intake import SeriesIntake
from app.errors import RetrieveIncomplete
from app.services.feeder import BatchFeeder
from app.services.retrieve import Delivery, Retriever

__all__ = ["receive_series"]


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
    reader: BatchFeeder[Path] = BatchFeeder(intake.add)
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
