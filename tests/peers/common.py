"""Process handling, readiness probes and data loading shared by the test peers.

Rules kept here so that no peer forgets them (see /work/shared/PEERS.md):

* every DCMTK-based process (storescu, findscu, dcmqrscp, and Orthanc, which links
  libdcmnet) gets ``TCP_NODELAY=1`` in its environment, otherwise each PDU exchange
  stalls on the 40 ms delayed ACK;
* a peer runs in its own session (``start_new_session=True``), reads /dev/null and
  logs to a file; it is stopped by SIGTERM to the PID we recorded, SIGKILL after
  20 s, and never by name;
* ports are always fresh ones, so a system Orthanc on 4242/8042 or another test
  session's peers cannot collide with ours.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from app.dimse.pynetdicom_fixes import quiesce_reactor

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------- ports

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that is currently free on every IPv4 address of this machine.

    The port is found by binding port 0 on the wildcard address rather than on
    127.0.0.1 only: Orthanc 1.10 and DCMTK 3.6.7 have no listen-address option and
    bind 0.0.0.0, which fails if any address already has the port.  Ports handed out
    by this process are never handed out twice.  Between this call and the peer's own
    bind another process could take the port; ``PeerProcess.start`` retries with new
    ports when the peer's log says so.
    """
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = int(sock.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("could not find a free TCP port")


def port_is_open(host: str, port: int, timeout: float = 0.25) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- environment


def dcmtk_tool(name: str) -> str:
    """The absolute path of DCMTK's ``name`` (storescu, movescu, storescp ...).

    pynetdicom 3 installs console scripts with the same names (storescu, findscu,
    movescu, getscu, storescp, echoscu) into the virtualenv, so with the venv's
    ``bin`` first on PATH a bare ``storescu`` is pynetdicom's and speaks other
    options: look past anything that is a script rather than a program.
    """
    for folder in os.get_exec_path():
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as f:
            if f.read(2) != b"#!":
                return str(candidate)
    raise FileNotFoundError(f"DCMTK {name} is not installed (apt: dcmtk)")


def dcmtk_available(*names: str) -> bool:
    """True when every one of the DCMTK programs is installed."""
    try:
        for name in names:
            dcmtk_tool(name)
    except FileNotFoundError:
        return False
    return True


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for DCMTK tools and peers: ours plus ``TCP_NODELAY=1``."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- DIMSE probes


def _set_nodelay(assoc: Association) -> None:
    """pynetdicom 3.0.4 leaves Nagle on: 45 ms per C-FIND instead of 3 ms."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _make_ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def c_echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    timeout: float = 5.0,
) -> bool:
    """One C-ECHO on a fresh association; True when the peer answered Success."""
    ae = _make_ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0x0000
    finally:
        assoc.release()


_FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}


def make_query(level: str, keys: Mapping[str, Any], charset: str | None = "ISO_IR 192") -> Dataset:
    """A C-FIND identifier: ``keys`` maps keywords to values ("" = return key)."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


class FindSession:
    """C-FIND queries on one open association (TCP_NODELAY set on its socket).

    >>> with FindSession("127.0.0.1", port, "ORTHANC") as session:
    ...     studies = session.find("STUDY", {"StudyInstanceUID": ""})
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str = "FINDSCU",
        model: str = "study",
        timeout: float = 30.0,
    ) -> None:
        self.model = _FIND_MODELS[model]
        ae = _make_ae(calling_ae, timeout)
        ae.add_requested_context(self.model)
        self.assoc = ae.associate(host, port, ae_title=called_ae)
        if not self.assoc.is_established:
            raise ConnectionError(
                f"C-FIND association {calling_ae} -> {called_ae}@{host}:{port} was not "
                "established (rejected or aborted; see the peer's log)"
            )
        _set_nodelay(self.assoc)

    def find(self, level: str, keys: Mapping[str, Any] | Dataset) -> list[Dataset]:
        query = keys if isinstance(keys, Dataset) else make_query(level, keys)
        if "QueryRetrieveLevel" not in query:
            query.QueryRetrieveLevel = level
        answers: list[Dataset] = []
        # The same pynetdicom reactor race the gateway guards against (issue 875):
        # without this, a loaded machine loses the first answer now and then.
        if not quiesce_reactor(self.assoc):
            raise ConnectionError("C-FIND: association not responsive")
        for status, identifier in self.assoc.send_c_find(query, self.model):
            if not status:
                raise ConnectionError("C-FIND: association aborted or no response")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is None:
                    raise RuntimeError("C-FIND: pending response without an identifier")
                answers.append(identifier)
            elif code != 0x0000:
                raise RuntimeError(f"C-FIND failed with status 0x{code:04X}")
        return answers

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def c_find(
    host: str,
    port: int,
    called_ae: str,
    level: str,
    keys: Mapping[str, Any] | Dataset,
    calling_ae: str = "FINDSCU",
    model: str = "study",
    timeout: float = 30.0,
) -> list[Dataset]:
    """One C-FIND on a fresh association; the pending identifiers."""
    with FindSession(host, port, called_ae, calling_ae, model, timeout) as session:
        return session.find(level, keys)


# --------------------------------------------------------------------------- HTTP probe


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET url answers 200."""
    try:
        response = httpx.get(url, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def wait_until(probe: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Call ``probe`` until it returns True (then True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for_echo(
    host: str, port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 30.0
) -> bool:
    """Poll until a C-ECHO succeeds (a TCP probe first, so no association errors are
    logged while nothing listens)."""
    return wait_until(
        lambda: port_is_open(host, port) and c_echo(host, port, called_ae, calling_ae, 5.0),
        timeout,
    )


def wait_for_http(url: str, timeout: float = 30.0) -> bool:
    """Poll until GET url answers 200."""
    return wait_until(lambda: http_ok(url), timeout)


# --------------------------------------------------------------------------- files


_TS_BY_ENCODING = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}

_INFO_TAGS = [
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
]


@dataclass(frozen=True)
class InstanceInfo:
    """What the harness needs to know about one file it loads."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    patient_name: str
    has_file_meta: bool


def read_instance_info(path: Path) -> InstanceInfo:
    """Identify a DICOM file, with or without preamble and file meta information."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_INFO_TAGS)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        encoding = ds.original_encoding
        ts = _TS_BY_ENCODING.get((bool(encoding[0]), bool(encoding[1])), ExplicitVRLittleEndian)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise ValueError(f"{path}: no {keyword}")
    return InstanceInfo(
        path=Path(path),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        transfer_syntax_uid=str(ts),
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        has_file_meta=meta is not None and "TransferSyntaxUID" in meta,
    )


@dataclass
class StoreReport:
    """Per-file outcome of ``store_files`` as storescu reported it."""

    succeeded: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    seconds: float = 0.0


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_PROBLEM = re.compile(r"\b[WEF]: ")
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>[^)]*)\)")


