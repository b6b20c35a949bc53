"""The embedded demo PACS: pynetdicom's own ``qrscp`` app in a subprocess.

``qrscp`` is a Verification, Storage and Query/Retrieve SCP backed by an
sqlite index.  It is good enough to demonstrate and test the gateway on one
machine without installing a real PACS, with limits worth knowing (found in
``pynetdicom/apps/qrscp`` 3.0.4 and by running it):

* only 12 attributes are indexed (PatientID, PatientName, StudyInstanceUID,
  StudyDate, StudyTime, AccessionNumber, StudyID, SeriesInstanceUID,
  Modality, SeriesNumber, SOPInstanceUID, InstanceNumber); any other key in
  a C-FIND identifier is silently dropped from the answer;
* a C-FIND returns one answer per matching *instance*, at every level: a
  STUDY query over a 60-image study yields 60 identical answers;
* answers carry no Specific Character Set: names are indexed as decoded
  text and re-encoded with pydicom's default codec, which is Latin-1, and
  characters outside it become ``?``.  ``Müller^Jürgen`` comes back as
  undeclared Latin-1 bytes (pydicom, but not a strict client, decodes it
  right), ``Łukasiewicz^Zofia^Maria`` as ``?ukasiewicz^Zofia^Maria`` and
  ``Yamada^Tarou=山田^太郎`` as ``Yamada^Tarou=??^??``.  Matching on non-ASCII
  names works.  ``QrscpProcess(utf8_answers=True)`` starts qrscp through a
  small bootstrap that declares ISO_IR 192 on every C-FIND answer, which
  makes all names come back intact;
* ingest is slow: about 12 ms per 128 KiB instance (an sqlite commit and a
  new SQLAlchemy engine per C-STORE), i.e. roughly 10 MB/s;
* a C-STORE whose index update fails (e.g. AccessionNumber over 16
  characters) still answers Success and the instance stays invisible to
  queries;
* relative ``instance_location``/``database_location`` are taken relative
  to the pynetdicom package directory, not the working directory, and a
  ``%`` in the INI file is interpolated; this module therefore writes
  absolute, escaped paths.
"""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from app.dimse.pynetdicom_fixes import quiesce_reactor
from app.sampledata import write_sample_studies

__all__ = [
    "DemoPacsError",
    "QrscpProcess",
    "load_demo_data",
    "store_files",
]

_READY_TIMEOUT = 20.0
_POLL_INTERVAL = 0.1
_STOP_TIMEOUT = 10.0
_LOG_TAIL_BYTES = 4000
_MANIFEST = "sample-manifest.txt"
_MAX_CONTEXTS = 128
# pynetdicom.sop_class builds its names at import time, invisible to mypy.
_VERIFICATION = UID("1.2.840.10008.1.1")


# Runs qrscp's main() after making every C-FIND answer declare UTF-8.  The
# answer identifiers are built from the index's decoded strings, so declaring
# ISO_IR 192 is all it takes for pydicom to encode them faithfully.
_UTF8_BOOTSTRAP = """
import sys
from pynetdicom.apps.qrscp import db, qrscp

_as_identifier = db.Instance.as_identifier

def _utf8_identifier(self, identifier, model):
    ds = _as_identifier(self, identifier, model)
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds

db.Instance.as_identifier = _utf8_identifier
sys.argv[0] = "qrscp"
qrscp.main(sys.argv[1:])
"""


class DemoPacsError(RuntimeError):
    """The demo PACS could not be started, or refused or failed a store."""


def _log_tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"


