"""The metadata memo: one encoding per cached file, valid for any base URL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from app.cache import CachedInstance
from app.dicomweb.instances import metadata
from app.sampledata import benchmark_ct, write_datasets
from app.services.metadata import MetadataStore

BASE = "http://gw.example:8000/pacs/main/dicomweb"


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_datasets(benchmark_ct(slices=3), tmp_path_factory.mktemp("ct"))


def cached(path: Path) -> CachedInstance:
    ds = dcmread(path, stop_before_pixels=True)
    return CachedInstance(
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID,
        path.stat().st_size,
        str(path),
    )


def pixel_uri(obj: dict[str, object]) -> str:
    pixel = obj["7FE00010"]
    assert isinstance(pixel, dict)
    return str(pixel["BulkDataURI"])


def test_the_document_is_what_encoding_each_instance_gives(slices: list[Path]) -> None:
    store = MetadataStore(1024**2)
    instances = [cached(p) for p in slices]
    got = json.loads(store.document(store.encoded_all(instances), BASE))
    for inst, obj in zip(instances, got, strict=True):
        url = f"{BASE}/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}"

        def bulk_uri(path: tuple[int, ...], url: str = url) -> str:
            return f"{url}/bulkdata/" + "/".join(
                f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path)
            )

        assert obj == metadata(Path(inst.file), bulk_uri)
        assert pixel_uri(obj) == f"{url}/bulkdata/7FE00010"


def test_a_second_request_reuses_the_encoding_under_its_own_base(slices: list[Path]) -> None:
    store = MetadataStore(1024**2)
    inst = cached(slices[0])
    first = json.loads(store.document([store.encoded(inst)], BASE))
    other = "https://viewer.example/dicomweb"
    second = json.loads(store.document([store.encoded(inst)], other))
    assert (store.misses, store.hits) == (1, 1)
    assert pixel_uri(first[0]).startswith(BASE + "/studies/")
    assert pixel_uri(second[0]).startswith(other + "/studies/")
    assert pixel_uri(second[0])[len(other) :] == pixel_uri(first[0])[len(BASE) :]


def test_a_file_replaced_in_the_cache_is_encoded_again(tmp_path: Path, slices: list[Path]) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(slices[0].read_bytes())
    store = MetadataStore(1024**2)
    inst = cached(path)
    before = json.loads(store.document([store.encoded(inst)], BASE))[0]
    ds = dcmread(path)
    ds.SeriesDescription = "replaced"
    ds.save_as(tmp_path / "new.dcm")
    os.replace(tmp_path / "new.dcm", path)  # as the cache replaces a file
    after = json.loads(store.document([store.encoded(cached(path))], BASE))[0]
    assert store.misses == 2
    assert before["0008103E"] != after["0008103E"]
    assert after["0008103E"]["Value"] == ["replaced"]


def test_a_host_name_cannot_break_out_of_the_json_string(slices: list[Path]) -> None:
    store = MetadataStore(1024**2)
    odd = 'http://a"b\\c/dicomweb'
    doc = json.loads(store.document([store.encoded(cached(slices[0]))], odd))
    assert pixel_uri(doc[0]).startswith(odd + "/studies/")


def test_memory_is_bounded_least_recently_used_first(slices: list[Path]) -> None:
    one = len(MetadataStore(1024**2).encoded(cached(slices[0])))
    store = MetadataStore(2 * one + one // 2)
    a, b, c = (cached(p) for p in slices)
    store.encoded(a)
    store.encoded(b)
    store.encoded(a)  # a is now the most recent
    store.encoded(c)  # evicts b
    assert (store.misses, store.hits) == (3, 1)
    store.encoded(a)
    assert store.hits == 2
    store.encoded(b)
    assert store.misses == 4


def test_zero_memory_encodes_every_time(slices: list[Path]) -> None:
    store = MetadataStore(0)
    inst = cached(slices[0])
    assert store.encoded(inst) == store.encoded(inst)
    assert (store.misses, store.hits) == (2, 0)


def test_a_missing_file_is_an_os_error(tmp_path: Path, slices: list[Path]) -> None:
    path = tmp_path / "gone.dcm"
    path.write_bytes(slices[0].read_bytes())
    inst = cached(path)
    path.unlink()
    with pytest.raises(OSError):
        MetadataStore(1024**2).encoded(inst)
