"""QIDO-RS latency: the gateway, pooled and unpooled, against Orthanc's own DICOMweb.

Run from the repository root::

    .venv/bin/python -m bench.qido_latency            # full: 200 requests per point
    .venv/bin/python -m bench.qido_latency --quick    # 30 requests per point

What it does, all on 127.0.0.1 and in a fresh temporary folder:

1. generates the sample studies (``app.sampledata.sample_studies()``, 300 files)
   and the 300-slice benchmark CT series (``benchmark_ct()``), and loads them
   into an Orthanc of its own (``tests.peers.orthanc.OrthancPeer``: free ports,
   ``TCP_NODELAY=1`` in its environment, ``DefaultEncoding: Utf8``) in which
   the gateway's AE title ``DIMSEGW`` is registered;
2. starts the gateway as a separate process (``dimse-gateway serve --config``,
   so the load generator does not share its GIL) with two nodes on that same
   Orthanc: ``pooled`` (``max_associations = 4``) and ``unpooled``
   (``max_associations = 4``, ``reuse_associations = false``: one association
   per C-FIND).  One process serves both, so both see the same interpreter,
   event loop and thread pool;
3. for each query and concurrency (1, 8, 32 closed-loop clients on one async
   httpx client per target) sends the same requests to Orthanc's
   ``/dicom-web``, to ``/pacs/pooled/dicomweb`` and to
   ``/pacs/unpooled/dicomweb``, in rounds whose target order rotates (the
   machine is shared and noisy: only same-run comparisons mean anything), after
   a warm-up.  Every answer is checked: a non-2xx status, an exception or a
   wrong number of objects counts as an error.  Per round it also records the
   CPU time Orthanc and the gateway used, the C-FIND times the gateway logged,
   the DIMSE messages pynetdicom reported dropping, and (from ``/pacs`` every
   100 ms, gateway rounds only) the pool's use, to tell where the time goes;
4. writes a Markdown section into ``docs/benchmarks.md`` (between
   ``<!-- qido-latency:start -->`` and ``<!-- qido-latency:end -->``; the rest
   of the file is left alone) and the raw data to
   ``bench/results/qido_latency.json``.

Bounded: a fixed number of requests per point, a time budget per point and
target (a point that hits it is marked), and a per-request timeout.  Exit
status 1 when any request failed.  ``--from-json FILE`` rewrites the docs
section from a saved result without measuring; ``--orthanc-dicom-threads 4``
shows what Orthanc's default thread count does to a second node.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from app.sampledata import benchmark_ct, sample_studies, write_datasets
from bench.common import (
    DOC_INTRO,
    GATEWAY_AE,
    LOOPBACK,
    REPO,
    GatewayProcess,
    sh,
    write_doc_section,
)
from tests.peers.common import free_port
from tests.peers.orthanc import ORTHANC_BINARY, OrthancPeer, orthanc_available

DOC_PATH = REPO / "docs" / "benchmarks.md"
JSON_PATH = REPO / "bench" / "results" / "qido_latency.json"
MARK_START = "<!-- qido-latency:start -->"
MARK_END = "<!-- qido-latency:end -->"

ORTHANC_AET = "ORTHANC"
MAX_ASSOCIATIONS = 4
# Orthanc serves each open association from a pool of DicomThreadsCount (default 4)
# threads, and a thread waits up to 1 s on an association that sends nothing.  With
# the pooled node's 4 idle associations open, every other association (the unpooled
# node's, or any modality's C-ECHO) waited ~1 s: 16 gives both nodes room.
ORTHANC_DICOM_THREADS = 16
CONCURRENCY = (1, 8, 32)
TARGETS = ("orthanc", "pooled", "unpooled")
TARGET_LABEL = {
    "orthanc": "Orthanc QIDO",
    "pooled": "gateway pooled",
    "unpooled": "gateway unpooled",
}
# Aims of issue #2 (QIDO-RS over C-FIND).
AIM_RATIO = 1.5
AIM_CONCURRENCY = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")
# pynetdicom 3.0.4 logs this when its association reactor takes a DIMSE message meant
# for the running operation off the queue and drops it (a C-FIND then misses a match).
_UNEXPECTED_LINE = "Received unexpected"
_CFIND_LINE = re.compile(
    r"C-FIND (?P<node>\S+) level=(?P<level>\S+) status=0x(?P<status>[0-9A-F]{4}) "
    r"matches=(?P<matches>\d+)(?: \(cancelled\))? elapsed=(?P<ms>[\d.]+)ms"
)


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Query:
    key: str
    label: str
    path: str
    params: dict[str, str]
    # The level's unique key: every answer object holds it exactly once.
    unique_tag: str
    expected: int
    # Relative weight of the request count (the 300-instance query is ~50x heavier).
    share: float = 1.0

    def count(self, body: bytes) -> int:
        return body.count(b'"' + self.unique_tag.encode() + b'"')


@dataclass
class Mode:
    requests: int
    warmup: int
    point_budget_s: float
    request_timeout_s: float


MODES = {
    "full": Mode(requests=200, warmup=12, point_budget_s=150.0, request_timeout_s=60.0),
    "quick": Mode(requests=30, warmup=4, point_budget_s=40.0, request_timeout_s=60.0),
}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process, all threads (from /proc/PID/stat)."""
    if pid is None:
        return math.nan
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def gateway_process(workdir: Path, orthanc: OrthancPeer) -> GatewayProcess:
    """The gateway with two nodes in front of the same Orthanc: ``pooled``
    (the default) and ``unpooled`` (a new association per C-FIND)."""
    nodes = [
        {
            "name": name,
            "ae_title": orthanc.aet,
            "host": LOOPBACK,
            "port": orthanc.dicom_port,
            "max_associations": MAX_ASSOCIATIONS,
            "reuse_associations": reuse,
            **({"default": True} if name == "pooled" else {}),
        }
        for name, reuse in (("pooled", True), ("unpooled", False))
    ]
    return GatewayProcess(workdir, nodes=nodes, written_by="bench/qido_latency.py")