def _tcp_nodelay(event: evt.Event) -> None:
    # pynetdicom leaves Nagle on; each request/response then waits on the
    # peer's 40 ms delayed ACK (see PEERS.md).
    assoc_socket = event.assoc.dul.socket
    if assoc_socket is not None and assoc_socket.socket is not None:
        assoc_socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class QrscpProcess:
    """pynetdicom's ``qrscp`` running as a child process with its state in ``work_dir``.

    ``work_dir`` receives ``qrscp.ini``, ``qrscp.log`` (stdout and stderr of
    the process), the sqlite index ``qrscp.sqlite`` and the ``instances``
    folder.  A second start on the same folder keeps the stored instances.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with QrscpProcess(tmp, port=11112) as pacs:
            store_files(paths, host="127.0.0.1", port=pacs.port, called_ae=pacs.ae_title)
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        port: int,
        ae_title: str = "QRSCP",
        bind_address: str = "127.0.0.1",
        move_destinations: Mapping[str, tuple[str, int]] | None = None,
        max_pdu: int = 16382,
        timeout: float = 30.0,
        utf8_answers: bool = False,
        log_level: str = "warn",
    ) -> None:
        """Prepare (but do not start) a qrscp listening on ``bind_address:port``.

        ``move_destinations`` maps the AE titles qrscp may C-MOVE to onto
        their (host, port).  ``bind_address`` ``""`` listens on every
        interface.  ``timeout`` applies to qrscp's ACSE, DIMSE and network
        timeouts.  ``utf8_answers`` runs qrscp through a bootstrap that
        declares ISO_IR 192 in its C-FIND answers (stock qrscp declares no
        character set and turns non-Latin-1 characters into ``?``).
        ``log_level`` is qrscp's ``--log-level`` (critical, error, warn,
        info, debug); ``info`` logs every DIMSE message, one line per C-FIND
        answer.
        """
        self.work_dir = work_dir.resolve()
        self.port = port
        self.ae_title = ae_title
        self.bind_address = bind_address
        self.move_destinations = dict(move_destinations or {})
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.utf8_answers = utf8_answers
        self.log_level = log_level
        self.config_path = self.work_dir / "qrscp.ini"
        self.log_path = self.work_dir / "qrscp.log"
        self.database_path = self.work_dir / "qrscp.sqlite"
        self.instance_dir = self.work_dir / "instances"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Address a client on this machine connects to."""
        return self.bind_address if self.bind_address not in ("", "0.0.0.0") else "127.0.0.1"

    @property
    def pid(self) -> int | None:
        """Process id of the running qrscp, ``None`` when not running."""
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        """Whether the child process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    def write_config(self) -> Path:
        """Write the INI file qrscp reads with ``-c`` and return its path."""

        def escaped(path: Path) -> str:
            # ConfigParser's BasicInterpolation treats % specially.
            return str(path).replace("%", "%%")

        config = configparser.ConfigParser()
        config["DEFAULT"] = {
            "ae_title": self.ae_title,
            "port": str(self.port),
            "max_pdu": str(self.max_pdu),
            "acse_timeout": str(self.timeout),
            "dimse_timeout": str(self.timeout),
            "network_timeout": str(self.timeout),
            "bind_address": self.bind_address,
            # qrscp joins these onto its own package directory; an absolute
            # path is the only way to keep them out of site-packages.
            "instance_location": escaped(self.instance_dir),
            "database_location": escaped(self.database_path),
            "log_identifier": "False",
        }
        for ae_title, (address, port) in self.move_destinations.items():
            config[ae_title] = {"address": address, "port": str(port)}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with self.config_path.open("w", encoding="utf-8") as f:
            config.write(f)
        return self.config_path

    def _check_port_free(self) -> None:
        # Without this, a foreign SCP already on the port would answer the
        # readiness C-ECHO and we would report a PACS that is not ours.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.bind_address, self.port))
            except OSError as exc:
                raise DemoPacsError(
                    f"cannot start qrscp: {self.bind_address or '*'}:{self.port} is in use "
                    f"or not available here ({exc})"
                ) from exc

    def command(self) -> list[str]:
        """The command line that starts qrscp with this instance's configuration."""
        if self.utf8_answers:
            launcher = [sys.executable, "-c", _UTF8_BOOTSTRAP]
        else:
            launcher = [sys.executable, "-m", "pynetdicom", "qrscp"]
        return [*launcher, "--log-level", self.log_level, "-c", str(self.config_path)]

    def start(self) -> None:
        """Start qrscp and return once it answers C-ECHO; raises :class:`DemoPacsError`."""
        if self.is_running():
            raise DemoPacsError(f"qrscp is already running (pid {self.pid})")
        self._check_port_free()
        self.write_config()
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                # Own session: a Ctrl-C meant for the caller does not kill the
                # PACS mid-test; stop() is the one way it ends.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            process = self._process
            assert process is not None
            code = process.poll()
            if code is not None:
                raise DemoPacsError(
                    f"qrscp exited with status {code} during start-up; log tail:\n"
                    + _log_tail(self.log_path)
                )
            if self._listening() and self.echo():
                return
            if time.monotonic() > deadline:
                raise DemoPacsError(
                    f"qrscp did not answer C-ECHO on {self.host}:{self.port} within "
                    f"{_READY_TIMEOUT:.0f} s; log tail:\n" + _log_tail(self.log_path)
                )
            time.sleep(_POLL_INTERVAL)

    def _listening(self) -> bool:
        # A plain connect first: pynetdicom logs every refused association
        # attempt as an error, which would litter the caller's log.
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def echo(self, calling_ae: str = "DEMOECHO") -> bool:
        """Send one C-ECHO; ``True`` if qrscp answered Success."""
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = 5
        ae.dimse_timeout = 5
        ae.network_timeout = 5
        ae.add_requested_context(_VERIFICATION)
        assoc = ae.associate(
            self.host,
            self.port,
            ae_title=self.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _tcp_nodelay)],
        )
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0x0000
        finally:
            assoc.release()

    def stop(self) -> None:
        """Terminate qrscp: SIGTERM, then SIGKILL after 10 s.  Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> QrscpProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"QrscpProcess({self.ae_title}@{self.host}:{self.port}, {state})"


def _transfer_syntax(ds: Dataset) -> UID:
    """Transfer syntax a data set was read with, also for files without file meta."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return UID(meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _read_header(path: Path) -> tuple[UID, UID]:
    ds = dcmread(path, force=True, stop_before_pixels=True)
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise DemoPacsError(f"{path}: not a composite instance (no SOP Class/Instance UID)")
    return UID(ds.SOPClassUID), _transfer_syntax(ds)


