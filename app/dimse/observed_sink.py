"""An ``InstanceSink`` that reports each received C-STORE (status, time) and passes it on.

It wraps a C-GET's sink (C-MOVE arrivals are received by the storage process,
see ``app.metrics``).  The time reported runs from the sink's ``open`` (the command arrived) to its
``close`` (the data set is written).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from app.dimse.storescp import IncomingInstance, InstanceSink

OPERATION = "C-STORE received"

Report = Callable[[IncomingInstance, int | None, float], None]


class ObservedSink:
    """``ObservedSink(sink, report)``: *report(incoming, status, seconds)* after each
    C-STORE; *status* is None when the sink raised (the SCP then answers a failure)."""

    def __init__(self, sink: InstanceSink, report: Report) -> None:
        self.sink = sink
        self.report = report
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        started = time.monotonic()
        try:
            opened = self.sink.open(incoming)
        except Exception:
            self.report(incoming, None, time.monotonic() - started)
            raise
        if isinstance(opened, int):
            self.report(incoming, opened, time.monotonic() - started)
        else:
            with self._lock:
                self._started[id(incoming)] = started
        return opened

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        with self._lock:
            started = self._started.pop(id(incoming), time.monotonic())
        try:
            status = self.sink.close(incoming, file, ok)
        except Exception:
            self.report(incoming, None, time.monotonic() - started)
            raise
        self.report(incoming, status, time.monotonic() - started)
        return status
