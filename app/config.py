"""Gateway configuration: one pydantic-settings class, from a TOML file and the environment.

Precedence, highest first: keyword arguments, ``DIMSE_GATEWAY_*`` environment
variables, the TOML file named by ``config_file`` or ``DIMSE_GATEWAY_CONFIG``,
then the defaults below.  The file's ``[gateway]`` table holds the top-level
fields, each ``[[nodes]]`` entry one PACS, each ``[[api_keys]]`` entry one API
key and ``[oidc]`` the token issuer; in the environment the top-level fields are
flat (``DIMSE_GATEWAY_HTTP_PORT=8001``) and ``DIMSE_GATEWAY_NODES``,
``DIMSE_GATEWAY_API_KEYS`` and ``DIMSE_GATEWAY_OIDC`` take JSON.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "DIMSE_GATEWAY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Explicit VR first: it carries VRs for private and unknown attributes.  Implicit
# VR is the one syntax every PACS must accept (PS3.5 10.1).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


def _check_ae_title(value: str) -> str:
    """AE titles are 1-16 characters of the default repertoire, no backslash (PS3.5 6.2)."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in stripped):
        raise ValueError("an AE title holds printable ASCII without backslash")
    return stripped


class DimseProfile(BaseModel):
    """What one PACS really supports on the DIMSE side.

    The defaults work with Orthanc, dcmqrscp and pynetdicom's qrscp; ``dimse-gateway
    probe NODE`` finds the values for another PACS and prints them as a
    ``[nodes.profile]`` table.
    """

    model_config = {"extra": "forbid"}

    # Proposed on the C-FIND/C-MOVE/C-GET contexts, in order of preference.  Some
    # legacy PACS (CTN) accept Explicit VR and then misparse the identifier:
    # they need ["1.2.840.10008.1.2"] alone.
    transfer_syntaxes: list[str] = Field(
        default_factory=lambda: [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN],
        min_length=1,
    )
    # Accepts relational queries (PS3.4 C.4.1.2.2, extended negotiation byte 1).
    # Informative: the planner always walks the hierarchy, which every PACS answers.
    relational_queries: bool = False
    # Accepts the Patient Root Q/R model; without it /patients is refused (400).
    patient_root: bool = True
    # Accepts C-GET; a node with ``retrieve = "auto"`` and ``c_get = false`` moves.
    c_get: bool = True
    # Matches PatientName case-sensitively (dcmqrscp, CTN): name keys are then sent
    # with each ASCII letter as "?" and matched by the gateway, so that QIDO's
    # case-insensitive PN matching holds on every PACS.
    case_sensitive_names: bool = False
    # Returns ModalitiesInStudy and NumberOfStudyRelatedSeries/Instances (and
    # NumberOfSeriesRelatedInstances) itself.  When false they are never asked
    # for or matched by the PACS: the gateway derives them from lower-level queries.
    study_counts: bool = True

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, v: list[str]) -> list[str]:
        bad = [uid for uid in v if not _UID.match(uid) or len(uid) > 64]
        if bad:
            raise ValueError(f"not transfer syntax UIDs: {', '.join(bad)}")
        return list(dict.fromkeys(v))


