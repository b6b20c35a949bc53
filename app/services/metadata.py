"""DICOM JSON metadata of cached instances, each encoded once.

A viewer opens a study by asking for the metadata of every series, and asks
again on every reload; encoding an instance (reading its header with pydicom,
walking it, JSON) costs about 0.6 ms, so a 300-instance series took longer
through the gateway than through Orthanc's own DICOMweb.  Cached files never
change in place (a new copy is renamed over the old one), so an instance's
encoding stays valid for as long as its file is the same file: the memo is
keyed by path, inode, size and modification time.

The encoding holds its BulkDataURIs relative to a per-process token, replaced
by the request's base URL when the answer is assembled, so one memo entry
serves every host name and node prefix a client may use.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from app.cache import CachedInstance
from app.dicomweb import instances as dicom_files
from app.dicomweb.json import dumps
from app.services.feeder import BatchFeeder
from app.services.retrieve import Delivery

_Key = tuple[str, int, int, int]


class MetadataStore:
    """``MetadataStore(max_bytes)``: thread-safe; ``encoded`` runs off the event loop."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Random per process: no DICOM value holds it by chance, and no client can guess it.
        self._token = f"urn:dimse-gateway-base:{secrets.token_hex(8)}"
        self._token_bytes = self._token.encode()
        self._memo: OrderedDict[_Key, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encoded(self, inst: CachedInstance) -> bytes:
        """The instance's DICOM JSON object, UTF-8, BulkDataURIs on the token.

        OSError when the file is gone or unreadable.
        """
        st = os.stat(inst.file)
        key = (inst.file, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._memo.get(key)
            if found is not None:
                self._memo.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        url = (
            f"{self._token}/studies/{inst.study_uid}/series/{inst.series_uid}"
            f"/instances/{inst.sop_uid}/bulkdata/"
        )

        def bulk_uri(path: tuple[int, ...]) -> str:
            return url + "/".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))

        # dumps() writes a list; the object alone is the text between the brackets.
        data = dumps([dicom_files.metadata(Path(inst.file), bulk_uri)])[1:-1]
        if len(data) <= self.max_bytes:
            with self._lock:
                if key not in self._memo:
                    self._memo[key] = data
                    self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, dropped = self._memo.popitem(last=False)
                    self._bytes -= len(dropped)
        return data

    def encoded_all(self, instances: Iterable[CachedInstance]) -> list[bytes]:
        # One thread for a whole batch: hundreds of small GIL-bound tasks spread
        # over the pool ran slower than one after the other.
        return [self.encoded(inst) for inst in instances]

    async def of_delivery(self, delivery: Delivery) -> tuple[list[bytes], str | None, bool]:
        """The DICOM JSON of every instance of *delivery*, a Warning text (missing
        instances, or a PACS warning status) and whether instances are missing.

        Instances are encoded as they arrive, so a cold series' metadata is
        ready soon after its last instance.
        """
        await delivery.prepare()
        parts: list[bytes] = []
        feeder: BatchFeeder[CachedInstance] = BatchFeeder(
            lambda batch: parts.extend(self.encoded_all(batch))
        )
        try:
            async for inst in delivery:
                feeder.push(inst)
            await feeder.finish()
        except BaseException:
            feeder.cancel()
            raise
        if delivery.complete:
            return parts, "; ".join(delivery.notes) or None, False
        if not parts and delivery.errors:
            raise delivery.errors[0]
        return parts, "; ".join(delivery.problems) or "the retrieve did not complete", True

    def document(self, parts: list[bytes], base: str) -> bytes:
        """The JSON array of *parts* with BulkDataURIs under *base* (a URL)."""
        body = b"[" + b",".join(parts) + b"]"
        # The base comes from the request's Host header: escape it as JSON.
        return body.replace(self._token_bytes, json.dumps(base, ensure_ascii=False)[1:-1].encode())
