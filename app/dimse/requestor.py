"""The gateway's own requestor associations, for C-ECHO, C-FIND and C-MOVE.

pynetdicom runs each association on two threads that hand every PDU to each
other through polled queues, and builds pydicom Datasets for every command set.
On a C-MOVE of a 300-instance series that cost the gateway about 0.5 ms of
interpreter time per pending response, on the same two cores as the PACS and
the storage SCP (docs/benchmarks.md). Here the thread that runs the operation
reads the socket itself, command sets stay bytes (``ul.parse_command``), and
pydicom decodes only identifiers: C-FIND matches and a C-MOVE's Failed SOP
Instance UID List.

Scope, PS3.8 requestor side: A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP,
A-ABORT; user information with maximum length and implementation
identification (no asynchronous operations window, no role selection). One
operation at a time, run by one thread: the pool guarantees it. C-GET stays on
pynetdicom (``app/dimse/get.py``): it needs the storage SCP role on the same
association.
"""

from __future__ import annotations

import contextlib
import io
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode, encode

from app.dimse import ul

log = logging.getLogger(__name__)

_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_DEFLATED: Final = "1.2.840.10008.1.2.1.99"
_MAX_NEGOTIATION_PDU: Final = 1 << 20
_MAX_COMMAND_SET: Final = 1 << 16
_RECV_CHUNK: Final = 1 << 16
# How often a wait for the PACS looks at the caller's cancel flag.
_CANCEL_POLL: Final = 0.05


class AssociateRejected(Exception):
    """A-ASSOCIATE-RJ (PS3.8 Table 9-21)."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"association rejected: result {result}, source {source}, reason {reason}")
        self.result = result
        self.source = source
        self.reason = reason

    @property
    def transient(self) -> bool:
        return self.result == ul.RJ_TRANSIENT


class ConnectFailed(Exception):
    """No association: the connection failed, or the PACS aborted or broke the negotiation."""


class TlsFailed(ConnectFailed):
    """The TLS handshake failed (the message says why)."""


class NegotiationAborted(ConnectFailed):
    """The PACS answered the A-ASSOCIATE-RQ with an A-ABORT."""


class Lost(Exception):
    """The association ended under an operation: A-ABORT, a closed or reset connection."""


class Silent(Lost):
    """The PACS said nothing for the DIMSE time-out; the association was aborted."""


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    # The PACS granted us the SCP role for this class (PS3.7 D.3.3.4): it may send
    # C-STORE requests on this context (the sub-operations of a C-GET).
    scp_role: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """One DIMSE message received: its command set as raw elements, its data set as bytes."""

    context_id: int
    command: dict[int, bytes]
    data_set: bytes | bytearray | None

    def us(self, elem: int) -> int | None:
        return ul.us(self.command, elem)

    @property
    def status(self) -> int | None:
        return self.us(ul.STATUS)

    def text(self, elem: int) -> str | None:
        return ul.text(self.command, elem)


def encode_identifier(identifier: Dataset, context: AcceptedContext) -> bytes:
    """*identifier* in the context's transfer syntax."""
    ts = UID(context.transfer_syntax)
    deflated = context.transfer_syntax == _DEFLATED
    data = encode(identifier, ts.is_implicit_VR, ts.is_little_endian, deflated)
    if data is None:
        raise ValueError("the query identifier cannot be encoded")
    return data


def decode_identifier(data: bytes | bytearray, context: AcceptedContext) -> Dataset:
    ts = UID(context.transfer_syntax)
    deflated = context.transfer_syntax == _DEFLATED
    return decode(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian, deflated)


