"""The gateway's storage SCP: a small DICOM upper layer and C-STORE receiver.

This is the bulk receive path of C-MOVE retrieves.  It is written from the
standard rather than built on pynetdicom, whose receiver runs at 0.25-0.4x of
DCMTK's ``storescp`` on the same C-MOVE (per-PDU objects, two threads relaying
through 1 ms polled queues, pydicom Datasets for every command; see
``PEERS.md``).  pynetdicom stays for the gateway's outgoing associations.

What it implements:

* PS3.8 upper layer, acceptor side: A-ASSOCIATE-RQ/AC/RJ (§9.3.2-9.3.4),
  P-DATA-TF (§9.3.5), A-RELEASE-RQ/RP (§9.3.6-9.3.7), A-ABORT (§9.3.8), the
  user information sub-items of PS3.8 Annex D and PS3.7 Annex D.3.3 (maximum
  length, implementation identification, SCP/SCU role selection; asynchronous
  operations, extended negotiation and user identity are ignored, which PS3.7
  allows: no reply item means "not supported").
* PS3.7 DIMSE-C: C-STORE (§9.1.1, §9.3.1) and C-ECHO (§9.1.5, §9.3.5) as
  performer; any other request gets 0211H "unrecognized operation".
* PS3.10 §7.1 file meta information, built by hand; the data set bytes are
  written exactly as received (no decode, no re-encode, no transcoding).

One thread per association; sockets with TCP_NODELAY (Nagle would stall every
C-STORE-RSP on the peer's delayed ACK) and the kernel's receive buffer
auto-tuning left on (setting SO_RCVBUF would switch it off); ``recv_into`` a
preallocated 1 MiB buffer, so one system call reads up to several PDUs; data
PDV payloads go to the sink's file as memoryview slices of that buffer, written
as they arrive (no copy of the data set in Python, no buffering of a whole
instance).  Each C-STORE-RSP is sent only after :meth:`InstanceSink.close`
returned, so a failed write becomes a failed sub-operation, never a silent
success.

Status codes used (PS3.4 B.2.3 for Storage, PS3.7 Annex C for the general ones):

=======  ===========================================================================
0000H    success
A700H    Refused: out of resources (an ``OSError`` from the sink or from a write,
         e.g. a full disk)
A900H    Error: data set does not match SOP class (for sinks that check)
C000H    Error: cannot understand (a C-STORE-RQ without a data set, or with SOP
         Class/Instance UIDs that are not UIDs)
0124H    Refused: not authorized (PS3.7 C.5, allowed for C-STORE by §9.1.1.1.9):
         what a sink should answer for an instance nobody asked for.  It says
         "this sender may not do this", which is the truth, where C000H would
         claim the data set was unreadable and send the PACS operator looking for
         a corrupt file.  DCMTK's storescu prints it as "Unknown Status: 0x124".
         Beware: Orthanc 1.10 ends the whole C-MOVE at the first failed C-STORE,
         whatever its status (final status C000H, no sub-operation counts).
0110H    Failure: processing failure (an unexpected exception from the sink)
0211H    Failure: unrecognized operation (a DIMSE request other than C-STORE/C-ECHO)
=======  ===========================================================================
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final, Protocol, TypeVar

from pydicom.uid import UID

from app.dimse import ul
from app.dimse.tls import peer_certificate_subject, tls_error_text
from app.dimse.ul import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATA_SET_MISMATCH",
    "STATUS_NOT_AUTHORIZED",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "STATUS_UNRECOGNIZED_OPERATION",
    "VERIFICATION_SOP_CLASS",
    "DirectorySink",
    "IncomingInstance",
    "InstanceSink",
    "StorageSCP",
    "is_storage_sop_class",
    "part10_header",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants


VERIFICATION_SOP_CLASS: Final = "1.2.840.10008.1.1"
_STORAGE_BRANCH: Final = "1.2.840.10008.5.1.4.1.1."  # PS3.4 B.5: Storage SOP Classes
_NON_STORAGE_BRANCH: Final = "1.2.840.10008.5.1.4."
_DICOM_ROOT: Final = "1.2.840.10008."
# PDUs that have no place once the association is established.
_UNEXPECTED_NOW: Final = (
    ul.A_ASSOCIATE_RQ,
    ul.A_ASSOCIATE_AC,
    ul.A_ASSOCIATE_RJ,
    ul.A_RELEASE_RP,
)
# Registered transfer syntaxes that make no sense on a DIMSE association.
_NOT_NETWORK_SYNTAXES: Final = frozenset(
    {"1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"}
)

STATUS_SUCCESS: Final = 0x0000
STATUS_OUT_OF_RESOURCES: Final = 0xA700
STATUS_DATA_SET_MISMATCH: Final = 0xA900
STATUS_CANNOT_UNDERSTAND: Final = 0xC000
STATUS_NOT_AUTHORIZED: Final = 0x0124
STATUS_PROCESSING_FAILURE: Final = 0x0110
STATUS_UNRECOGNIZED_OPERATION: Final = 0x0211


# Limits
_MAX_ASSOCIATE_RQ: Final = 1 << 20  # 128 contexts x many syntaxes fit easily
_MAX_SMALL_PDU: Final = 1024  # release/abort bodies are 4 bytes
_PDU_SLACK: Final = 1 << 16  # tolerated excess over our announced maximum
_MAX_COMMAND_SET: Final = 1 << 16
_RECV_BUFFER: Final = 1 << 20
_LINGER_SECONDS: Final = 2.0


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class IncomingInstance:
    """One C-STORE-RQ as it arrives: who sent it, what it is, and for which C-MOVE."""

    calling_ae: str
    called_ae: str
    peer_address: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    move_originator_ae: str | None
    move_originator_message_id: int | None


class InstanceSink(Protocol):
    """Where received instances go.  Called from the association threads, possibly
    from several at once: implementations must be thread-safe."""

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        """Called when a C-STORE-RQ arrives, before its data set.

        Return a writable binary file object: the receiver writes the Part 10 file
        into it (preamble, ``DICM``, file meta group 0002, then the data set bytes
        exactly as received), in slices of the receiver's buffer that are valid only
        during each ``write`` call (write or copy them, do not keep them).  Or return a
        DIMSE status to refuse the instance, e.g. :data:`STATUS_NOT_AUTHORIZED` for
        an instance no retrieve asked for, :data:`STATUS_OUT_OF_RESOURCES` for a
        full disk; the data set is then read and discarded.
        """
        ...

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        """Called after the last data set fragment (``ok=True``) or when the instance
        could not be received completely (``ok=False``: write error, A-ABORT,
        connection lost, time-out, shutdown).

        The sink closes ``file`` and does its fsync/rename/bookkeeping, or removes
        the partial file when ``ok`` is false.  The returned status goes into the
        C-STORE-RSP (when there still is an association to send it on); a success
        status returned for ``ok=False`` is replaced by A700H.
        """
        ...


class DirectorySink:
    """The simplest useful sink: ``<directory>/<SOPInstanceUID>.dcm``.

    The file is written as ``<uid>.dcm.<thread>.part`` and renamed when complete, so a
    reader never sees a partial file; a failed instance leaves nothing behind.
    ``fsync=True`` flushes every file to disk before the C-STORE-RSP: durable, but
    writing the 300 files of a CT series took 1066 ms with it and 43 ms without on
    this kind of machine (PEERS.md).  An instance received again replaces the
    earlier file.  Thread-safe (one file per instance, nothing shared).
    """

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self._prefix = os.path.join(self.directory, "")

    def path_for(self, incoming: IncomingInstance) -> Path:
        """Where the instance is once complete."""
        return Path(self._prefix + incoming.sop_instance_uid + ".dcm")

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        # The receiver passes only UIDs made of digits and dots: safe in a file name.
        # An association thread receives one instance at a time, so the thread ID
        # keeps the same instance arriving on two associations at once apart.
        part = f"{self._prefix}{incoming.sop_instance_uid}.dcm.{threading.get_ident():x}.part"
        return open(part, "wb")

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        final = self._prefix + incoming.sop_instance_uid + ".dcm"
        part = str(file.name)
        try:
            if ok:
                file.flush()
                if self.fsync:
                    os.fsync(file.fileno())
        finally:
            file.close()
            if not ok:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)
        if not ok:
            return STATUS_OUT_OF_RESOURCES
        os.replace(part, final)
        return STATUS_SUCCESS


_Waiting = TypeVar("_Waiting")


def route_by_originator(
    incoming: IncomingInstance,
    waiting: Mapping[int, _Waiting],
    calling_ae: Callable[[_Waiting], str],
) -> _Waiting | None:
    """Which waiting retrieve an incoming instance belongs to, or None.

    *waiting* maps each running retrieve's C-MOVE Message ID to it.  The Move
    Originator Message ID decides, if the calling AE is the PACS that retrieve
    asked (pynetdicom's qrscp puts its own title in Move Originator AE, so the
    originator AE says nothing).  Without an originator ID (a U attribute) the
    instance goes to the one retrieve running on that PACS, if there is only
    one; its study/series check follows when it is complete.
    """
    msg_id = incoming.move_originator_message_id
    if msg_id is not None:
        found = waiting.get(msg_id)
        if found is not None and calling_ae(found) == incoming.calling_ae:
            return found
        return None
    candidates = [w for w in waiting.values() if calling_ae(w) == incoming.calling_ae]
    return candidates[0] if len(candidates) == 1 else None


def is_storage_sop_class(uid: str) -> bool:
    """Whether we accept presentation contexts for ``uid`` on a storage association.

    Accepted: Verification; the Storage SOP Class branch ``1.2.840.10008.5.1.4.1.1.``
    (PS3.4 B.5, including classes newer than pydicom's dictionary) except the
    query/retrieve models registered inside it; registered classes elsewhere under
    ``1.2.840.10008.5.1.4.`` whose name says Storage (hanging protocols, colour
    palettes, implant templates, RT delivery instructions); and private SOP
    classes outside the DICOM root, since vendors' private objects travel in
    C-MOVE sub-operations too.  Only C-STORE and C-ECHO are served whatever the
    context, so a wrongly accepted class costs nothing but a 0211H answer.
    """
    if uid == VERIFICATION_SOP_CLASS:
        return True
    if not uid.startswith(_DICOM_ROOT):
        return bool(ul.UID_CHARS.fullmatch(uid))
    registered = UID(uid)
    is_registered = registered.type == "SOP Class"
    if uid.startswith(_STORAGE_BRANCH):
        return not is_registered or "Storage" in registered.name
    if uid.startswith(_NON_STORAGE_BRANCH):
        return is_registered and registered.name.endswith("Storage")
    return False


def _is_storable_transfer_syntax(uid: str) -> bool:
    return uid not in _NOT_NETWORK_SYNTAXES and UID(uid).type == "Transfer Syntax"


def _explicit_element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def part10_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str | None = None,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 §7.1), encoded
    Explicit VR Little Endian with our implementation class UID and version name.
    ``source_ae`` becomes (0002,0016) Source Application Entity Title."""
    elements = [
        _explicit_element(0x0001, b"OB", b"\x00\x01"),
        _explicit_element(0x0002, b"UI", ul.pad_uid(sop_class_uid)),
        _explicit_element(0x0003, b"UI", ul.pad_uid(sop_instance_uid)),
        _explicit_element(0x0010, b"UI", ul.pad_uid(transfer_syntax_uid)),
        _explicit_element(0x0012, b"UI", ul.pad_uid(IMPLEMENTATION_CLASS_UID)),
        _explicit_element(0x0013, b"SH", ul.pad_text(IMPLEMENTATION_VERSION_NAME)),
    ]
    if source_ae:
        elements.append(_explicit_element(0x0016, b"AE", ul.pad_text(source_ae)))
    group = b"".join(elements)
    length = _explicit_element(0x0000, b"UL", ul.UL.pack(len(group)))
    return b"\x00" * 128 + b"DICM" + length + group


# --------------------------------------------------------------------------- PDU encoding


# --------------------------------------------------------------------------- PDU decoding


class _PeerGone(Exception):
    """The connection closed or failed, or the server is stopping."""


class _TimedOut(_PeerGone):
    """The peer was silent for longer than the time-out: we abort (PS3.8 §9.1.5)."""


@dataclass
class _ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class _AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ (PS3.8 §9.3.2) that negotiation needs."""

    header_echo: bytes  # called AE, calling AE and reserved bytes, echoed in the AC
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: list[_ProposedContext] = field(default_factory=list)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)


def _parse_associate_rq(body: bytes) -> _AssociateRequest:
    if len(body) < 68:
        raise ul.ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    rq = _AssociateRequest(
        header_echo=body[4:68],
        protocol_version=version,
        called_ae=ul.ae(body[4:20]),
        calling_ae=ul.ae(body[20:36]),
        application_context="",
    )
    for item_type, value in ul.items(body, 68, len(body)):
        if item_type == 0x10:
            rq.application_context = ul.uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ul.ProtocolError("presentation context item too short")
            context = _ProposedContext(value[0], "", [])
            for sub_type, sub_value in ul.items(value, 4, len(value)):
                if sub_type == 0x30:
                    context.abstract_syntax = ul.uid(sub_value)
                elif sub_type == 0x40:
                    context.transfer_syntaxes.append(ul.uid(sub_value))
            rq.contexts.append(context)
        elif item_type == 0x50:
            _parse_user_information(value, rq)
        # Unknown items are ignored.
    return rq


def _parse_user_information(value: bytes, rq: _AssociateRequest) -> None:
    for sub_type, sub_value in ul.items(value, 0, len(value)):
        if sub_type == 0x51:
            if len(sub_value) != 4:
                raise ul.ProtocolError("maximum length sub-item is not 4 bytes")
            (rq.max_pdu,) = struct.unpack(">I", sub_value)
        elif sub_type == 0x52:
            rq.implementation_class_uid = ul.uid(sub_value)
        elif sub_type == 0x55:
            rq.implementation_version_name = ul.ae(sub_value)
        elif sub_type == 0x54:
            # PS3.7 D.3.3.4: UID length, UID, SCU role, SCP role
            if len(sub_value) < 4:
                raise ul.ProtocolError("role selection sub-item too short")
            (uid_length,) = struct.unpack_from(">H", sub_value, 0)
            if len(sub_value) != 2 + uid_length + 2:
                raise ul.ProtocolError("role selection sub-item has a wrong UID length")
            uid = ul.uid(sub_value[2 : 2 + uid_length])
            rq.roles[uid] = (sub_value[2 + uid_length], sub_value[3 + uid_length])
        # 0x53 asynchronous operations, 0x56/0x57 extended negotiation and 0x58 user
        # identity are not supported: no reply item (PS3.7 D.3.3.3, D.3.3.5-7).


# --------------------------------------------------------------------------- association


class _Instance:
    """A C-STORE in progress: the command's facts and where its data set goes."""

    __slots__ = (
        "context_id",
        "error",
        "file",
        "incoming",
        "message_id",
        "received",
        "reply",
        "status",
        "write",
    )

    def __init__(
        self,
        context_id: int,
        message_id: int,
        incoming: IncomingInstance | None,
        file: BinaryIO | None,
        status: int,
        reply: bytes = b"",
    ) -> None:
        self.context_id = context_id
        self.reply = reply  # the answer when no sink is involved
        self.message_id = message_id
        self.incoming = incoming
        self.file = file
        self.status = status
        self.error: OSError | None = None
        self.received = 0
        self.write: Callable[[memoryview], object] = self._discard if file is None else self._write

    def _discard(self, chunk: memoryview) -> None:
        self.received += len(chunk)

    def _write(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        file = self.file
        assert file is not None
        try:
            written = file.write(chunk)
            while written < len(chunk):  # raw file objects may write less than asked
                if not written:
                    raise OSError(errno.EIO, "the sink's file accepted no bytes")
                chunk = chunk[written:]
                written = file.write(chunk)
        except OSError as exc:
            self.error = exc
            self.write = self._discard


class _Association:
    """One TCP connection from accept to close, served by its own thread."""

    def __init__(self, scp: StorageSCP, sock: socket.socket, peer_address: str) -> None:
        self.scp = scp
        self.sock = sock
        self.peer_address = peer_address
        self.calling_ae = ""
        self.called_ae = ""
        self.established = False
        self.thread: threading.Thread | None = None
        self._stopping = False
        self._send_lock = threading.Lock()
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = 0
        self._end = 0
        self._peer_max_pdu = 0
        self._contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        self._instance: _Instance | None = None
        self._deadline: float | None = None  # ACSE time-out during set-up
        self._instances = 0
        self._bytes = 0

    # ------------------------------------------------------------------ life cycle

    def run(self) -> None:
        started = time.monotonic()
        try:
            if self.scp.ssl_context is not None and not self._start_tls(self.scp.ssl_context):
                return
            if self._negotiate():
                self._transfer()
        except ul.ProtocolError as exc:
            log.warning(
                "storage SCP: protocol error from %s (%s): %s; aborting",
                self.calling_ae or "?",
                self.peer_address,
                exc,
            )
            self._send_abort(ul.ABORT_SOURCE_PROVIDER, exc.reason)
            self._linger()
        except _TimedOut as exc:
            log.warning(
                "storage SCP: association from %s (%s): %s; aborting",
                self.calling_ae or "?",
                self.peer_address,
                exc,
            )
            self._send_abort(ul.ABORT_SOURCE_PROVIDER, ul.ABORT_REASON_NOT_SPECIFIED)
        except _PeerGone as exc:
            if not self._stopping:
                log.warning(
                    "storage SCP: association from %s (%s) ended: %s",
                    self.calling_ae or "?",
                    self.peer_address,
                    exc,
                )
        except Exception:
            log.exception(
                "storage SCP: unexpected error on the association from %s (%s); aborting",
                self.calling_ae or "?",
                self.peer_address,
            )
            self._send_abort(ul.ABORT_SOURCE_PROVIDER, ul.ABORT_REASON_NOT_SPECIFIED)
        finally:
            self._fail_open_instance()
            with contextlib.suppress(OSError):
                self.sock.close()
            if self.established:
                elapsed = time.monotonic() - started
                log.info(
                    "storage SCP: association from %s (%s) closed: %d instances, %.1f MB in %.2f s",
                    self.calling_ae,
                    self.peer_address,
                    self._instances,
                    self._bytes / 1e6,
                    elapsed,
                )

    def _start_tls(self, context: ssl.SSLContext) -> bool:
        """The server side of the TLS handshake, within the ACSE time-out (PS3.15 B.1);
        False (logged, connection closed by ``run``) when it fails."""
        self.sock.settimeout(self.scp.acse_timeout)
        try:
            tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            # Swapped before the handshake, so that abort_from_outside can wake it.
            self.sock = tls
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            if not self._stopping:
                log.warning(
                    "storage SCP: TLS handshake with %s failed: %s",
                    self.peer_address,
                    tls_error_text(exc),
                )
            return False
        log.info(
            "storage SCP: %s from %s, client certificate %s",
            tls.version(),
            self.peer_address,
            peer_certificate_subject(tls) or "none",
        )
        return True

    def abort_from_outside(self) -> None:
        """Called by ``StorageSCP.stop`` from another thread: A-ABORT, then shut the
        socket down, which wakes the association thread."""
        self._stopping = True
        if isinstance(self.sock, ssl.SSLSocket):
            # An OpenSSL connection must not be written by two threads: no A-ABORT,
            # just the TCP shutdown (SSLSocket.shutdown would drop its state under
            # the reading thread).
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            return
        # Do not wait behind a send stuck on a peer that does not read.
        if self.established and self._send_lock.acquire(timeout=1.0):
            try:
                self.sock.sendall(ul.a_abort(ul.ABORT_SOURCE_USER, ul.ABORT_REASON_NOT_SPECIFIED))
            except OSError:
                pass
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _fail_open_instance(self) -> None:
        instance, self._instance = self._instance, None
        if instance is not None and instance.file is not None and instance.incoming is not None:
            self._close_sink(instance, ok=False)

    # ------------------------------------------------------------------ reading

    def _recv(self, offset: int) -> int:
        if self._deadline is not None:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _TimedOut("ACSE time-out during association set-up")
            self.sock.settimeout(remaining)
        try:
            got = self.sock.recv_into(self._view[offset:])
        except TimeoutError:
            raise _TimedOut("time-out waiting for the peer") from None
        except OSError as exc:
            raise _PeerGone(f"connection error: {exc}") from None
        if got == 0:
            raise _PeerGone("connection closed by the peer")
        return got

    def _fill(self, n: int) -> None:
        """Make at least ``n`` (<= buffer size) unread bytes available."""
        if self._end - self._pos >= n:
            return
        if self._pos == self._end:
            self._pos = self._end = 0
        elif self._pos + n > len(self._buf):
            avail = self._end - self._pos
            self._view[:avail] = self._view[self._pos : self._end]
            self._pos, self._end = 0, avail
        while self._end - self._pos < n:
            self._end += self._recv(self._end)

    def _stream(self, n: int, write: Callable[[memoryview], object]) -> None:
        """Pass the next ``n`` bytes to ``write`` in slices of the receive buffer."""
        view = self._view
        while n:
            avail = self._end - self._pos
            if avail == 0:
                self._pos = 0
                self._end = avail = self._recv(0)
            k = n if n < avail else avail
            write(view[self._pos : self._pos + k])
            self._pos += k
            n -= k

    def _read_bytes(self, n: int) -> bytes:
        out = bytearray()
        self._stream(n, out.extend)
        return bytes(out)

    def _read_pdu_header(self) -> tuple[int, int]:
        self._fill(6)
        pdu_type, _, length = ul.PDU_HEADER.unpack_from(self._buf, self._pos)
        self._pos += 6
        return pdu_type, length

    # ------------------------------------------------------------------ writing

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise _TimedOut("time-out sending to the peer") from None
            except OSError as exc:
                raise _PeerGone(f"connection error while sending: {exc}") from None

    def _send_abort(self, source: int, reason: int) -> None:
        with contextlib.suppress(_PeerGone):
            self._send(ul.a_abort(source, reason))

    def _linger(self) -> None:
        """Wait briefly for the peer to close, so that our last PDU is not lost to a
        reset of a connection closed with unread data (PS3.8 §9.1.4, ARTIM)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(_LINGER_SECONDS)
            deadline = time.monotonic() + _LINGER_SECONDS
            while time.monotonic() < deadline and self.sock.recv_into(self._view):
                pass

    def _send_command(self, context_id: int, command: bytes) -> None:
        """Send a command set in P-DATA-TF PDUs no larger than the peer accepts."""
        room = self._peer_max_pdu - 6 if self._peer_max_pdu else len(command)
        room = max(room, 2)
        pdus = []
        for start in range(0, len(command), room):
            fragment = command[start : start + room]
            last = start + room >= len(command)
            pdv = ul.PDV_HEADER.pack(len(fragment) + 2, context_id, 0x03 if last else 0x01)
            pdus.append(ul.pdu(ul.P_DATA_TF, pdv + fragment))
        self._send(b"".join(pdus))

    # ------------------------------------------------------------------ association set-up

    def _negotiate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and answer AC or RJ; True when established."""
        scp = self.scp
        self._deadline = time.monotonic() + scp.acse_timeout
        pdu_type, length = self._read_pdu_header()
        if pdu_type == ul.A_ABORT:
            raise _PeerGone("A-ABORT before association")
        if pdu_type not in (
            ul.A_ASSOCIATE_RQ,
            ul.A_ASSOCIATE_AC,
            ul.A_ASSOCIATE_RJ,
            ul.P_DATA_TF,
            ul.A_RELEASE_RQ,
            ul.A_RELEASE_RP,
        ):
            raise ul.ProtocolError(f"unknown PDU type 0x{pdu_type:02X}", ul.ABORT_UNRECOGNIZED_PDU)
        if pdu_type != ul.A_ASSOCIATE_RQ:
            raise ul.ProtocolError(
                f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ", ul.ABORT_UNEXPECTED_PDU
            )
        if length > _MAX_ASSOCIATE_RQ:
            raise ul.ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes")
        body = self._read_bytes(length)
        self._deadline = None
        self.sock.settimeout(scp.acse_timeout)
        rq = _parse_associate_rq(body)
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        rejection = self._check_request(rq)
        if rejection is not None:
            result, source, reason, why = rejection
            log.warning(
                "storage SCP: association from %r (%s) to %r rejected: %s",
                rq.calling_ae,
                self.peer_address,
                rq.called_ae,
                why,
            )
            self._send(ul.a_associate_rj(result, source, reason))
            self._linger()
            return False
        self._send(self._accept(rq))
        self.established = True
        self.sock.settimeout(scp.network_timeout)
        return True

    def _check_request(self, rq: _AssociateRequest) -> tuple[int, int, int, str] | None:
        scp = self.scp
        if not rq.protocol_version & 0x0001:
            return (ul.RJ_PERMANENT, ul.RJ_SOURCE_ACSE, 2, "protocol version not supported")
        if rq.application_context != ul.APPLICATION_CONTEXT:
            return (
                ul.RJ_PERMANENT,
                ul.RJ_SOURCE_USER,
                2,
                f"application context {rq.application_context!r} not supported",
            )
        if rq.called_ae != scp.ae_title:
            return (ul.RJ_PERMANENT, ul.RJ_SOURCE_USER, 7, "called AE title not recognized")
        try:
            allowed = scp.allow(rq.calling_ae, self.peer_address)
        except Exception:
            log.exception("storage SCP: allow() raised; refusing the association")
            allowed = False
        if not allowed:
            return (ul.RJ_PERMANENT, ul.RJ_SOURCE_USER, 3, "calling AE title not recognized")
        if scp.active_associations > scp.max_associations:
            return (ul.RJ_TRANSIENT, ul.RJ_SOURCE_PRESENTATION, 2, "local limit exceeded")
        return None

    def _accept(self, rq: _AssociateRequest) -> bytes:
        """Negotiate every presentation context and build the A-ASSOCIATE-AC."""
        scp = self.scp
        self._peer_max_pdu = rq.max_pdu
        items = [ul.item(0x10, ul.APPLICATION_CONTEXT.encode("ascii"))]
        accepted_classes: set[str] = set()
        for context in rq.contexts:
            result, syntax = self._negotiate_context(context, rq.roles)
            if result == ul.PC_ACCEPTANCE:
                self._contexts[context.context_id] = (context.abstract_syntax, syntax)
                accepted_classes.add(context.abstract_syntax)
            # The transfer syntax sub-item of a rejected context is not significant.
            reply_syntax = syntax or (context.transfer_syntaxes or ["1.2.840.10008.1.2"])[0]
            items.append(
                ul.item(
                    0x21,
                    bytes((context.context_id, 0, result, 0))
                    + ul.item(0x40, reply_syntax.encode("ascii")),
                )
            )
        user = [
            ul.item(0x51, struct.pack(">I", scp.max_pdu)),
            ul.item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii")),
            ul.item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        ]
        for uid, (scu_role, _scp_role) in rq.roles.items():
            # PS3.7 D.3.3.4: the requestor may be SCU (it sends C-STOREs); we never
            # take the SCU role of a storage class ourselves, so its SCP role is 0.
            if uid in accepted_classes:
                raw = uid.encode("ascii")
                user.append(ul.item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu_role, 0))))
        items.append(ul.item(0x50, b"".join(user)))
        log.info(
            "storage SCP: association from %s (%s) accepted: %d of %d presentation "
            "contexts, peer max PDU %d, implementation %s %s",
            rq.calling_ae,
            self.peer_address,
            len(self._contexts),
            len(rq.contexts),
            rq.max_pdu,
            rq.implementation_class_uid,
            rq.implementation_version_name,
        )
        body = struct.pack(">HH", 0x0001, 0) + rq.header_echo + b"".join(items)
        return ul.pdu(ul.A_ASSOCIATE_AC, body)

    def _negotiate_context(
        self, context: _ProposedContext, roles: dict[str, tuple[int, int]]
    ) -> tuple[int, str]:
        if not context.abstract_syntax or not is_storage_sop_class(context.abstract_syntax):
            return ul.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, ""
        role = roles.get(context.abstract_syntax)
        if role is not None and not role[0]:
            # The requestor refuses the SCU role: it could not send us anything here.
            return ul.PC_USER_REJECTION, ""
        syntax = self._choose_transfer_syntax(context.transfer_syntaxes)
        if syntax is None:
            return ul.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, ""
        return ul.PC_ACCEPTANCE, syntax

    def _choose_transfer_syntax(self, proposed: Sequence[str]) -> str | None:
        preferred = self.scp.transfer_syntaxes
        if preferred is not None:
            return next((ts for ts in preferred if ts in proposed), None)
        # The proposer's own first choice that we can store: the PACS sends the
        # instance as it holds it, with no transcoding on its side.
        return next((ts for ts in proposed if _is_storable_transfer_syntax(ts)), None)

    # ------------------------------------------------------------------ data transfer

    def _transfer(self) -> None:
        """Serve PDUs until release, abort or error (PS3.8 §9.3.5-9.3.8)."""
        max_pdu = self.scp.max_pdu + _PDU_SLACK
        command = bytearray()
        command_context = 0
        while True:
            pdu_type, length = self._read_pdu_header()
            if pdu_type == ul.P_DATA_TF:
                if length > max_pdu:
                    raise ul.ProtocolError(
                        f"P-DATA-TF of {length} bytes exceeds our maximum {self.scp.max_pdu}"
                    )
                remaining = length
                while remaining:
                    if remaining < 6:
                        raise ul.ProtocolError("truncated PDV item")
                    self._fill(6)
                    item_length, context_id, header = ul.PDV_HEADER.unpack_from(
                        self._buf, self._pos
                    )
                    self._pos += 6
                    if item_length < 2 or item_length + 4 > remaining:
                        raise ul.ProtocolError("PDV item length inconsistent with its PDU")
                    remaining -= item_length + 4
                    n = item_length - 2
                    if context_id not in self._contexts:
                        raise ul.ProtocolError(f"PDV on presentation context {context_id}")
                    if header & 0x01:  # command fragment
                        if self._instance is not None:
                            raise ul.ProtocolError("command fragment inside a data set")
                        if command and context_id != command_context:
                            raise ul.ProtocolError("command fragments on two contexts")
                        if len(command) + n > _MAX_COMMAND_SET:
                            raise ul.ProtocolError("command set too large")
                        command_context = context_id
                        self._stream(n, command.extend)
                        if header & 0x02:
                            data = bytes(command)
                            command.clear()
                            self._on_command(context_id, data)
                    else:  # data set fragment
                        instance = self._instance
                        if instance is None:
                            raise ul.ProtocolError("data set fragment without a command")
                        if context_id != instance.context_id:
                            raise ul.ProtocolError("data set on another context than its command")
                        self._stream(n, instance.write)
                        if header & 0x02:
                            self._instance = None
                            self._finish(instance)
            elif pdu_type == ul.A_RELEASE_RQ:
                self._skip_small(length)
                if self._instance is not None:
                    log.warning(
                        "storage SCP: %s (%s) released in the middle of a data set",
                        self.calling_ae,
                        self.peer_address,
                    )
                    self._fail_open_instance()
                self._send(ul.A_RELEASE_RP_PDU)
                self._linger()
                return
            elif pdu_type == ul.A_ABORT:
                self._skip_small(length)
                raise _PeerGone("A-ABORT from the peer")
            elif pdu_type in (
                ul.A_ASSOCIATE_RQ,
                ul.A_ASSOCIATE_AC,
                ul.A_ASSOCIATE_RJ,
                ul.A_RELEASE_RP,
            ):
                raise ul.ProtocolError(
                    f"unexpected PDU type 0x{pdu_type:02X}", ul.ABORT_UNEXPECTED_PDU
                )
            else:
                raise ul.ProtocolError(
                    f"unknown PDU type 0x{pdu_type:02X}", ul.ABORT_UNRECOGNIZED_PDU
                )

    def _skip_small(self, length: int) -> None:
        if length > _MAX_SMALL_PDU:
            raise ul.ProtocolError(f"release/abort PDU of {length} bytes")
        self._stream(length, lambda _chunk: None)

    # ------------------------------------------------------------------ DIMSE

    def _on_command(self, context_id: int, data: bytes) -> None:
        elements = ul.parse_command(data)
        command_field = ul.us(elements, 0x0100)
        message_id = ul.us(elements, 0x0110)
        data_set_type = ul.us(elements, 0x0800)
        if command_field is None or data_set_type is None:
            raise ul.ProtocolError("command set without Command Field or Command Data Set Type")
        has_data_set = data_set_type != ul.NO_DATA_SET
        if command_field == ul.C_STORE_RQ and message_id is not None:
            self._begin_store(context_id, message_id, elements, has_data_set)
        elif command_field == ul.C_ECHO_RQ and message_id is not None and not has_data_set:
            log.debug("storage SCP: C-ECHO from %s", self.calling_ae)
            self._send_command(
                context_id,
                ul.response(
                    ul.C_ECHO_RSP, message_id, STATUS_SUCCESS, VERIFICATION_SOP_CLASS, None
                ),
            )
        elif command_field == ul.C_CANCEL_RQ or command_field & 0x8000:
            log.warning(
                "storage SCP: ignoring command 0x%04X from %s", command_field, self.calling_ae
            )
        else:
            # Another request, or a request without a Message ID: refuse it, after
            # reading and discarding its data set.
            log.warning(
                "storage SCP: unsupported command 0x%04X from %s", command_field, self.calling_ae
            )
            reply = ul.response(
                command_field | 0x8000,
                message_id or 0,
                STATUS_UNRECOGNIZED_OPERATION,
                ul.valid_uid(ul.text(elements, 0x0002)),
                None,
            )
            self._answer_after_data_set(context_id, has_data_set, reply)

    def _answer_after_data_set(self, context_id: int, has_data_set: bool, reply: bytes) -> None:
        """Send ``reply`` now, or after reading and discarding the data set to come."""
        if has_data_set:
            self._instance = _Instance(context_id, 0, None, None, 0, reply)
        else:
            self._send_command(context_id, reply)

    def _begin_store(
        self, context_id: int, message_id: int, elements: dict[int, bytes], has_data_set: bool
    ) -> None:
        sop_class = ul.valid_uid(ul.text(elements, 0x0002))
        sop_instance = ul.valid_uid(ul.text(elements, 0x1000))
        if not (has_data_set and sop_class and sop_instance):
            # No data set, or not UIDs (which we could neither name a file after
            # nor trust in a path): "cannot understand".
            log.warning(
                "storage SCP: C-STORE-RQ from %s without data set or valid UIDs", self.calling_ae
            )
            reply = ul.response(
                ul.C_STORE_RSP, message_id, STATUS_CANNOT_UNDERSTAND, sop_class, sop_instance
            )
            self._answer_after_data_set(context_id, has_data_set, reply)
            return
        incoming = IncomingInstance(
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            peer_address=self.peer_address,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=self._contexts[context_id][1],
            move_originator_ae=ul.text(elements, 0x1030),
            move_originator_message_id=ul.us(elements, 0x1031),
        )
        file, status = self._open_sink(incoming)
        self._instance = _Instance(context_id, message_id, incoming, file, status)

    def _open_sink(self, incoming: IncomingInstance) -> tuple[BinaryIO | None, int]:
        try:
            opened = self.scp.sink.open(incoming)
        except OSError as exc:
            log.error("storage SCP: sink cannot store %s: %s", incoming.sop_instance_uid, exc)
            return None, STATUS_OUT_OF_RESOURCES
        except Exception:
            log.exception("storage SCP: sink.open failed for %s", incoming.sop_instance_uid)
            return None, STATUS_PROCESSING_FAILURE
        if isinstance(opened, int):
            if not 0 <= opened <= 0xFFFF:
                log.error("storage SCP: sink.open returned status %r", opened)
                return None, STATUS_PROCESSING_FAILURE
            return None, opened
        header = part10_header(
            incoming.sop_class_uid,
            incoming.sop_instance_uid,
            incoming.transfer_syntax_uid,
            incoming.calling_ae,
        )
        try:
            opened.write(header)
        except OSError as exc:
            log.error("storage SCP: cannot write %s: %s", incoming.sop_instance_uid, exc)
            instance = _Instance(0, 0, incoming, opened, STATUS_SUCCESS)
            self._close_sink(instance, ok=False)
            return None, STATUS_OUT_OF_RESOURCES
        return opened, STATUS_SUCCESS

    def _close_sink(self, instance: _Instance, ok: bool) -> int:
        assert instance.incoming is not None and instance.file is not None
        try:
            status = self.scp.sink.close(instance.incoming, instance.file, ok)
        except OSError as exc:
            log.error(
                "storage SCP: sink cannot complete %s: %s", instance.incoming.sop_instance_uid, exc
            )
            return STATUS_OUT_OF_RESOURCES
        except Exception:
            log.exception(
                "storage SCP: sink.close failed for %s", instance.incoming.sop_instance_uid
            )
            return STATUS_PROCESSING_FAILURE
        if not isinstance(status, int) or not 0 <= status <= 0xFFFF:
            log.error("storage SCP: sink.close returned status %r", status)
            return STATUS_PROCESSING_FAILURE
        if not ok and (status == STATUS_SUCCESS or 0xB000 <= status <= 0xBFFF):
            return STATUS_OUT_OF_RESOURCES
        return status

    def _finish(self, instance: _Instance) -> None:
        """The last data set fragment arrived: close the sink, then answer."""
        if instance.incoming is None:  # a data set we only had to read
            self._send_command(instance.context_id, instance.reply)
            return
        status = instance.status
        if instance.file is not None:
            ok = instance.error is None
            if not ok:
                log.error(
                    "storage SCP: writing %s failed: %s",
                    instance.incoming.sop_instance_uid,
                    instance.error,
                )
            status = self._close_sink(instance, ok)
        if status == STATUS_SUCCESS:
            self._instances += 1
        self._bytes += instance.received
        log.debug(
            "storage SCP: C-STORE %s from %s: %d bytes, status 0x%04X",
            instance.incoming.sop_instance_uid,
            self.calling_ae,
            instance.received,
            status,
        )
        self._send_command(
            instance.context_id,
            ul.response(
                ul.C_STORE_RSP,
                instance.message_id,
                status,
                instance.incoming.sop_class_uid,
                instance.incoming.sop_instance_uid,
            ),
        )


