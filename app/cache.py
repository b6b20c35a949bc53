"""The on-disk instance store: Part 10 files under ``work_dir``, indexed in sqlite.

Files are written by the storage SCP into ``tmp/`` and renamed into place only
when complete, then indexed with their size; a file whose size no longer matches
its index entry is never served.  The index survives restarts; files without an
entry (a crash between rename and index) are removed at start-up.  The store is
bounded by ``max_bytes`` with least-recently-used eviction.

Paths derive only from validated UIDs, never from anything a client or PACS
sends as a name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.dicomweb.query import valid_uid

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS instances_access ON instances (last_access);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    -- Instances a complete retrieve delivered; NULL while unknown.
    complete_count INTEGER,
    updated REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class WrittenInstance:
    """A completely written temporary file and what it holds, to be committed."""

    temp: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str


@dataclass(frozen=True)
class CachedInstance:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    # A string: a warm retrieve lists hundreds of instances, and building Path
    # objects for them cost more than the index lookup and the stats together.
    file: str

    @property
    def path(self) -> Path:
        return Path(self.file)


class InstanceCache:
    """Thread-safe: the storage SCP's threads write, request handlers read."""

    def __init__(self, root: Path, *, max_bytes: int, protect_recent: float = 60.0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.protect_recent = protect_recent
        self._files = root / "instances"
        self._tmp = root / "tmp"
        self._files.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # (kind, result) -> lookups, read by /metrics: ("instance", "hit"), ("series", "miss").
        self.lookups: Counter[tuple[str, str]] = Counter()
        self._db = sqlite3.connect(root / "index.sqlite3", check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._bytes = self._total()
        self._sweep()

    # -- paths -------------------------------------------------------------

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        if not valid_uid(sop_uid):
            raise ValueError(f"not a valid UID: {sop_uid[:70]!r}")
        return Path(self.folder_for(study_uid, series_uid), f"{sop_uid}.dcm")

    def folder_for(self, study_uid: str, series_uid: str) -> str:
        """The folder of a series' files (which may not exist yet)."""
        for uid in (study_uid, series_uid):
            if not valid_uid(uid):
                raise ValueError(f"not a valid UID: {uid[:70]!r}")
        return f"{self._files}{os.sep}{study_uid}{os.sep}{series_uid}"

    @property
    def temp_dir(self) -> Path:
        """Where instances are written before :meth:`commit` (same file system)."""
        return self._tmp

    def temp_path(self) -> Path:
        return self._tmp / f"{uuid.uuid4().hex}.part"

    # -- writing -----------------------------------------------------------

    def commit(
        self,
        temp: Path,
        *,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
    ) -> CachedInstance:
        """Move a completely written temp file into place and index it.

        OSError or ValueError (an invalid UID) if it cannot be kept; the temp
        file, if still there, is then the caller's to delete.
        """
        written = WrittenInstance(
            temp, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax
        )
        with self._lock:
            placed = self._place(written)
            try:
                (instance,) = self._index([placed])
            except sqlite3.Error:
                # Renamed but not indexed: the file is nobody's.
                with contextlib.suppress(OSError):
                    os.unlink(placed[1])
                raise OSError(f"could not index {sop_uid}") from None
        self._bound()
        return instance

    def commit_many(self, written: Sequence[WrittenInstance]) -> list[CachedInstance | None]:
        """:meth:`commit` for several files, indexed in one transaction.

        None in place of a file that could not be kept (logged, its temp file
        deleted): the retrieve it belonged to then counts it missing.
        """
        placed: list[tuple[WrittenInstance, str, int]] = []
        positions: list[int] = []
        out: list[CachedInstance | None] = [None] * len(written)
        # Renamed and indexed under the lock eviction holds: eviction never
        # deletes a file renamed in place of the copy it chose.
        with self._lock:
            for position, item in enumerate(written):
                try:
                    placed.append(self._place(item))
                except (OSError, ValueError) as exc:
                    log.error("could not keep %s: %s", item.sop_uid, exc)
                    item.temp.unlink(missing_ok=True)
                else:
                    positions.append(position)
            try:
                indexed = self._index(placed)
            except sqlite3.Error as exc:
                log.error("could not index %d instances: %s", len(placed), exc)
                for _, final, _ in placed:
                    with contextlib.suppress(OSError):
                        os.unlink(final)
                return out
        self._bound()
        for position, instance in zip(positions, indexed, strict=True):
            out[position] = instance
        return out

    def _place(self, item: WrittenInstance) -> tuple[WrittenInstance, str, int]:
        """Rename the file into place: (item, final path, size)."""
        folder = self.folder_for(item.study_uid, item.series_uid)
        if not valid_uid(item.sop_uid):
            raise ValueError(f"not a valid UID: {item.sop_uid[:70]!r}")
        final = f"{folder}{os.sep}{item.sop_uid}.dcm"
        size = os.stat(item.temp).st_size
        try:
            os.replace(item.temp, final)
        except FileNotFoundError:
            # The series' folder does not exist yet (asking first, every time,
            # cost more than the rename).
            os.makedirs(folder, exist_ok=True)
            os.replace(item.temp, final)
        return item, final, size

    def _index(self, placed: Sequence[tuple[WrittenInstance, str, int]]) -> list[CachedInstance]:
        """Index placed files in one transaction; the caller holds the lock."""
        if not placed:
            return []
        now = time.time()
        try:
            # Sizes already counted, this batch's included: the same
            # instance twice in one batch (two retrieves overlapping)
            # replaces itself, it does not add up.
            counted: dict[str, int] = {}
            grown = 0
            for item, _, size in placed:
                if item.sop_uid in counted:
                    old = counted[item.sop_uid]
                else:
                    row = self._db.execute(
                        "SELECT size FROM instances WHERE sop_uid = ?", (item.sop_uid,)
                    ).fetchone()
                    old = row[0] if row else 0
                grown += size - old
                counted[item.sop_uid] = size
            rows = [
                (i.sop_uid, i.study_uid, i.series_uid, i.sop_class_uid, i.transfer_syntax, size)
                for i, _, size in placed
            ]
            self._db.executemany(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in rows],
            )
            # One commit per batch: per instance, the commit was the
            # largest share of the gateway's own CPU time in a cold retrieve.
            self._db.commit()
        except sqlite3.Error:
            # Nothing of the batch may stay in an open transaction that a
            # later, unrelated commit would write.
            self._db.rollback()
            raise
        self._bytes += grown
        return [
            CachedInstance(*row, final) for row, (_, final, _) in zip(rows, placed, strict=True)
        ]

    def _bound(self) -> None:
        if self._bytes > self.max_bytes:
            try:
                self.evict()
            except (OSError, ValueError, sqlite3.Error) as exc:
                # The instances are kept; the bound is enforced next time.
                log.error("cache eviction failed: %s", exc)

    def mark_series_complete(self, study_uid: str, series_uid: str, count: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO series VALUES (?, ?, ?, ?)",
                (series_uid, study_uid, count, time.time()),
            )
            self._db.commit()

    # -- reading -----------------------------------------------------------

    def get(self, sop_uid: str) -> CachedInstance | None:
        """The instance if it is cached and intact; touches its LRU time."""
        with self._lock:
            row = self._db.execute(
                "SELECT sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, size "
                "FROM instances WHERE sop_uid = ?",
                (sop_uid,),
            ).fetchone()
            if row is None:
                self.lookups["instance", "miss"] += 1
                return None
            self._db.execute(
                "UPDATE instances SET last_access = ? WHERE sop_uid = ?", (time.time(), sop_uid)
            )
            self._db.commit()
        found = self._checked(row)
        with self._lock:
            self.lookups["instance", "hit" if found else "miss"] += 1
        return found

    def series(self, series_uid: str) -> list[CachedInstance] | None:
        """All instances of a series known to be complete, or None.

        Complete means a retrieve ended with every sub-operation delivered and
        all of those instances are still here and intact.
        """
        with self._lock:
            meta = self._db.execute(
                "SELECT complete_count FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if meta is None or meta[0] is None:
                self.lookups["series", "miss"] += 1
                return None
            rows = self._db.execute(
                "SELECT sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, size "
                "FROM instances WHERE series_uid = ?",
                (series_uid,),
            ).fetchall()
            if len(rows) < meta[0]:
                self.lookups["series", "miss"] += 1
                return None
            self._db.execute(
                "UPDATE instances SET last_access = ? WHERE series_uid = ?",
                (time.time(), series_uid),
            )
            self._db.commit()
        folders: dict[tuple[str, str], str] = {}
        out = []
        for row in rows:
            key = (row[1], row[2])
            folder = folders.get(key)
            if folder is None:
                folder = folders[key] = self.folder_for(row[1], row[2])
            out.append(self._checked(row, folder))
        whole = all(i is not None for i in out)
        with self._lock:
            self.lookups["series", "hit" if whole else "miss"] += 1
        return [i for i in out if i is not None] if whole else None

    def study_series(self, study_uid: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid FROM series WHERE study_uid = ?", (study_uid,)
            ).fetchall()
        return [r[0] for r in rows]

    def _checked(
        self, row: tuple[str, str, str, str, str, int], folder: str | None = None
    ) -> CachedInstance | None:
        """The row as an instance if its file is there with the indexed size.

        ``folder``: the row's study/series folder, already validated.
        """
        sop, study, series, sop_class, ts, size = row
        if folder is None:
            path = str(self.path_for(study, series, sop))
        elif valid_uid(sop):
            path = f"{folder}{os.sep}{sop}.dcm"
        else:
            path = ""
        try:
            actual = os.stat(path).st_size if path else -1
        except FileNotFoundError:
            actual = -1
        if actual != size:
            log.warning("cached instance %s is missing or truncated; dropping it", sop)
            self._forget(sop)
            return None
        return CachedInstance(sop, study, series, sop_class, ts, size, path)

    # -- housekeeping ------------------------------------------------------

    def _forget(self, sop_uid: str) -> None:
        with self._lock:
            row = self._db.execute(
                "SELECT size, series_uid FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            if row is None:
                return
            self._db.execute("DELETE FROM instances WHERE sop_uid = ?", (sop_uid,))
            # The series can no longer be served whole without a new retrieve.
            self._db.execute(
                "UPDATE series SET complete_count = NULL WHERE series_uid = ?", (row[1],)
            )
            self._db.commit()
            self._bytes -= row[0]

    def evict(self) -> int:
        """Remove least recently used instances until under ``max_bytes``."""
        removed = 0
        # Instances touched in the last minute may be on their way to a client
        # (a retrieve larger than the cache): the bound is exceeded for a while
        # rather than a stream losing the file it is about to send.
        recent = time.time() - self.protect_recent
        while self._bytes > self.max_bytes:
            with self._lock:
                rows = self._db.execute(
                    "SELECT sop_uid, study_uid, series_uid FROM instances "
                    "WHERE last_access < ? ORDER BY last_access LIMIT 64",
                    (recent,),
                ).fetchall()
            if not rows:
                log.warning(
                    "cache holds %d bytes, over its %d byte bound, all of it in use",
                    self._bytes,
                    self.max_bytes,
                )
                break
            for sop, study, series in rows:
                if self._evict_one(sop, study, series, recent):
                    removed += 1
                if self._bytes <= self.max_bytes:
                    break
        if removed:
            log.info("cache evicted %d instances; %d bytes held", removed, self._bytes)
        return removed

    def _evict_one(self, sop: str, study: str, series: str, recent: float) -> bool:
        """Delete one instance chosen for eviction, unless it was used or
        replaced since: the check, the unlink and the index row under one lock,
        as a commit renames and indexes under it."""
        with self._lock:
            row = self._db.execute(
                "SELECT size, last_access FROM instances WHERE sop_uid = ?", (sop,)
            ).fetchone()
            if row is None or row[1] >= recent:
                return False
            self.path_for(study, series, sop).unlink(missing_ok=True)
            self._db.execute("DELETE FROM instances WHERE sop_uid = ?", (sop,))
            # The series can no longer be served whole without a new retrieve.
            self._db.execute(
                "UPDATE series SET complete_count = NULL WHERE series_uid = ?", (series,)
            )
            self._db.commit()
            self._bytes -= row[0]
            return True

    def _total(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()
        return int(row[0])

    def _sweep(self) -> None:
        """Drop half-written temp files and files the index does not know."""
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT sop_uid FROM instances")}
        for path in self._all_files():
            if path.stem not in known:
                path.unlink(missing_ok=True)

    def _all_files(self) -> Iterator[Path]:
        yield from self._files.glob("*/*/*.dcm")

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()
