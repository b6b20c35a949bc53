"""``dimse-gateway find`` and ``dimse-gateway get``: search and download through a gateway.

Exit codes: 0 done; 1 the gateway refused, or the retrieve failed or came
incomplete; 2 bad arguments; 3 the gateway could not be reached; 130
interrupted (the job is cancelled first).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydicom.datadict import tag_for_keyword
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from app.client.gateway import ClientError, GatewayClient
from app.client.multipart import MultipartError, MultipartReader, boundary_of

LEVELS = ("studies", "series", "instances")
# (heading, tag) per level: what a person scans a list for, UIDs last.
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "studies": [
        ("PatientName", "00100010"),
        ("PatientID", "00100020"),
        ("StudyDate", "00080020"),
        ("Modalities", "00080061"),
        ("StudyDescription", "00081030"),
        ("Series", "00201206"),
        ("Instances", "00201208"),
        ("StudyInstanceUID", "0020000D"),
    ],
    "series": [
        ("Modality", "00080060"),
        ("SeriesNumber", "00200011"),
        ("SeriesDescription", "0008103E"),
        ("Instances", "00201209"),
        ("SeriesInstanceUID", "0020000E"),
        ("StudyInstanceUID", "0020000D"),
    ],
    "instances": [
        ("InstanceNumber", "00200013"),
        ("SOPClassUID", "00080016"),
        ("SOPInstanceUID", "00080018"),
        ("SeriesInstanceUID", "0020000E"),
    ],
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_FINISHED = ("done", "failed", "cancelled")
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax={ts}'


# -- find ----------------------------------------------------------------------


def _tag(name: str) -> str | None:
    """8-hex tag of a keyword or tag as QIDO takes it; None for anything else."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return name.upper()
    tag = tag_for_keyword(name)
    return f"{tag:08X}" if tag is not None else None


def cell(attribute: dict[str, Any] | None) -> str:
    """A DICOM JSON attribute (PS3.18 F.2) as one line of text; values joined by ``\\``."""
    if not attribute:
        return ""
    out = []
    for value in attribute.get("Value", []):
        if isinstance(value, dict):
            # PN: the alphabetic group is what people read; sequences are not shown.
            value = value.get("Alphabetic", "") if "vr" not in value else "(sequence)"
        out.append("" if value is None else str(value))
    return "\\".join(out)


