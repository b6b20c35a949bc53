"""Request ids in log lines (text and JSON), route templates for metrics, the
observed sink and the pool's operation reports, without a PACS."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydantic import ValidationError

from app.api.middleware import route_template
from app.config import PacsNode, Settings
from app.dimse.observed_sink import ObservedSink
from app.dimse.pool import AssociationPool
from app.dimse.storescp import IncomingInstance
from app.errors import PacsFailureStatus
from app.logs import JsonFormatter, RequestIdFilter, request_id
from app.metrics import Metrics, status_category


def _record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    record = logging.LogRecord("app.dimse.find", logging.INFO, __file__, 1, message, None, None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    RequestIdFilter().filter(record)
    return record


def test_json_lines_carry_the_request_id() -> None:
    token = request_id.set("abc-123")
    try:
        line = JsonFormatter().format(_record("C-FIND orthanc level=STUDY"))
    finally:
        request_id.reset(token)
    entry = json.loads(line)
    assert entry["request_id"] == "abc-123"
    assert entry["message"] == "C-FIND orthanc level=STUDY"
    assert entry["level"] == "INFO" and entry["logger"] == "app.dimse.find"
    assert entry["time"].endswith("+00:00")


def test_outside_a_request_the_id_is_null_and_exceptions_are_kept() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        entry = json.loads(JsonFormatter().format(_record("failed", exc)))
    assert entry["request_id"] is None
    assert "ValueError: boom" in entry["exception"]


def test_log_format_setting() -> None:
    assert Settings(work_dir=Path("/tmp")).log_format == "text"
    assert Settings(work_dir=Path("/tmp"), log_format="json").log_format == "json"
    with pytest.raises(ValidationError):
        Settings(work_dir=Path("/tmp"), log_format="xml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "params", "template"),
    [
        ("/dicomweb/studies", {}, "/dicomweb/studies"),
        (
            "/pacs/orthanc/dicomweb/studies/1.2.3",
            {"node": "orthanc", "study": "1.2.3"},
            "/pacs/{node}/dicomweb/studies/{study}",
        ),
        (
            "/dicomweb/studies/1.2/series/1.3/instances/1.4/frames/1,2/rendered",
            {"study": "1.2", "series": "1.3", "instance": "1.4", "frames": "1,2"},
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
        ),
        (
            "/dicomweb/studies/1.2/series/1.3/instances/1.4/bulkdata/00540016/0/00181072",
            {"study": "1.2", "series": "1.3", "instance": "1.4", "tag_path": "00540016/0/00181072"},
            "/dicomweb/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag_path}",
        ),
    ],
)
def test_route_templates(path: str, params: dict[str, str], template: str) -> None:
    assert route_template({"path": path, "path_params": params, "route": object()}) == template


def test_an_unrouted_path_is_one_label() -> None:
    assert route_template({"path": "/wp-admin/x", "path_params": {}}) == "unmatched"


def test_status_categories() -> None:
    assert [status_category(s) for s in (0x0000, 0xB000, 0xC000, 0xFE00, None)] == [
        "success",
        "warning",
        "failure",
        "cancel",
        "none",
    ]


class _Sink:
    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse

    def open(self, incoming: IncomingInstance) -> BinaryIO | int:
        return self.refuse if self.refuse is not None else io.BytesIO()

    def close(self, incoming: IncomingInstance, file: BinaryIO, ok: bool) -> int:
        return 0x0000 if ok else 0xA700


def _incoming() -> IncomingInstance:
    return IncomingInstance(
        calling_ae="ORTHANC",
        called_ae="DIMSEGW",
        peer_address="127.0.0.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        move_originator_ae="DIMSEGW",
        move_originator_message_id=7,
    )


def test_the_observed_sink_reports_each_store_with_its_status() -> None:
    seen: list[tuple[str, int | None]] = []

    def report(incoming: IncomingInstance, status: int | None, seconds: float) -> None:
        assert seconds >= 0
        seen.append((incoming.sop_instance_uid, status))

    sink = ObservedSink(_Sink(), report)
    inc = _incoming()
    file = sink.open(inc)
    assert not isinstance(file, int)
    assert sink.close(inc, file, ok=True) == 0
    file = sink.open(inc)
    assert not isinstance(file, int)
    assert sink.close(inc, file, ok=False) == 0xA700
    assert ObservedSink(_Sink(refuse=0x0124), report).open(inc) == 0x0124
    assert seen == [("1.2.3.4", 0), ("1.2.3.4", 0xA700), ("1.2.3.4", 0x0124)]


def test_the_pool_reports_operations_and_runs_them_in_the_callers_context() -> None:
    """run_observed reports status and time; the worker thread sees the caller's request id."""
    metrics = Metrics()
    node = PacsNode(name="n", ae_title="N", host="127.0.0.1", port=104)
    seen_ids: list[str | None] = []

    async def scenario() -> None:
        with ThreadPoolExecutor(2) as executor:
            pool = AssociationPool(node, calling_ae_title="GW", contexts=[], executor=executor)
            pool.observer = metrics.observe_dimse
            lease: Any = type("L", (), {"busy": None})()

            def ok(_lease: Any) -> int:
                seen_ids.append(request_id.get())
                assert threading.current_thread() is not threading.main_thread()
                return 0xB000

            def fails(_lease: Any) -> int:
                raise PacsFailureStatus("n", "C-FIND", 0xC001, None)

            request_id.set("req-7")
            assert await pool.run_observed(lease, ok, "C-MOVE", lambda s: s) == 0xB000
            with pytest.raises(PacsFailureStatus):
                await pool.run_observed(lease, fails, "C-FIND", lambda s: s)

    asyncio.run(scenario())
    assert seen_ids == ["req-7"]
    text = metrics.render().decode()
    assert (
        'dimse_gateway_dimse_operations_total{node="n",operation="C-MOVE",status="warning"} 1.0'
        in text
    )
    assert (
        'dimse_gateway_dimse_operations_total{node="n",operation="C-FIND",status="failure"} 1.0'
        in text
    )
    assert (
        'dimse_gateway_dimse_operation_duration_seconds_count{node="n",operation="C-MOVE"} 1.0'
        in text
    )


def test_registries_are_per_app() -> None:
    first, second = Metrics(), Metrics()
    first.observe_http("GET", "/health", 200, 0.01, 10)
    assert b'route="/health"' in first.render()
    assert b'route="/health"' not in second.render()
