"""The storage SCP in a process of its own, driven by the gateway.

A C-MOVE's throughput is set by one loop: the PACS sends the next instance
only after our C-STORE-RSP.  Inside the gateway process that loop shared one
interpreter lock with pynetdicom's C-MOVE requestor (it decodes every pending
response into pydicom Datasets), the event loop streaming parts to clients,
and the cache's bookkeeping: the receive thread kept waiting for the GIL and
cold retrieves ran at half of DCMTK's ``storescp`` although the receiver alone
matches it (``docs/benchmarks.md``).  Here the receiver keeps an interpreter to
itself and does only what must happen before the C-STORE-RSP:

* accept associations only from configured senders (calling AE title and
  address; names are resolved again when an unknown address calls, so a PACS
  whose address changed is not locked out until a restart);
* accept an instance only when a retrieve expects it: the parent registers each
  C-MOVE (its Message ID, the PACS's AE title, the study, series or instance
  asked for) and waits for the acknowledgement before sending the C-MOVE-RQ;
* write the Part 10 file to the cache's temporary folder, check the study and
  series UIDs it declares against the retrieve, and only then answer Success.

Each accepted instance is then reported to the parent, which moves it into the
cache index and hands it to the waiting HTTP responses.  An instance the parent
cannot index is therefore missing from its retrieve, and the retrieve's
completeness check (arrivals against the C-MOVE's counts) reports it: a failed
write is never a silent success.

The parent talks to the child over a socket pair with
:class:`multiprocessing.connection.Connection` messages (tuples of strings and
ints).  The child ends when the parent says stop or when the socket closes (the
parent died); the parent starts a new child if one dies, with the same port and
the expectations that were open.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import site
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, BinaryIO

from app.dimse.storescp import (
    STATUS_NOT_AUTHORIZED,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    IncomingInstance,
    StorageSCP,
    route_by_originator,
)
from app.dimse.tls import server_context
from app.dimse.uidscan import file_study_series

log = logging.getLogger(__name__)

# An instance that contradicts its retrieve's study, series or instance: a
# processing failure (PS3.4 B.2.3), as the in-process receiver answers.
STATUS_MISMATCH = 0xC002

_START_TIMEOUT = 30.0
_ACK_TIMEOUT = 10.0
_RESOLVE_INTERVAL = 30.0
# Bytes read back from a received file to find its study and series.
_HEAD_BYTES = 65536
# Messages read from the child before they are handled together.
_BATCH = 64


class StorageProcessError(RuntimeError):
    """The storage process could not be started or stopped answering."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """What one running C-MOVE may deliver."""

    msg_id: int
    calling_ae: str
    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None

    def covers(self, study: str, series: str, sop: str) -> bool:
        return (
            study == self.study_uid
            and (self.series_uid is None or series == self.series_uid)
            and (self.sop_uid is None or sop == self.sop_uid)
        )


@dataclass(frozen=True, slots=True)
class StorageTls:
    """A second listener speaking DICOM TLS, beside the plain one.

    AE titles in ``tls_only_senders`` (PACS configured for TLS) are refused on the
    plain port, so that their instances cannot travel in the clear by mistake.
    """

    port: int
    cert_file: str
    key_file: str
    ca_file: str | None
    require_client_cert: bool
    tls_only_senders: frozenset[str] = frozenset()

    def as_config(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "ca_file": self.ca_file,
            "require_client_cert": self.require_client_cert,
            "tls_only_senders": sorted(self.tls_only_senders),
        }


@dataclass(frozen=True, slots=True)
class Arrival:
    """An instance the child wrote and acknowledged, waiting to be indexed."""

    msg_id: int
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    temp: Path
    calling_ae: str = ""
    seconds: float | None = None  # from the C-STORE-RQ to the file checked


# --------------------------------------------------------------------------- parent side


class StorageProcess:
    """Start, feed and stop the storage SCP child.

    ``senders`` maps each PACS AE title allowed to store to us to the host names
    of its nodes.  ``on_arrivals`` is called on a reader thread of this process
    with the instances the child accepted, in order, a few at a time; it owns
    their temporary files from then on (index them, or delete them).
    ``observer``, if set, is called on that thread for every C-STORE the child
    answered, refusals included, with the calling AE title, the status and the
    seconds it took.
    """

    def __init__(
        self,
        ae_title: str,
        *,
        host: str,
        port: int,
        max_pdu: int,
        senders: Mapping[str, Sequence[str]],
        temp_dir: Path,
        on_arrivals: Callable[[list[Arrival]], None],
        log_level: str = "INFO",
        tls: StorageTls | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.max_pdu = max_pdu
        self.senders = {ae: list(hosts) for ae, hosts in senders.items()}
        self.temp_dir = Path(temp_dir)
        self.on_arrivals = on_arrivals
        self.log_level = log_level
        self.tls = tls
        self._port = port
        self._tls_port = tls.port if tls is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._expected: dict[int, Expectation] = {}
        self._acks: dict[int, concurrent.futures.Future[None]] = {}
        self._seq = itertools.count(1)
        self._stopping = False
        self._restarts = 0
        self.observer: Callable[[str, int, float | None], None] | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def tls_port(self) -> int | None:
        """The TLS listener's port (None without one)."""
        return self._tls_port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def restarts(self) -> int:
        return self._restarts

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the child and wait until it listens (blocking)."""
        self._stopping = False
        self._spawn()
        self._reader = threading.Thread(
            target=self._read_loop, name="storeproc-reader", daemon=True
        )
        self._reader.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop (it aborts open associations), then reap it."""
        self._stopping = True
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("storage process %d did not stop in %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(OSError):
            conn.close()
        if self._reader is not None:
            self._reader.join(timeout)
        with self._state_lock:
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(StorageProcessError("the storage process stopped"))
            self._acks.clear()
        self._proc = self._conn = None

    # -- expectations --------------------------------------------------------

    def expect(self, expectation: Expectation) -> concurrent.futures.Future[None]:
        """Register a retrieve; the future completes when the child has it.

        The C-MOVE-RQ must not leave before: the PACS may connect at once.
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._state_lock:
            seq = next(self._seq)
            self._expected[expectation.msg_id] = expectation
            self._acks[seq] = future
        try:
            self._send(("expect", seq, *_expectation_fields(expectation)))
        except (OSError, ValueError) as exc:
            # The reader restarts a dead child and sends it every expectation,
            # answering this future then; only a stopped process fails it.
            if self._stopping:
                with self._state_lock:
                    self._acks.pop(seq, None)
                future.set_exception(StorageProcessError(f"storage process gone: {exc}"))
        return future

    def forget(self, msg_id: int) -> None:
        """The retrieve ended: later C-STOREs for it are refused."""
        with self._state_lock:
            self._expected.pop(msg_id, None)
        with contextlib.suppress(OSError, ValueError):
            self._send(("forget", msg_id))

    # -- internals -------------------------------------------------------------

    def _spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        config = {
            "ae_title": self.ae_title,
            "host": self.host,
            "port": self._port,
            "max_pdu": self.max_pdu,
            "senders": self.senders,
            "temp_dir": str(self.temp_dir),
            "log_level": self.log_level,
            "tls": None if self.tls is None else {**self.tls.as_config(), "port": self._tls_port},
        }
        try:
            proc = subprocess.Popen(
                # -P and our own package first on the path: the child runs the
                # code the gateway runs, never an ``app`` package that happens
                # to sit in the working directory.
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "app.dimse.storeproc",
                    "--fd",
                    str(child_sock.fileno()),
                ],
                env=_child_environment(),
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C meant for the gateway must not kill the
                # receiver before the gateway has finished its responses.
                start_new_session=True,
            )
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        try:
            conn.send(config)
            if not conn.poll(_START_TIMEOUT):
                raise StorageProcessError(f"no answer within {_START_TIMEOUT:g} s")
            message = conn.recv()
        except (OSError, EOFError, StorageProcessError) as exc:
            conn.close()
            proc.kill()
            proc.wait(5)
            raise StorageProcessError(f"the storage SCP process did not start: {exc}") from exc
        if message[0] != "ready":
            conn.close()
            proc.wait(5)
            raise StorageProcessError(f"the storage SCP could not start: {message[1]}")
        self._port = int(message[1])
        self._tls_port = message[2]
        self._proc, self._conn = proc, conn

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("no storage process")
        with self._send_lock:
            conn.send(message)

    def _read_loop(self) -> None:
        while True:
            conn = self._conn
            if conn is None:
                return
            try:
                messages = [conn.recv()]
            except (EOFError, OSError):
                if self._stopping or not self._respawn():
                    return
                continue
            # What the child sent meanwhile is handled together: arrivals are
            # indexed in one transaction, whose commit costs as much as one
            # instance's.  A child that ended meanwhile is noticed by the next
            # recv(), after what it sent has been handled.
            with contextlib.suppress(EOFError, OSError):
                while len(messages) < _BATCH and conn.poll():
                    messages.append(conn.recv())
            self._handle(messages)

    def _handle(self, messages: list[tuple[Any, ...]]) -> None:
        arrivals: list[Arrival] = []
        for message in messages:
            try:
                if message[0] == "arrived":
                    arrivals.append(_arrival(message))
                    continue
                self._arrived(arrivals)
                arrivals = []
                self._dispatch(message)
            except Exception:
                # repr, not a slice: a message that is not a tuple must not
                # raise again here and end the reader.
                log.exception("storage process: cannot handle %.80r", message)
        self._arrived(arrivals)

    def _arrived(self, arrivals: list[Arrival]) -> None:
        if not arrivals:
            return
        try:
            self.on_arrivals(arrivals)
        except Exception:
            log.exception("storage process: cannot handle %d arrivals", len(arrivals))
            # Whatever was not moved into the cache is nobody's now.
            for arrival in arrivals:
                arrival.temp.unlink(missing_ok=True)
        if self.observer is not None:
            try:
                for arrival in arrivals:
                    self.observer(arrival.calling_ae, STATUS_SUCCESS, arrival.seconds)
            except Exception:
                log.exception("storage process: the observer failed")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "refused":
            if self.observer is not None:
                self.observer(message[1], message[2], message[3])
        elif kind == "ack":
            with self._state_lock:
                future = self._acks.pop(message[1], None)
            if future is not None and not future.done():
                future.set_result(None)

    def _respawn(self) -> bool:
        """Replace a child that died, with the expectations still open."""
        proc = self._proc
        code = proc.poll() if proc is not None else None
        if proc is not None and code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(2)
        log.error("the storage SCP process ended unexpectedly (exit status %s); restarting", code)
        old = self._conn
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        for attempt in range(5):
            if self._stopping:
                return False
            try:
                self._spawn()
                break
            except StorageProcessError as exc:
                log.error("storage SCP restart %d failed: %s", attempt + 1, exc)
                time.sleep(0.5 * (attempt + 1))
        else:
            self._conn = None
            with self._state_lock:
                for future in self._acks.values():
                    future.set_exception(StorageProcessError("the storage SCP cannot restart"))
                self._acks.clear()
            return False
        self._restarts += 1
        with self._state_lock:
            pending = list(self._acks)
            expected = list(self._expected.values())
        for expectation in expected:
            self._send(("expect", 0, *_expectation_fields(expectation)))
        # Acknowledge what was waiting: the new child has every expectation now.
        for seq in pending:
            self._dispatch(("ack", seq))
        return True


def _child_environment() -> dict[str, str]:
    """The gateway's environment, with its package's folder first on the path
    when that is a source tree (an editable install); an installed package's
    site-packages is on the child's path anyway, and first it would come before
    the standard library."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in sites:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    return env


def _arrival(message: tuple[Any, ...]) -> Arrival:
    _, msg_id, sop, sop_class, ts, study, series, temp, calling_ae, seconds = message
    return Arrival(msg_id, sop, sop_class, ts, study, series, Path(temp), calling_ae, seconds)


def _expectation_fields(e: Expectation) -> tuple[int, str, str, str | None, str | None]:
    return (e.msg_id, e.calling_ae, e.study_uid, e.series_uid, e.sop_uid)


# --------------------------------------------------------------------------- child side


class _SenderPolicy:
    """Calling AE title -> the addresses its hosts resolve to, re-resolved (at most
    every 30 s per AE) when a known AE calls from an unknown address."""

    def __init__(self, hosts: Mapping[str, Sequence[str]]) -> None:
        self._hosts = {ae: list(h) for ae, h in hosts.items()}
        self._addresses: dict[str, set[str]] = {}
        self._resolved: dict[str, float] = {}
        self._lock = threading.Lock()
        for ae in self._hosts:
            self._resolve(ae)

    def allow(self, calling_ae: str, address: str) -> bool:
        with self._lock:
            if calling_ae not in self._hosts:
                return False
            if address in self._addresses.get(calling_ae, ()):
                return True
            if time.monotonic() - self._resolved.get(calling_ae, 0.0) < _RESOLVE_INTERVAL:
                return False
            self._resolve(calling_ae)
            return address in self._addresses[calling_ae]

    def _resolve(self, ae: str) -> None:
        addresses: set[str] = set()
        for host in self._hosts[ae]:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError:
                log.warning("cannot resolve %s, the host of sender %s", host, ae)
                continue
            addresses.update(str(info[4][0]) for info in infos)
        if addresses & {"127.0.0.1", "::1"}:
            # A PACS on this machine may connect from any loopback address.
            addresses |= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
        self._addresses[ae] = addresses
        self._resolved[ae] = time.monotonic()


class _SpareFiles:
    """Temporary files created ahead of need, by a thread of their own.

    The PACS sends an instance only once the previous one is answered, so the
    receive path is the critical path of a retrieve.  Creating a file on it
    took 0.3-0.5 ms (ext4, with a few hundred MB written and not yet flushed,
    as during any retrieve) against under 0.2 ms for the rest of a 512 KB
    instance.  Unused files are deleted at stop; the gateway's start-up sweep
    of the temp folder catches those of a child that died.
    """

    def __init__(self, prefix: str, depth: int = 4) -> None:
        self._prefix = prefix
        self._ready: queue.Queue[tuple[str, BinaryIO]] = queue.Queue(depth)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="spare-files", daemon=True)
        self._thread.start()

    def take(self) -> tuple[str, BinaryIO]:
        """A new empty file, open for writing and reading back, and its path."""
        while True:
            try:
                spare = self._ready.get_nowait()
            except queue.Empty:
                return self._create()
            # Deleted while it waited (someone cleaned the temp folder): what
            # was written to it would be lost at the rename.
            if os.fstat(spare[1].fileno()).st_nlink:
                return spare
            _discard(spare)

    def _create(self) -> tuple[str, BinaryIO]:
        path = f"{self._prefix}{uuid.uuid4().hex}.part"
        # Unbuffered: the receiver writes PDV slices of up to a PDU, no copy needed.
        return path, open(path, "x+b", buffering=0)

    def _fill(self) -> None:
        while not self._stopping.is_set():
            try:
                spare = self._create()
            except OSError as exc:
                log.error("storage SCP: cannot create a temporary file: %s", exc)
                self._stopping.wait(1.0)
                continue
            while True:
                try:
                    self._ready.put(spare, timeout=0.5)
                    break
                except queue.Full:
                    if self._stopping.is_set():
                        _discard(spare)
                        return

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        while True:
            try:
                _discard(self._ready.get_nowait())
            except queue.Empty:
                return


