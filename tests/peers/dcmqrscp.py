"""DCMTK's dcmqrscp (3.6.7) as a test peer."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.peers.common import (
    LOOPBACK,
    PeerProcess,
    c_echo,
    dcmtk_available,
    dcmtk_tool,
    free_port,
    port_is_open,
)

DCMQRSCP_BINARY = "dcmqrscp"


def dcmqrscp_available() -> bool:
    return dcmtk_available(DCMQRSCP_BINARY, "storescu")


_SYMBOL = re.compile(r"[^A-Za-z0-9_]")


class DcmqrscpPeer(PeerProcess):
    """A dcmqrscp with one AE (default "DCMQRSCP") storing into a temporary folder.

    ``peers`` maps a symbolic name to ``(AET, host, port)`` and becomes the
    HostTable: these AEs are the known C-MOVE destinations (an unknown one gets
    "Refused: Move Destination Unknown", 0xA801).  The AE accepts any calling AE
    (``ANY`` in the AETable).  dcmqrscp reads its configuration only at start, so
    ``register_peer`` restarts a running peer; the stored data survive (the index
    lives in the storage folder).

    Settings that matter: the default fork mode (``--single-process`` segfaults
    after the first association in 3.6.7), ``SpecificCharacterSet = "ISO_IR 192",
    override`` so that every answer is UTF-8, no UserName/GroupName (root in CI),
    the storage folder created before start, quota ``(max_studies, 1024mb)``
    (larger per-study quotas are rejected; exceeding ``max_studies`` deletes the
    oldest study).  With the default options dcmqrscp accepts only uncompressed
    transfer syntaxes for storage; ``extra_args`` (e.g. ``["+xs"]``) can change that,
    but it never decompresses on C-MOVE.
    """

    kind = "dcmqrscp"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "DCMQRSCP",
        peers: Mapping[str, tuple[str, str, int]] | None = None,
        name: str | None = None,
        max_studies: int = 500,
        max_associations: int = 16,
        verbose: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._dicom_port = 0
        self.peers: dict[str, tuple[str, str, int]] = dict(peers or {})
        self.max_studies = max_studies
        self.max_associations = max_associations
        self.verbose = verbose
        self.extra_args = list(extra_args)
        super().__init__(workdir, name=name, aet=aet)
        self.config_path = self.workdir / "dcmqrscp.cfg"
        self.storage_dir = self.workdir / "storage"
        if re.search(r"\s", str(self.storage_dir)):
            raise ValueError(f"dcmqrscp cannot use a storage path with blanks: {self.storage_dir}")

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    def _allocate_ports(self) -> None:
        self._dicom_port = free_port()

    def config_text(self) -> str:
        hosts = []
        used: set[str] = set()
        for name, (aet, host, port) in self.peers.items():
            symbol = _SYMBOL.sub("_", name).lower() or "peer"
            while symbol in used:
                symbol += "_"
            used.add(symbol)
            hosts.append(f"{symbol} = ({aet}, {host}, {port})")
        host_lines = "\n".join(hosts)
        return (
            "# written by tests/peers/dcmqrscp.py\n"
            f"NetworkTCPPort  = {self._dicom_port}\n"
            "MaxPDUSize      = 131072\n"
            f"MaxAssociations = {self.max_associations}\n"
            'SpecificCharacterSet = "ISO_IR 192", override\n'
            "\n"
            "HostTable BEGIN\n"
            f"{host_lines}\n"
            "HostTable END\n"
            "\n"
            "VendorTable BEGIN\n"
            "VendorTable END\n"
            "\n"
            "AETable BEGIN\n"
            f"{self.aet} {self.storage_dir} RW ({self.max_studies}, 1024mb) ANY\n"
            "AETable END\n"
        )

    def _write_config(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")

    def _command(self) -> list[str]:
        cmd = [dcmtk_tool(DCMQRSCP_BINARY), "-c", str(self.config_path), "-dhl"]
        if self.verbose:
            cmd.append("-v")
        cmd.extend(self.extra_args)
        return cmd

    def _probe_ready(self) -> bool:
        if not port_is_open(LOOPBACK, self._dicom_port):
            return False
        return c_echo(LOOPBACK, self._dicom_port, self.aet, "ECHOSCU", timeout=5.0)

    def register_peer(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace a HostTable entry; restarts the peer when it runs."""
        self.peers[name] = (aet, host, port)
        if self.is_running():
            self.stop()
            self.start()
        else:
            self._write_config()

    def stored_sop_instance_uids(self) -> set[str]:
        # dcmqrscp only answers hierarchical queries: walk study -> series -> image.
        uids: set[str] = set()
        with self.find_session() as session:
            studies = session.find("STUDY", {"StudyInstanceUID": ""})
            for study in studies:
                study_uid = str(study.StudyInstanceUID)
                series = session.find(
                    "SERIES", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": ""}
                )
                for one in series:
                    images = session.find(
                        "IMAGE",
                        {
                            "StudyInstanceUID": study_uid,
                            "SeriesInstanceUID": str(one.SeriesInstanceUID),
                            "SOPInstanceUID": "",
                        },
                    )
                    uids.update(str(image.SOPInstanceUID) for image in images)
        return uids