class PacsNode(BaseModel):
    """One PACS the gateway talks to."""

    model_config = {"extra": "forbid"}

    name: str = Field(description="Name used in URLs: /pacs/{name}/dicomweb")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    default: bool = False
    query_model: Literal["study", "patient"] = Field(
        default="study",
        description="Information model for STUDY/SERIES/IMAGE searches; PATIENT level "
        "always uses Patient Root",
    )
    retrieve: Literal["move", "get", "auto"] = "move"
    max_associations: int = Field(default=4, ge=1, le=64)
    # How long a request waits for a free association before it gets 503.
    acquire_timeout: float = Field(default=30.0, gt=0)
    # An idle association older than this is released rather than reused: many PACS
    # drop idle peers silently, and a dead socket would cost the next request a retry.
    # Below the usual PACS idle limits (Orthanc's DicomScpTimeout is 30 s), so the
    # gateway releases first instead of racing the PACS's close.
    idle_timeout: float = Field(default=20.0, gt=0)
    # False opens a fresh association for every operation (for PACS that dislike
    # long-lived associations); the bound on concurrent associations still holds.
    reuse_associations: bool = True
    connect_timeout: float = Field(default=3.0, gt=0)
    acse_timeout: float = Field(default=10.0, gt=0)
    # The PACS's longest silence within an operation (between two PDUs); then A-ABORT, 504.
    dimse_timeout: float = Field(default=30.0, gt=0)
    # C-GET associations only (pynetdicom's idle limit); the pool's own use idle_timeout.
    network_timeout: float = Field(default=60.0, gt=0)
    max_pdu: int = Field(default=0, ge=0, description="0 means unlimited")
    # PS3.18 (2024c) answers an empty search with 204; some clients want 200 and [].
    no_match_status: Literal[200, 204] = 204
    max_results: int = Field(
        default=10000, ge=1, description="C-FIND matches collected per search at most"
    )
    # DICOM TLS on the associations to this node (PS3.15 B.9: TLS 1.2+).  The CA file
    # signs the PACS's certificate (the system's CAs when unset); the certificate and
    # key are the gateway's own, for a PACS that wants mutual TLS.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # DICOM peers are often reached by an address their certificate does not name;
    # switching this off still verifies the chain.
    tls_verify_hostname: bool = True
    # How the gateway knows how many instances a retrieve must bring: "find" asks
    # the PACS after the move (its instance count when it counts natively, the
    # C-FIND IMAGE listing otherwise or to name what is missing), since a move's
    # own counts can say Success for instances never sent; "counts" trusts the
    # move's sub-operation counts (compared with what arrived) alone.
    expected_instances: Literal["find", "counts"] = "find"
    profile: DimseProfile = Field(default_factory=DimseProfile)
    # The largest QIDO ``limit`` a client gets: a bigger or missing limit is cut to
    # this, with a Warning, as PS3.18 §8.3.4.4 lets a server do.  None: only max_results.
    max_limit: int | None = Field(default=None, ge=1)
    # Refuse (400) searches that would list the whole PACS: no match key, or only "*".
    refuse_unfiltered_searches: bool = False
    # OAuth2 scopes that grant use of this node to a bearer token (any one suffices).
    scopes: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NODE_NAME.match(v):
            raise ValueError("a node name has letters, digits, '.', '_' or '-' (max 64)")
        return v

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @model_validator(mode="after")
    def _tls_complete(self) -> PacsNode:
        files = {
            "tls_ca_file": self.tls_ca_file,
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
        }
        where = f"node {self.name!r}"
        if not self.tls:
            named = [k for k, v in files.items() if v is not None]
            if named:
                # Certificates without tls = true would silently leave the link in the clear.
                raise ValueError(f"{where}: {', '.join(named)} given but tls is not true")
            return self
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"{where}: tls_cert_file and tls_key_file go together (mutual TLS)")
        # Plain ssl, imported here to keep this module free of the DIMSE package.
        from app.dimse.tls import TlsConfigError, client_context

        try:
            client_context(
                ca_file=self.tls_ca_file,
                cert_file=self.tls_cert_file,
                key_file=self.tls_key_file,
                verify_hostname=self.tls_verify_hostname,
            )
        except TlsConfigError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _model_supported(self) -> PacsNode:
        if self.query_model == "patient" and not self.profile.patient_root:
            raise ValueError(f"node {self.name}: query_model 'patient' needs profile.patient_root")
        return self


