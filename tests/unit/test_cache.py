"""The on-disk instance cache: atomic commits, integrity, LRU bound, restarts."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from app.cache import InstanceCache, WrittenInstance

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _put(cache: InstanceCache, sop: str, size: int, series: str = SERIES) -> None:
    temp = cache.temp_path()
    temp.write_bytes(b"x" * size)
    cache.commit(
        temp,
        study_uid=STUDY,
        series_uid=series,
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
    )


def test_commit_then_get(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    _put(cache, "1.2.3.4.1", 100)
    got = cache.get("1.2.3.4.1")
    assert got is not None and got.size == 100 and got.path.read_bytes() == b"x" * 100
    assert not list((tmp_path / "tmp").iterdir()), "temp file renamed into place"
    assert cache.get("1.2.3.4.2") is None


def test_truncated_file_is_never_served(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    _put(cache, "1.2.3.4.1", 100)
    _put(cache, "1.2.3.4.2", 100)
    cache.mark_series_complete(STUDY, SERIES, 2)
    assert cache.series(SERIES) is not None
    path = cache.path_for(STUDY, SERIES, "1.2.3.4.1")
    path.write_bytes(b"x" * 10)
    assert cache.get("1.2.3.4.1") is None
    assert cache.series(SERIES) is None, "a series with a broken file is not complete"


def test_series_complete_needs_every_instance(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    _put(cache, "1.2.3.4.1", 10)
    assert cache.series(SERIES) is None, "unknown count: not complete"
    cache.mark_series_complete(STUDY, SERIES, 2)
    assert cache.series(SERIES) is None, "one of two"
    _put(cache, "1.2.3.4.2", 10)
    assert [i.sop_uid for i in cache.series(SERIES) or []] == ["1.2.3.4.1", "1.2.3.4.2"]


def test_least_recently_used_go_first(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=250, protect_recent=0)
    _put(cache, "1.2.3.4.1", 100)
    time.sleep(0.01)
    _put(cache, "1.2.3.4.2", 100)
    time.sleep(0.01)
    assert cache.get("1.2.3.4.1") is not None  # now the most recent
    time.sleep(0.01)
    _put(cache, "1.2.3.4.3", 100)
    assert cache.size_bytes <= 250
    assert cache.get("1.2.3.4.2") is None
    assert cache.get("1.2.3.4.1") is not None
    assert not cache.path_for(STUDY, SERIES, "1.2.3.4.2").exists()


def test_survives_restart_and_sweeps_leftovers(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    _put(cache, "1.2.3.4.1", 100)
    cache.mark_series_complete(STUDY, SERIES, 1)
    stray = cache.path_for(STUDY, SERIES, "1.2.3.4.9")
    stray.write_bytes(b"half")
    half_written = cache.temp_path()
    half_written.write_bytes(b"half")
    cache.close()
    again = InstanceCache(tmp_path, max_bytes=10_000)
    assert again.series(SERIES) is not None
    assert again.size_bytes == 100
    assert not stray.exists() and not half_written.exists()


@pytest.mark.parametrize("bad", ["../../etc", "1.2.3/../../x", "", "1.2.a"])
def test_paths_only_from_valid_uids(tmp_path: Path, bad: str) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    with pytest.raises(ValueError):
        cache.path_for(STUDY, SERIES, bad)


def test_instances_in_use_are_not_evicted(tmp_path: Path) -> None:
    """A retrieve larger than the cache must not lose the files it is streaming."""
    cache = InstanceCache(tmp_path, max_bytes=150)
    for i in range(3):
        _put(cache, f"1.2.3.4.{i}", 100)
    assert all(cache.get(f"1.2.3.4.{i}") is not None for i in range(3))
    assert cache.size_bytes == 300


def _written(cache: InstanceCache, sop: str, size: int) -> WrittenInstance:
    temp = cache.temp_path()
    temp.write_bytes(b"y" * size)
    return WrittenInstance(
        temp, STUDY, SERIES, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"
    )


def _indexed_bytes(root: Path) -> int:
    with sqlite3.connect(root / "index.sqlite3") as db:
        return int(db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])


def test_a_batch_keeps_what_it_can_and_says_which(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    good, bad = _written(cache, "1.2.3.4.1", 100), _written(cache, "1.2.3.4.x", 50)
    out = cache.commit_many([good, bad, _written(cache, "1.2.3.4.2", 70)])
    assert [i.sop_uid if i else None for i in out] == ["1.2.3.4.1", None, "1.2.3.4.2"]
    assert not bad.temp.exists(), "the refused file is deleted"
    assert cache.size_bytes == 170 == _indexed_bytes(tmp_path)
    assert cache.commit_many([]) == []


def test_the_same_instance_twice_in_a_batch_counts_once(tmp_path: Path) -> None:
    # Two retrieves (study and series level) of the same series deliver it twice.
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    _put(cache, "1.2.3.4.1", 40)
    out = cache.commit_many([_written(cache, "1.2.3.4.1", 100), _written(cache, "1.2.3.4.1", 100)])
    assert all(i is not None for i in out)
    assert cache.size_bytes == 100 == _indexed_bytes(tmp_path)
    cache.close()
    assert InstanceCache(tmp_path, max_bytes=10_000).size_bytes == 100


def test_a_failed_index_leaves_nothing_behind(tmp_path: Path) -> None:
    cache = InstanceCache(tmp_path, max_bytes=10_000)
    # The second row of the batch fails, as on a full disk.
    cache._db.execute(
        "CREATE TRIGGER full BEFORE INSERT ON instances WHEN NEW.sop_uid = '1.2.3.4.9' "
        "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )
    cache._db.commit()
    out = cache.commit_many([_written(cache, "1.2.3.4.1", 10), _written(cache, "1.2.3.4.9", 10)])
    assert out == [None, None]
    # A later, unrelated commit must not write half of the failed batch.
    cache.mark_series_complete(STUDY, SERIES, 1)
    assert _indexed_bytes(tmp_path) == 0 == cache.size_bytes
    assert cache.get("1.2.3.4.1") is None
    assert list((tmp_path / "instances").rglob("*.dcm")) == []
    assert list((tmp_path / "tmp").iterdir()) == []
    # The single-file path (C-GET) says so, and leaves no file either.
    single = _written(cache, "1.2.3.4.9", 10)
    with pytest.raises(OSError, match="could not index"):
        cache.commit(
            single.temp,
            study_uid=STUDY,
            series_uid=SERIES,
            sop_uid="1.2.3.4.9",
            sop_class_uid=single.sop_class_uid,
            transfer_syntax=single.transfer_syntax,
        )
    assert list((tmp_path / "instances").rglob("*.dcm")) == []


def test_eviction_spares_an_instance_stored_again_after_it_was_chosen(tmp_path: Path) -> None:
    # Eviction picks its victims first and deletes them one by one; a retrieve
    # may store a new copy of one of them in between (another thread).
    cache = InstanceCache(tmp_path, max_bytes=10_000, protect_recent=0)
    _put(cache, "1.2.3.4.1", 100)
    chosen_at = time.time()
    time.sleep(0.01)
    _put(cache, "1.2.3.4.1", 120)  # the new copy
    assert not cache._evict_one("1.2.3.4.1", STUDY, SERIES, chosen_at)
    kept = cache.get("1.2.3.4.1")
    assert kept is not None and kept.size == 120 and kept.path.stat().st_size == 120
    assert cache._evict_one("1.2.3.4.1", STUDY, SERIES, time.time() + 1)
    assert cache.get("1.2.3.4.1") is None and cache.size_bytes == 0
