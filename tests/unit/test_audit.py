"""The audit log's lines, and patient identity kept out of the normal log.

Through the real HTTP app with the node on a closed port: every request here
ends in 401, 403, 400 or 503, and each of those is audited like a success.
Successful searches and retrieves with counts are in the integration tests.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

import httpx
import pytest

from app.auth.keys import generate_key, sha256_hash
from app.config import ApiKey, PacsNode, Settings
from tests.gateway_server import GatewayServer

KEY = generate_key()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _settings(tmp_path: Path, **extra: object) -> Settings:
    port = _closed_port()
    options: dict[str, object] = {
        "http_port": 0,
        "storage_port": 0,
        "work_dir": tmp_path / "gw",
        "audit_log": tmp_path / "logs" / "audit.jsonl",
        "nodes": [
            PacsNode(name="a", ae_title="A", host="127.0.0.1", port=port, default=True),
            PacsNode(name="b", ae_title="B", host="127.0.0.1", port=port),
        ],
        "api_keys": [ApiKey(name="viewer", hash=sha256_hash(KEY), nodes=["a"])],
    }
    return Settings(**{**options, **extra})  # type: ignore[arg-type]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def test_one_line_per_request_with_who_where_what_and_outcome(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    auth = {"Authorization": f"Bearer {KEY}"}
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        c.get("/health")
        c.get("/pacs", headers=auth)
        c.get("/pacs/a/dicomweb/studies", params={"PatientName": "DOE^JANE*"})
        c.get("/pacs/a/dicomweb/studies", params={"PatientName": "DOE^JANE*"}, headers=auth)
        c.get("/pacs/b/dicomweb/series", headers=auth)
        c.get("/dicomweb/studies/1.2.3/series/1.2.3.4", headers=auth)
        c.get("/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/frames/1", headers=auth)
        c.get("/dicomweb/patients/PID-12345/studies", headers=auth)
        c.get("/dicomweb/studies", params={"StudyDate": "20201399"}, headers=auth)
        c.get("/dicomweb/studies/1.2.3/series/1.2.3.4/nifti", headers=auth)
    assert settings.audit_log is not None
    assert settings.audit_log.stat().st_mode & 0o777 == 0o640
    lines = _lines(settings.audit_log)
    # /health and /pacs are not searches or retrieves.
    assert len(lines) == 8
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))
        assert line["client"] == "127.0.0.1"
        assert isinstance(line["duration_ms"], float)
    unauthenticated, search, forbidden, retrieve, frames, patient, bad, nifti = lines
    assert unauthenticated["principal"] is None
    assert unauthenticated["status"] == 401
    assert unauthenticated["error"] == "Unauthenticated"
    assert search == {
        **search,
        "principal": "viewer",
        "node": "a",
        "kind": "search",
        "level": "study",
        "status": 503,
        "error": "PacsUnavailable",
        "query_keys": ["PatientName"],
        "complete": True,
    }
    assert forbidden["status"] == 403
    assert forbidden["node"] == "b"
    assert forbidden["level"] == "series"
    assert retrieve["kind"] == "retrieve"
    assert (retrieve["level"], retrieve["resource"]) == ("series", "instances")
    assert (retrieve["study_uid"], retrieve["series_uid"]) == ("1.2.3", "1.2.3.4")
    assert (frames["level"], frames["resource"], frames["instance_uid"]) == (
        "instance",
        "frames",
        "1.2.3.4.5",
    )
    assert patient["level"] == "study"
    assert bad["status"] == 400
    assert bad["query_keys"] == ["StudyDate"]
    assert (nifti["kind"], nifti["resource"], nifti["node"]) == ("nifti", "nifti", "a")
    text = settings.audit_log.read_text()
    # Query values and the Patient ID from the path stay out unless asked for.
    for secret in ("DOE", "PID-12345", "20201399"):
        assert secret not in text


def test_query_values_when_configured(tmp_path: Path) -> None:
    settings = _settings(tmp_path, audit_query_values=True, api_keys=[])
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        c.get("/dicomweb/studies", params={"PatientName": "DOE^JANE*", "limit": "5"})
        c.get("/dicomweb/patients/PID-12345/studies")
    assert settings.audit_log is not None
    search, patient = _lines(settings.audit_log)
    assert search["principal"] == "anonymous"
    assert search["query"] == [["PatientName", "DOE^JANE*"], ["limit", "5"]]
    assert patient["patient_id"] == "PID-12345"


def test_no_audit_file_unless_configured(tmp_path: Path) -> None:
    settings = _settings(tmp_path).model_copy(update={"audit_log": None})
    with GatewayServer(settings) as gw:
        httpx.get(f"{gw.url}/dicomweb/studies", headers={"X-API-Key": KEY}, timeout=10)
    assert not (tmp_path / "logs").exists()


def test_patient_identity_never_reaches_the_normal_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, api_keys=[])
    caplog.set_level(logging.INFO)
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        # PACS down (503, WARNING), bad values (400, INFO), unknown node (404).
        c.get("/dicomweb/patients/PID-98765/studies")
        c.get("/dicomweb/patients/PID-98765%2A/studies")
        c.get(
            "/dicomweb/studies",
            params={"PatientName": "SMITH^ANNA", "PatientBirthDate": "19991399"},
        )
        c.get("/dicomweb/studies", params={"PatientID": "PID-98765", "StudyDate": "2020"})
        c.get("/pacs/PID-98765/dicomweb/studies")
    # The gateway's side only: httpx logs the client's own URLs.
    messages = [
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    ]
    assert any("503" in m for m in messages)
    assert any("400 InvalidQuery (PatientBirthDate)" in m for m in messages)
    for secret in ("PID-98765", "SMITH", "19991399"):
        assert not [m for m in messages if secret in m], secret