class ApiKey(BaseModel):
    """A static API key, kept only as a hash (``dimse-gateway hash-key`` makes one)."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=64, description="Principal name in the audit log")
    hash: str = Field(description="scrypt$... or sha256:<hex>, from dimse-gateway hash-key")
    # Node names the key may use; "*" means every node.
    nodes: list[str] = Field(default_factory=list)

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        # Imported here: app.auth imports this module.
        from app.auth.keys import check_hash_format

        return check_hash_format(v)


JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]


def _default_algorithms() -> list[JwtAlgorithm]:
    return ["RS256", "ES256"]


class OidcSettings(BaseModel):
    """OAuth2/OIDC bearer tokens (JWT) checked against the issuer's published keys."""

    model_config = {"extra": "forbid"}

    issuer: str = Field(min_length=1, description="Expected iss claim")
    audience: str = Field(min_length=1, description="Expected aud claim (this gateway)")
    jwks_url: str = Field(description="The issuer's JWKS endpoint (http or https)")
    # Public-key algorithms only: an HMAC "key" from a JWKS would be public knowledge.
    algorithms: list[JwtAlgorithm] = Field(default_factory=_default_algorithms, min_length=1)
    # Claim naming the nodes a token may use (a list or a space-separated string; "*" all).
    nodes_claim: str = "dicom_nodes"
    # Claim whose value names the principal in the audit log.
    principal_claim: str = "sub"
    leeway: float = Field(default=30.0, ge=0, le=300, description="Clock skew allowed, seconds")
    # The key set is re-read after this long, and at most once per refresh_cooldown
    # when a token names a key id not in it (key rotation).
    jwks_cache_seconds: float = Field(default=300.0, gt=0)
    jwks_refresh_cooldown: float = Field(default=30.0, ge=0)
    jwks_timeout: float = Field(default=5.0, gt=0)

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.lower().startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http or https URL")
        return v


