"""``dimse-gateway find`` and ``get`` against the real gateway in front of Orthanc.

The truth for ``get`` is the files Orthanc was loaded with (SOP Instance UIDs
and decoded pixels); for ``find`` it is the gateway's own QIDO-RS answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from app.cli import main
from app.client.commands import COLUMNS, cell
from tests.gateway_server import GatewayServer, free_port, gateway_settings, local_node
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-cli"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def loaded(peer: OrthancPeer, *, study: str, series: str | None = None) -> dict[str, Path]:
    return {
        i.sop_instance_uid: i.path
        for i in peer.loaded.values()
        if i.study_instance_uid == study and (series is None or i.series_instance_uid == series)
    }


def assert_same_instances(folder: Path, expected: dict[str, Path]) -> None:
    """Same SOP Instance UIDs, each in a file named after it, with the same pixels."""
    written = sorted(folder.rglob("*"))
    assert not [p for p in written if p.name.endswith(".part")], "a file was left half-written"
    files = [p for p in written if p.is_file()]
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    assert set(got) == set(expected)
    for sop, path in got.items():
        assert path.name == f"{sop}.dcm"
        ours, theirs = dcmread(path), dcmread(expected[sop])
        assert ours.SeriesInstanceUID == path.parent.name
        assert np.array_equal(ours.pixel_array, theirs.pixel_array), sop


def test_get_series_writes_what_the_pacs_holds_in_every_transfer_syntax(
    gateway: GatewayServer,
    orthanc_peer: OrthancPeer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The dcm_qa_ts series: one image stored in nine transfer syntaxes, as stored.
    info = next(i for i in orthanc_peer.loaded.values() if "dcm_qa_ts" in str(i.path))
    study, series = info.study_instance_uid, info.series_instance_uid
    expected = loaded(orthanc_peer, study=study, series=series)
    assert (
        len(
            {
                i.transfer_syntax_uid
                for i in orthanc_peer.loaded.values()
                if i.sop_instance_uid in expected
            }
        )
        > 5
    )
    code = main(
        [
            "get",
            "--url",
            gateway.url,
            "--study",
            study,
            "--series",
            series,
            "--to",
            str(tmp_path / "out"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{len(expected)} instances" in out
    assert_same_instances(tmp_path / "out", expected)


def test_get_study_through_a_node_url_with_a_progress_bar(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, tmp_path: Path
) -> None:
    study = next(
        i for i in orthanc_peer.loaded.values() if i.patient_id == "DGW0002"
    ).study_instance_uid
    expected = loaded(orthanc_peer, study=study)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "get",
            "--url",
            gateway.url,
            "--node",
            "orthanc",
            "--study",
            study,
            "--to",
            str(tmp_path / "study"),
            "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert "retrieving" in run.stderr and "downloading" in run.stderr
    assert_same_instances(tmp_path / "study", expected)
    series = {p.parent.name for p in (tmp_path / "study").rglob("*.dcm")}
    assert len(series) > 1, "each series in its own folder"


def test_get_without_a_job_streams_the_same_files(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, tmp_path: Path
) -> None:
    info = next(i for i in orthanc_peer.loaded.values() if i.patient_id == "DGW0001")
    expected = loaded(orthanc_peer, study=info.study_instance_uid, series=info.series_instance_uid)
    code = main(
        [
            "get",
            "--url",
            gateway.url,
            "--study",
            info.study_instance_uid,
            "--series",
            info.series_instance_uid,
            "--to",
            str(tmp_path),
            "--no-job",
        ]
    )
    assert code == 0
    assert_same_instances(tmp_path, expected)


def test_get_nifti_is_the_gateways_volume(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, tmp_path: Path
) -> None:
    info = next(i for i in orthanc_peer.loaded.values() if i.patient_id == "DGW0003")
    study, series = info.study_instance_uid, info.series_instance_uid
    target = tmp_path / "ct.nii.gz"
    assert (
        main(
            ["get", "--url", gateway.url, "--study", study, "--series", series, "--to", str(target)]
        )
        == 0
    )
    assert not list(tmp_path.glob("*.part"))
    direct = tmp_path / "direct.nii.gz"
    direct.write_bytes(
        httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti", timeout=60).content
    )
    ours, reference = nib.load(target), nib.load(direct)
    assert ours.shape == reference.shape and ours.shape[2] == len(
        loaded(orthanc_peer, study=study, series=series)
    )
    assert np.array_equal(ours.affine, reference.affine)
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(reference.dataobj))
    # The finished job was forgotten once its file was downloaded.
    assert not [j for j in httpx.get(f"{gateway.url}/jobs", timeout=5).json() if j["nifti"]]


def test_find_prints_what_qido_answers(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    study = next(
        i for i in orthanc_peer.loaded.values() if i.patient_id == "DGW0002"
    ).study_instance_uid
    qido = httpx.get(
        f"{gateway.dicomweb}/series", params={"StudyInstanceUID": study}, timeout=30
    ).json()
    assert len(qido) > 1

    assert (
        main(["find", "--url", gateway.url, "--level", "series", f"StudyInstanceUID={study}"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [heading for heading, _ in COLUMNS["series"]]
    rows = lines[1:]
    assert len(rows) == len(qido)
    for match in qido:
        row = next(r for r in rows if cell(match["0020000E"]) in r)
        for _, tag in COLUMNS["series"]:
            assert cell(match.get(tag)) in row

    assert (
        main(
            [
                "find",
                "--url",
                gateway.url,
                "--level",
                "series",
                "--json",
                f"StudyInstanceUID={study}",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == qido

    # Keys and included fields become columns; non-ASCII names print as they are.
    qido = httpx.get(
        f"{gateway.dicomweb}/studies",
        params={"PatientName": "M*", "includefield": "InstitutionName"},
        timeout=30,
    ).json()
    assert (
        main(["find", "--url", gateway.url, "PatientName=M*", "includefield=InstitutionName"]) == 0
    )
    out = capsys.readouterr().out
    assert "InstitutionName" in out.splitlines()[0]
    assert "Müller^Jürgen" in out and len(out.splitlines()) == len(qido) + 1


def test_find_and_get_report_failures_with_honest_exit_codes(
    gateway: GatewayServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["find", "--url", gateway.url, "StudyDate=20241301"]) == 1
    err = capsys.readouterr().err
    assert "400 InvalidQuery" in err and "StudyDate" in err

    assert main(["find", "--url", gateway.url, "PatientName"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err

    assert main(["find", "--url", f"http://127.0.0.1:{free_port()}"]) == 3
    assert "cannot reach the gateway" in capsys.readouterr().err

    assert main(["find", "--url", gateway.url, "PatientID=NOBODY-HERE"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no matches" in err

    code = main(
        ["get", "--url", gateway.url, "--study", "1.2.3.4.5.6.7.8.9", "--to", str(tmp_path / "x")]
    )
    assert code == 1
    assert "the job failed: NotFound" in capsys.readouterr().err

    code = main(
        ["get", "--url", gateway.url, "--node", "nope", "--study", "1.2.3", "--to", str(tmp_path)]
    )
    assert code == 1
    assert "404 UnknownNode" in capsys.readouterr().err

    code = main(
        ["get", "--url", gateway.url, "--study", "1.2.3", "--to", str(tmp_path / "a.nii.gz")]
    )
    assert code == 1
    assert "--series" in capsys.readouterr().err