# --------------------------------------------------------------------------- measuring


@dataclass
class Chunk:
    """One round of one target at one point."""

    target: str
    round: int
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    capped: bool = False
    cpu_s: dict[str, float] = field(default_factory=dict)
    cfind_ms: list[float] = field(default_factory=list)
    pool_max_in_use: int | None = None
    pool_max_waiting: int | None = None
    dropped_messages: int = 0


async def _run_chunk(
    client: httpx.AsyncClient,
    url: str,
    query: Query,
    n: int,
    concurrency: int,
    deadline: float,
    chunk: Chunk,
) -> None:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            chunk.requests += 1
            started = time.perf_counter()
            try:
                response = await client.get(url, params=query.params)
                body = response.content
                elapsed = time.perf_counter() - started
            except Exception as exc:  # any failure is an error, and is counted
                chunk.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if not response.is_success:
                chunk.errors.append(f"HTTP {response.status_code}: {body[:200]!r}")
            elif (found := query.count(body)) != query.expected:
                chunk.errors.append(f"{found} objects instead of {query.expected}")
            else:
                chunk.latencies.append(elapsed)
        if remaining > 0:
            chunk.capped = True

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    chunk.wall_s = time.perf_counter() - started


async def _watch_pool(client: httpx.AsyncClient, node: str, chunk: Chunk) -> None:
    """Sample the pool state every 100 ms while a chunk runs (max in use, max waiting)."""
    while True:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            for entry in (await client.get("/pacs")).json():
                if entry["name"] == node:
                    pool = entry["pool"]
                    chunk.pool_max_in_use = max(chunk.pool_max_in_use or 0, pool["in_use"])
                    chunk.pool_max_waiting = max(chunk.pool_max_waiting or 0, pool["waiting"])
        await asyncio.sleep(0.1)


