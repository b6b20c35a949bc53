"""The storage SCP child process (``app.dimse.storeproc``) with a real sender.

Each test starts a real child process on a free loopback port and sends to it
with pynetdicom's C-STORE SCU, which can set Move Originator AE title and
Message ID as a PACS doing a C-MOVE does.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from app.dimse.storeproc import (
    STATUS_MISMATCH,
    Arrival,
    Expectation,
    StorageProcess,
    _SpareFiles,
)
from app.dimse.storescp import STATUS_NOT_AUTHORIZED, STATUS_OUT_OF_RESOURCES
from app.sampledata import ct_series, sample_patients
from tests.gateway_server import partial_files
from tests.peers.common import LOOPBACK

GATEWAY_AE = "GWPROC"
PACS_AE = "PACS"


def _series(slices: int, series_number: int = 1) -> list[Dataset]:
    patient = next(iter(sample_patients().values()))
    return list(
        ct_series(
            patient=patient,
            study_uid="1.2.826.0.1.3680043.8.498.4242",
            series_number=series_number,
            slices=slices,
            rows=32,
            cols=32,
        )
    )


def _process(
    temp_dir: Path,
    on_arrivals: Callable[[list[Arrival]], object] = lambda _batch: None,
    *,
    port: int = 0,
    senders: dict[str, list[str]] | None = None,
) -> StorageProcess:
    return StorageProcess(
        GATEWAY_AE,
        host=LOOPBACK,
        port=port,
        max_pdu=1048576,
        senders={PACS_AE: ["localhost"]} if senders is None else senders,
        temp_dir=temp_dir,
        on_arrivals=on_arrivals,  # type: ignore[arg-type]
        log_level="WARNING",
    )


@pytest.fixture
def arrivals() -> queue.Queue[Arrival]:
    return queue.Queue()


@pytest.fixture
def storage(tmp_path: Path, arrivals: queue.Queue[Arrival]) -> Iterator[StorageProcess]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = _process(temp, lambda batch: [arrivals.put(a) for a in batch])
    proc.start()
    yield proc
    proc.stop()


def _send(
    port: int,
    datasets: list[Dataset],
    *,
    msg_id: int | None,
    calling_ae: str = PACS_AE,
) -> list[int]:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate(LOOPBACK, port, ae_title=GATEWAY_AE)
    assert assoc.is_established, "the storage process refused the association"
    statuses = []
    try:
        for ds in datasets:
            kwargs = {} if msg_id is None else {"originator_aet": "MOVER", "originator_id": msg_id}
            rsp = assoc.send_c_store(ds, **kwargs)
            statuses.append(int(rsp.Status))
    finally:
        assoc.release()
    return statuses


def _expect(storage: StorageProcess, **fields: object) -> None:
    storage.expect(Expectation(**fields)).result(timeout=10)  # type: ignore[arg-type]


def test_expected_instances_are_written_and_reported(
    storage: StorageProcess, arrivals: queue.Queue[Arrival]
) -> None:
    series = _series(3)
    first = series[0]
    _expect(
        storage,
        msg_id=11,
        calling_ae=PACS_AE,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
    )
    assert _send(storage.port, series, msg_id=11) == [0, 0, 0]
    got = [arrivals.get(timeout=5) for _ in series]
    assert {(a.calling_ae, a.seconds is not None and a.seconds > 0) for a in got} == {
        (PACS_AE, True)
    }
    assert [a.sop_uid for a in got] == [ds.SOPInstanceUID for ds in series]
    for arrival, ds in zip(got, series, strict=True):
        assert (arrival.msg_id, arrival.study_uid, arrival.series_uid) == (
            11,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
        )
        assert arrival.sop_class_uid == ds.SOPClassUID
        written = pydicom.dcmread(arrival.temp)
        assert written.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert written.PixelData == ds.PixelData


def test_unexpected_and_foreign_instances_are_refused(
    storage: StorageProcess, arrivals: queue.Queue[Arrival], tmp_path: Path
) -> None:
    series = _series(1)
    other = _series(1, series_number=2)
    ds = series[0]
    _expect(
        storage,
        msg_id=5,
        calling_ae=PACS_AE,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
    )
    seen: queue.Queue[tuple[str, int, float | None]] = queue.Queue()
    storage.observer = lambda ae, status, seconds: seen.put((ae, status, seconds))
    # Another move's Message ID, and this move's ID with another series.
    assert _send(storage.port, series, msg_id=6) == [STATUS_NOT_AUTHORIZED]
    assert _send(storage.port, other, msg_id=5) == [STATUS_MISMATCH]
    reported = [seen.get(timeout=5) for _ in range(2)]
    assert [(ae, status) for ae, status, _ in reported] == [
        (PACS_AE, STATUS_NOT_AUTHORIZED),
        (PACS_AE, STATUS_MISMATCH),
    ]
    assert all(seconds is not None and seconds >= 0 for _, _, seconds in reported)
    storage.forget(5)
    time.sleep(0.2)  # "forget" needs no answer; give the child time to read it
    assert _send(storage.port, series, msg_id=5) == [STATUS_NOT_AUTHORIZED]
    assert arrivals.empty()
    assert partial_files(tmp_path / "tmp") == []


def test_without_an_originator_id_the_single_retrieve_from_that_pacs_gets_it(
    storage: StorageProcess, arrivals: queue.Queue[Arrival]
) -> None:
    ds = _series(1)[0]
    _expect(storage, msg_id=9, calling_ae=PACS_AE, study_uid=ds.StudyInstanceUID)
    assert _send(storage.port, [ds], msg_id=None) == [0]
    assert arrivals.get(timeout=5).msg_id == 9


def test_unknown_sender_is_rejected(storage: StorageProcess) -> None:
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, storage.port, ae_title=GATEWAY_AE)
    assert assoc.is_rejected


def test_a_killed_child_is_replaced_on_the_same_port_with_its_expectations(
    storage: StorageProcess, arrivals: queue.Queue[Arrival]
) -> None:
    ds = _series(1)[0]
    _expect(storage, msg_id=3, calling_ae=PACS_AE, study_uid=ds.StudyInstanceUID)
    port, pid = storage.port, storage.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (storage.pid == pid or storage.restarts == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert storage.restarts == 1 and storage.pid != pid
    assert storage.port == port
    assert _send(storage.port, [ds], msg_id=3) == [0]
    assert arrivals.get(timeout=5).sop_uid == ds.SOPInstanceUID


def test_stop_ends_the_child_and_closes_the_port(tmp_path: Path) -> None:
    proc = _process(tmp_path, senders={})
    proc.start()
    port, pid = proc.port, proc.pid
    assert pid is not None
    proc.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
        pass
    assert proc.restarts == 0


def test_a_port_in_use_is_a_clear_start_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen(1)
        proc = _process(tmp_path, port=busy.getsockname()[1], senders={})
        with pytest.raises(RuntimeError, match="cannot listen"):
            proc.start()


def test_the_child_runs_the_gateways_code_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arrivals: queue.Queue[Arrival]
) -> None:
    # "app" is a common name: a gateway started from a folder holding another
    # project's app/ must not run that project's code in its storage child.
    decoy = tmp_path / "elsewhere" / "app" / "dimse"
    decoy.mkdir(parents=True)
    (decoy.parent / "__init__.py").write_text("")
    (decoy / "__init__.py").write_text("")
    (decoy / "storeproc.py").write_text("raise SystemExit('the decoy ran')\n")
    monkeypatch.chdir(decoy.parent.parent)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = _process(temp, lambda batch: [arrivals.put(a) for a in batch])
    proc.start()
    try:
        series = _series(1)
        _expect(
            proc,
            msg_id=5,
            calling_ae=PACS_AE,
            study_uid=series[0].StudyInstanceUID,
            series_uid=series[0].SeriesInstanceUID,
        )
        assert _send(proc.port, series, msg_id=5) == [0]
        assert arrivals.get(timeout=5).sop_uid == series[0].SOPInstanceUID
    finally:
        proc.stop()


def test_spare_temporary_files_are_deleted_when_the_child_stops(tmp_path: Path) -> None:
    proc = _process(tmp_path, senders={})
    proc.start()
    deadline = time.monotonic() + 5
    while not list(tmp_path.glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("*.part")), "the child keeps files ready before any C-STORE"
    proc.stop()
    assert list(tmp_path.glob("*.part")) == []


def _arrived_message(n: int, temp: Path) -> tuple[object, ...]:
    return (
        "arrived",
        7,
        f"1.2.3.{n}",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.3",
        "1.2.3.4",
        str(temp),
        PACS_AE,
        0.01,
    )


def _reader_on(pipe: Connection, on_arrivals: Callable[[list[Arrival]], object]) -> StorageProcess:
    """A StorageProcess whose reader reads ``pipe`` (no child, no restart)."""
    proc = _process(Path("/nonexistent"), on_arrivals, senders={})
    proc._conn = pipe
    proc._respawn = lambda: False  # type: ignore[method-assign]
    return proc


def test_what_a_dying_child_sent_is_still_handled(tmp_path: Path) -> None:
    got: list[str] = []
    ours, childs = Pipe()
    proc = _reader_on(ours, lambda batch: got.extend(a.sop_uid for a in batch))
    for n in (1, 2, 3):
        childs.send(_arrived_message(n, tmp_path / f"{n}.part"))
    childs.close()
    reader = threading.Thread(target=proc._read_loop)
    reader.start()
    reader.join(5)
    assert got == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def test_a_failing_observer_does_not_stop_the_reader(tmp_path: Path) -> None:
    got: list[str] = []
    ours, childs = Pipe()
    proc = _reader_on(ours, lambda batch: got.extend(a.sop_uid for a in batch))

    def observer(_ae: str, _status: int, _seconds: float | None) -> None:
        raise KeyError("a metrics bug")

    proc.observer = observer
    ack = proc._acks[41] = concurrent.futures.Future()
    reader = threading.Thread(target=proc._read_loop)
    reader.start()
    childs.send(_arrived_message(1, tmp_path / "1.part"))
    childs.send(("refused", PACS_AE, STATUS_MISMATCH, 0.01))
    childs.send(("ack", 41))
    childs.send(_arrived_message(2, tmp_path / "2.part"))
    ack.result(timeout=5)
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    childs.close()
    reader.join(5)
    assert got == ["1.2.3.1", "1.2.3.2"]


def test_an_unreadable_data_set_is_refused_and_deleted(
    storage: StorageProcess, arrivals: queue.Queue[Arrival], tmp_path: Path
) -> None:
    # Not a data set the header walk reads, and without the UIDs pydicom's
    # fallback looks for (AttributeError, not OSError).
    ds = _series(1)[0]
    del ds.StudyInstanceUID
    _expect(storage, msg_id=8, calling_ae=PACS_AE, study_uid="1.2.3", series_uid=None)
    assert _send(storage.port, [ds], msg_id=8) == [STATUS_OUT_OF_RESOURCES]
    assert arrivals.empty()
    assert partial_files(tmp_path / "tmp") == []


def test_a_spare_file_deleted_while_it_waited_is_not_used(tmp_path: Path) -> None:
    spares = _SpareFiles(f"{tmp_path}{os.sep}", depth=2)
    try:
        deadline = time.monotonic() + 5
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for waiting in tmp_path.iterdir():  # an operator "cleaning" the temp folder
            waiting.unlink()
        path, file = spares.take()
        try:
            assert Path(path).exists()
            file.write(b"kept")
            assert Path(path).read_bytes() == b"kept"
        finally:
            file.close()
    finally:
        spares.close()


def test_a_malformed_message_is_logged_and_the_reader_goes_on(tmp_path: Path) -> None:
    got: list[str] = []
    ours, childs = Pipe()
    proc = _reader_on(ours, lambda batch: got.extend(a.sop_uid for a in batch))
    reader = threading.Thread(target=proc._read_loop)
    reader.start()
    childs.send(42)  # not a tuple: neither indexable nor sliceable
    childs.send(("arrived", "too", "short"))
    childs.send(_arrived_message(1, tmp_path / "1.part"))
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    childs.close()
    reader.join(5)
    assert got == ["1.2.3.1"]