class Settings(BaseSettings):
    """Everything the gateway needs to run."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    config_file: Path | None = None
    ae_title: str = "DIMSEGW"
    storage_port: int = Field(default=11112, ge=0, le=65535)
    storage_host: str = "0.0.0.0"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    work_dir: Path = Path("/var/lib/dimse-gateway")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object per log line (time, level, logger, message, request_id).
    log_format: Literal["text", "json"] = "text"
    # The instance cache under work_dir; least recently used instances go first.
    cache_max_bytes: int = Field(default=20 * 1024**3, ge=64 * 1024**2)
    # Memory for the DICOM JSON of cached instances (a 512x512 CT slice takes about 3 KB),
    # so a series' metadata is encoded once, not on every viewer reload. 0 turns it off.
    metadata_memory_bytes: int = Field(default=64 * 1024**2, ge=0)
    # Announced to PACS that send us instances: larger PDUs mean fewer round trips.
    storage_max_pdu: int = Field(default=1024 * 1024, ge=16384)
    # On shutdown, in-flight requests get this long to finish; then streaming
    # retrieves end at a part boundary, marked incomplete (app/serving.py). Keep it
    # and 5 s more below the container's stop timeout (Docker: 10 s).
    shutdown_grace: float = Field(default=4.0, ge=0)
    # NIfTI sidecars leave out patient identity unless asked (?phi=true) and allowed here.
    allow_phi_in_sidecars: bool = False
    # Retrieve jobs (POST /jobs): how many are kept at once (finished ones make room
    # oldest first), how many run at once (the rest wait, queued), and how long a
    # finished job and its NIfTI result stay.
    jobs_max: int = Field(default=64, ge=1, le=10000)
    jobs_concurrency: int = Field(default=2, ge=1, le=64)
    jobs_ttl: float = Field(default=3600.0, gt=0)
    # A comment line on a quiet /jobs/{id}/events stream, so proxies keep it open.
    jobs_heartbeat: float = Field(default=15.0, gt=0)
    # The built OHIF viewer (npm @ohif/app: its dist/ folder, or the package holding
    # it; scripts/install-viewer.sh installs one), served at /viewer/ when set.
    viewer_dir: Path | None = None
    nodes: list[PacsNode] = Field(default_factory=list)
    # A second storage SCP port speaking DICOM TLS (2762 is DICOM's registered TLS
    # port), for the C-MOVE sub-associations of PACS that send over TLS; the plain
    # port stays for the others.  None: no TLS listener.
    storage_tls_port: int | None = Field(default=None, ge=0, le=65535)
    storage_tls_cert_file: Path | None = None
    storage_tls_key_file: Path | None = None
    # CAs that sign the PACS's client certificates; required when they must present one.
    storage_tls_ca_file: Path | None = None
    storage_tls_require_client_cert: bool = True
    # Authentication is on as soon as a key or an OIDC issuer is configured.
    api_keys: list[ApiKey] = Field(default_factory=list)
    oidc: OidcSettings | None = None
    # One JSON line per search and retrieve; None: no audit log.
    audit_log: Path | None = None
    # Query values may name patients: the audit log has keys only unless this is set.
    audit_query_values: bool = False
    # Requests beyond these are refused before routing (414, 431).
    max_url_bytes: int = Field(default=8192, ge=1024)
    max_header_bytes: int = Field(default=16384, ge=4096)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("viewer_dir")
    @classmethod
    def _viewer(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        for candidate in (v, v / "dist"):
            if (candidate / "index.html").is_file():
                return candidate.resolve()
        raise ValueError(
            f"{v} holds no built viewer (no index.html there or in dist/): "
            "run scripts/install-viewer.sh"
        )

    @model_validator(mode="after")
    def _nodes_consistent(self) -> Settings:
        names = [n.name for n in self.nodes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"node names must be unique: {', '.join(dupes)}")
        defaults = [n.name for n in self.nodes if n.default]
        if len(defaults) > 1:
            raise ValueError(f"only one node may be the default: {', '.join(defaults)}")
        self._check_storage_tls()
        key_names = [k.name for k in self.api_keys]
        dupes = sorted({n for n in key_names if key_names.count(n) > 1})
        if dupes:
            raise ValueError(f"api_keys names must be unique: {', '.join(dupes)}")
        for key in self.api_keys:
            unknown = sorted(set(key.nodes) - {"*", *names})
            if unknown:
                raise ValueError(f"api key {key.name!r} names unknown nodes: {', '.join(unknown)}")
        return self

    def _check_storage_tls(self) -> None:
        files = {
            "storage_tls_cert_file": self.storage_tls_cert_file,
            "storage_tls_key_file": self.storage_tls_key_file,
            "storage_tls_ca_file": self.storage_tls_ca_file,
        }
        if self.storage_tls_port is None:
            named = [k for k, v in files.items() if v is not None]
            if named:
                raise ValueError(f"{', '.join(named)} given but no storage_tls_port")
            return
        if self.storage_tls_cert_file is None or self.storage_tls_key_file is None:
            raise ValueError(
                "storage_tls_port needs storage_tls_cert_file and storage_tls_key_file"
            )
        if self.storage_tls_port != 0 and self.storage_tls_port == self.storage_port:
            raise ValueError("storage_tls_port must differ from storage_port")
        from app.dimse.tls import server_context

        server_context(
            cert_file=self.storage_tls_cert_file,
            key_file=self.storage_tls_key_file,
            ca_file=self.storage_tls_ca_file,
            require_client_cert=self.storage_tls_require_client_cert,
        )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.oidc is not None

    @property
    def default_node(self) -> PacsNode | None:
        for node in self.nodes:
            if node.default:
                return node
        return self.nodes[0] if len(self.nodes) == 1 else None

    def node(self, name: str) -> PacsNode | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, init_settings))


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file; ``[gateway]`` keys become top-level fields."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        path: Any = None
        if isinstance(init, InitSettingsSource):
            path = init.init_kwargs.get("config_file")
        path = path or os.environ.get(CONFIG_ENV)
        self._data: dict[str, Any] = _read_toml(Path(path)) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_TABLES = ("nodes", "api_keys", "oidc")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"configuration file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - {"gateway", *_TABLES}
    if unknown:
        raise ValueError(
            f"configuration file {path}: unknown table(s) {', '.join(sorted(unknown))}; "
            "expected [gateway], [[nodes]], [[api_keys]] and [oidc]"
        )
    data: dict[str, Any] = dict(raw.get("gateway", {}))
    for table in _TABLES:
        if table in raw:
            data[table] = raw[table]
    data["config_file"] = path
    return data


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from a file (or ``DIMSE_GATEWAY_CONFIG``), the environment and overrides."""
    if config_file is not None:
        overrides["config_file"] = Path(config_file)
    return Settings(**overrides)