def _error_kinds(errors: Iterable[str]) -> dict[str, int]:
    """Errors grouped by kind (the message up to its first details)."""
    kinds: dict[str, int] = {}
    for error in errors:
        kind = re.sub(r"^(HTTP \d+).*?\"error\":\"(\w+)\".*$", r"\1 \2", error)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(chunks: Sequence[Chunk]) -> dict[str, Any]:
    lat = sorted(x for c in chunks for x in c.latencies)
    requests = sum(c.requests for c in chunks)
    wall = sum(c.wall_s for c in chunks)
    cfind = sorted(x for c in chunks for x in c.cfind_ms)
    cpu: dict[str, float] = {}
    for c in chunks:
        for who, seconds in c.cpu_s.items():
            cpu[who] = cpu.get(who, 0.0) + seconds
    in_use = [c.pool_max_in_use for c in chunks if c.pool_max_in_use is not None]
    waiting = [c.pool_max_waiting for c in chunks if c.pool_max_waiting is not None]
    ms = 1000.0
    return {
        "requests": requests,
        "ok": len(lat),
        "errors": sum(len(c.errors) for c in chunks),
        "error_samples": [e for c in chunks for e in c.errors][:5],
        "error_kinds": _error_kinds(e for c in chunks for e in c.errors),
        "dropped_messages": sum(c.dropped_messages for c in chunks),
        "capped": any(c.capped for c in chunks),
        "median_ms": statistics.median(lat) * ms if lat else math.nan,
        "p90_ms": _percentile(lat, 90) * ms,
        "p99_ms": _percentile(lat, 99) * ms,
        "min_ms": lat[0] * ms if lat else math.nan,
        "max_ms": lat[-1] * ms if lat else math.nan,
        "mean_ms": statistics.fmean(lat) * ms if lat else math.nan,
        "throughput_rps": requests / wall if wall else math.nan,
        "cpu_ms_per_request": {
            who: seconds * ms / requests for who, seconds in cpu.items() if requests
        },
        "cfind_count": len(cfind),
        "cfind_median_ms": statistics.median(cfind) if cfind else None,
        "cfind_p99_ms": _percentile(cfind, 99) if cfind else None,
        "pool_max_in_use": max(in_use) if in_use else None,
        "pool_max_waiting": max(waiting) if waiting else None,
        "rounds": [
            {
                "target": c.target,
                "round": c.round,
                "requests": c.requests,
                "errors": len(c.errors),
                "wall_s": round(c.wall_s, 3),
                "median_ms": round(statistics.median(c.latencies) * ms, 2) if c.latencies else None,
            }
            for c in chunks
        ],
        "latencies_ms": [round(x * ms, 3) for x in lat],
    }


