"""C-CANCEL for a C-MOVE or C-GET that is waiting on a silent PACS.

The operation's thread sits in pynetdicom's response iterator, which gives it
control only when a response arrives.  A PACS that takes its time before the
first sub-operation (a cold archive, a slow disk) would then learn of the
cancellation only when it finally answers.  A watcher thread sends the
C-CANCEL-RQ as soon as the retrieve is abandoned (PS3.7 9.3.2.3, 9.3.3.3: it
may come at any time while the operation is outstanding).  pynetdicom queues
outgoing PDUs through a thread-safe queue, so this one extra message from
another thread does not interleave with the operation's own messages.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from types import TracebackType

from pynetdicom.association import Association

log = logging.getLogger(__name__)

_POLL = 0.05


class CancelWatcher:
    """``with CancelWatcher(assoc, msg_id, model, cancel) as watcher:`` around the
    response loop; call :meth:`send` from the loop too (only one C-CANCEL goes out)."""

    def __init__(
        self, assoc: Association, msg_id: int, model: str, cancel: threading.Event
    ) -> None:
        self._assoc = assoc
        self._msg_id = msg_id
        self._model = model
        self._cancel = cancel
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.sent = False
        self._thread = threading.Thread(target=self._watch, name=f"cancel-{msg_id}", daemon=True)

    def __enter__(self) -> CancelWatcher:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()

    def send(self) -> None:
        """Send C-CANCEL once, unless the operation already ended."""
        with self._lock:
            if self.sent or self._done.is_set() or not self._assoc.is_established:
                return
            self.sent = True
            with contextlib.suppress(Exception):
                self._assoc.send_c_cancel(self._msg_id, query_model=self._model)
                log.debug("C-CANCEL sent for message %d", self._msg_id)

    def _watch(self) -> None:
        while not self._done.is_set():
            if self._cancel.wait(_POLL):
                self.send()
                return
