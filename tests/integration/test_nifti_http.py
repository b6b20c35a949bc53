"""NIfTI over HTTP: a series from Orthanc through C-MOVE, converted by the gateway."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from app.convert.nifti import build_volume
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-nifti"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def _series(peer: OrthancPeer, patient: str, description: str) -> tuple[str, str, list[Path]]:
    from pydicom import dcmread

    files = [
        i
        for i in peer.loaded.values()
        if i.patient_id == patient
        and dcmread(i.path, stop_before_pixels=True).SeriesDescription == description
    ]
    assert files
    return files[0].study_instance_uid, files[0].series_instance_uid, [i.path for i in files]


def _load(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(data)


def test_series_as_nii_gz_matches_the_converter_on_the_originals(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series, paths = _series(orthanc_peer, "DGW0003", "T1 SE oblique")
    resp = httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti", timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/gzip"
    assert 'filename="' in resp.headers["content-disposition"]
    assert resp.headers["content-disposition"].endswith('.nii.gz"')
    img = _load(gzip.decompress(resp.content))
    reference = build_volume(paths)
    assert img.shape[:3] == reference.voxels.shape[::-1][:3]
    np.testing.assert_allclose(img.affine, reference.affine_ras, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), reference.voxels)


def test_uncompressed_has_a_content_length(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series, _ = _series(orthanc_peer, "DGW0001", "Thorax 1.0 B31f")
    resp = httpx.get(
        f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti",
        params={"compress": "false"},
        timeout=120,
    )
    assert resp.status_code == 200
    assert int(resp.headers["content-length"]) == len(resp.content)
    img = _load(resp.content)
    assert img.get_data_dtype() == np.int16, "CT in HU stays int16"


def test_sidecar_leaves_out_patient_identity(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series, _ = _series(orthanc_peer, "DGW0003", "T2 TSE oblique")
    url = f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti/sidecar"
    side = httpx.get(url, timeout=120).json()
    assert side["Modality"] == "MR"
    assert side["SeriesDescription"] == "T2 TSE oblique"
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(side)
    refused = httpx.get(url, params={"phi": "true"}, timeout=30)
    assert refused.status_code == 400
    assert "allow_phi_in_sidecars" in refused.json()["message"]


def test_one_call_path(gateway: GatewayServer) -> None:
    one = httpx.get(
        f"{gateway.dicomweb}/nifti",
        params={
            "PatientID": "DGW0003",
            "StudyDate": "20220110",
            "SeriesDescription": "T2 TSE oblique",
        },
        timeout=120,
    )
    assert one.status_code == 200, one.text
    assert _load(gzip.decompress(one.content)).ndim >= 3
    several = httpx.get(f"{gateway.dicomweb}/nifti", params={"PatientID": "DGW0003"}, timeout=60)
    assert several.status_code == 300
    assert len(several.json()) == 2
    none = httpx.get(f"{gateway.dicomweb}/nifti", params={"PatientID": "NOBODY"}, timeout=60)
    assert none.status_code == 404
    bare = httpx.get(f"{gateway.dicomweb}/nifti", timeout=60)
    assert bare.status_code == 400


def test_loads_in_simpleitk_too(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, tmp_path: Path
) -> None:
    import SimpleITK as sitk

    study, series, _ = _series(orthanc_peer, "DGW0002", "t2_haste_tra")
    resp = httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti", timeout=120)
    out = tmp_path / "s.nii.gz"
    out.write_bytes(resp.content)
    image = sitk.ReadImage(str(out))
    nii = _load(gzip.decompress(resp.content))
    assert image.GetSize() == nii.shape[:3]
    assert io.BytesIO(resp.content).read(2) == b"\x1f\x8b"
    # The same geometry: SimpleITK reports LPS, nibabel's affine is RAS.
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(
        flip @ direction * np.array(image.GetSpacing()), nii.affine[:3, :3], atol=1e-4
    )
    np.testing.assert_allclose(flip @ np.array(image.GetOrigin()), nii.affine[:3, 3], atol=1e-3)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(image), np.asarray(nii.dataobj).transpose(2, 1, 0)
    )


def test_series_with_a_missing_slice_is_refused_with_422(tmp_path: Path) -> None:
    """Its own Orthanc, holding a CT series with one slice taken out."""
    from app.sampledata import ct_series, sample_patients, write_datasets
    from tests.gateway_server import free_port
    from tests.peers.orthanc import orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    slices = list(
        ct_series(
            patient=sample_patients()["ascii"],
            study_uid="2.25.4224",
            series_number=5,
            slices=12,
            rows=32,
            cols=32,
            seed="gap",
        )
    )
    del slices[6]
    files = write_datasets(slices, tmp_path / "gap")
    storage_port = free_port()
    peer = OrthancPeer(
        tmp_path / "orthanc", modalities={"DIMSEGW": ("DIMSEGW", "127.0.0.1", storage_port)}
    )
    peer.start()
    try:
        peer.load(files)
        settings = gateway_settings(
            tmp_path / "gw",
            local_node("orthanc", peer.aet, peer.dicom_port, default=True),
            storage_port=storage_port,
        )
        series = str(slices[0].SeriesInstanceUID)
        with GatewayServer(settings) as gw:
            resp = httpx.get(f"{gw.dicomweb}/studies/2.25.4224/series/{series}/nifti", timeout=60)
        assert resp.status_code == 422, resp.text
        body = resp.json()
        assert body["error"] == "ConversionError"
        assert "slice" in body["message"].lower()
    finally:
        peer.stop()


def test_each_header_is_read_once_as_the_series_arrives(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter parses every file while the retrieve runs, once: nothing is read twice."""
    import app.convert.nifti as nifti

    reads: list[str] = []
    original = nifti.dcmread

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(nifti, "dcmread", counting)
    study, series, paths = _series(orthanc_peer, "DGW0003", "T1 SE oblique")
    resp = httpx.get(
        f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti",
        params={"compress": "false"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert len(reads) == len(paths) == len(set(reads))
    monkeypatch.undo()
    reference = build_volume(paths)
    img = _load(resp.content)
    np.testing.assert_allclose(img.affine, reference.affine_ras, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), reference.voxels)