def columns_for(level: str, params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The level's columns, then any attribute the user matched on or asked to include."""
    columns = list(COLUMNS[level])
    known = {tag for _, tag in columns}
    names: list[str] = []
    for key, value in params:
        if key.lower() == "includefield":
            names.extend(v.strip() for v in value.split(",") if v.strip() != "all")
        elif key.lower() not in ("limit", "offset", "fuzzymatching"):
            names.append(key)
    for name in names:
        tag = _tag(name)
        if tag is not None and tag not in known:
            columns.append((name, tag))
            known.add(tag)
    return columns


def format_table(matches: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    rows = [[heading for heading, _ in columns]]
    rows += [[cell(match.get(tag)) for _, tag in columns] for match in matches]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def parse_keys(pairs: list[str]) -> list[tuple[str, str]]:
    params = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not KEY=VALUE (e.g. PatientName=DOE*)")
        params.append((key, value))
    return params


def find(
    client: GatewayClient,
    level: str,
    params: list[tuple[str, str]],
    *,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    matches, warnings = client.search(level, params)
    for text in warnings:
        print(f"warning: {text}", file=err)
    if as_json:
        print(json.dumps(matches, indent=2, ensure_ascii=False), file=out)
    elif matches:
        print(format_table(matches, columns_for(level, params)), file=out)
    if not matches:
        print("no matches", file=err)
    return 0


# -- get -----------------------------------------------------------------------


@dataclass
class _Bar:
    """Rich progress rows on stderr (one per stage: retrieving, downloading), or nothing."""

    progress: Progress | None
    tasks: dict[str, TaskID] = field(default_factory=dict)

    def update(
        self, stage: str, completed: int, total: int | None, detail: str = "", label: str = ""
    ) -> None:
        if self.progress is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(label or stage, total=total, detail=detail)
        self.progress.update(
            self.tasks[stage],
            description=label or stage,
            completed=completed,
            total=total,
            detail=detail,
        )


@contextmanager
def _progress(show: bool) -> Iterator[_Bar]:
    if not show:
        yield _Bar(None)
        return
    progress = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress:
        yield _Bar(progress)


def _job_detail(p: dict[str, Any]) -> str:
    parts = [f"{p['completed']} sent by the PACS"]
    if p["failed"]:
        parts.append(f"{p['failed']} failed")
    if p["warning"]:
        parts.append(f"{p['warning']} with warnings")
    return ", ".join(parts)


def _follow_job(client: GatewayClient, job: dict[str, Any], bar: _Bar) -> dict[str, Any]:
    state = job
    for state in client.follow(job):
        p = state["progress"]
        known = p["remaining"] is not None
        total = p["completed"] + p["failed"] + p["warning"] + (p["remaining"] or 0)
        phase = "converting" if state["phase"] == "convert" else "retrieving"
        bar.update(
            "job",
            p["received"],
            total if known or state["state"] in _FINISHED else None,
            _job_detail(p),
            label=phase,
        )
        if state["state"] in _FINISHED:
            break
    return state


def _job_failure(state: dict[str, Any]) -> ClientError:
    error = state.get("error")
    if state["state"] == "failed" and error:
        return ClientError(f"the job failed: {error.get('error')}: {error.get('message')}")
    p = state["progress"]
    return ClientError(
        f"the job was {state['state']} after {p['received']} instances "
        f"({p['completed']} completed, {p['failed']} failed, {p['remaining']} remaining)"
    )


def _instance_path(folder: Path, headers: dict[str, str], index: int) -> Path:
    """``folder/<series>/<sop>.dcm`` from the part's Content-Location; only UIDs make names."""
    location = headers.get("content-location", "")
    segments = location.rstrip("/").split("/")
    sop = segments[-1] if len(segments) > 1 and segments[-2] == "instances" else ""
    series = segments[segments.index("series") + 1] if "series" in segments[:-1] else ""
    name = f"{sop}.dcm" if _UID.match(sop) else f"instance-{index:05d}.dcm"
    return folder / series / name if _UID.match(series) else folder / name


def _download_dicom(
    client: GatewayClient,
    study: str,
    series: str | None,
    folder: Path,
    transfer_syntax: str,
    bar: _Bar,
    total: int | None,
    err: TextIO,
) -> int:
    path = f"{client.base}/studies/{study}" + (f"/series/{series}" if series else "")
    accept = DICOM_ACCEPT.format(ts=transfer_syntax)
    written = 0
    with client.stream("GET", path, headers={"Accept": accept}) as resp:
        for text in resp.headers.get_list("warning"):
            print(f"warning: {text}", file=err)
        reader = MultipartReader(resp.iter_bytes(), boundary_of(resp.headers["content-type"]))
        try:
            for part in reader.parts():
                target = _instance_path(folder, part.headers, written + 1)
                target.parent.mkdir(parents=True, exist_ok=True)
                # A file appears whole or not at all.
                temp = target.with_name(target.name + ".part")
                with open(temp, "wb") as fh:
                    for chunk in part.chunks():
                        fh.write(chunk)
                os.replace(temp, target)
                written += 1
                bar.update("downloading", written, total, "instances")
        except MultipartError as exc:
            raise ClientError(f"the gateway's answer broke off: {exc}; {written} written") from exc
    if not reader.complete:
        raise ClientError(
            f"the retrieve was incomplete: the gateway's answer ended without its closing "
            f"boundary after {written} instances (see the gateway's log)"
        )
    if resp.status_code == 206:
        raise ClientError(f"the gateway delivered part of what was asked: {written} instances")
    return written


def _download_file(client: GatewayClient, path: str, target: Path, bar: _Bar, **kw: Any) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".part")
    size = 0
    try:
        with client.stream("GET", path, **kw) as resp, open(temp, "wb") as fh:
            length = resp.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            for chunk in resp.iter_bytes():
                fh.write(chunk)
                size += len(chunk)
                kib = (total + 1023) // 1024 if total is not None else None
                bar.update("downloading", (size + 1023) // 1024, kib, "KiB")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return size


def get(
    client: GatewayClient,
    *,
    study: str,
    series: str | None,
    to: Path,
    transfer_syntax: str = "*",
    use_job: bool = True,
    echo: int | None = None,
    volume: int | None = None,
    show_progress: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    name = to.name.lower()
    nifti = name.endswith((".nii", ".nii.gz"))
    if nifti and series is None:
        raise ClientError("a NIfTI file holds one series: give --series")
    choice = {k: v for k, v in (("echo", echo), ("volume", volume)) if v is not None}
    if choice and not nifti:
        raise ClientError("--echo and --volume choose a NIfTI volume: give --to FILE.nii.gz")
    with _progress(show_progress) as bar:
        done = _get(client, study, series, to, transfer_syntax, use_job, choice, bar, err)
    # After the bar has gone: printing under a live display garbles it.
    print(done, file=out)
    return 0


def _get(
    client: GatewayClient,
    study: str,
    series: str | None,
    to: Path,
    transfer_syntax: str,
    use_job: bool,
    choice: dict[str, int],
    bar: _Bar,
    err: TextIO,
) -> str:
    nifti = to.name.lower().endswith((".nii", ".nii.gz"))
    compress = to.name.lower().endswith(".gz")
    job = None
    if use_job:
        body: dict[str, Any] = {"study": study, "series": series}
        if nifti:
            body |= {"nifti": True, "compress": compress, **choice}
        job = client.start_job(body)
        if job is None:
            print("this gateway has no jobs; downloading without progress counts", file=err)
    total: int | None = None
    if job is not None:
        try:
            state = _follow_job(client, job, bar)
        except KeyboardInterrupt:
            with suppress(ClientError):
                client.cancel(job["id"])
            raise
        if state["state"] != "done":
            raise _job_failure(state)
        if nifti:
            size = _download_file(client, f"/jobs/{job['id']}/result", to, bar)
            with suppress(ClientError):  # finished: this forgets the job and its file
                client.cancel(job["id"])
            return f"{to} ({size} bytes)"
        total = state["progress"]["received"]
    elif nifti:
        path = f"{client.base}/studies/{study}/series/{series}/nifti"
        params = {"compress": "true" if compress else "false", **choice}
        size = _download_file(client, path, to, bar, params=params)
        return f"{to} ({size} bytes)"
    to.mkdir(parents=True, exist_ok=True)
    written = _download_dicom(client, study, series, to, transfer_syntax, bar, total, err)
    return f"{to}: {written} instances"


def default_url() -> str:
    return os.environ.get("DIMSE_GATEWAY_URL", "http://127.0.0.1:8000")


def run(func: Any, *args: Any, **kwargs: Any) -> int:
    """Run a command, turning client errors into a message and an exit code."""
    try:
        code: int = func(*args, **kwargs)
        return code
    except ClientError as exc:
        print(f"dimse-gateway: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dimse-gateway: interrupted", file=sys.stderr)
        return 130
