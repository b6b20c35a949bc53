"""CTN (the RSNA Central Test Node, Debian ``ctn`` 3.2.0) as a test peer.

CTN's ``image_server`` keeps its configuration and its index in MySQL, so the
peer runs a private MariaDB of its own: a fresh data directory, TCP on a free
loopback port, a Unix socket, started as the ``mysql`` user (mariadbd refuses to
run as root) and stopped with the peer.  The schema comes from the package's
``/usr/share/ctn/mysql`` scripts; every AE the tests use is written into the
control tables (an unknown calling AE gets "Called AE Title Not Recognized").

Its quirks, which are why it is here (see /work/shared/PEERS.md):

* it accepts an Explicit VR proposal for C-FIND/C-MOVE, then misparses the
  identifier and aborts: clients must offer Implicit VR Little Endian alone;
* a C-MOVE sends only the instances it stored as Implicit VR; the others count
  as warning sub-operations, are never sent, and the final status is Success;
* it returns neither ModalitiesInStudy nor related-instance counts, matches
  names case-sensitively, binds all interfaces, and leaves one zombie per
  association until it exits (they go with its process group).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from app.dimse.pynetdicom_fixes import quiesce_reactor
from tests.peers.common import (
    LOOPBACK,
    InstanceInfo,
    PeerProcess,
    PeerStartError,
    StoreReport,
    _parse_storescu,
    _set_nodelay,
    c_echo,
    dcmtk_env,
    dcmtk_tool,
    free_port,
    log_tail,
    make_query,
    port_is_open,
    wait_until,
)

IMAGE_SERVER = "/usr/bin/image_server"
MARIADBD = "/usr/sbin/mariadbd"
CTN_SQL = Path("/usr/share/ctn/mysql")


def ctn_available() -> bool:
    """CTN, MariaDB and DCMTK's storescu installed, and a ``mysql`` user to run the DB."""
    try:
        pwd.getpwnam("mysql")
        dcmtk_tool("storescu")
    except (KeyError, FileNotFoundError):
        return False
    tools = (IMAGE_SERVER, MARIADBD, shutil.which("mariadb"), shutil.which("mariadb-install-db"))
    return (
        all(t and Path(t).exists() for t in tools) and (CTN_SQL / "CreateDIMTables.script").exists()
    )


