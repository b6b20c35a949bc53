"""Integration tests for app.demo: pynetdicom's qrscp as the embedded demo PACS."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association

from app.demo import DemoPacsError, QrscpProcess, load_demo_data, store_files
from app.dimse.pynetdicom_fixes import quiesce_reactor
from app.sampledata import ct_series, derive_uid, sample_patients, write_datasets

pytestmark = pytest.mark.integration

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
SMALL = {"ct_slices": 3, "mr_slices": 2, "ct_matrix": 32, "mr_matrix": 32}
N_STUDIES = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _nodelay(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _find(pacs: QrscpProcess, query: Dataset) -> list[Dataset]:
    ae = AE(ae_title="TESTFIND")
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc: Association = ae.associate(
        pacs.host, pacs.port, ae_title=pacs.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    assert assoc.is_established
    try:
        answers = []
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            assert status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            else:
                assert status.Status == 0x0000, f"C-FIND status 0x{status.Status:04X}"
        return answers
    finally:
        assoc.release()


def _study_query(**keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.SpecificCharacterSet = "ISO_IR 192"
    query.StudyInstanceUID = ""
    query.PatientName = ""
    query.PatientID = ""
    query.StudyDate = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


def _studies(answers: list[Dataset]) -> dict[str, Dataset]:
    # qrscp answers once per matching instance, even at STUDY level.
    return {ds.StudyInstanceUID: ds for ds in answers}


# The stock run loads the full default demo data set (300 files, as the demo
# does); the UTF-8 run a small one, to keep the suite quick.
FULL: dict[str, int] = {}
MODES = {"stock": (False, FULL), "utf8": (True, SMALL)}


def _expected_files(options: dict[str, int]) -> int:
    return 3 * options.get("ct_slices", 60) + 5 * options.get("mr_slices", 24)


@pytest.fixture(scope="module", params=sorted(MODES))
def loaded_pacs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[QrscpProcess]:
    utf8, options = MODES[request.param]
    work = tmp_path_factory.mktemp(f"qrscp-{request.param}")
    with QrscpProcess(work / "pacs", port=_free_port(), utf8_answers=utf8) as pacs:
        stored = load_demo_data(pacs, work / "data", **options)
        assert stored == _expected_files(options)
        yield pacs


def _options(pacs: QrscpProcess) -> dict[str, int]:
    return MODES["utf8" if pacs.utf8_answers else "stock"][1]


def test_files_and_log_live_in_work_dir(loaded_pacs: QrscpProcess) -> None:
    assert loaded_pacs.is_running()
    assert loaded_pacs.log_path.parent == loaded_pacs.work_dir
    assert loaded_pacs.database_path.is_file()
    stored = list(loaded_pacs.instance_dir.iterdir())
    assert len(stored) == _expected_files(_options(loaded_pacs))
    assert loaded_pacs.echo()


def test_study_find_returns_every_study(loaded_pacs: QrscpProcess) -> None:
    answers = _find(loaded_pacs, _study_query())
    studies = _studies(answers)
    assert len(studies) == N_STUDIES
    assert len(answers) == _expected_files(_options(loaded_pacs))
    dates = sorted(ds.StudyDate for ds in studies.values())
    assert dates[0] == "20190314"
    assert len(set(dates)) == N_STUDIES


def test_latin1_name_comes_back(loaded_pacs: QrscpProcess) -> None:
    patient = sample_patients()["latin1"]
    studies = _studies(_find(loaded_pacs, _study_query(PatientID=patient.patient_id)))
    assert len(studies) == 2
    for ds in studies.values():
        assert str(ds.PatientName) == "Müller^Jürgen"


def test_matching_on_non_ascii_name(loaded_pacs: QrscpProcess) -> None:
    studies = _studies(_find(loaded_pacs, _study_query(PatientName="Łukasiewicz^Zofia^Maria")))
    assert len(studies) == 1
    studies = _studies(_find(loaded_pacs, _study_query(PatientName="M*ller*")))
    assert len(studies) == 2


def test_utf8_names(loaded_pacs: QrscpProcess) -> None:
    by_id = {ds.PatientID: ds for ds in _studies(_find(loaded_pacs, _study_query())).values()}
    polish = by_id[sample_patients()["polish"].patient_id]
    japanese = by_id[sample_patients()["japanese"].patient_id]
    if loaded_pacs.utf8_answers:
        assert polish.SpecificCharacterSet == "ISO_IR 192"
        assert str(polish.PatientName) == "Łukasiewicz^Zofia^Maria"
        assert japanese.PatientName.ideographic == "山田^太郎"
        assert str(japanese.PatientName) == sample_patients()["japanese"].name
    else:
        # Stock qrscp declares no character set and re-encodes with pydicom's
        # default codec (Latin-1): what does not fit becomes "?".
        assert "SpecificCharacterSet" not in polish
        assert str(polish.PatientName) == "?ukasiewicz^Zofia^Maria"
        assert japanese.PatientName.ideographic == "??^??"


def test_reload_is_idempotent(loaded_pacs: QrscpProcess) -> None:
    data_dir = loaded_pacs.work_dir.parent / "data"
    before = sorted(p.stat().st_mtime_ns for p in data_dir.glob("*.dcm"))
    load_demo_data(loaded_pacs, data_dir, **_options(loaded_pacs))
    after = sorted(p.stat().st_mtime_ns for p in data_dir.glob("*.dcm"))
    assert before == after  # reused, not regenerated
    assert len(_studies(_find(loaded_pacs, _study_query()))) == N_STUDIES


def test_store_files_without_preamble_or_meta(tmp_path: Path) -> None:
    patient = sample_patients()["ascii"]
    datasets = list(
        ct_series(
            patient=patient,
            study_uid=derive_uid("test", "raw"),
            series_number=9,
            slices=2,
            rows=16,
            cols=16,
        )
    )
    no_preamble, raw = tmp_path / "no-preamble.dcm", tmp_path / "raw.dcm"
    # File meta, but neither the 128-byte preamble nor the "DICM" prefix.
    datasets[0].preamble = None
    datasets[0].save_as(no_preamble, enforce_file_format=False)
    assert no_preamble.read_bytes()[:2] == b"\x02\x00"
    # Bare implicit VR data set, no meta at all.
    plain = datasets[1]
    del plain.file_meta
    pydicom.dcmwrite(raw, plain, implicit_vr=True, little_endian=True)
    assert pydicom.dcmread(raw, force=True).original_encoding == (True, True)

    with QrscpProcess(tmp_path / "pacs", port=_free_port()) as pacs:
        assert (
            store_files([no_preamble, raw], host=pacs.host, port=pacs.port, called_ae=pacs.ae_title)
            == 2
        )
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = datasets[0].StudyInstanceUID
        query.SeriesInstanceUID = ""
        query.SeriesNumber = ""
        answers = _find(pacs, query)
    assert len(answers) == 2
    assert {int(ds.SeriesNumber) for ds in answers} == {9}
    stored_syntaxes = {
        pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in pacs.instance_dir.iterdir()
    }
    assert ImplicitVRLittleEndian in stored_syntaxes


def test_store_to_nowhere_raises(tmp_path: Path) -> None:
    paths = write_datasets(
        ct_series(
            patient=sample_patients()["ascii"],
            study_uid="1.2.3",
            series_number=1,
            slices=1,
            rows=8,
            cols=8,
        ),
        tmp_path,
    )
    with pytest.raises(DemoPacsError, match="not established"):
        store_files(paths, host="127.0.0.1", port=_free_port(), called_ae="NOBODY")


def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DemoPacsError, match="in use"):
            QrscpProcess(tmp_path, port=port).start()


def test_start_failure_shows_log_tail(tmp_path: Path) -> None:
    # AE titles are at most 16 characters: qrscp dies in AE() with a traceback.
    pacs = QrscpProcess(tmp_path, port=_free_port(), ae_title="AN_AE_TITLE_TOO_LONG")
    with pytest.raises(DemoPacsError, match="exited with status") as info:
        pacs.start()
    assert "log tail" in str(info.value)
    assert "Error" in str(info.value)
    assert not pacs.is_running()


def test_stop_is_idempotent_and_config_has_destinations(tmp_path: Path) -> None:
    pacs = QrscpProcess(
        tmp_path,
        port=_free_port(),
        ae_title="DEMOPACS",
        move_destinations={"GW": ("127.0.0.1", 11113)},
    )
    with pacs:
        pid = pacs.pid
        assert pid is not None
        assert pacs.echo()
    assert not pacs.is_running()
    pacs.stop()
    text = pacs.config_path.read_text()
    assert "[GW]" in text
    assert "ae_title = DEMOPACS" in text
    assert str(pacs.instance_dir) in text


def test_move_to_configured_destination(tmp_path: Path) -> None:
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    receiver = AE(ae_title="GWRECV")
    receiver.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    receiver.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    recv_port = _free_port()
    server = receiver.start_server(
        ("127.0.0.1", recv_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        with QrscpProcess(
            tmp_path / "pacs",
            port=_free_port(),
            move_destinations={"GWRECV": ("127.0.0.1", recv_port)},
        ) as pacs:
            load_demo_data(pacs, tmp_path / "data", **SMALL)
            study_uid = derive_uid("dimse-gateway-sample", "study", "ACC2020060207")
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study_uid
            ae = AE(ae_title="TESTMOVE")
            ae.add_requested_context(STUDY_ROOT_MOVE)
            assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title)
            assert assoc.is_established
            try:
                statuses = [
                    status.Status
                    for status, _ in assoc.send_c_move(query, "GWRECV", STUDY_ROOT_MOVE)
                ]
                assert quiesce_reactor(assoc)  # second operation on this association
                unknown = [
                    status.Status
                    for status, _ in assoc.send_c_move(query, "NOBODY", STUDY_ROOT_MOVE)
                ]
            finally:
                assoc.release()
    finally:
        server.shutdown()
    assert statuses[-1] == 0x0000
    # The Müller CT/MR study: one CT and one MR series.
    assert len(received) == SMALL["ct_slices"] + SMALL["mr_slices"]
    assert unknown == [0xA801]