# --------------------------------------------------------------------------- server


class StorageSCP:
    """A C-STORE/C-ECHO acceptor for one AE title, one thread per association.

    >>> scp = StorageSCP("DIMSEGW", port=11112, sink=sink, allow=lambda ae, ip: True)
    >>> scp.start()
    ...
    >>> scp.stop()

    ``allow(calling_ae, peer_address)`` decides whether an association is
    accepted (A-ASSOCIATE-RJ "calling AE title not recognized" otherwise); an
    association to another called AE title is rejected with "called AE title not
    recognized".  ``max_pdu`` is announced as our Maximum Length Received; P-DATA-TF
    PDUs more than 64 KiB above it abort the association.  ``transfer_syntaxes``,
    when given, is our order of preference; by default the proposer's own first
    registered transfer syntax is accepted, compressed or not, so instances are
    stored as the PACS holds them.  ``acse_timeout`` bounds association set-up,
    ``network_timeout`` the silence on an established association; either ends
    in an A-ABORT.  More than ``max_associations`` concurrent associations are
    rejected (transient, "local limit exceeded").  With ``ssl_context`` every
    connection starts with a TLS handshake (DICOM TLS, PS3.15 B.1), bounded by
    ``acse_timeout``; the context decides whether a client certificate is required.
    """

    def __init__(
        self,
        ae_title: str,
        *,
        host: str = "0.0.0.0",
        port: int = 11112,
        sink: InstanceSink,
        allow: Callable[[str, str], bool],
        max_pdu: int = 1048576,
        acse_timeout: float = 30,
        network_timeout: float = 60,
        transfer_syntaxes: Sequence[str] | None = None,
        max_associations: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not 0 < len(ae_title.strip()) <= 16:
            raise ValueError(f"ae_title must be 1 to 16 characters, not {ae_title!r}")
        if not 4096 <= max_pdu <= 0xFFFFFFFF - _PDU_SLACK:
            raise ValueError(f"max_pdu must be between 4096 and 2**32 - 65537, not {max_pdu}")
        if acse_timeout <= 0 or network_timeout <= 0:
            raise ValueError("acse_timeout and network_timeout must be positive")
        if max_associations < 1:
            raise ValueError("max_associations must be at least 1")
        self.ae_title = ae_title.strip()
        self.host = host
        self.sink = sink
        self.allow = allow
        self.max_pdu = max_pdu
        self.acse_timeout = float(acse_timeout)
        self.network_timeout = float(network_timeout)
        self.transfer_syntaxes = list(transfer_syntaxes) if transfer_syntaxes is not None else None
        self.max_associations = max_associations
        self.ssl_context = ssl_context
        self._port = port
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._associations: set[_Association] = set()

    @property
    def port(self) -> int:
        """The TCP port we listen on (the ephemeral port chosen when 0 was asked)."""
        return self._port

    @property
    def active_associations(self) -> int:
        """Connections currently being served (negotiating or established)."""
        with self._lock:
            return len(self._associations)

    def start(self) -> None:
        """Bind and listen, and accept connections on a daemon thread; returns at once."""
        if self._listener is not None:
            raise RuntimeError("storage SCP already started")
        family, kind, proto, _, address = socket.getaddrinfo(
            self.host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(64)
            # A time-out lets the accept loop notice stop() where shutdown() does not
            # wake accept() (non-Linux).
            listener.settimeout(0.5)
        except OSError:
            listener.close()
            raise
        self._port = int(listener.getsockname()[1])
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"storescp-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "storage SCP %s listening on %s:%d%s",
            self.ae_title,
            self.host,
            self._port,
            " (TLS)" if self.ssl_context is not None else "",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort the active associations and join their threads."""
        listener = self._listener
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        listener.close()
        self._listener = None
        with self._lock:
            associations = list(self._associations)
        for association in associations:
            association.abort_from_outside()
        deadline = time.monotonic() + timeout
        for association in associations:
            if association.thread is not None:
                association.thread.join(max(0.0, deadline - time.monotonic()))
        log.info("storage SCP %s stopped", self.ae_title)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                log.error("storage SCP: accept failed: %s", exc)
                time.sleep(0.1)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # the peer may already be gone
                log.debug("storage SCP: cannot set TCP_NODELAY: %s", exc)
            association = _Association(self, sock, str(address[0]))
            thread = threading.Thread(
                target=self._serve,
                args=(association,),
                name=f"storescp-{address[0]}:{address[1]}",
                daemon=True,
            )
            association.thread = thread
            with self._lock:
                self._associations.add(association)
            if self._stopping.is_set():
                association.abort_from_outside()
            thread.start()

    def _serve(self, association: _Association) -> None:
        try:
            association.run()
        finally:
            with self._lock:
                self._associations.discard(association)
