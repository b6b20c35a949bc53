"""WADO-RS through the gateway: C-MOVE from a real Orthanc to the gateway's storage SCP.

The truth is the files Orthanc was loaded with; Orthanc's own WADO-RS is the
second reference for the same series.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.filebase import DicomBytesIO

from app.dicomweb.accept import COMPRESSED_FRAME_TYPES
from app.runtime import Gateway
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.integration.conftest import GATEWAY_AE
from tests.peers.common import InstanceInfo
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

EVRLE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-retrieve"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


def parse_multipart(resp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """A strict reader: the body must start with the boundary and end with the closing one."""
    ctype = resp.headers["content-type"]
    match = re.search(r'boundary="?([^";]+)"?', ctype)
    assert match, ctype
    boundary = match.group(1).encode()
    body = resp.content
    assert body.startswith(b"--" + boundary + b"\r\n"), body[:100]
    assert body.endswith(b"--" + boundary + b"--\r\n"), body[-100:]
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        assert payload.endswith(b"\r\n")
        payload = payload[:-2]
        if "Content-Length" in headers:
            assert int(headers["Content-Length"]) == len(payload)
        parts.append((headers, payload))
    return parts


def read_part(payload: bytes) -> Dataset:
    return dcmread(DicomBytesIO(payload))


def dataset_bytes(path: Path) -> bytes:
    """The data set as stored in a file, after the preamble and file meta."""
    return dataset_bytes_of(path.read_bytes())


def dataset_bytes_of(payload: bytes) -> bytes:
    """The data set after the preamble and file meta (whose group length comes first)."""
    if payload[128:132] != b"DICM":
        return payload
    group_len = int.from_bytes(payload[140:144], "little")
    return payload[144 + group_len :]


def series_files(peer: OrthancPeer, series: str) -> list[InstanceInfo]:
    return [i for i in peer.loaded.values() if i.series_instance_uid == series]


def pick_series(peer: OrthancPeer, predicate: Any) -> str:
    for info in peer.loaded.values():
        if predicate(info):
            return info.series_instance_uid
    raise AssertionError("no such series")


def url(gw: GatewayServer, *parts: str) -> str:
    return gw.dicomweb + "/studies/" + "/".join(parts)


def test_series_as_stored_is_byte_identical(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    series = pick_series(orthanc_peer, lambda i: i.patient_id == "DGW0003")
    files = series_files(orthanc_peer, series)
    study = files[0].study_instance_uid
    resp = httpx.get(
        url(gateway, study, "series", series),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    parts = parse_multipart(resp)
    by_uid = {i.sop_instance_uid: i for i in files}
    assert len(parts) == len(files)
    for headers, payload in parts:
        ds = read_part(payload)
        info = by_uid[str(ds.SOPInstanceUID)]
        assert (
            headers["Content-Type"]
            == f"application/dicom; transfer-syntax={info.transfer_syntax_uid}"
        )
        assert headers["Content-Location"].endswith(f"/instances/{ds.SOPInstanceUID}")
        assert dataset_bytes_of(payload) == dataset_bytes(info.path)


def test_every_transfer_syntax(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, testdata_dir: Path
) -> None:
    """All nine syntaxes of dcm_qa_ts: as stored byte for byte, and by default
    Explicit VR Little Endian with the pixel values pydicom decodes from the original."""
    originals = sorted((testdata_dir / "dcm_qa_ts" / "In").glob("*.dcm"))
    assert len(originals) == 9
    for path in originals:
        src = dcmread(path, force=True)
        info = orthanc_peer.loaded[str(src.SOPInstanceUID)]
        inst_url = url(
            gateway,
            info.study_instance_uid,
            "series",
            info.series_instance_uid,
            "instances",
            info.sop_instance_uid,
        )
        as_stored = httpx.get(
            inst_url,
            headers={"Accept": "multipart/related; type=application/dicom; transfer-syntax=*"},
            timeout=60,
        )
        assert as_stored.status_code == 200, (path.name, as_stored.text)
        [(headers, payload)] = parse_multipart(as_stored)
        assert dataset_bytes_of(payload) == dataset_bytes(path), path.name
        default = httpx.get(inst_url, timeout=60)
        assert default.status_code == 200, (path.name, default.text)
        [(headers, payload)] = parse_multipart(default)
        assert headers["Content-Type"] == f"application/dicom; transfer-syntax={EVRLE}"
        got = read_part(payload)
        assert got.file_meta.TransferSyntaxUID == EVRLE
        np.testing.assert_array_equal(got.pixel_array, src.pixel_array, err_msg=path.name)


def test_same_instances_and_pixels_as_orthanc_wado(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    series = pick_series(orthanc_peer, lambda i: i.patient_id == "DGW0002")
    files = series_files(orthanc_peer, series)
    study = files[0].study_instance_uid
    ours = parse_multipart(httpx.get(url(gateway, study, "series", series), timeout=60))
    theirs_resp = httpx.get(
        f"{orthanc_peer.dicomweb_url}/studies/{study}/series/{series}",
        headers={"Accept": 'multipart/related; type="application/dicom"'},
        timeout=60,
    )
    assert theirs_resp.status_code == 200
    theirs = parse_multipart(theirs_resp)
    a = {str(d.SOPInstanceUID): d for d in (read_part(p) for _, p in ours)}
    b = {str(d.SOPInstanceUID): d for d in (read_part(p) for _, p in theirs)}
    assert set(a) == set(b) == {i.sop_instance_uid for i in files}
    for uid in a:
        np.testing.assert_array_equal(a[uid].pixel_array, b[uid].pixel_array)


def test_cached_series_needs_no_move(gateway: GatewayServer, orthanc_peer: OrthancPeer) -> None:
    series = pick_series(orthanc_peer, lambda i: i.patient_id == "DGW0004")
    study = series_files(orthanc_peer, series)[0].study_instance_uid
    first = httpx.get(url(gateway, study, "series", series), timeout=60)
    assert first.status_code == 200
    moves = runtime(gateway).retriever.moves_started
    second = httpx.get(url(gateway, study, "series", series), timeout=60)
    assert second.status_code == 200
    assert runtime(gateway).retriever.moves_started == moves
    assert len(parse_multipart(first)) == len(parse_multipart(second))


def test_concurrent_clients_share_one_move_per_series(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    """8 clients, 4 series, two per series: 4 moves, every client gets its own series."""
    wanted: list[tuple[str, str]] = []
    for info in orthanc_peer.loaded.values():
        pair = (info.study_instance_uid, info.series_instance_uid)
        if info.patient_id == "DGW0001" and pair not in wanted:
            wanted.append(pair)
    for info in orthanc_peer.loaded.values():
        pair = (info.study_instance_uid, info.series_instance_uid)
        if (
            info.patient_id is not None
            and not info.patient_id.startswith("DGW")
            and pair not in wanted
        ):
            wanted.append(pair)
        if len(wanted) == 4:
            break
    assert len(wanted) == 4
    moves = runtime(gateway).retriever.moves_started

    async def run() -> list[tuple[str, set[str], set[str]]]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(study: str, series: str) -> tuple[str, set[str], set[str]]:
                resp = await client.get(url(gateway, study, "series", series))
                assert resp.status_code == 200
                parts = [read_part(p) for _, p in parse_multipart(resp)]
                return (
                    series,
                    {str(d.SeriesInstanceUID) for d in parts},
                    {str(d.SOPInstanceUID) for d in parts},
                )

            return await asyncio.gather(*(one(s, se) for s, se in wanted for _ in range(2)))

    results = asyncio.run(run())
    for series, got_series, got_sops in results:
        assert got_series == {series}, "a client received another series' instances"
        expected = {i.sop_instance_uid for i in series_files(orthanc_peer, series)}
        assert got_sops == expected, "both clients of a shared move get the whole series"
    assert runtime(gateway).retriever.moves_started - moves == 4


def test_metadata_and_bulkdata(gateway: GatewayServer, orthanc_peer: OrthancPeer) -> None:
    series = pick_series(orthanc_peer, lambda i: i.patient_id == "DGW0003")
    files = series_files(orthanc_peer, series)
    study = files[0].study_instance_uid
    resp = httpx.get(url(gateway, study, "series", series, "metadata"), timeout=60)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/dicom+json")
    objs = resp.json()
    assert {o["00080018"]["Value"][0] for o in objs} == {i.sop_instance_uid for i in files}
    obj = objs[0]
    assert not any(k.startswith("0002") for k in obj)
    pixel = obj["7FE00010"]
    assert "BulkDataURI" in pixel and "InlineBinary" not in pixel
    bulk = httpx.get(pixel["BulkDataURI"], timeout=60)
    assert bulk.status_code == 200
    [(_, data)] = parse_multipart(bulk)
    src = dcmread(orthanc_peer.loaded[obj["00080018"]["Value"][0]].path)
    assert data == src.PixelData


def test_frames_single_and_multi_frame(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, testdata_dir: Path
) -> None:
    enhanced = next(i for i in orthanc_peer.loaded.values() if "dcm_qa_enh" in str(i.path))
    src = dcmread(enhanced.path)
    n = int(src.NumberOfFrames)
    frames = f"1,{n}"
    resp = httpx.get(
        url(
            gateway,
            enhanced.study_instance_uid,
            "series",
            enhanced.series_instance_uid,
            "instances",
            enhanced.sop_instance_uid,
            "frames",
            frames,
        ),
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    parts = parse_multipart(resp)
    assert len(parts) == 2
    arr = src.pixel_array
    for (_, data), index in zip(parts, (0, n - 1), strict=True):
        expected = arr[index].astype(arr.dtype.newbyteorder("<")).tobytes()
        assert data == expected
    out_of_range = httpx.get(
        url(
            gateway,
            enhanced.study_instance_uid,
            "series",
            enhanced.series_instance_uid,
            "instances",
            enhanced.sop_instance_uid,
            "frames",
            str(n + 1),
        ),
        timeout=60,
    )
    assert out_of_range.status_code == 404


def first_frame_url(gw: GatewayServer, info: InstanceInfo) -> str:
    return url(
        gw,
        info.study_instance_uid,
        "series",
        info.series_instance_uid,
        "instances",
        info.sop_instance_uid,
        "frames",
        "1",
    )


def test_frames_in_their_compressed_media_type_are_the_stored_codestream(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    from dicomweb_client.api import DICOMwebClient

    media_of = {ts: media for media, family in COMPRESSED_FRAME_TYPES.items() for ts in family}
    compressed = [i for i in orthanc_peer.loaded.values() if i.transfer_syntax_uid in media_of]
    # dcm_qa_ts: RLE, two JPEG lossless, two JPEG-LS, JPEG 2000.
    assert {media_of[i.transfer_syntax_uid] for i in compressed} >= {
        "image/jpeg",
        "image/jls",
        "image/jp2",
        "image/dicom-rle",
    }
    for info in compressed:
        media = media_of[info.transfer_syntax_uid]
        frame_url = first_frame_url(gateway, info)
        stored = httpx.get(
            frame_url,
            headers={
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"
            },
            timeout=60,
        )
        [(_, codestream)] = parse_multipart(stored)
        resp = httpx.get(
            frame_url, headers={"Accept": f'multipart/related; type="{media}"'}, timeout=60
        )
        assert resp.status_code == 200, (info.path.name, resp.text)
        assert resp.headers["content-type"].startswith(f'multipart/related; type="{media}"')
        [(headers, data)] = parse_multipart(resp)
        assert headers["Content-Type"] == f"{media}; transfer-syntax={info.transfer_syntax_uid}"
        assert data == codestream and len(data) > 0
        single = httpx.get(frame_url, headers={"Accept": media}, timeout=60)
        assert single.status_code == 200 and single.content == codestream

    # An instance stored in another compression, or uncompressed, is not converted: 406.
    jpeg_ls = next(i for i in compressed if media_of[i.transfer_syntax_uid] == "image/jls")
    evrle = next(
        i for i in orthanc_peer.loaded.values() if i.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    )
    for info in (jpeg_ls, evrle):
        refused = httpx.get(
            first_frame_url(gateway, info),
            headers={"Accept": 'multipart/related; type="image/jpeg"'},
            timeout=60,
        )
        assert refused.status_code == 406, refused.text
        assert "sent as stored" in refused.json()["message"]
        # A client that also takes uncompressed frames gets them.
        either = httpx.get(
            first_frame_url(gateway, info),
            headers={
                "Accept": 'multipart/related; type="image/jpeg", '
                'multipart/related; type="application/octet-stream"'
            },
            timeout=60,
        )
        assert either.status_code == 200, either.text
        [(headers, _)] = parse_multipart(either)
        assert headers["Content-Type"].startswith("application/octet-stream")

    # dicomweb-client asking for JPEG lossless frames by media type and syntax.
    lossless = next(i for i in compressed if i.transfer_syntax_uid == "1.2.840.10008.1.2.4.70")
    client = DICOMwebClient(url=gateway.dicomweb)
    frames = client.retrieve_instance_frames(
        lossless.study_instance_uid,
        lossless.series_instance_uid,
        lossless.sop_instance_uid,
        frame_numbers=[1],
        media_types=(("image/jpeg", "1.2.840.10008.1.2.4.70"),),
    )
    src = dcmread(lossless.path)
    expected = b"".join(next(generate_fragmented_frames(src.PixelData)))
    assert frames[0] == expected


def test_dicomweb_client_retrieves(gateway: GatewayServer, orthanc_peer: OrthancPeer) -> None:
    from dicomweb_client.api import DICOMwebClient

    series = pick_series(orthanc_peer, lambda i: i.patient_id == "DGW0001")
    files = series_files(orthanc_peer, series)
    study = files[0].study_instance_uid
    client = DICOMwebClient(url=gateway.dicomweb)
    datasets = client.retrieve_series(study, series)
    assert {str(d.SOPInstanceUID) for d in datasets} == {i.sop_instance_uid for i in files}
    sop = files[0].sop_instance_uid
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert meta["00080018"]["Value"] == [sop]
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    src = dcmread(files[0].path)
    assert frames[0] == src.PixelData


def test_unknown_study_is_404(gateway: GatewayServer) -> None:
    resp = httpx.get(url(gateway, "1.2.3.4.5.6.7.8.9"), timeout=30)
    assert resp.status_code == 404
    assert resp.json()["error"] == "NotFound"


def _fresh_instance(tmp_path: Path) -> tuple[Path, str]:
    from app.sampledata import ct_series, sample_patients, write_datasets

    ds = next(
        ct_series(
            patient=sample_patients()["ascii"],
            study_uid="2.25.4242",
            series_number=99,
            slices=1,
            rows=16,
            cols=16,
            seed="unsolicited",
        )
    )
    [path] = write_datasets([ds], tmp_path)
    return path, str(ds.SOPInstanceUID)


def test_store_from_an_unknown_ae_is_refused(
    gateway: GatewayServer, gateway_storage_port: int, tmp_path: Path
) -> None:
    from app.demo import DemoPacsError, store_files

    path, sop = _fresh_instance(tmp_path)
    with pytest.raises(DemoPacsError):
        store_files(
            [path],
            host="127.0.0.1",
            port=gateway_storage_port,
            called_ae=GATEWAY_AE,
            calling_ae="INTRUDER",
        )
    assert runtime(gateway).cache.get(sop) is None


def test_unsolicited_store_from_the_pacs_ae_is_refused(
    gateway: GatewayServer, gateway_storage_port: int, orthanc_peer: OrthancPeer, tmp_path: Path
) -> None:
    """The PACS's own AE title, but no retrieve is waiting: refused, nothing kept."""
    from app.demo import DemoPacsError, store_files

    path, sop = _fresh_instance(tmp_path)
    with pytest.raises(DemoPacsError):
        store_files(
            [path],
            host="127.0.0.1",
            port=gateway_storage_port,
            called_ae=GATEWAY_AE,
            calling_ae=orthanc_peer.aet,
        )
    assert runtime(gateway).cache.get(sop) is None
