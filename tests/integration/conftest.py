"""Session fixtures for integration tests: real PACS peers holding the test data.

``orthanc_peer`` and ``dcmqrscp_peer`` are started lazily (only when a test asks
for them), each on free ports with its own temporary storage, loaded with the
same files, and stopped at the end of the session.  ``peer.loaded`` tells what a
peer really holds (checked against the peer after loading), ``peer.refused``
what it did not keep and why.  When a test that uses a peer fails, the peer's log
tail is added to the failure report.

Every peer knows these AEs (symbolic name -> (AET, host, port), see
``peer_modalities``): ``DIMSEGW`` (``GATEWAY_AE``, listening on
``gateway_storage_port``: the gateway's C-MOVE destination and calling AE),
``FINDSCU``, ``MOVESCU``, ``STORESCU``, ``GETSCU`` and ``STORESCP`` (each with a
free port of its own, so a test may listen there as a move destination).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pydicom import dcmread

from app.demo import QrscpProcess, store_files
from app.sampledata import sample_studies, write_datasets
from tests.peers.common import LOOPBACK, PeerProcess, free_port
from tests.peers.ctn import CtnPeer, ctn_available
from tests.peers.dcmqrscp import DcmqrscpPeer, dcmqrscp_available
from tests.peers.orthanc import OrthancPeer, orthanc_available

GATEWAY_AE = "DIMSEGW"
CLIENT_AES = ("FINDSCU", "MOVESCU", "STORESCU", "GETSCU", "STORESCP")
TESTDATA_ENV = "DIMSE_GATEWAY_TESTDATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TESTDATA = REPO_ROOT.parent / "shared" / "testdata"

# Files in the test data folders that are not DICOM.
_NOT_DICOM_SUFFIXES = {".nii", ".gz", ".json", ".txt", ".md", ".bval", ".bvec", ".sh"}
_NOT_DICOM_NAMES = {"LICENSE", "README", "notes.txt"}

_started_peers: list[PeerProcess] = []
P = TypeVar("P", bound=PeerProcess)


def testdata_root() -> Path:
    """Where the shared test data should be (``DIMSE_GATEWAY_TESTDATA`` overrides)."""
    override = os.environ.get(TESTDATA_ENV)
    return Path(override).expanduser().resolve() if override else DEFAULT_TESTDATA


def _dicom_files_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() not in _NOT_DICOM_SUFFIXES
        and p.name not in _NOT_DICOM_NAMES
        and not p.name.startswith(".")
    )


def collect_testdata_files(root: Path) -> list[Path]:
    """The real scanner files the peers hold (see the test data's README.md):
    the Siemens orientation series (most without preamble; JPEG and JPEG 2000
    copies in ``axmb/``), one MR image in nine transfer syntaxes, and enhanced
    multi-frame MR objects."""
    files = _dicom_files_under(root / "dcm_qa" / "In" / "Orientation")
    files += sorted((root / "dcm_qa_ts" / "In").glob("*.dcm"))
    files += _dicom_files_under(root / "dcm_qa_enh" / "In")
    return files


# ---------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def testdata_dir() -> Path:
    root = testdata_root()
    if not (root / "dcm_qa_ts" / "In").is_dir():
        message = (
            f"test data not found at {root}: clone the repository next to the shared/ "
            f"folder or set {TESTDATA_ENV} to the testdata folder"
        )
        if os.environ.get("CI"):
            # CI has the data beside the clone: its absence is a broken set-up,
            # not a reason to pass with half the suite skipped.
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def testdata_files(testdata_dir: Path) -> list[Path]:
    files = collect_testdata_files(testdata_dir)
    if not files:
        pytest.skip(f"no DICOM files under {testdata_dir}")
    return files


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``app.sampledata``'s demo studies (4 patients with ASCII, Latin-1, Polish and
    Japanese names; 6 studies; 300 files) written to a temporary folder."""
    return write_datasets(sample_studies(), tmp_path_factory.mktemp("sampledata"))


@pytest.fixture(scope="session")
def peer_data_files(testdata_files: list[Path], sample_files: list[Path]) -> list[Path]:
    """Everything the peers are loaded with, in loading order."""
    return [*testdata_files, *sample_files]


# ---------------------------------------------------------------------------- AEs


@pytest.fixture(scope="session")
def gateway_storage_port() -> int:
    """The port the gateway's storage SCP (AE ``GATEWAY_AE``) must listen on."""
    return free_port()


@pytest.fixture(scope="session")
def client_ae_ports() -> dict[str, int]:
    """A free port per client AE in ``CLIENT_AES`` (where it may listen as a move
    destination)."""
    return {aet: free_port() for aet in CLIENT_AES}


@pytest.fixture(scope="session")
def peer_modalities(
    gateway_storage_port: int, client_ae_ports: dict[str, int]
) -> dict[str, tuple[str, str, int]]:
    """Symbolic name -> (AET, host, port) registered in every peer."""
    modalities = {GATEWAY_AE: (GATEWAY_AE, LOOPBACK, gateway_storage_port)}
    modalities.update({aet: (aet, LOOPBACK, port) for aet, port in client_ae_ports.items()})
    return modalities


# ---------------------------------------------------------------------------- peers


def _start_and_load(peer: P, files: list[Path]) -> P:
    _started_peers.append(peer)
    peer.start()
    result = peer.load(files)
    if not result.loaded:
        peer.stop()
        pytest.fail(
            f"{peer.name} kept none of the {len(files)} files; first refusals: "
            f"{list(result.refused.items())[:3]}\n{peer.log_tail()}"
        )
    return peer


@pytest.fixture(scope="session")
def orthanc_peer(
    tmp_path_factory: pytest.TempPathFactory,
    peer_modalities: dict[str, tuple[str, str, int]],
    peer_data_files: list[Path],
) -> Iterator[OrthancPeer]:
    """Orthanc (AET ``ORTHANC``) with the DICOMweb plugin, holding the test data."""
    if not orthanc_available():
        pytest.skip(
            "Orthanc or its DICOMweb plugin is not installed (apt: orthanc orthanc-dicomweb)"
        )
    peer = OrthancPeer(tmp_path_factory.mktemp("orthanc"), modalities=peer_modalities)
    try:
        yield _start_and_load(peer, peer_data_files)
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def dcmqrscp_peer(
    tmp_path_factory: pytest.TempPathFactory,
    peer_modalities: dict[str, tuple[str, str, int]],
    peer_data_files: list[Path],
) -> Iterator[DcmqrscpPeer]:
    """DCMTK dcmqrscp (AET ``DCMQRSCP``) holding the test data it accepts
    (uncompressed transfer syntaxes only)."""
    if not dcmqrscp_available():
        pytest.skip("DCMTK dcmqrscp/storescu is not installed (apt: dcmtk)")
    peer = DcmqrscpPeer(tmp_path_factory.mktemp("dcmqrscp"), peers=peer_modalities)
    try:
        yield _start_and_load(peer, peer_data_files)
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def qrscp_peer(
    tmp_path_factory: pytest.TempPathFactory,
    gateway_storage_port: int,
    sample_files: list[Path],
) -> Iterator[QrscpProcess]:
    """pynetdicom's ``qrscp`` app (the demo PACS, AET ``QRSCP``) holding the sample
    studies, with UTF-8 answers as the demo runs it.  It gets only the sample data:
    its C-STORE accepts anything but its index drops instances it cannot index."""
    work = tmp_path_factory.mktemp("qrscp")
    pacs = QrscpProcess(
        work,
        port=free_port(),
        ae_title="QRSCP",
        move_destinations={GATEWAY_AE: (LOOPBACK, gateway_storage_port)},
        utf8_answers=True,
    )
    with pacs:
        store_files(sample_files, host=LOOPBACK, port=pacs.port, called_ae=pacs.ae_title)
        yield pacs


# CTN answers every association with ~40 ms Nagle stalls per C-STORE (it has no
# TCP_NODELAY): it holds one patient of the sample data and the MR series of a
# second one (Latin-1 name), not all of it.
CTN_PATIENTS = ("DGW0001", "DGW0002")
# dcm_qa_ts: one series, 2.dcm and 3.dcm sent as Implicit VR (CTN moves them),
# 1.dcm as Explicit VR (CTN keeps it, lists it, counts it as a warning and never
# sends it on a C-MOVE while answering Success).
CTN_IMPLICIT_TS_FILES = ("2.dcm", "3.dcm")
CTN_EXPLICIT_TS_FILES = ("1.dcm",)


def _for_ctn(path: Path) -> bool:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "Modality"])
    return bool(
        ds.PatientID == CTN_PATIENTS[0] or (ds.PatientID == CTN_PATIENTS[1] and ds.Modality == "MR")
    )


