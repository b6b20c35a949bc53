"""Cached files are sent as read-only mappings (``app.api.retrieve._mapped``):
never past the end of a file that changed since it was indexed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.api import retrieve
from app.api.retrieve import _mapped


def test_a_mapping_holds_exactly_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    data = bytes(range(256)) * 4099
    path.write_bytes(data)
    view = _mapped(path, len(data))
    assert view is not None
    assert view.readonly and bytes(view) == data


def test_a_file_of_another_size_or_gone_is_not_mapped(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x" * 1000)
    assert _mapped(path, 2000) is None  # truncated since it was indexed
    assert _mapped(path, 500) is None  # grown: not the file that was indexed
    assert _mapped(tmp_path / "gone.dcm", 1000) is None
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert _mapped(empty, 0) is None


def test_a_mapping_survives_the_eviction_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"DICM" * 5000)
    view = _mapped(str(path), 20000)
    assert view is not None
    path.unlink()
    assert bytes(view[:4]) == b"DICM" and len(view) == 20000


async def _collect(file: Path, size: int) -> bytes:
    return b"".join([bytes(c) async for c in retrieve._file_chunks(file, size)])


@pytest.mark.parametrize("limit", [1 << 30, 1000], ids=["mapped", "read in chunks"])
def test_file_chunks_bound_each_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    monkeypatch.setattr(retrieve, "_MAP_LIMIT", limit)
    monkeypatch.setattr(retrieve, "_CHUNK", 4096)
    path = tmp_path / "big.dcm"
    data = bytes(range(251)) * 100  # 25100 bytes: 7 chunks, the last one short
    path.write_bytes(data)
    sizes = asyncio.run(_sizes(path, len(data)))
    assert sizes == [4096] * 6 + [25100 - 6 * 4096]
    assert asyncio.run(_collect(path, len(data))) == data
    with pytest.raises(OSError, match="changed since it was indexed"):
        asyncio.run(_collect(path, len(data) + 1))


async def _sizes(file: Path, size: int) -> list[int]:
    return [len(c) async for c in retrieve._file_chunks(file, size)]