def store_files(
    paths: Iterable[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "DEMOLOAD",
) -> int:
    """C-STORE every file over one association; returns the number stored.

    One presentation context is proposed per (SOP class, transfer syntax)
    found in the files, at most 128.  Files may lack the Part 10 preamble
    or file meta.  Success and warning statuses count as stored; anything
    else (failure status, rejected context, lost association) raises
    :class:`DemoPacsError` naming the file.
    """
    files = list(paths)
    if not files:
        return 0
    # Headers first: the contexts must be known before associating, and
    # reading all pixel data up front could hold hundreds of MB.
    wanted = sorted({_read_header(path) for path in files})
    if len(wanted) > _MAX_CONTEXTS:
        raise DemoPacsError(
            f"the files need {len(wanted)} presentation contexts; one association allows "
            f"{_MAX_CONTEXTS}"
        )
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in wanted:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _tcp_nodelay)]
    )
    if not assoc.is_established:
        raise DemoPacsError(
            f"association {calling_ae} -> {called_ae} at {host}:{port} was not established "
            f"(rejected={assoc.is_rejected}, aborted={assoc.is_aborted})"
        )
    stored = 0
    try:
        for path in files:
            ds = dcmread(path, force=True)
            syntax = _transfer_syntax(ds)
            if getattr(ds, "file_meta", None) is None:
                ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = syntax
            # pynetdicom 3.0.4 can drop the response of a request sent while its
            # reactor has not come round yet (issue 875): the store then times out.
            if not quiesce_reactor(assoc):
                raise DemoPacsError(f"{path}: the association stopped responding")
            try:
                status = assoc.send_c_store(ds)
            except ValueError as exc:
                raise DemoPacsError(f"{path}: {exc}") from exc
            if not status:
                raise DemoPacsError(
                    f"{path}: no C-STORE response (association "
                    f"{'aborted' if assoc.is_aborted else 'lost'})"
                )
            code = int(status.Status)
            # 0xB000, 0xB006, 0xB007 are warnings: stored, with a remark.
            if code != 0x0000 and code & 0xF000 != 0xB000:
                comment = status.get("ErrorComment", "")
                raise DemoPacsError(f"{path}: C-STORE failed with status 0x{code:04X} {comment}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def _manifest_files(data_dir: Path) -> list[Path] | None:
    manifest = data_dir / _MANIFEST
    if not manifest.is_file():
        return None
    paths = [data_dir / line for line in manifest.read_text().splitlines() if line]
    return paths if paths and all(p.is_file() for p in paths) else None


def load_demo_data(pacs: QrscpProcess, data_dir: Path, **sample_options: Any) -> int:
    """Store :func:`app.sampledata.sample_studies` in ``pacs``; returns the file count.

    The files are generated into ``data_dir`` unless a complete earlier set
    is there (listed in ``sample-manifest.txt``, written last, so that an
    interrupted generation is redone).  ``sample_options`` go to
    :func:`app.sampledata.write_sample_studies` when generating.
    """
    paths = _manifest_files(data_dir)
    if paths is None:
        paths = write_sample_studies(data_dir, **sample_options)
        (data_dir / _MANIFEST).write_text("".join(f"{p.name}\n" for p in paths))
    return store_files(paths, host=pacs.host, port=pacs.port, called_ae=pacs.ae_title)