@pytest.fixture(scope="session")
def ctn_peer(
    tmp_path_factory: pytest.TempPathFactory,
    peer_modalities: dict[str, tuple[str, str, int]],
    sample_files: list[Path],
    testdata_dir: Path,
) -> Iterator[CtnPeer]:
    """CTN's image_server (AET ``CTNAE``) on a private MariaDB, holding two sample
    patients as Implicit VR and the dcm_qa_ts series with one Explicit VR instance."""
    if not ctn_available():
        pytest.skip("CTN or MariaDB is not installed (apt: ctn mariadb-server mariadb-client)")
    peer = CtnPeer(tmp_path_factory.mktemp("ctn"), peers=peer_modalities)
    ts_dir = testdata_dir / "dcm_qa_ts" / "In"
    implicit = [p for p in sample_files if _for_ctn(p)]
    implicit += [ts_dir / name for name in CTN_IMPLICIT_TS_FILES]
    try:
        _start_and_load(peer, implicit)
        explicit = peer.load(
            [ts_dir / n for n in CTN_EXPLICIT_TS_FILES], sender=peer.send_as_stored
        )
        if len(explicit.loaded) != len(CTN_EXPLICIT_TS_FILES):
            pytest.fail(f"CTN refused the Explicit VR files: {explicit.refused}\n{peer.log_tail()}")
        yield peer
    finally:
        peer.stop()


@pytest.fixture(params=["orthanc_peer", "dcmqrscp_peer"])
def pacs_peer(request: pytest.FixtureRequest) -> PeerProcess:
    """Each of the PACS peers in turn."""
    peer: PeerProcess = request.getfixturevalue(request.param)
    return peer


# ---------------------------------------------------------------------------- reporting


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Append the log tail of each peer a failed test used to its report.

    (A peer that fails to start raises ``PeerStartError`` carrying its log tail.)
    """
    report = yield
    if report.failed:
        seen: set[int] = set()
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, PeerProcess) and id(value) not in seen:
                seen.add(id(value))
                report.sections.append(
                    (f"{value.name} log tail ({value.log_path})", value.log_tail(60) or "(empty)")
                )
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _started_peers:
        return
    terminalreporter.section("PACS peers")
    for peer in _started_peers:
        timings = ", ".join(f"{k} {v:.2f} s" for k, v in peer.timings.items())
        terminalreporter.write_line(
            f"{peer.name}: {peer.aet} DICOM port {peer.dicom_port}; {timings}; "
            f"{len(peer.loaded)} instances loaded, {len(peer.refused)} files refused; "
            f"log {peer.log_path}"
        )
