"""The test harness itself: real PACS peers start, hold the data and answer as expected."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID

from tests.integration.conftest import GATEWAY_AE
from tests.peers import (
    DcmqrscpPeer,
    OrthancPeer,
    PeerProcess,
    StorescpPeer,
    c_echo,
    c_find,
    dcmtk_env,
    dcmtk_tool,
    read_instance_info,
)

pytestmark = pytest.mark.integration


def _run_dcmtk(cmd: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd),
        env=dcmtk_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


def _findscu(peer: PeerProcess, out_dir: Path, *keys: str) -> list[pydicom.Dataset]:
    """DCMTK findscu, Study Root, answers extracted to files and read back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [dcmtk_tool("findscu"), "-S", "-X", "-od", str(out_dir)]
    cmd += ["-aet", "FINDSCU", "-aec", peer.aet]
    for key in keys:
        cmd += ["-k", key]
    _run_dcmtk([*cmd, peer.host, str(peer.dicom_port)])
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]


def _is_compressed(transfer_syntax: str) -> bool:
    return UID(transfer_syntax).is_compressed


# ---------------------------------------------------------------------------- liveness


def test_peer_answers_c_echo(pacs_peer: PeerProcess) -> None:
    assert pacs_peer.is_running()
    assert pacs_peer.echo(), pacs_peer.log_tail()
    assert c_echo(pacs_peer.host, pacs_peer.dicom_port, pacs_peer.aet, GATEWAY_AE)


def test_peer_rejects_a_wrong_called_ae(pacs_peer: PeerProcess) -> None:
    assert not c_echo(pacs_peer.host, pacs_peer.dicom_port, "NOT-" + pacs_peer.aet)


# ---------------------------------------------------------------------------- loading


def test_peer_holds_what_the_harness_says(
    pacs_peer: PeerProcess, peer_data_files: list[Path]
) -> None:
    assert pacs_peer.loaded, pacs_peer.refused
    handled = set(pacs_peer.loaded_files) | set(pacs_peer.refused)
    assert handled == set(peer_data_files)
    assert pacs_peer.stored_sop_instance_uids() == set(pacs_peer.loaded_sop_instance_uids)


def test_orthanc_keeps_every_file(orthanc_peer: OrthancPeer, peer_data_files: list[Path]) -> None:
    assert orthanc_peer.refused == {}
    assert len(orthanc_peer.loaded) == len(peer_data_files)


def test_dcmqrscp_refuses_exactly_the_compressed_files(
    dcmqrscp_peer: DcmqrscpPeer, orthanc_peer: OrthancPeer
) -> None:
    compressed = {
        info.path
        for info in orthanc_peer.loaded.values()
        if _is_compressed(info.transfer_syntax_uid)
    }
    assert compressed, "the test data should contain compressed files"
    assert set(dcmqrscp_peer.refused) == compressed
    for reason in dcmqrscp_peer.refused.values():
        assert "unable to convert dataset" in reason


# ---------------------------------------------------------------------------- queries


def test_findscu_finds_the_loaded_studies(pacs_peer: PeerProcess, tmp_path: Path) -> None:
    answers = _findscu(
        pacs_peer,
        tmp_path / "find",
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "PatientID",
    )
    found = {str(ds.StudyInstanceUID) for ds in answers}
    assert found == set(pacs_peer.loaded_study_uids)


