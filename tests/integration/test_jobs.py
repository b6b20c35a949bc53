"""Retrieve jobs end to end: the real gateway in front of Orthanc.

A job's events are read off the wire as a browser's EventSource would see
them; the truth for counts is the files Orthanc was loaded with.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import main
from app.runtime import Gateway
from app.sampledata import ct_series, sample_patients, write_datasets
from tests.gateway_server import (
    GatewayServer,
    free_port,
    gateway_settings,
    local_node,
    partial_files,
)
from tests.integration.conftest import GATEWAY_AE
from tests.integration.test_nifti_http_cases import STUDY as ECHO_STUDY
from tests.integration.test_nifti_http_cases import _multi_echo
from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = pytest.mark.integration

_FIELD = re.compile(r"^(id|event|data): ?.*$")


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-jobs"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def runtime(gw: GatewayServer) -> Gateway:
    state: Gateway = gw.app.state.gateway
    return state


def files_of(peer: OrthancPeer, *, study: str, series: str | None = None) -> set[str]:
    return {
        i.sop_instance_uid
        for i in peer.loaded.values()
        if i.study_instance_uid == study and (series is None or i.series_instance_uid == series)
    }


def sample_series(peer: OrthancPeer, patient_id: str) -> tuple[str, str]:
    """(study, series) of the largest series of a sample patient."""
    counts: dict[tuple[str, str], int] = {}
    for i in peer.loaded.values():
        if i.patient_id == patient_id:
            key = (i.study_instance_uid, i.series_instance_uid)
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: counts[k])


def read_events(resp: httpx.Response) -> list[tuple[str, dict[str, Any], int]]:
    """(event, data, id) of every message, checking the framing strictly: fields
    one per line, messages separated by one blank line, comments allowed."""
    text = resp.read().decode()
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        for line in lines:
            assert _FIELD.match(line), line
        fields = dict(line.split(": ", 1) for line in lines)
        out.append((fields["event"], json.loads(fields["data"]), int(fields["id"])))
    return out


def follow(gw: GatewayServer, job_id: str, **headers: str) -> list[tuple[str, dict[str, Any], int]]:
    with httpx.stream("GET", f"{gw.url}/jobs/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        return read_events(r)


def start(gw: GatewayServer, body: dict[str, Any], base: str | None = None) -> dict[str, Any]:
    resp = httpx.post(f"{base or gw.dicomweb}/jobs", json=body, timeout=10)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    assert resp.headers["location"] == f"/jobs/{job['id']}"
    return job


def test_series_job_events_arrive_in_order_and_end_done(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series = sample_series(orthanc_peer, "DGW0001")
    expected = files_of(orthanc_peer, study=study, series=series)
    moves = runtime(gateway).retriever.moves_started
    job = start(gateway, {"study": study, "series": series})
    assert job["state"] in ("queued", "running")
    assert job["links"]["events"] == f"/jobs/{job['id']}/events"

    events = follow(gateway, job["id"])
    ids = [seq for _, _, seq in events]
    assert ids == list(range(1, len(ids) + 1)), "every change, in order, none missing"
    names = [name for name, _, _ in events]
    assert names[:-1] == ["progress"] * (len(events) - 1) and names[-1] == "end"
    order = {"queued": 0, "running": 1, "done": 2}
    states = [order[data["state"]] for _, data, _ in events]
    assert states == sorted(states)
    for key in ("completed", "received"):
        counts = [data["progress"][key] for _, data, _ in events]
        assert counts == sorted(counts), f"{key} went backwards: {counts}"
    middle = [d["progress"]["received"] for _, d, _ in events if d["state"] == "running"]
    assert any(0 < n < len(expected) for n in middle), "no progress was reported on the way"
    pending = [d["progress"]["remaining"] for _, d, _ in events if d["state"] == "running"]
    assert any(r is not None and r > 0 for r in pending), "no C-MOVE remaining count was seen"
    final = events[-1][1]
    assert final["state"] == "done"
    assert final["progress"] == {
        "remaining": 0,
        "completed": len(expected),
        "failed": 0,
        "warning": 0,
        "received": len(expected),
    }
    assert httpx.get(f"{gateway.url}/jobs/{job['id']}", timeout=5).json()["state"] == "done"

    # The prefetch filled the cache: WADO-RS now starts no move.
    retrieved = httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{series}", timeout=60)
    assert retrieved.status_code == 200
    assert retrieved.content.count(b"Content-Location:") == len(expected)
    assert runtime(gateway).retriever.moves_started == moves + 1

    # A late reader gets the whole history; Last-Event-ID resumes after a seen event.
    assert follow(gateway, job["id"]) == events
    assert follow(gateway, job["id"], **{"Last-Event-ID": str(len(events) - 1)}) == events[-1:]


def test_study_job_prefetches_every_series_in_one_move(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, _ = sample_series(orthanc_peer, "DGW0002")
    expected = files_of(orthanc_peer, study=study)
    loaded = orthanc_peer.loaded.values()
    series = {i.series_instance_uid for i in loaded if i.study_instance_uid == study}
    assert len(series) > 1
    moves = runtime(gateway).retriever.moves_started
    job = start(gateway, {"study": study}, base=f"{gateway.url}/pacs/orthanc/dicomweb")
    final = follow(gateway, job["id"])[-1][1]
    assert final["state"] == "done", final
    assert final["progress"]["completed"] == final["progress"]["received"] == len(expected)
    assert runtime(gateway).retriever.moves_started == moves + 1
    for uid in series:
        resp = httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{uid}", timeout=60)
        assert resp.status_code == 200
    assert runtime(gateway).retriever.moves_started == moves + 1, "a series was moved again"

    again = start(gateway, {"study": study})
    final = follow(gateway, again["id"])[-1][1]
    assert final["state"] == "done" and final["cached"] is True
    assert final["progress"]["received"] == len(expected)
    assert runtime(gateway).retriever.moves_started == moves + 1


def test_nifti_job_result_is_the_series_volume(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series = sample_series(orthanc_peer, "DGW0003")
    job = start(gateway, {"study": study, "series": series, "nifti": True})
    assert job["links"]["result"] == f"/jobs/{job['id']}/result"
    events = follow(gateway, job["id"])
    phases = [d["phase"] for _, d, _ in events]
    assert "convert" in phases and phases.index("convert") > phases.index("retrieve")
    assert events[-1][1]["state"] == "done", events[-1]
    result = httpx.get(f"{gateway.url}/jobs/{job['id']}/result", timeout=60)
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/gzip"
    assert re.search(r'filename="[^"]+\.nii\.gz"', result.headers["content-disposition"])
    direct = httpx.get(f"{gateway.dicomweb}/studies/{study}/series/{series}/nifti", timeout=60)
    assert direct.status_code == 200
    assert gzip.decompress(result.content) == gzip.decompress(direct.content)

    # Forgetting a finished job deletes its file.
    path = next((runtime(gateway).settings.work_dir / "jobs").glob(f"{job['id']}*"))
    assert httpx.delete(f"{gateway.url}/jobs/{job['id']}", timeout=5).status_code == 204
    assert not path.exists()
    assert httpx.get(f"{gateway.url}/jobs/{job['id']}", timeout=5).status_code == 404


def test_job_requests_that_cannot_work_are_refused_with_reasons(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    study, series = sample_series(orthanc_peer, "DGW0001")
    post = f"{gateway.dicomweb}/jobs"
    resp = httpx.post(post, json={"study": study, "nifti": True}, timeout=5)
    assert resp.status_code == 400 and "series" in resp.json()["message"]
    resp = httpx.post(post, json={"study": "1.2.x"}, timeout=5)
    assert resp.status_code == 400 and resp.json()["parameter"] == "study"
    resp = httpx.post(post, json={"series": series}, timeout=5)
    assert resp.status_code == 400 and "study" in resp.json()["message"]
    resp = httpx.post(f"{gateway.url}/pacs/nope/dicomweb/jobs", json={"study": study}, timeout=5)
    assert resp.status_code == 404 and resp.json()["error"] == "UnknownNode"
    assert httpx.get(f"{gateway.url}/jobs/0123", timeout=5).status_code == 404

    # A study the PACS does not hold: the job fails and says why.
    missing = start(gateway, {"study": "1.2.3.4.5.6.7.8.9"})
    final = follow(gateway, missing["id"])[-1][1]
    assert final["state"] == "failed"
    assert final["error"]["error"] == "NotFound" and "no series" in final["error"]["message"]

    # A retrieve job has no file to download.
    job = start(gateway, {"study": study, "series": series})
    follow(gateway, job["id"])
    resp = httpx.get(f"{gateway.url}/jobs/{job['id']}/result", timeout=5)
    assert resp.status_code == 409 and resp.json()["error"] == "JobNotReady"


# ---------------------------------------------------------------- cancelling a move

BIG_STUDY = "2.25.777000222"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayServer, OrthancPeer]]:
    """An Orthanc of its own with one 150-slice 512x512 CT (a move long enough to
    stop) and a three-echo MR series (three NIfTI volumes)."""
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    files = write_datasets(
        ct_series(
            patient=sample_patients()["ascii"],
            study_uid=BIG_STUDY,
            series_number=3,
            slices=150,
            rows=512,
            cols=512,
            seed="jobs-cancel",
        ),
        tmp_path_factory.mktemp("big-ct"),
    )
    files += write_datasets(_multi_echo(), tmp_path_factory.mktemp("multi-echo"))
    storage_port = free_port()
    peer = OrthancPeer(
        tmp_path_factory.mktemp("orthanc-big"),
        modalities={GATEWAY_AE: (GATEWAY_AE, "127.0.0.1", storage_port)},
    )
    peer.start()
    try:
        peer.load(files)
        settings = gateway_settings(
            tmp_path_factory.mktemp("gw-big"),
            local_node("orthanc", peer.aet, peer.dicom_port, default=True, dimse_timeout=10),
            storage_port=storage_port,
        )
        with GatewayServer(settings) as gw:
            yield gw, peer
    finally:
        peer.stop()


def _wait(predicate: Any, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_cancel_stops_the_move_and_keeps_no_partial_series(
    big: tuple[GatewayServer, OrthancPeer],
) -> None:
    gw, peer = big
    series = next(i for i in peer.loaded.values() if i.study_instance_uid == BIG_STUDY)
    series_uid = series.series_instance_uid
    total = sum(i.series_instance_uid == series_uid for i in peer.loaded.values())
    assert total == 150
    job = start(gw, {"study": BIG_STUDY, "series": series_uid})
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{gw.url}/jobs/{job['id']}/events", timeout=60) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["progress"]["received"] >= 3:
                    break
        cancelled = httpx.delete(f"{gw.url}/jobs/{job['id']}", timeout=30)
        assert cancelled.status_code == 200, cancelled.text
        for line in lines:  # the stream goes on to its end event
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    body = cancelled.json()
    assert body["state"] == "cancelled"
    assert events[-1]["state"] == "cancelled"
    p = body["progress"]
    assert 3 <= p["received"] < total, "C-CANCEL should have stopped the PACS early"
    assert p["completed"] < total

    rt: Gateway = gw.app.state.gateway
    assert _wait(lambda: not rt.retriever._fetches), "the move was not stopped"
    assert _wait(lambda: not partial_files(rt.cache.root / "tmp")), "a partial file was left"
    assert rt.cache.series(series_uid) is None, "a cancelled move is not a complete series"
    assert httpx.get(f"{gw.url}/pacs", timeout=5).json()[0]["pool"]["in_use"] == 0
    # Cancelling a finished job forgets it; cancelling twice is harmless.
    assert httpx.delete(f"{gw.url}/jobs/{job['id']}", timeout=5).status_code == 204

    again = start(gw, {"study": BIG_STUDY, "series": series_uid})
    final = follow(gw, again["id"])[-1][1]
    assert final["state"] == "done"
    assert final["progress"]["received"] == final["progress"]["completed"] == total


def test_nifti_job_of_a_multi_echo_series_needs_a_choice(
    big: tuple[GatewayServer, OrthancPeer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw, peer = big
    series = next(
        i.series_instance_uid for i in peer.loaded.values() if i.study_instance_uid == ECHO_STUDY
    )
    body = {"study": ECHO_STUDY, "series": series, "nifti": True}
    unchosen = follow(gw, start(gw, body)["id"])[-1][1]
    assert unchosen["state"] == "failed"
    assert unchosen["error"]["error"] == "InvalidRequest"
    assert (
        "3 volumes" in unchosen["error"]["message"]
        and "_e1, _e2, _e3" in unchosen["error"]["message"]
    )

    job = start(gw, {**body, "echo": 2})
    final = follow(gw, job["id"])[-1][1]
    assert final["state"] == "done" and final["echo"] == 2
    result = httpx.get(f"{gw.url}/jobs/{job['id']}/result", timeout=60)
    assert result.status_code == 200
    assert '_e2.nii.gz"' in result.headers["content-disposition"]
    direct = httpx.get(
        f"{gw.dicomweb}/studies/{ECHO_STUDY}/series/{series}/nifti", params={"echo": 2}, timeout=60
    )
    assert direct.status_code == 200
    assert gzip.decompress(result.content) == gzip.decompress(direct.content)

    # The same through the command-line client.
    get = ["get", "--url", gw.url, "--study", ECHO_STUDY, "--series", series]
    assert main([*get, "--to", str(tmp_path / "me.nii.gz")]) == 1
    assert "3 volumes" in capsys.readouterr().err
    assert main([*get, "--echo", "2", "--to", str(tmp_path / "e2.nii.gz")]) == 0
    assert gzip.decompress((tmp_path / "e2.nii.gz").read_bytes()) == gzip.decompress(direct.content)

    missing = follow(gw, start(gw, {**body, "volume": 9})["id"])[-1][1]
    assert missing["state"] == "failed" and missing["error"]["error"] == "NotFound"
    assert "volume=9" in missing["error"]["message"]
    refused = httpx.post(f"{gw.dicomweb}/jobs", json={"study": ECHO_STUDY, "echo": 1}, timeout=5)
    assert refused.status_code == 400 and "nifti" in refused.json()["message"]


# ---------------------------------------------------------------- bounds and expiry


@pytest.fixture
def silent_pacs() -> Iterator[int]:
    """A port that accepts TCP connections and never answers an A-ASSOCIATE-RQ:
    a job on it stays running as long as the test needs (a real PACS cannot
    be made to hang like this)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_jobs_are_bounded_queued_heartbeated_and_expire(silent_pacs: int, tmp_path: Path) -> None:
    settings = gateway_settings(
        tmp_path,
        local_node("silent", "SILENT", silent_pacs, default=True, acse_timeout=3),
        storage_port=free_port(),
    ).model_copy(
        update={"jobs_max": 2, "jobs_concurrency": 1, "jobs_ttl": 1.0, "jobs_heartbeat": 0.2}
    )
    with GatewayServer(settings) as gw:
        first = start(gw, {"study": "1.2.3", "series": "1.2.3.4"})
        second = start(gw, {"study": "1.2.3", "series": "1.2.3.5"})
        refused = httpx.post(f"{gw.dicomweb}/jobs", json={"study": "1.2.3"}, timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"] == "TooManyJobs" and refused.headers["retry-after"]
        assert _wait(lambda: httpx.get(f"{gw.url}/jobs/{first['id']}").json()["state"] == "running")
        assert httpx.get(f"{gw.url}/jobs/{second['id']}").json()["state"] == "queued"
        listed = httpx.get(f"{gw.url}/jobs", timeout=5).json()
        assert [j["id"] for j in listed] == [first["id"], second["id"]]

        # A quiet stream carries heartbeat comments; a client that leaves stops
        # its stream, not the job.
        with httpx.stream("GET", f"{gw.url}/jobs/{first['id']}/events", timeout=10) as resp:
            seen: list[str] = []
            for line in resp.iter_lines():
                seen.append(line)
                if seen.count(": heartbeat") >= 2:
                    break
        assert seen[0].startswith("id: ") and "event: progress" in seen
        assert httpx.get(f"{gw.url}/jobs/{first['id']}").json()["state"] == "running"

        queued = httpx.delete(f"{gw.url}/jobs/{second['id']}", timeout=10).json()
        assert queued["state"] == "cancelled" and queued["started"] is None
        running = httpx.delete(f"{gw.url}/jobs/{first['id']}", timeout=20).json()
        assert running["state"] == "cancelled"

        # Finished jobs are forgotten after jobs_ttl and make room for new ones.
        assert _wait(lambda: httpx.get(f"{gw.url}/jobs/{first['id']}").status_code == 404, 5)
        assert httpx.get(f"{gw.url}/jobs", timeout=5).json() == []
        start(gw, {"study": "1.2.3"})