def _parse_storescu(output: str, batch: Sequence[Path], report: StoreReport) -> None:
    by_name = {str(p): p for p in batch}
    notes: dict[Path, list[str]] = {}
    ok: set[Path] = set()
    current: Path | None = None
    for raw in output.splitlines():
        line = raw.rstrip()
        match = _SENDING.match(line)
        if match:
            current = by_name.get(match["path"], Path(match["path"]))
            notes.setdefault(current, [])
            continue
        match = _RESPONSE.match(line)
        if match and current is not None:
            status = match["status"]
            if status.startswith(("Success", "Warning")):
                ok.add(current)
            else:
                notes[current].append(f"Store Response: {status}")
            continue
        problem = _PROBLEM.search(line)
        if problem and current is not None:
            notes[current].append(line[problem.start() :])
    general = [ln for ln in output.splitlines() if ln.startswith(("E:", "F:"))]
    for path in batch:
        if path in ok:
            report.succeeded.append(path)
        elif path in notes:
            report.failed[path] = " | ".join(notes[path]) or "no Success response"
        else:
            mentioned = [ln for ln in output.splitlines() if str(path) in ln]
            report.failed[path] = " | ".join(mentioned or general[-3:]) or "storescu never sent it"


UNCOMPRESSED_TRANSFER_SYNTAXES = (
    str(ExplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(ImplicitVRLittleEndian),
)
MAX_PROPOSED_CONTEXTS = 120  # DICOM allows 128 per association


def _contexts_for(infos: Iterable[InstanceInfo]) -> list[tuple[str, tuple[str, ...]]]:
    """Per SOP class: one context per transfer syntax of the files, plus one offering
    all uncompressed syntaxes (storescu converts to it when a syntax is refused)."""
    contexts: list[tuple[str, tuple[str, ...]]] = []
    for info in infos:
        for ctx in (
            (info.sop_class_uid, (info.transfer_syntax_uid,)),
            (info.sop_class_uid, UNCOMPRESSED_TRANSFER_SYNTAXES),
        ):
            if ctx not in contexts:
                contexts.append(ctx)
    return contexts


def _store_batches(
    infos: Sequence[InstanceInfo], max_files: int
) -> Iterator[tuple[list[InstanceInfo], list[tuple[str, tuple[str, ...]]]]]:
    batch: list[InstanceInfo] = []
    contexts: list[tuple[str, tuple[str, ...]]] = []
    for info in infos:
        extra = [c for c in _contexts_for([info]) if c not in contexts]
        if batch and (
            len(batch) >= max_files or len(contexts) + len(extra) > MAX_PROPOSED_CONTEXTS
        ):
            yield batch, contexts
            batch, contexts = [], []
            extra = _contexts_for([info])
        batch.append(info)
        contexts.extend(extra)
    if batch:
        yield batch, contexts


def _write_storescu_profile(path: Path, contexts: Sequence[tuple[str, tuple[str, ...]]]) -> str:
    """A DCMTK association profile (see DCMTK's asconfig.txt) proposing ``contexts``."""
    syntax_lists: dict[tuple[str, ...], str] = {}
    lines = ["[[TransferSyntaxes]]"]
    for _, syntaxes in contexts:
        if syntaxes not in syntax_lists:
            key = f"TS{len(syntax_lists) + 1}"
            syntax_lists[syntaxes] = key
            lines.append(f"[{key}]")
            lines.extend(f"TransferSyntax{n} = {uid}" for n, uid in enumerate(syntaxes, 1))
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines.extend(
        f"PresentationContext{n} = {sop}\\{syntax_lists[syntaxes]}"
        for n, (sop, syntaxes) in enumerate(contexts, 1)
    )
    lines += ["[[Profiles]]", "[Harness]", "PresentationContexts = Contexts", ""]
    path.write_text("\n".join(lines), encoding="ascii")
    return "Harness"


def store_files(
    paths: Iterable[Path | InstanceInfo],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "STORESCU",
    *,
    batch_size: int = 200,
    timeout: float = 300.0,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
) -> StoreReport:
    """C-STORE files with DCMTK storescu, up to ``batch_size`` files per association.

    storescu alone proposes a compressed transfer syntax only when told with one
    ``-x?`` option (a single syntax per run), so the harness writes an association
    profile (``-xf``) instead: per SOP class one presentation context per transfer
    syntax of the files (each file travels as it is stored, compressed or not) plus
    one with all uncompressed syntaxes.  When the peer refuses a file's syntax,
    storescu falls back to the uncompressed context, which fails for compressed
    files (DCMTK's storescu does not decompress): that file is reported failed.
    ``-nh`` goes on after a failed store.  Files without preamble or file meta are
    read as bare data sets (storescu's default ``+f``).  storescu's output is
    appended to ``log_path``.
    """
    report = StoreReport()
    started = time.monotonic()
    infos: list[InstanceInfo] = []
    for item in paths:
        if isinstance(item, InstanceInfo):
            infos.append(item)
            continue
        try:
            infos.append(read_instance_info(Path(item)))
        except Exception as exc:
            report.failed[Path(item)] = f"unreadable as DICOM: {exc}"
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        for number, (batch, contexts) in enumerate(_store_batches(infos, batch_size), 1):
            profile_path = Path(tmp) / f"profile{number}.cfg"
            profile = _write_storescu_profile(profile_path, contexts)
            files = [info.path for info in batch]
            cmd = [
                dcmtk_tool("storescu"),
                "-v",
                "-nh",
                "-xf",
                str(profile_path),
                profile,
                "-aet",
                calling_ae,
                "-aec",
                called_ae,
                "-to",
                "10",
                "-ta",
                "30",
                "-td",
                "120",
                *extra_args,
                host,
                str(port),
                *(str(p) for p in files),
            ]
            proc = subprocess.run(
                cmd,
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            output = proc.stdout.decode("utf-8", "replace")
            if log_path is not None:
                with log_path.open("a", encoding="utf-8") as log:
                    log.write(f"\n=== {shlex.join(cmd[:17])} ... ({len(files)} files)\n")
                    log.write(output)
                    log.write(f"=== exit status {proc.returncode}\n")
            _parse_storescu(output, files, report)
    report.seconds = time.monotonic() - started
    return report


# --------------------------------------------------------------------------- peer process


class PeerStartError(RuntimeError):
    """The peer did not become ready; the message carries its log tail."""


@dataclass
class LoadResult:
    """Outcome of one ``PeerProcess.load`` call, checked against the peer's content."""

    loaded: dict[str, InstanceInfo] = field(default_factory=dict)
    refused: dict[Path, str] = field(default_factory=dict)
    seconds: float = 0.0


_PORT_CONFLICT = re.compile(r"address already in use|cannot bind|could not bind|bind.*fail", re.I)


class PeerProcess:
    """Base class of a PACS peer running as a child process.

    Subclasses implement ``_allocate_ports``, ``_write_config``, ``_command``,
    ``_probe_ready`` and ``stored_sop_instance_uids`` and set ``aet``.
    After ``load`` the peer knows which files it really holds: ``loaded`` maps
    SOPInstanceUID to the file's ``InstanceInfo``, ``refused`` maps each file the
    peer did not keep to the reason.
    """

    kind = "peer"
    startup_timeout = 30.0
    stop_timeout = 20.0
    start_attempts = 3

    def __init__(self, workdir: Path, *, name: str | None = None, aet: str = "PEER") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name or self.kind
        self.aet = aet
        self.host = LOOPBACK
        self.log_path = self.workdir / f"{self.name}.log"
        self.store_log_path = self.workdir / "storescu.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.loaded: dict[str, InstanceInfo] = {}
        self.refused: dict[Path, str] = {}
        self.timings: dict[str, float] = {}
        self._allocate_ports()

    # ------------------------------------------------------------------ subclass hooks

    @property
    def dicom_port(self) -> int:
        raise NotImplementedError

    def _allocate_ports(self) -> None:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe_ready(self) -> bool:
        raise NotImplementedError

    def stored_sop_instance_uids(self) -> set[str]:
        """The SOPInstanceUIDs the running peer holds, asked from the peer itself."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dcmtk_env()

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Start the peer and wait until it is ready; retry on a port conflict."""
        if self.is_running():
            return self
        started = time.monotonic()
        for attempt in range(1, self.start_attempts + 1):
            if attempt > 1:
                self._allocate_ports()
            self._write_config()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(attempt)
            try:
                self._wait_ready()
            except PeerStartError:
                self.stop()
                if attempt == self.start_attempts or not self._log_says_port_conflict(log_offset):
                    raise
                continue
            self.timings["start"] = time.monotonic() - started
            return self
        raise AssertionError("unreachable")

    def _spawn(self, attempt: int) -> None:
        cmd = self._command()
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"\n=== {stamp} start attempt {attempt}: {shlex.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise PeerStartError(
                    f"{self.name} exited with status {code} during start-up\n"
                    f"--- {self.log_path} ---\n{self.log_tail()}"
                )
            if self._probe_ready():
                return
            if time.monotonic() > deadline:
                raise PeerStartError(
                    f"{self.name} not ready after {self.startup_timeout:.0f} s\n"
                    f"--- {self.log_path} ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _log_says_port_conflict(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return False
        return bool(_PORT_CONFLICT.search(text))

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM to the recorded PID, SIGKILL to its process group after ``timeout``.

        The group is the session created for this peer (its PGID is the recorded
        PID), so dcmqrscp's per-association children go with it.  Returns the exit
        status, or None when the peer was not started.
        """
        proc = self.process
        if proc is None:
            return None
        atexit.unregister(self.stop)
        timeout = self.stop_timeout if timeout is None else timeout
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._reap_group(proc.pid)
        return proc.returncode

    @staticmethod
    def _reap_group(pgid: int) -> None:
        """End children left in the peer's own process group (e.g. dcmqrscp workers
        busy with an association).  Zombies are ignored: once the peer is gone they
        belong to init."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _live_group_members(pgid):
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + 2.0
            while _live_group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def log_tail(self, lines: int = 80) -> str:
        """The last lines of the peer's log, for failure messages."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.aet}@{self.host}:{self.dicom_port} {state}>"

    # ------------------------------------------------------------------ DIMSE helpers

    def echo(self, calling_ae: str = "ECHOSCU", timeout: float = 5.0) -> bool:
        return c_echo(self.host, self.dicom_port, self.aet, calling_ae, timeout)

    def find(
        self,
        level: str,
        keys: Mapping[str, Any] | Dataset,
        calling_ae: str = "FINDSCU",
        model: str = "study",
    ) -> list[Dataset]:
        return c_find(self.host, self.dicom_port, self.aet, level, keys, calling_ae, model)

    def find_session(self, calling_ae: str = "FINDSCU", model: str = "study") -> FindSession:
        return FindSession(self.host, self.dicom_port, self.aet, calling_ae, model)

    # ------------------------------------------------------------------ data

    @property
    def loaded_sop_instance_uids(self) -> frozenset[str]:
        return frozenset(self.loaded)

    @property
    def loaded_study_uids(self) -> frozenset[str]:
        return frozenset(info.study_instance_uid for info in self.loaded.values())

    @property
    def loaded_files(self) -> list[Path]:
        return [info.path for info in self.loaded.values()]

    def _send(self, infos: Sequence[InstanceInfo], calling_ae: str) -> StoreReport:
        return store_files(
            infos,
            self.host,
            self.dicom_port,
            self.aet,
            calling_ae,
            log_path=self.store_log_path,
        )

    def load(
        self,
        paths: Iterable[Path],
        calling_ae: str = "STORESCU",
        sender: Callable[[Sequence[InstanceInfo]], StoreReport] | None = None,
    ) -> LoadResult:
        """Store files into the running peer and check what it really kept.

        Files go through storescu (``calling_ae`` calling) unless ``sender`` is
        given (e.g. ``OrthancPeer.upload_rest``).  A file whose SOPInstanceUID was
        already loaded (or appears twice in ``paths``) is not sent: Orthanc would
        keep the first copy and dcmqrscp the last, and both peers should agree.
        """
        started = time.monotonic()
        result = LoadResult()
        to_send: list[InstanceInfo] = []
        seen: dict[str, Path] = {uid: info.path for uid, info in self.loaded.items()}
        for path in paths:
            path = Path(path)
            try:
                info = read_instance_info(path)
            except Exception as exc:
                result.refused[path] = f"not sent: unreadable as DICOM ({exc})"
                continue
            if info.sop_instance_uid in seen:
                result.refused[path] = (
                    f"not sent: duplicate SOPInstanceUID of {seen[info.sop_instance_uid]}"
                )
                continue
            seen[info.sop_instance_uid] = path
            to_send.append(info)
        if not to_send:
            report = StoreReport()
        elif sender is not None:
            report = sender(to_send)
        else:
            report = self._send(to_send, calling_ae)
        present = self.stored_sop_instance_uids() if to_send else set()
        for info in to_send:
            if info.sop_instance_uid in present:
                result.loaded[info.sop_instance_uid] = info
            elif info.path in report.failed:
                result.refused[info.path] = (
                    f"{report.failed[info.path]} [{_uid_name(info.transfer_syntax_uid)}, "
                    f"{_uid_name(info.sop_class_uid)}]"
                )
            else:
                result.refused[info.path] = "store reported success but the peer does not list it"
        result.seconds = time.monotonic() - started
        self.loaded.update(result.loaded)
        self.refused.update(result.refused)
        self.timings["load"] = self.timings.get("load", 0.0) + result.seconds
        return result


def _live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes in group ``pgid`` that are not zombies (Linux /proc)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read().decode("ascii", "replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain blanks and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _uid_name(uid: str) -> str:
    name = pydicom.uid.UID(uid).name
    return name if name and name != uid else uid


def log_tail(path: Path, lines: int = 80, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log file (empty string when it does not exist)."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - max_bytes))
            data = log.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class StorescpPeer(PeerProcess):
    """DCMTK storescp as a C-STORE receiver, e.g. a C-MOVE destination in a test.

    Files land in ``output_dir`` (``received_sop_instance_uids()`` lists them).
    ``port`` fixes the port (e.g. the one registered for an AE in the PACS peers);
    without it a free port is chosen.  Accepts every transfer syntax DCMTK knows
    (``+xa``) and a 128 KiB PDU, so the sender's PDV size is not the bottleneck.
    """

    kind = "storescp"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        name: str | None = None,
        extra_args: Sequence[str] = ("+xa", "-pdu", "131072"),
    ) -> None:
        self._fixed_port = port
        self._port = 0
        self.extra_args = list(extra_args)
        super().__init__(workdir, name=name, aet=aet)
        self.output_dir = self.workdir / "received"

    @property
    def dicom_port(self) -> int:
        return self._port

    def _allocate_ports(self) -> None:
        self._port = self._fixed_port or free_port()

    def _write_config(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            dcmtk_tool("storescp"),
            "-aet",
            self.aet,
            "-od",
            str(self.output_dir),
            "-dhl",
            *self.extra_args,
            str(self._port),
        ]

    def _probe_ready(self) -> bool:
        if not port_is_open(LOOPBACK, self._port):
            return False
        return c_echo(LOOPBACK, self._port, self.aet, "ECHOSCU", timeout=5.0)

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def stored_sop_instance_uids(self) -> set[str]:
        return {read_instance_info(p).sop_instance_uid for p in self.received_files()}
