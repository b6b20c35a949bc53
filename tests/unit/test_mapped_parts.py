"""Cached files are sent as read-only mappings (``app.api.retrieve._mapped``):
never past the end of a file that changed since it was indexed."""

from __future__ import annotations

from pathlib import Path

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
