"""Orthanc (Debian 1.10.1 + DICOMweb plugin 1.7) as a test peer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.peers.common import (
    LOOPBACK,
    LoadResult,
    PeerProcess,
    StoreReport,
    c_echo,
    free_port,
    http_ok,
    port_is_open,
)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def find_dicomweb_plugin() -> str | None:
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    matches = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return str(matches[0]) if matches else None


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).exists() and find_dicomweb_plugin() is not None


class OrthancPeer(PeerProcess):
    """An Orthanc with its own storage, free DICOM/HTTP ports and the DICOMweb plugin.

    ``modalities`` maps a symbolic name to ``(AET, host, port)``; each entry may
    C-FIND/C-MOVE/C-GET and is a valid C-MOVE destination (Orthanc connects to the
    host/port written here).  An AE not registered can still C-ECHO and C-STORE,
    but its C-FIND/C-MOVE end in an A-ABORT.  More AEs can be added while running
    with ``register_modality`` (REST ``PUT /modalities/{name}``).

    Settings that matter: ``DefaultEncoding: Utf8`` (Latin1, Debian's default,
    destroys non-Latin-1 names), ``DicomCheckCalledAet: true``, HTTP only for local
    clients, no authentication.  Orthanc 1.10 cannot be told to listen on loopback
    only: both ports bind 0.0.0.0.  ``sync_storage=False`` (the default here) turns
    off the per-file fsync that dominates ingest time; pass True for benchmarks that
    must match a stock Orthanc.
    """

    kind = "orthanc"

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        name: str | None = None,
        verbose: bool = False,
        sync_storage: bool = False,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self._dicom_port = 0
        self._http_port = 0
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.verbose = verbose
        self.sync_storage = sync_storage
        self.extra_config = dict(extra_config or {})
        plugin = find_dicomweb_plugin()
        if plugin is None:
            raise FileNotFoundError("Orthanc's DICOMweb plugin is not installed")
        self.plugin = plugin
        super().__init__(workdir, name=name, aet=aet)
        self.config_path = self.workdir / "orthanc.json"
        self.storage_dir = self.workdir / "storage"

    # ------------------------------------------------------------------ addresses

    @property
    def dicom_port(self) -> int:
        return self._dicom_port

    @property
    def http_port(self) -> int:
        return self._http_port

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self._http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    # ------------------------------------------------------------------ hooks

    def _allocate_ports(self) -> None:
        self._dicom_port = free_port()
        self._http_port = free_port()

    def config(self) -> dict[str, Any]:
        """The JSON configuration the peer is started with."""
        config: dict[str, Any] = {
            "Name": f"dimse-gateway test {self.name}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "SyncStorageArea": self.sync_storage,
            "Plugins": [self.plugin],
            "HttpServerEnabled": True,
            "HttpPort": self._http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self._dicom_port,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": False,
            "DefaultEncoding": "Utf8",
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowMove": False,
            "DicomAlwaysAllowGet": False,
            "UnknownSopClassAccepted": False,
            "OverwriteInstances": False,
            "SaveJobs": False,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        config.update(self.extra_config)
        return config

    def _write_config(self) -> None:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")

    def _command(self) -> list[str]:
        cmd = [ORTHANC_BINARY]
        if self.verbose:
            cmd.append("--verbose")
        cmd.append(str(self.config_path))
        return cmd

    def _probe_ready(self) -> bool:
        # Orthanc opens its DICOM port a few ms before its HTTP server: check both.
        if not http_ok(f"{self.http_url}/system", timeout=1.0):
            return False
        if not port_is_open(self.host, self._dicom_port):
            return False
        return c_echo(self.host, self._dicom_port, self.aet, "ECHOSCU", timeout=5.0)

    # ------------------------------------------------------------------ REST

    def http(self, timeout: float = 30.0) -> httpx.Client:
        """An httpx client on the REST API (close it, or use it in a with block)."""
        return httpx.Client(base_url=self.http_url, timeout=timeout, trust_env=False)

    def rest_get(self, path: str, **params: Any) -> Any:
        with self.http() as client:
            response = client.get(path, params=params or None)
            response.raise_for_status()
            return response.json()

    def stored_sop_instance_uids(self) -> set[str]:
        instances = self.rest_get("/instances", expand="")
        return {str(item["MainDicomTags"]["SOPInstanceUID"]) for item in instances}

    def register_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace a DicomModalities entry on the running peer (kept in memory;
        also written to the config for the next start)."""
        self.modalities[name] = (aet, host, port)
        if self.is_running():
            with self.http() as client:
                response = client.put(
                    f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": port}
                )
                response.raise_for_status()
        self._write_config()

    def upload_rest(self, paths: Iterable[Path]) -> StoreReport:
        """POST each file to ``/instances`` (an alternative to storescu)."""
        report = StoreReport()
        with self.http(timeout=120.0) as client:
            for path in paths:
                path = Path(path)
                try:
                    response = client.post(
                        "/instances",
                        content=path.read_bytes(),
                        headers={"Content-Type": "application/dicom"},
                    )
                except httpx.HTTPError as exc:
                    report.failed[path] = f"REST upload failed: {exc}"
                    continue
                if response.status_code == 200:
                    report.succeeded.append(path)
                else:
                    report.failed[path] = f"HTTP {response.status_code}: {response.text[:300]}"
        return report

    def load_rest(self, paths: Iterable[Path]) -> LoadResult:
        """Like ``load`` but through ``POST /instances`` instead of C-STORE."""
        return self.load(
            paths, sender=lambda infos: self.upload_rest([info.path for info in infos])
        )

    def remove_storage(self) -> None:
        """Delete the storage folder (only when stopped)."""
        if self.is_running():
            raise RuntimeError("stop the peer first")
        shutil.rmtree(self.storage_dir, ignore_errors=True)