def _discard(spare: tuple[str, BinaryIO]) -> None:
    path, file = spare
    with contextlib.suppress(OSError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


class _ChildSink:
    """The child's :class:`~app.dimse.storescp.InstanceSink`: expected instances to
    temporary files, each reported to the parent once complete and checked."""

    def __init__(self, conn: Connection, temp_dir: Path) -> None:
        self._conn = conn
        self._spares = _SpareFiles(os.path.join(temp_dir, ""))
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._expected: dict[int, Expectation] = {}
        self._files: dict[int, tuple[Expectation, str, float]] = {}

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def shutdown(self) -> None:
        """Delete the spare temporary files (after the SCPs stopped)."""
        self._spares.close()

    def expect(self, expectation: Expectation) -> None:
        with self._lock:
            self._expected[expectation.msg_id] = expectation

    def forget(self, msg_id: int) -> None:
        with self._lock:
            self._expected.pop(msg_id, None)

    def _route(self, incoming: IncomingInstance) -> Expectation | None:
        with self._lock:
            return route_by_originator(incoming, self._expected, lambda e: e.calling_ae)

    def _refuse(self, incoming: IncomingInstance, status: int, started: float | None) -> int:
        seconds = None if started is None else time.monotonic() - started
        self.send(("refused", incoming.calling_ae, status, seconds))
        return status

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        started = time.monotonic()
        expectation = self._route(incoming)
        if expectation is None:
            log.warning(
                "refused C-STORE of %s from %s (%s): no retrieve is waiting for it "
                "(Move Originator Message ID %s)",
                incoming.sop_instance_uid,
                incoming.calling_ae,
                incoming.peer_address,
                incoming.move_originator_message_id,
            )
            return self._refuse(incoming, STATUS_NOT_AUTHORIZED, started)
        if expectation.sop_uid and incoming.sop_instance_uid != expectation.sop_uid:
            return self._refuse(incoming, STATUS_MISMATCH, started)
        path, file = self._spares.take()
        with self._lock:
            self._files[id(file)] = (expectation, path, started)
        return file

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        with self._lock:
            expectation, path, started = self._files.pop(id(file))
        reported = False
        try:
            checked = self._check(incoming, file, ok, expectation, path)
            if isinstance(checked, int):
                return self._refuse(incoming, checked, started)
            study, series = checked
            self.send(
                (
                    "arrived",
                    expectation.msg_id,
                    incoming.sop_instance_uid,
                    incoming.sop_class_uid,
                    incoming.transfer_syntax_uid,
                    study,
                    series,
                    path,
                    incoming.calling_ae,
                    time.monotonic() - started,
                )
            )
            reported = True
            return STATUS_SUCCESS
        finally:
            if not reported:
                # Refused, or the gateway could not be told: nobody will read it.
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _check(
        self,
        incoming: IncomingInstance,
        file: BinaryIO,
        ok: bool,
        expectation: Expectation,
        path: str,
    ) -> tuple[str, str] | int:
        """Close the file: its study and series UIDs, or the failure status it gets."""
        head = b""
        try:
            if ok:
                # From the open file: opening it again cost as much as its UID check.
                head = os.pread(file.fileno(), _HEAD_BYTES, 0)
        except OSError:
            ok = False
        finally:
            try:
                file.close()
            except OSError:
                ok = False
        if not ok:
            return STATUS_OUT_OF_RESOURCES
        try:
            study, series = file_study_series(path, incoming.transfer_syntax_uid, head=head)
        except Exception as exc:  # pydicom's fallback raises more than OSError/ValueError
            log.error("cannot read back %s: %s", incoming.sop_instance_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        if not expectation.covers(study, series, incoming.sop_instance_uid):
            log.warning(
                "refused %s: it belongs to study %s series %s, not to what retrieve %d asked for",
                incoming.sop_instance_uid,
                study,
                series,
                expectation.msg_id,
            )
            return STATUS_MISMATCH
        return study, series


def _child_main(fd: int) -> int:
    conn = Connection(fd)
    config: dict[str, Any] = conn.recv()
    logging.basicConfig(
        level=config["log_level"],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sink = _ChildSink(conn, Path(config["temp_dir"]))
    try:
        return _serve_child(conn, config, sink)
    finally:
        sink.shutdown()


def _serve_child(conn: Connection, config: dict[str, Any], sink: _ChildSink) -> int:
    policy = _SenderPolicy(config["senders"])
    tls = config.get("tls")
    scp = StorageSCP(
        config["ae_title"],
        host=config["host"],
        port=config["port"],
        sink=sink,
        allow=policy.allow if tls is None else _plain_allow(policy, tls),
        max_pdu=config["max_pdu"],
    )
    scps = [scp]
    if tls is not None:
        try:
            scps.append(_tls_scp(config, tls, sink, policy))
        except ValueError as exc:  # the files changed since the configuration was read
            conn.send(("failed", f"storage TLS: {exc}"))
            return 1
    for each in scps:
        try:
            each.start()
        except OSError as exc:
            for other in scps:
                other.stop()
            conn.send(("failed", f"cannot listen on {config['host']}:{each.port}: {exc}"))
            return 1
    sink.send(("ready", scp.port, scps[1].port if tls is not None else None))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.info("storage SCP: the gateway went away; stopping")
                break
            kind = message[0]
            if kind == "expect":
                _, seq, msg_id, calling_ae, study, series, sop = message
                sink.expect(Expectation(msg_id, calling_ae, study, series, sop))
                if seq:
                    sink.send(("ack", seq))
            elif kind == "forget":
                sink.forget(message[1])
            elif kind == "stop":
                break
    except KeyboardInterrupt:
        pass
    finally:
        for each in scps:
            each.stop()
    return 0


def _plain_allow(policy: _SenderPolicy, tls: Mapping[str, Any]) -> Callable[[str, str], bool]:
    tls_only = frozenset(tls["tls_only_senders"])

    def allow(calling_ae: str, address: str) -> bool:
        if calling_ae in tls_only:
            log.warning(
                "refused a plain TCP association from %s (%s): its node uses DICOM TLS, "
                "so it must store to the TLS port %s",
                calling_ae,
                address,
                tls["port"],
            )
            return False
        return policy.allow(calling_ae, address)

    return allow


def _tls_scp(
    config: Mapping[str, Any], tls: Mapping[str, Any], sink: _ChildSink, policy: _SenderPolicy
) -> StorageSCP:
    context = server_context(
        cert_file=Path(tls["cert_file"]),
        key_file=Path(tls["key_file"]),
        ca_file=Path(tls["ca_file"]) if tls["ca_file"] else None,
        require_client_cert=tls["require_client_cert"],
    )
    return StorageSCP(
        config["ae_title"],
        host=config["host"],
        port=tls["port"],
        sink=sink,
        allow=policy.allow,
        max_pdu=config["max_pdu"],
        ssl_context=context,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dimse-gateway storage SCP child process")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    return _child_main(args.fd)


if __name__ == "__main__":
    sys.exit(main())