def test_orthanc_qido_lists_the_loaded_studies(orthanc_peer: OrthancPeer) -> None:
    response = httpx.get(
        f"{orthanc_peer.dicomweb_url}/studies",
        headers={"Accept": "application/dicom+json"},
        timeout=30,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    studies = {item["0020000D"]["Value"][0] for item in response.json()}
    assert studies == set(orthanc_peer.loaded_study_uids)


def _non_ascii_patients(peer: PeerProcess) -> dict[str, str]:
    names = {
        info.patient_id: info.patient_name
        for info in peer.loaded.values()
        if not info.patient_name.isascii()
    }
    if not names:
        pytest.skip("no non-ASCII patient name loaded (app.sampledata is missing)")
    return names


def test_non_ascii_names_come_back_over_c_find(pacs_peer: PeerProcess) -> None:
    expected = _non_ascii_patients(pacs_peer)
    with pacs_peer.find_session() as session:
        for patient_id, name in expected.items():
            answers = session.find("STUDY", {"PatientID": patient_id, "PatientName": ""})
            assert answers, patient_id
            for answer in answers:
                assert "ISO_IR 192" in answer.get("SpecificCharacterSet", ""), answer
                assert str(answer.PatientName) == name


def test_non_ascii_names_come_back_over_findscu(pacs_peer: PeerProcess, tmp_path: Path) -> None:
    expected = _non_ascii_patients(pacs_peer)
    for number, (patient_id, name) in enumerate(expected.items()):
        answers = _findscu(
            pacs_peer,
            tmp_path / f"find{number}",
            "QueryRetrieveLevel=STUDY",
            "SpecificCharacterSet=ISO_IR 192",
            f"PatientID={patient_id}",
            "PatientName",
        )
        assert answers
        assert {str(ds.PatientName) for ds in answers} == {name}


def test_non_ascii_names_come_back_over_qido(orthanc_peer: OrthancPeer) -> None:
    expected = _non_ascii_patients(orthanc_peer)
    with httpx.Client(base_url=orthanc_peer.dicomweb_url, timeout=30, trust_env=False) as client:
        for patient_id, name in expected.items():
            response = client.get("/studies", params={"PatientID": patient_id})
            assert response.status_code == 200, response.text
            groups = dict(
                zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="), strict=False)
            )
            for study in response.json():
                value = study["00100010"]["Value"][0]
                assert {k: v for k, v in value.items() if v} == {
                    k: v for k, v in groups.items() if v
                }


# ---------------------------------------------------------------------------- retrieve


def test_c_move_to_the_gateway_ae(
    pacs_peer: PeerProcess, gateway_storage_port: int, tmp_path: Path
) -> None:
    """The gateway's AE is a known move destination on both peers."""
    by_series: dict[tuple[str, str], set[str]] = {}
    for uid, info in pacs_peer.loaded.items():
        if not _is_compressed(info.transfer_syntax_uid):
            key = (info.study_instance_uid, info.series_instance_uid)
            by_series.setdefault(key, set()).add(uid)
    (study_uid, series_uid), expected = min(by_series.items(), key=lambda kv: len(kv[1]))
    with StorescpPeer(tmp_path / "gw", aet=GATEWAY_AE, port=gateway_storage_port) as receiver:
        _run_dcmtk(
            [
                dcmtk_tool("movescu"), "-S",
                "-aet", "MOVESCU", "-aem", GATEWAY_AE, "-aec", pacs_peer.aet,
                "-k", "QueryRetrieveLevel=SERIES",
                "-k", f"StudyInstanceUID={study_uid}",
                "-k", f"SeriesInstanceUID={series_uid}",
                pacs_peer.host, str(pacs_peer.dicom_port),
            ]
        )  # fmt: skip
        received = receiver.stored_sop_instance_uids()
    assert received == expected


def test_c_get_by_the_getscu_ae(pacs_peer: PeerProcess, tmp_path: Path) -> None:
    info = next(i for i in pacs_peer.loaded.values() if not _is_compressed(i.transfer_syntax_uid))
    out = tmp_path / "get"
    out.mkdir()
    _run_dcmtk(
        [
            dcmtk_tool("getscu"), "-S", "-aet", "GETSCU", "-aec", pacs_peer.aet, "-od", str(out),
            "-k", "QueryRetrieveLevel=IMAGE",
            "-k", f"StudyInstanceUID={info.study_instance_uid}",
            "-k", f"SeriesInstanceUID={info.series_instance_uid}",
            "-k", f"SOPInstanceUID={info.sop_instance_uid}",
            pacs_peer.host, str(pacs_peer.dicom_port),
        ]
    )  # fmt: skip
    received = [read_instance_info(p).sop_instance_uid for p in out.iterdir()]
    assert received == [info.sop_instance_uid]


# ---------------------------------------------------------------------------- lifecycle


def test_dcmqrscp_register_peer_restarts_and_keeps_data(
    tmp_path: Path, testdata_files: list[Path]
) -> None:
    bare = _bare_dataset_copy(testdata_files[2], tmp_path / "bare")
    assert not read_instance_info(bare).has_file_meta
    peer = DcmqrscpPeer(tmp_path / "q")
    with peer:
        pid = peer.pid
        result = peer.load([*testdata_files[:2], bare])
        assert len(result.loaded) == 3, result.refused
        with pytest.raises(RuntimeError, match="0xA801"):
            # dcmqrscp checks the move destination before anything else
            _move_status(peer, "EXTRA")
        peer.register_peer("extra", "EXTRA", "127.0.0.1", 104)
        assert peer.pid != pid and peer.is_running()
        assert peer.stored_sop_instance_uids() == set(result.loaded)
    assert not peer.is_running()
    assert peer.process is not None and peer.process.returncode is not None


def _bare_dataset_copy(source: Path, target: Path) -> Path:
    """``source`` written without preamble and file meta (a raw data set, as some
    scanners export), implicit VR little endian."""
    ds = pydicom.dcmread(source)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    ds.save_as(target, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert target.read_bytes()[128:132] != b"DICM"
    return target


def _move_status(peer: PeerProcess, destination: str) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(peer.host, peer.dicom_port, ae_title=peer.aet)
    assert assoc.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = next(iter(peer.loaded_study_uids))
    try:
        for status, _ in assoc.send_c_move(
            query, destination, StudyRootQueryRetrieveInformationModelMove
        ):
            code = int(status.Status) if status else -1
            if code not in (0xFF00, 0x0000):
                raise RuntimeError(f"C-MOVE status 0x{code:04X}")
    finally:
        assoc.release()


def test_orthanc_rest_loading_and_runtime_modalities(
    tmp_path: Path, testdata_files: list[Path]
) -> None:
    peer = OrthancPeer(tmp_path / "o")
    with peer:
        result = peer.load_rest(testdata_files[:3])
        assert len(result.loaded) == 3, result.refused
        study_uid = next(iter(result.loaded.values())).study_instance_uid
        query = {"StudyInstanceUID": study_uid}
        # An AE not in DicomModalities may not C-FIND: Orthanc aborts the association.
        with pytest.raises(ConnectionError):
            c_find(peer.host, peer.dicom_port, peer.aet, "STUDY", query, calling_ae="LATECOMER")
        peer.register_modality("latecomer", "LATECOMER", "127.0.0.1", 104)
        answers = c_find(
            peer.host, peer.dicom_port, peer.aet, "STUDY", query, calling_ae="LATECOMER"
        )
        assert [str(a.StudyInstanceUID) for a in answers] == [study_uid]
        ports = (peer.dicom_port, peer.http_port)
    assert not peer.is_running()
    assert peer.process is not None and peer.process.returncode == 0
    # Both ports are free again.
    import socket

    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))