def command(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set from ``(element, value)`` pairs, in ascending element order."""
    return ul.encode_command(elements)


def us(value: int) -> bytes:
    return ul.US.pack(value)


def request_command(
    field: int, sop_class: str, msg_id: int, *, destination: str | None = None
) -> bytes:
    """A C-FIND, C-GET or C-MOVE request's command set, with an identifier to follow;
    priority MEDIUM."""
    elements = [
        (ul.AFFECTED_SOP_CLASS_UID, ul.pad_uid(sop_class)),
        (ul.COMMAND_FIELD, us(field)),
        (ul.MESSAGE_ID, us(msg_id)),
    ]
    if destination is not None:
        elements.append((ul.MOVE_DESTINATION, ul.pad_text(destination)))
    elements += [(ul.PRIORITY, us(0)), (ul.COMMAND_DATA_SET_TYPE, us(ul.DATA_SET_PRESENT))]
    return command(elements)


class RequestorAssociation:
    """An association the gateway opened; see :func:`associate`.

    Not thread-safe: one thread runs one operation at a time.  The event loop
    thread may ask :attr:`is_established` of an idle association.
    """

    def __init__(
        self,
        sock: socket.socket,
        contexts: Sequence[AcceptedContext],
        *,
        peer_max_pdu: int,
        acse_timeout: float,
        dimse_timeout: float,
    ) -> None:
        self._sock = sock
        self._acse_timeout = acse_timeout
        self._buf = bytearray()
        self._closed = False
        self.established(contexts, peer_max_pdu, dimse_timeout)

    def established(
        self, contexts: Sequence[AcceptedContext], peer_max_pdu: int, dimse_timeout: float
    ) -> None:
        """What the A-ASSOCIATE-AC settled."""
        self._contexts = {c.context_id: c for c in contexts}
        # The first context accepted for a class serves it.
        self._by_class = {c.abstract_syntax: c for c in reversed(contexts)}
        # Room for one PDV's data in a P-DATA-TF the peer accepts (0: no limit).
        self._room = max(peer_max_pdu - 6, 2) if peer_max_pdu else 1 << 30
        self.dimse_timeout = dimse_timeout

    # ------------------------------------------------------------------ state

    @property
    def peer_address(self) -> str:
        try:
            return str(self._sock.getpeername()[0])
        except OSError:
            return "?"

    @property
    def accepted_contexts(self) -> list[AcceptedContext]:
        return list(self._contexts.values())

    def context_by_id(self, context_id: int) -> AcceptedContext:
        """The context of a PDV that ``receive`` accepted (so it exists)."""
        return self._contexts[context_id]

    def context_for(self, abstract_syntax: str) -> AcceptedContext | None:
        return self._by_class.get(abstract_syntax)

    @property
    def is_established(self) -> bool:
        """False once it ended; for an idle association, also when the PACS closed,
        aborted or released it meanwhile (nothing else may arrive unasked)."""
        if self._closed:
            return False
        if self._buf or self._readable(0):
            self._drop_idle()
            return False
        return True

    def _drop_idle(self) -> None:
        if not isinstance(self._sock, ssl.SSLSocket):
            # A-RELEASE-RQ from the acceptor deserves its A-RELEASE-RP.
            with contextlib.suppress(OSError):
                head = bytes(self._buf) or self._sock.recv(16, socket.MSG_DONTWAIT)
                if head[:1] == bytes((ul.A_RELEASE_RQ,)):
                    self._sock.send(ul.pdu(ul.A_RELEASE_RP, b"\x00\x00\x00\x00"))
        self._close()

    def _readable(self, timeout: float) -> bool:
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        try:
            ready, _, _ = select.select([self._sock], [], [], timeout)
        except (OSError, ValueError):
            return True  # the socket broke: reading says how
        return bool(ready)

    # ------------------------------------------------------------------ sending

    def send(self, context: AcceptedContext, command_set: bytes, data_set: bytes | None) -> None:
        """One DIMSE message; fragments sized to the peer's maximum PDU."""
        pdus = self._fragments(context.context_id, command_set, 0x01)
        if data_set is not None:
            pdus += self._fragments(context.context_id, data_set, 0x00)
        self._send(b"".join(pdus))

    def send_cancel(self, context: AcceptedContext, msg_id: int) -> None:
        """C-CANCEL-RQ for the operation *msg_id* (PS3.7 9.3.2.3, 9.3.3.3)."""
        self.send(
            context,
            command(
                [
                    (ul.COMMAND_FIELD, us(ul.C_CANCEL_RQ)),
                    (ul.MESSAGE_ID_BEING_RESPONDED_TO, us(msg_id)),
                    (ul.COMMAND_DATA_SET_TYPE, us(ul.NO_DATA_SET)),
                ]
            ),
            None,
        )

    def _fragments(self, context_id: int, data: bytes, kind: int) -> list[bytes]:
        room = self._room
        if len(data) <= room:
            return [_p_data(context_id, kind | 0x02, data)]
        view = memoryview(data)
        last = len(data) - room
        return [
            _p_data(context_id, kind | (0x02 if start >= last else 0), view[start : start + room])
            for start in range(0, len(data), room)
        ]

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise Lost("the association is closed")
        try:
            self._sock.settimeout(self.dimse_timeout)
            self._sock.sendall(data)
        except OSError as exc:
            self._close()
            raise Lost(f"connection error while sending: {exc}") from None

    # ------------------------------------------------------------------ receiving

    def receive(
        self,
        *,
        cancel: threading.Event | None = None,
        on_cancel: Callable[[], None] | None = None,
    ) -> Message:
        """The next DIMSE message, waiting at most the DIMSE time-out between PDUs.

        While it waits, a set *cancel* calls *on_cancel* once (to send C-CANCEL
        from this thread: the socket has one user at a time).
        """
        command_set = bytearray()
        data: bytearray | None = None
        parsed: dict[int, bytes] | None = None
        context_id = 0
        while True:
            if (
                on_cancel is not None
                and cancel is not None
                and not self._buf
                and self._wait(cancel)
            ):
                on_cancel()
                on_cancel = None
            pdu_type, body = self._read_pdu()
            if pdu_type != ul.P_DATA_TF:
                self._unexpected(pdu_type, body)
            pos, end = 0, len(body)
            while pos < end:
                if end - pos < 6:
                    self._protocol_error("truncated PDV item")
                length, context_id, header = ul.PDV_HEADER.unpack_from(body, pos)
                if length < 2 or pos + 4 + length > end:
                    self._protocol_error("PDV item length inconsistent with its PDU")
                if context_id not in self._contexts:
                    self._protocol_error(f"PDV on presentation context {context_id}")
                fragment = memoryview(body)[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if header & 0x01:
                    if parsed is not None:
                        self._protocol_error("a command fragment after the command set")
                    command_set += fragment
                    if len(command_set) > _MAX_COMMAND_SET:
                        self._protocol_error("command set too large")
                    if not header & 0x02:
                        continue
                    try:
                        parsed = ul.parse_command(bytes(command_set))
                        has_data = ul.us(parsed, ul.COMMAND_DATA_SET_TYPE) != ul.NO_DATA_SET
                    except ul.ProtocolError as exc:
                        self._protocol_error(str(exc))
                    if not has_data:
                        if pos < end:
                            self._protocol_error("more PDVs after a message without a data set")
                        return Message(context_id, parsed, None)
                    data = bytearray()
                else:
                    if parsed is None or data is None:
                        self._protocol_error("a data set fragment before its command set")
                    data += fragment
                    if header & 0x02:
                        if pos < end:
                            self._protocol_error("more PDVs after the end of a message")
                        return Message(context_id, parsed, data)

    def _wait(self, cancel: threading.Event) -> bool:
        """Wait for the PACS's next bytes, up to the DIMSE time-out; True when
        *cancel* was set meanwhile (the caller then sends C-CANCEL and waits on)."""
        deadline = time.monotonic() + self.dimse_timeout
        while not self._readable(_CANCEL_POLL):
            if cancel.is_set():
                return True
            if time.monotonic() > deadline:
                self._time_out()
        return cancel.is_set()

    def _read_pdu(self) -> tuple[int, bytes | bytearray]:
        header = self._read(6)
        pdu_type, _, length = ul.PDU_HEADER.unpack(header)
        return pdu_type, self._read(length)

    def _read(self, n: int) -> bytes | bytearray:
        buf = self._buf
        if not buf and n > _RECV_CHUNK:
            # A large PDU (a C-STORE data set of a C-GET): read it in place.
            whole = bytearray(n)
            view = memoryview(whole)
            got = 0
            while got < n:
                got += self._recv_into(view[got:])
            return whole
        while len(buf) < n:
            try:
                self._sock.settimeout(self.dimse_timeout)
                chunk = self._sock.recv(max(_RECV_CHUNK, n - len(buf)))
            except TimeoutError:
                self._time_out()
            except OSError as exc:
                self._close()
                raise Lost(f"connection error: {exc}") from None
            if not chunk:
                self._close()
                raise Lost("the PACS closed the connection")
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _recv_into(self, view: memoryview) -> int:
        try:
            self._sock.settimeout(self.dimse_timeout)
            got = self._sock.recv_into(view)
        except TimeoutError:
            self._time_out()
        except OSError as exc:
            self._close()
            raise Lost(f"connection error: {exc}") from None
        if not got:
            self._close()
            raise Lost("the PACS closed the connection")
        return got

    def _time_out(self) -> NoReturn:
        self.abort()
        raise Silent(f"no answer within {self.dimse_timeout:g} s")

    def _unexpected(self, pdu_type: int, body: bytes | bytearray) -> NoReturn:
        if pdu_type == ul.A_ABORT:
            self._close()
            source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
            raise Lost(f"the PACS aborted the association (source {source}, reason {reason})")
        if pdu_type == ul.A_RELEASE_RQ:
            with contextlib.suppress(Lost):
                self._send(ul.pdu(ul.A_RELEASE_RP, b"\x00\x00\x00\x00"))
            self._close()
            raise Lost("the PACS released the association in the middle of an operation")
        self._protocol_error(f"unexpected PDU type 0x{pdu_type:02X}")

    def _protocol_error(self, message: str) -> NoReturn:
        self.abort()
        raise Lost(f"protocol error from the PACS: {message}")

    # ------------------------------------------------------------------ ending

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (ACSE time-out) for the A-RELEASE-RP; abort if it
        does not come.  Anything still arriving for an operation is discarded."""
        if self._closed:
            return
        try:
            self._send(ul.pdu(ul.A_RELEASE_RQ, b"\x00\x00\x00\x00"))
            deadline = time.monotonic() + self._acse_timeout
            while time.monotonic() < deadline:
                self.dimse_timeout = max(0.01, deadline - time.monotonic())
                pdu_type, _ = self._read_pdu()
                if pdu_type in (ul.A_RELEASE_RP, ul.A_ABORT):
                    break
                if pdu_type == ul.A_RELEASE_RQ:  # both released at once (PS3.8 §7.2.2)
                    self._send(ul.pdu(ul.A_RELEASE_RP, b"\x00\x00\x00\x00"))
        except Lost:
            return
        self._close()

    def abort(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self._sock.settimeout(1.0)
            self._sock.sendall(ul.a_abort(ul.ABORT_SOURCE_USER, ul.ABORT_REASON_NOT_SPECIFIED))
        self._close()

    def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()


def _p_data(context_id: int, header: int, data: bytes | memoryview) -> bytes:
    pdv = ul.PDV_HEADER.pack(len(data) + 2, context_id, header)
    return ul.PDU_HEADER.pack(ul.P_DATA_TF, 0, len(data) + 6) + pdv + bytes(data)


def _ae_title(title: str) -> bytes:
    return title.encode("ascii").ljust(16)


def associate(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    max_pdu: int,
    connect_timeout: float,
    acse_timeout: float,
    dimse_timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    scp_roles: Sequence[str] = (),
) -> RequestorAssociation:
    """Open an association proposing *contexts* (abstract syntax, transfer syntaxes),
    asking for the SCP role for the SOP classes in *scp_roles* (C-GET's storage classes).

    Raises :class:`AssociateRejected`, :class:`TlsFailed` or :class:`ConnectFailed`.
    """
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        # Nagle would hold every request for the PACS's delayed ACK (40 ms on loopback).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock.settimeout(acse_timeout)
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            except (OSError, ValueError) as exc:
                raise TlsFailed(str(exc)) from exc
        proposed = {2 * i + 1: (a, list(ts)) for i, (a, ts) in enumerate(contexts)}
        sock.settimeout(acse_timeout)
        try:
            sock.sendall(_associate_rq(calling_ae, called_ae, proposed, max_pdu, scp_roles))
        except OSError as exc:
            if isinstance(sock, ssl.SSLSocket):
                # Under TLS 1.3 a refused client certificate arrives as an alert
                # after our side of the handshake: reading it lets the context
                # record the reason.
                with contextlib.suppress(OSError):
                    sock.recv(1)
            raise ConnectFailed(f"the PACS closed the connection: {exc}") from exc
        association = RequestorAssociation(
            sock, [], peer_max_pdu=0, acse_timeout=acse_timeout, dimse_timeout=acse_timeout
        )
        try:
            pdu_type, body = association._read_pdu()
        except Silent as exc:
            raise ConnectFailed(f"no answer to A-ASSOCIATE-RQ within {acse_timeout:g} s") from exc
        except Lost as exc:
            raise ConnectFailed(f"the PACS ended the connection during negotiation: {exc}") from exc
        if pdu_type == ul.A_ASSOCIATE_RJ and len(body) >= 4:
            association._close()
            raise AssociateRejected(body[1], body[2], body[3])
        if pdu_type == ul.A_ABORT:
            association._close()
            raise NegotiationAborted("the PACS aborted the association during negotiation")
        if pdu_type != ul.A_ASSOCIATE_AC or len(body) > _MAX_NEGOTIATION_PDU:
            association.abort()
            raise ConnectFailed(f"unexpected PDU type 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")
        try:
            accepted, peer_max_pdu = _parse_associate_ac(bytes(body), proposed)
        except ul.ProtocolError as exc:
            association.abort()
            raise ConnectFailed(f"malformed A-ASSOCIATE-AC: {exc}") from exc
        association.established(accepted, peer_max_pdu, dimse_timeout)
        return association
    except BaseException:
        with contextlib.suppress(OSError):
            sock.close()
        raise


def _associate_rq(
    calling_ae: str,
    called_ae: str,
    proposed: dict[int, tuple[str, list[str]]],
    max_pdu: int,
    scp_roles: Sequence[str],
) -> bytes:
    items = [ul.item(0x10, ul.APPLICATION_CONTEXT.encode("ascii"))]
    for context_id, (abstract, syntaxes) in proposed.items():
        subs = ul.item(0x30, abstract.encode("ascii")) + b"".join(
            ul.item(0x40, ts.encode("ascii")) for ts in syntaxes
        )
        items.append(ul.item(0x20, bytes((context_id, 0, 0, 0)) + subs))
    user = (
        ul.item(0x51, struct.pack(">I", max_pdu))
        + ul.item(0x52, ul.IMPLEMENTATION_CLASS_UID.encode("ascii"))
        + ul.item(0x55, ul.IMPLEMENTATION_VERSION_NAME.encode("ascii"))
    )
    for sop_class in dict.fromkeys(scp_roles):
        # PS3.7 D.3.3.4: UID length, UID, SCU role 0, SCP role 1.
        raw = sop_class.encode("ascii")
        user += ul.item(0x54, struct.pack(">H", len(raw)) + raw + b"\x00\x01")
    items.append(ul.item(0x50, user))
    fixed = struct.pack(">HH", 0x0001, 0) + _ae_title(called_ae) + _ae_title(calling_ae)
    return ul.pdu(ul.A_ASSOCIATE_RQ, fixed + b"\x00" * 32 + b"".join(items))


def _parse_associate_ac(
    body: bytes, proposed: dict[int, tuple[str, list[str]]]
) -> tuple[list[AcceptedContext], int]:
    if len(body) < 68:
        raise ul.ProtocolError("A-ASSOCIATE-AC shorter than its fixed fields")
    accepted: list[tuple[int, str, str]] = []
    peer_max_pdu = 0
    scp_roles: set[str] = set()
    for item_type, value in ul.items(body, 68, len(body)):
        if item_type == 0x21:
            if len(value) < 4:
                raise ul.ProtocolError("presentation context item too short")
            context_id, result = value[0], value[2]
            if result != ul.PC_ACCEPTANCE or context_id not in proposed:
                continue
            syntaxes = [ul.uid(v) for t, v in ul.items(value, 4, len(value)) if t == 0x40]
            abstract, offered = proposed[context_id]
            if len(syntaxes) != 1 or syntaxes[0] not in offered:
                raise ul.ProtocolError(f"context {context_id} accepted with a syntax not offered")
            accepted.append((context_id, abstract, syntaxes[0]))
        elif item_type == 0x50:
            for sub_type, sub_value in ul.items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub_value) == 4:
                    (peer_max_pdu,) = struct.unpack(">I", sub_value)
                elif sub_type == 0x54 and len(sub_value) >= 4:
                    (length,) = struct.unpack_from(">H", sub_value, 0)
                    if len(sub_value) == length + 4 and sub_value[length + 3] == 1:
                        scp_roles.add(ul.uid(sub_value[2 : 2 + length]))
    contexts = [AcceptedContext(c, a, ts, a in scp_roles) for c, a, ts in accepted]
    return contexts, peer_max_pdu


__all__ = [
    "AcceptedContext",
    "AssociateRejected",
    "ConnectFailed",
    "Lost",
    "Message",
    "NegotiationAborted",
    "RequestorAssociation",
    "Silent",
    "TlsFailed",
    "associate",
    "command",
    "decode_identifier",
    "encode_identifier",
    "request_command",
    "us",
]