def _sql_text(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class CtnPeer(PeerProcess):
    """CTN's ``image_server`` with AE ``aet`` (default "CTNAE") on a private MariaDB.

    ``peers`` maps a symbolic name to ``(AET, host, port)``: each becomes a known
    AE (allowed to call, and a C-MOVE destination at that host and port).
    ``load`` sends files as Implicit VR (``storescu -xi``) so that CTN can move
    them back; ``load_as_stored`` sends them in their own syntax, which CTN
    keeps but will not move.
    """

    kind = "ctn"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "CTNAE",
        peers: Mapping[str, tuple[str, str, int]] | None = None,
        name: str | None = None,
    ) -> None:
        self._dicom_port = 0
        self.peers: dict[str, tuple[str, str, int]] = dict(peers or {})
        super().__init__(workdir, name=name, aet=aet)
        self.images_dir = self.workdir / "images"
        self.db_port = free_port()
        self.db_dir: Path | None = None
        self.db_process: subprocess.Popen[bytes] | None = None
        self.db_log_path = self.workdir / "mariadb.log"

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    def _allocate_ports(self) -> None:
        self._dicom_port = free_port()

    # ------------------------------------------------------------------ MariaDB

    @property
    def _socket(self) -> Path:
        assert self.db_dir is not None
        return self.db_dir / "run" / "mysqld.sock"

    def _sql(self, statements: str, database: str | None = None) -> None:
        cmd = ["mariadb", "--no-defaults", "-S", str(self._socket), "-uroot"]
        if database:
            cmd.append(database)
        proc = subprocess.run(
            cmd, input=statements.encode(), capture_output=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb: {proc.stderr.decode(errors='replace').strip()}")

    def _start_db(self) -> None:
        # Under /tmp with 0755: pytest's own temporary folders are 0700 root, which
        # the mysql user cannot enter.
        self.db_dir = Path(tempfile.mkdtemp(prefix="ctn-mariadb-"))
        os.chmod(self.db_dir, 0o755)
        data, run = self.db_dir / "data", self.db_dir / "run"
        data.mkdir()
        run.mkdir()
        mysql = pwd.getpwnam("mysql")
        for folder in (data, run):
            os.chown(folder, mysql.pw_uid, mysql.pw_gid)
        started = time.monotonic()
        with self.db_log_path.open("ab") as log:
            subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={data}",
                    "--user=mysql",
                    "--skip-test-db",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
                check=True,
            )
            self.db_process = subprocess.Popen(
                [
                    MARIADBD,
                    "--no-defaults",
                    f"--datadir={data}",
                    "--user=mysql",
                    "--bind-address=127.0.0.1",
                    f"--port={self.db_port}",
                    f"--socket={self._socket}",
                    f"--pid-file={run / 'mysqld.pid'}",
                    f"--log-error={self.db_log_path}",
                    # A throw-away index: no fsync per insert (CTN commits each one).
                    "--innodb-flush-log-at-trx-commit=0",
                    "--skip-innodb-doublewrite",
                    # Names travel as raw bytes: no conversion from a UTF-8 client
                    # charset that refuses Latin-1 bytes ("Incorrect string value").
                    "--character-set-server=latin1",
                    "--collation-server=latin1_swedish_ci",
                    "--skip-character-set-client-handshake",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if not wait_until(self._db_ready, timeout=60.0, interval=0.1):
            raise PeerStartError(
                f"MariaDB for CTN not ready after 60 s\n--- {self.db_log_path} ---\n"
                + log_tail(self.db_log_path, 40)
            )
        self._sql(
            "CREATE USER 'ctn'@'localhost' IDENTIFIED BY 'ctn';"
            "CREATE USER 'ctn'@'%' IDENTIFIED BY 'ctn';"
            "GRANT ALL ON *.* TO 'ctn'@'localhost'; GRANT ALL ON *.* TO 'ctn'@'%';"
            # CTN writes names as the bytes it received; latin1 columns take any byte
            # (the default utf8mb4 refuses Latin-1 and even UTF-8 names).
            "CREATE DATABASE CTNControl CHARACTER SET latin1;"
            "CREATE DATABASE CTNImages CHARACTER SET latin1;"
        )
        self._sql((CTN_SQL / "CreateControlTables.script").read_text(), "CTNControl")
        self._sql((CTN_SQL / "CreateDIMTables.script").read_text(), "CTNImages")
        self.timings["database"] = time.monotonic() - started

    def _db_ready(self) -> bool:
        if self.db_process is not None and self.db_process.poll() is not None:
            raise PeerStartError(
                f"MariaDB for CTN exited with status {self.db_process.returncode}\n"
                f"--- {self.db_log_path} ---\n" + log_tail(self.db_log_path, 40)
            )
        if not self._socket.exists():
            return False
        try:
            self._sql("SELECT 1")
        except RuntimeError:
            return False
        return True

    def _stop_db(self) -> None:
        proc = self.db_process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.db_process = None
        if self.db_dir is not None:
            shutil.rmtree(self.db_dir, ignore_errors=True)
            self.db_dir = None

    # ------------------------------------------------------------------ PeerProcess hooks

    def _write_config(self) -> None:
        """The control tables: who may call, where moves go, where images are kept."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        entities = {self.aet: ("localhost", self._dicom_port)}
        for aet, host, port in self.peers.values():
            entities[aet] = (host, port)
        for caller in ("ECHOSCU", "FINDSCU", "MOVESCU", "STORESCU"):
            entities.setdefault(caller, ("localhost", 0))
        callers = [a for a in entities if a != self.aet]
        root = _sql_text(str(self.images_dir))
        me = _sql_text(self.aet)
        rows_ae = ",".join(
            f"({_sql_text(a)},{_sql_text(h)},{p},'','ORG')" for a, (h, p) in entities.items()
        )
        rows_security = ",".join(f"({_sql_text(a)},{me})" for a in callers)
        rows_storage = ",".join(f"({_sql_text(a)},{me},'',{root},'','')" for a in callers)
        self._sql(
            "DELETE FROM ApplicationEntity; DELETE FROM SecurityMatrix;"
            "DELETE FROM StorageAccess; DELETE FROM StorageControl;"
            f"INSERT INTO ApplicationEntity VALUES {rows_ae};"
            f"INSERT INTO SecurityMatrix VALUES {rows_security};"
            f"INSERT INTO StorageAccess VALUES ({me},'CTNImages','','',0,'');"
            f"INSERT INTO StorageControl VALUES {rows_storage};",
            "CTNControl",
        )

    def _command(self) -> list[str]:
        # -q: without it every received data set is dumped to stdout.
        return [
            IMAGE_SERVER,
            "-q",
            "-n",
            "localhost",
            "-l",
            str(self.workdir / "associations.log"),
            str(self._dicom_port),
        ]

    def _env(self) -> dict[str, str]:
        return dcmtk_env({"CTN_MYSQL_SERVER": LOOPBACK, "CTN_MYSQL_SERVER_PORT": str(self.db_port)})

    def _probe_ready(self) -> bool:
        if not port_is_open(LOOPBACK, self._dicom_port):
            return False
        return c_echo(LOOPBACK, self._dicom_port, self.aet, "ECHOSCU", timeout=5.0)

    def start(self) -> CtnPeer:
        if self.is_running():
            return self
        try:
            if self.db_process is None:
                self._start_db()
            super().start()
        except BaseException:
            self._stop_db()
            raise
        return self

    def stop(self, timeout: float | None = None) -> int | None:
        code = super().stop(timeout)
        self._stop_db()
        return code

    # ------------------------------------------------------------------ DIMSE

    def find_implicit(self, level: str, keys: Mapping[str, object]) -> list[object]:
        """One Study Root C-FIND offering Implicit VR only (what CTN parses)."""
        ae = AE(ae_title="FINDSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian)
        assoc = ae.associate(LOOPBACK, self._dicom_port, ae_title=self.aet)
        if not assoc.is_established:
            raise ConnectionError(f"C-FIND association to {self.aet} failed")
        _set_nodelay(assoc)
        try:
            if not quiesce_reactor(assoc):
                raise ConnectionError("C-FIND: association not responsive")
            query = make_query(level, keys, charset=None)
            answers = []
            for status, ident in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                if not status:
                    raise ConnectionError("C-FIND: association aborted")
                if int(status.Status) in (0xFF00, 0xFF01) and ident is not None:
                    answers.append(ident)
                elif int(status.Status) != 0:
                    raise RuntimeError(f"C-FIND failed: 0x{int(status.Status):04X}")
            return answers
        finally:
            if assoc.is_established:
                assoc.release()

    def stored_sop_instance_uids(self) -> set[str]:
        uids: set[str] = set()
        for study in self.find_implicit("STUDY", {"StudyInstanceUID": ""}):
            st = str(study.StudyInstanceUID).strip()  # type: ignore[attr-defined]
            for series in self.find_implicit(
                "SERIES", {"StudyInstanceUID": st, "SeriesInstanceUID": ""}
            ):
                se = str(series.SeriesInstanceUID).strip()  # type: ignore[attr-defined]
                for image in self.find_implicit(
                    "IMAGE",
                    {"StudyInstanceUID": st, "SeriesInstanceUID": se, "SOPInstanceUID": ""},
                ):
                    uids.add(str(image.SOPInstanceUID).strip())  # type: ignore[attr-defined]
        return uids

    # ------------------------------------------------------------------ data

    def _storescu(self, infos: Sequence[InstanceInfo], syntax_option: str) -> StoreReport:
        report = StoreReport()
        started = time.monotonic()
        files = [info.path for info in infos]
        for start in range(0, len(files), 200):
            batch = files[start : start + 200]
            cmd = [
                dcmtk_tool("storescu"),
                "-v",
                "-nh",
                syntax_option,
                "-aet",
                "STORESCU",
                "-aec",
                self.aet,
                LOOPBACK,
                str(self._dicom_port),
                *(str(p) for p in batch),
            ]
            proc = subprocess.run(
                cmd,
                env=dcmtk_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=300,
                check=False,
            )
            output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
            with self.store_log_path.open("a", encoding="utf-8") as log:
                log.write(f"\n=== storescu {syntax_option} ({len(batch)} files)\n{output}")
            _parse_storescu(output, batch, report)
        report.seconds = time.monotonic() - started
        return report

    def _send(self, infos: Sequence[InstanceInfo], calling_ae: str) -> StoreReport:
        return self.send_implicit(infos)

    def send_implicit(self, infos: Sequence[InstanceInfo]) -> StoreReport:
        """storescu -xi: CTN keeps them in its raw Implicit VR format and can move them."""
        return self._storescu(infos, "-xi")

    def send_as_stored(self, infos: Sequence[InstanceInfo]) -> StoreReport:
        """storescu proposing the files' own syntax first: Explicit VR ones are kept
        as Part 10 files that CTN's C-MOVE skips."""
        return self._storescu(infos, "-xe")