def _rounds_for(n: int, concurrency: int) -> int:
    """Rounds per point: up to 5, each with at least two requests per client."""
    return max(1, min(5, n // (2 * concurrency)))


class Bench:
    def __init__(
        self,
        mode: Mode,
        orthanc: OrthancPeer,
        gateway: GatewayProcess,
        queries: Sequence[Query],
        concurrency: Sequence[int],
    ) -> None:
        self.mode = mode
        self.orthanc = orthanc
        self.gateway = gateway
        self.queries = queries
        self.concurrency = concurrency
        self.base = {
            "orthanc": orthanc.dicomweb_url,
            "pooled": f"{gateway.url}/pacs/pooled/dicomweb",
            "unpooled": f"{gateway.url}/pacs/unpooled/dicomweb",
        }
        self.results: list[dict[str, Any]] = []

    def _client(self, base_url: str) -> httpx.AsyncClient:
        limit = max(self.concurrency) * 2
        return httpx.AsyncClient(
            base_url=base_url,
            timeout=self.mode.request_timeout_s,
            trust_env=False,
            headers={"Accept": "application/dicom+json"},
            # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes
            # them: reusing one at that very moment fails with a ReadError (seen once).
            limits=httpx.Limits(
                max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=2.0
            ),
        )

    async def run(self) -> None:
        clients = {t: self._client(self.base[t]) for t in TARGETS}
        admin = self._client(self.gateway.url)
        try:
            await self._verify(clients)
            for query in self.queries:
                await self._warm_up(clients, query)
                for concurrency in self.concurrency:
                    await self._point(clients, admin, query, concurrency)
        finally:
            for c in (*clients.values(), admin):
                await c.aclose()

    async def _verify(self, clients: dict[str, httpx.AsyncClient]) -> None:
        """Each target answers each query with the expected objects (full JSON parse)."""
        for query in self.queries:
            for target in TARGETS:
                response = await clients[target].get(query.path, params=query.params)
                response.raise_for_status()
                objects = response.json()
                if len(objects) != query.expected or query.count(response.content) != len(objects):
                    raise RuntimeError(
                        f"{target} answered {query.key} with {len(objects)} objects, "
                        f"expected {query.expected}"
                    )
        _log("all targets give the expected answers")

    async def _warm_up(self, clients: dict[str, httpx.AsyncClient], query: Query) -> None:
        n = max(2, round(self.mode.warmup * query.share))
        for target in TARGETS:
            for concurrency in (1, MAX_ASSOCIATIONS * 2):
                chunk = Chunk(target, -1)
                await _run_chunk(
                    clients[target],
                    query.path,
                    query,
                    max(n, concurrency),
                    concurrency,
                    time.perf_counter() + self.mode.point_budget_s,
                    chunk,
                )
                if chunk.errors:
                    raise RuntimeError(f"warm-up {target} {query.key}: {chunk.errors[:3]}")

    async def _point(
        self,
        clients: dict[str, httpx.AsyncClient],
        admin: httpx.AsyncClient,
        query: Query,
        concurrency: int,
    ) -> None:
        n = max(1, round(self.mode.requests * query.share))
        rounds = _rounds_for(n, concurrency)
        per_round = max(math.ceil(n / rounds), concurrency)
        deadlines = {t: time.perf_counter() + self.mode.point_budget_s for t in TARGETS}
        chunks: dict[str, list[Chunk]] = {t: [] for t in TARGETS}
        started = time.monotonic()
        for r in range(rounds):
            order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
            for target in order:
                chunk = Chunk(target, r)
                await self._measure(
                    clients[target], admin, query, per_round, concurrency, chunk, deadlines[target]
                )
                chunks[target].append(chunk)
        summary = {t: summarize(chunks[t]) for t in TARGETS}
        self.results.append(
            {
                "query": query.key,
                "label": query.label,
                "path": query.path,
                "params": query.params,
                "objects": query.expected,
                "concurrency": concurrency,
                "rounds": rounds,
                "requests_per_round": per_round,
                "targets": summary,
            }
        )
        line = ", ".join(
            f"{t} {s['median_ms']:.1f}/{s['p99_ms']:.1f} ms ({s['errors']} err)"
            for t, s in summary.items()
        )
        _log(f"{query.key} c={concurrency}: {line} [{time.monotonic() - started:.0f} s]")

    async def _measure(
        self,
        client: httpx.AsyncClient,
        admin: httpx.AsyncClient,
        query: Query,
        n: int,
        concurrency: int,
        chunk: Chunk,
        deadline: float,
    ) -> None:
        pids = {
            "orthanc": self.orthanc.pid,
            "gateway": self.gateway.pid,
        }
        cpu0 = {who: _proc_cpu_s(pid) for who, pid in pids.items()}
        cpu0["loadgen"] = time.process_time()
        log_offset = self.gateway.log_size()
        watcher = None
        if chunk.target != "orthanc":
            watcher = asyncio.ensure_future(_watch_pool(admin, chunk.target, chunk))
        try:
            await _run_chunk(client, query.path, query, n, concurrency, deadline, chunk)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        cpu1 = {who: _proc_cpu_s(pid) for who, pid in pids.items()}
        cpu1["loadgen"] = time.process_time()
        chunk.cpu_s = {who: cpu1[who] - cpu0[who] for who in cpu0}
        if chunk.target != "orthanc":
            log_text = self.gateway.log_since(log_offset)
            chunk.dropped_messages = log_text.count(_UNEXPECTED_LINE)
            for match in _CFIND_LINE.finditer(log_text):
                if match["node"] == chunk.target:
                    chunk.cfind_ms.append(float(match["ms"]))


# --------------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model or platform.processor() or "unknown",
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
    }


def versions(orthanc: OrthancPeer) -> dict[str, str]:
    out = {"python": platform.python_version()}
    out["orthanc"] = sh([ORTHANC_BINARY, "--version"]).splitlines()[0]
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        out["orthanc_dicomweb"] = str(orthanc.rest_get("/plugins/dicom-web")["Version"])
    for package in ("pynetdicom", "pydicom", "fastapi", "uvicorn", "uvloop", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[package] = metadata.version(package)
    commit = sh(["git", "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "status", "--porcelain", "--", "app"])
    out["gateway_commit"] = commit + (" (app/ has uncommitted changes)" if dirty else "")
    return out


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    m, v, setup = report["machine"], report["versions"], report["setup"]
    lines = [
        MARK_START,
        "## QIDO-RS latency: gateway vs Orthanc's own DICOMweb",
        "",
        f"Written by `bench/qido_latency.py` on {report['date']}; command: "
        f"`{report['command']}` in `{report['cwd']}` ({report['mode']} mode, "
        f"{report['duration_s']:.0f} s).",
        "",
        "**Aims (issue #2):** the pooled gateway's median no worse than "
        f"**{AIM_RATIO}x** Orthanc's native QIDO on the same query, and "
        f"**{AIM_CONCURRENCY} concurrent clients served with no errors through "
        f"{MAX_ASSOCIATIONS} associations**.  Figures before the gateway existed "
        "(`/work/shared/PEERS.md`, same kind of machine): Orthanc QIDO "
        "`/studies?PatientID` about 5 ms median, all 5 studies about 20 ms; "
        "pynetdicom C-FIND on an open association 3-5 ms with TCP_NODELAY.",
        "",
        "Setup, all on 127.0.0.1: "
        f"Orthanc ({v.get('orthanc', '?')}, DICOMweb plugin {v.get('orthanc_dicomweb', '?')}) "
        "started by the script in a temporary folder with `TCP_NODELAY=1` in its environment, "
        f"`DicomThreadsCount: {setup['orthanc_dicom_threads']}` (see the note below), "
        "`DefaultEncoding: Utf8`, no storage fsync (ingest only), holding "
        f"{setup['instances']} instances in {setup['studies']} studies "
        "(`sample_studies()` plus the 300-slice `benchmark_ct()`).  The gateway runs as its "
        "own process (`dimse-gateway serve`, uvicorn, one worker, log level INFO) with two "
        f"nodes on that Orthanc: `pooled` (max_associations={MAX_ASSOCIATIONS}) and "
        f"`unpooled` (max_associations={MAX_ASSOCIATIONS}, reuse_associations=false: one "
        "association per C-FIND); one process serves both, so they share interpreter and "
        "thread pool.  Load generator: one async httpx client per target (keep-alive, "
        f"uvloop) in a third process, closed loop with 1, {max(CONCURRENCY) // 4} and "
        f"{max(CONCURRENCY)} clients; the three targets are measured in alternating rounds "
        "(order rotated each round) after a warm-up.  Latency = request sent to body "
        "fully read.  Every answer is checked (2xx and the expected number of objects).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, load average {m['loadavg_start'][0]:.2f} at start. "
        f"Python {v['python']}, pynetdicom {v.get('pynetdicom', '?')}, pydicom "
        f"{v.get('pydicom', '?')}, FastAPI {v.get('fastapi', '?')}, uvicorn "
        f"{v.get('uvicorn', '?')}, httpx {v.get('httpx', '?')}; gateway at "
        f"{v.get('gateway_commit', '?')}.",
        "",
        "Median / p99 in ms (nearest rank; n = requests per target and point):",
        "",
        "| query | clients | n | Orthanc QIDO | gateway pooled | gateway unpooled "
        "| pooled / Orthanc (median) | errors O/P/U |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["points"]:
        t = row["targets"]
        o, p, u = t["orthanc"], t["pooled"], t["unpooled"]
        ratio = p["median_ms"] / o["median_ms"] if o["median_ms"] else math.nan
        verdict = "" if ratio <= AIM_RATIO else " ✗"
        capped = " (time-capped)" if any(x["capped"] for x in t.values()) else ""
        lines.append(
            f"| {row['label']} | {row['concurrency']} | {o['requests']}{capped} "
            f"| {_fmt(o['median_ms'])} / {_fmt(o['p99_ms'])} "
            f"| {_fmt(p['median_ms'])} / {_fmt(p['p99_ms'])} "
            f"| {_fmt(u['median_ms'])} / {_fmt(u['p99_ms'])} "
            f"| {_fmt(ratio, 2)}x{verdict} | {o['errors']}/{p['errors']}/{u['errors']} |"
        )
    lines += [
        "",
        "Where the time goes: the gateway's C-FIND time as it logs it (send to final "
        "response, in a worker thread, including pynetdicom decoding the answers), "
        "and CPU per request (from /proc, all threads) of Orthanc and of the gateway "
        "process while each target was measured; throughput in requests/s.",
        "",
        "| query | clients | pooled C-FIND median | unpooled C-FIND median "
        "| CPU ms/req Orthanc: O / P / U | CPU ms/req gateway: P / U "
        "| req/s O / P / U | pooled assocs in use / waiting (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["points"]:
        t = row["targets"]
        o, p, u = t["orthanc"], t["pooled"], t["unpooled"]

        def cpu(s: dict[str, Any], who: str) -> str:
            return _fmt(s["cpu_ms_per_request"].get(who))

        lines.append(
            f"| {row['label']} | {row['concurrency']} "
            f"| {_fmt(p['cfind_median_ms'])} | {_fmt(u['cfind_median_ms'])} "
            f"| {cpu(o, 'orthanc')} / {cpu(p, 'orthanc')} / {cpu(u, 'orthanc')} "
            f"| {cpu(p, 'gateway')} / {cpu(u, 'gateway')} "
            f"| {_fmt(o['throughput_rps'], 0)} / {_fmt(p['throughput_rps'], 0)} / "
            f"{_fmt(u['throughput_rps'], 0)} "
            f"| {p['pool_max_in_use'] if p['pool_max_in_use'] is not None else '-'} / "
            f"{p['pool_max_waiting'] if p['pool_max_waiting'] is not None else '-'} |"
        )
    verdicts = report["verdicts"]
    lines += [
        "",
        "Against the aims:",
        "",
        f"- Pooled median within {AIM_RATIO}x of Orthanc: "
        f"{'**met**' if verdicts['ratio_met'] else '**not met**'}: within the aim at "
        f"{verdicts['ratio_points_met']} of {verdicts['ratio_points']} points"
        + (
            "; missed at " + ", ".join(verdicts["ratio_missed"]) + "."
            if verdicts["ratio_missed"]
            else "."
        ),
        f"- {AIM_CONCURRENCY} concurrent clients, no errors, through {MAX_ASSOCIATIONS} "
        f"associations: {'**met**' if verdicts['concurrency_met'] else '**not met**'} "
        f"({verdicts['concurrency_detail']}).",
        f"- Errors over the whole run: {verdicts['errors_total']} (all targets, warm-up "
        "excluded)"
        + (": " + "; ".join(verdicts["error_list"]) + "." if verdicts["error_list"] else "."),
        "- DIMSE messages pynetdicom dropped (its warning `Received unexpected ... service "
        f"message` in the gateway's log): {verdicts['dropped_messages']}.",
    ]
    if setup["orthanc_dicom_threads"] == ORTHANC_DICOM_THREADS:
        lines += [
            "",
            "Note on `DicomThreadsCount`: Orthanc serves open associations from a pool of "
            "that many threads (default 4), and a thread waits up to 1 s on an association "
            "that sends nothing.  While the pooled node kept its 4 associations open and "
            "idle, a 4-thread Orthanc made every other association wait about 1 s: the "
            "unpooled node's C-FINDs took 0.45-1 s instead of 6-20 ms, and a plain "
            "`echoscu` from another AE 0.8-1 s instead of 22 ms.  Hence 16 threads here "
            "(`--orthanc-dicom-threads 4` shows it); a deployment against a stock Orthanc "
            "needs `max_associations` below its `DicomThreadsCount`, minus what other "
            "DICOM clients use.",
        ]
    lines += [
        "",
        "Raw data (every latency, per-round medians, CPU, pool samples): "
        "`bench/results/qido_latency.json` (not committed).",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def _clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


def verdicts(points: Sequence[dict[str, Any]], pool_state: dict[str, Any]) -> dict[str, Any]:
    missed = []
    for row in points:
        t = row["targets"]
        ratio = t["pooled"]["median_ms"] / t["orthanc"]["median_ms"]
        if not ratio <= AIM_RATIO:
            missed.append(f"{row['label']} with {_clients(row['concurrency'])} ({ratio:.2f}x)")
    at_aim = [r for r in points if r["concurrency"] == AIM_CONCURRENCY]
    errors_aim = sum(r["targets"]["pooled"]["errors"] for r in at_aim)
    in_use = max((r["targets"]["pooled"]["pool_max_in_use"] or 0 for r in at_aim), default=0)
    pooled = pool_state.get("pooled", {})
    detail = (
        f"{errors_aim} errors over {sum(r['targets']['pooled']['requests'] for r in at_aim)} "
        f"requests at {AIM_CONCURRENCY} clients; at most {in_use} associations in use "
        f"(sampled every 100 ms); the pooled node opened {pooled.get('opened_total', '?')} "
        f"associations in the whole run"
    )
    return {
        "ratio_points": len(points),
        "ratio_points_met": len(points) - len(missed),
        "ratio_missed": missed,
        "ratio_met": not missed,
        "concurrency_met": bool(at_aim) and errors_aim == 0 and in_use <= MAX_ASSOCIATIONS,
        "concurrency_detail": detail,
        "errors_total": sum(r["targets"][t]["errors"] for r in points for t in TARGETS),
        "error_list": [
            f"{TARGET_LABEL[t]}, {r['label']} with {_clients(r['concurrency'])}: {n} x {kind}"
            for r in points
            for t in TARGETS
            for kind, n in r["targets"][t]["error_kinds"].items()
        ],
        "dropped_messages": sum(
            r["targets"][t]["dropped_messages"] for r in points for t in ("pooled", "unpooled")
        ),
    }


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    write_doc_section(path, section, MARK_START, MARK_END, DOC_INTRO)


# --------------------------------------------------------------------------- main


def _queries(loaded: dict[str, Any]) -> list[Query]:
    infos = list(loaded.values())
    ct = [i for i in infos if i.patient_id == "DGW0900"]
    ct_study, ct_series = ct[0].study_instance_uid, ct[0].series_instance_uid
    studies = {i.study_instance_uid for i in infos}
    return [
        Query(
            "study-by-patient",
            "`/studies?PatientID=DGW0002`",
            "/studies",
            {"PatientID": "DGW0002"},
            "0020000D",
            len({i.study_instance_uid for i in infos if i.patient_id == "DGW0002"}),
        ),
        Query("all-studies", "`/studies` (all)", "/studies", {}, "0020000D", len(studies)),
        Query(
            "series-of-study",
            "`/studies/{CT}/series`",
            f"/studies/{ct_study}/series",
            {},
            "0020000E",
            len({i.series_instance_uid for i in ct}),
        ),
        Query(
            "instances-of-series",
            "`/studies/{CT}/series/{CT}/instances` (300)",
            f"/studies/{ct_study}/series/{ct_series}/instances",
            {},
            "00080018",
            len(ct),
            # ~50x the work of the others: fewer requests keep the run to minutes.
            share=0.5,
        ),
    ]


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run

    def run(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.qido_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="30 requests per point")
    parser.add_argument("--requests", type=int, help="requests per point (overrides the mode)")
    parser.add_argument(
        "--orthanc-dicom-threads",
        type=int,
        default=ORTHANC_DICOM_THREADS,
        metavar="N",
        help=f"Orthanc's DicomThreadsCount (default {ORTHANC_DICOM_THREADS}; Orthanc's own "
        "default, 4, makes the unpooled node wait ~1 s per C-FIND behind the pooled "
        "node's idle associations)",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: rewrite the docs section from a saved result",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text(encoding="utf-8"))
        report["verdicts"] = verdicts(report["points"], report["pool_state_end"])
        section = render_markdown(report)
        if not args.no_doc:
            write_doc(section)
        print(section)
        return 0
    argv_used = list(sys.argv[1:] if argv is None else argv)

    if not orthanc_available():
        sys.exit("Orthanc and its DICOMweb plugin are needed (apt: orthanc orthanc-dicomweb)")
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    if args.requests:
        mode = Mode(args.requests, mode.warmup, mode.point_budget_s, mode.request_timeout_s)
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO)
    command = shlex.join([str(exe), "-m", "bench.qido_latency", *argv_used])

    began = time.monotonic()
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="qido-bench-"))
    orthanc: OrthancPeer | None = None
    gateway: GatewayProcess | None = None
    try:
        _log(f"generating data in {work}")
        files = write_datasets(sample_studies(), work / "data" / "sample")
        files += write_datasets(benchmark_ct(), work / "data" / "ct")
        orthanc = OrthancPeer(
            work / "orthanc",
            aet=ORTHANC_AET,
            modalities={GATEWAY_AE: (GATEWAY_AE, LOOPBACK, free_port())},
            extra_config={"DicomThreadsCount": args.orthanc_dicom_threads},
        )
        orthanc.start()
        loaded = orthanc.load(files)
        if len(loaded.loaded) != len(files):
            raise RuntimeError(
                f"Orthanc kept {len(loaded.loaded)} of {len(files)} files: "
                f"{list(loaded.refused.items())[:3]}"
            )
        _log(f"Orthanc holds {len(loaded.loaded)} instances (loaded in {loaded.seconds:.1f} s)")
        queries = _queries(orthanc.loaded)
        gateway = gateway_process(work / "gateway", orthanc)
        gateway.start()
        _log(f"gateway pid {gateway.pid} on {gateway.url}; Orthanc pid {orthanc.pid}")

        bench = Bench(mode, orthanc, gateway, queries, CONCURRENCY)
        _event_loop_runner()(bench.run())

        pool_state = {
            entry["name"]: entry["pool"]
            for entry in httpx.get(f"{gateway.url}/pacs", trust_env=False).json()
        }
        report: dict[str, Any] = {
            "benchmark": "qido_latency",
            "date": date,
            "command": command,
            "cwd": os.getcwd(),
            "mode": mode_name,
            "requests_per_point": mode.requests,
            "machine": machine,
            "versions": versions(orthanc),
            "setup": {
                "instances": len(orthanc.loaded),
                "studies": len({i.study_instance_uid for i in orthanc.loaded.values()}),
                "orthanc_env": {"TCP_NODELAY": "1"},
                "orthanc_dicom_threads": args.orthanc_dicom_threads,
                "orthanc_config": {
                    k: v
                    for k, v in orthanc.config().items()
                    if k not in ("StorageDirectory", "IndexDirectory", "Plugins")
                },
                "gateway_command": shlex.join(gateway.command),
                "gateway_config": gateway.config_text,
                "concurrency": list(CONCURRENCY),
            },
            "points": bench.results,
            "pool_state_end": pool_state,
        }
        machine["loadavg_end"] = list(os.getloadavg())
        report["verdicts"] = verdicts(bench.results, pool_state)
        report["duration_s"] = time.monotonic() - began
        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(report, indent=1), encoding="utf-8")
        section = render_markdown(report)
        if not args.no_doc:
            write_doc(section)
        print(section)
        _log(f"done in {report['duration_s']:.0f} s; raw data in {JSON_PATH}")
        return 0 if report["verdicts"]["errors_total"] == 0 else 1
    finally:
        if gateway is not None:
            gateway.stop()
            if args.keep:
                _log(f"gateway log: {gateway.log_path}")
        if orthanc is not None:
            orthanc.stop()
        if args.keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
