"""WADO-RS retrieve through the gateway: cold (C-MOVE) and warm (cache) against the
native DIMSE ceiling and against Orthanc's own WADO-RS; peak memory of a 1 GB study.

Run from the repository root::

    .venv/bin/python -m bench.retrieve            # 9 interleaved rounds
    .venv/bin/python -m bench.retrieve --quick    # 2 rounds
    .venv/bin/python -m bench.retrieve --profile  # also py-spy the gateway (see below)

What it does, all on 127.0.0.1 and in a fresh temporary folder:

1. generates the 300-slice 512x512 CT series (``app.sampledata.benchmark_ct()``,
   about 158 MB) and a second study of 7 such series (other series UIDs, about
   1.1 GB) and loads both into an Orthanc of its own
   (``tests.peers.orthanc.OrthancPeer``: free ports, ``TCP_NODELAY=1`` in its
   environment, ``SyncStorageArea: false`` so that loading 1.1 GB takes seconds;
   it only affects ingest), in which ``DIMSEGW`` (the gateway's storage port),
   ``STORESCP`` and ``MOVESCU`` are registered;
2. runs the gateway as a separate process, ``dimse-gateway serve --config FILE``
   (a generated TOML: ``work_dir`` in the temporary folder, ``storage_host``
   127.0.0.1, ``log_level`` INFO, one node, the Orthanc) in a session of its own;
3. after one warm-up of each, runs interleaved rounds (target order rotated each
   round) of

   (a) gateway, cold cache: the gateway is stopped, ``work_dir/cache`` deleted,
       the gateway started again and given one request on the retrieve route with
       an invalid UID (400: it touches neither the cache nor the PACS, but FastAPI
       builds its route state on a process's first request, ~25 ms), all untimed; then
       ``GET /dicomweb/studies/{st}/series/{se}`` with
       ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``
       read to the end by ``curl -o /dev/null`` (time to first byte
       = curl's ``time_starttransfer``; MB/s = the series' file bytes / ``time_total``,
       the multipart body being 0.1 % larger);
   (b) gateway, warm cache: the same request again on the same process; checked
       to have caused no C-MOVE (the count of ``C-MOVE`` lines in the gateway log);
   (c) DCMTK ``movescu -S`` (``TCP_NODELAY=1``) of the series from Orthanc into
       DCMTK ``storescp -pdu 131072 -od DIR`` (writes files), timed as the wall
       time of the movescu process (this includes DCMTK's ~20 ms start-up);
   (d) Orthanc's own WADO-RS of the series (``/dicom-web/studies/{st}/series/{se}``,
       same Accept, same curl);

   every run is checked (HTTP 200 and the body size of a verified response, or
   movescu's exit status and 300 files written);
4. (e) peak memory: a fresh gateway process with an empty cache streams the
   7-series study (``GET /dicomweb/studies/{st}``, cold, then once more warm) to
   curl; VmHWM of ``/proc/PID/status`` is read after each request, VmRSS sampled
   every 20 ms during it, both summed over the gateway and its storage SCP child
   process (so the VmHWM figure is an upper bound of their joint peak); "gateway
   CPU" likewise counts both processes;
5. with ``--profile`` (py-spy must be in the venv: ``pip install py-spy``): three
   more cold and three warm series retrieves (``--profile-runs``) in each of two
   modes, each run with ``py-spy record --threads --subprocesses --rate 1000 --nonblocking``
   attached to the gateway process: *wall* (``--idle``: where each thread spends
   its time, waits included) and *GIL* (``--gil``: who holds the interpreter);
   raw collapsed stacks into ``bench/results/retrieve-pyspy-{wall,gil}-{cold,warm}.txt``,
   summarised as milliseconds per instance per thread and function, with the
   findings written out;
6. writes a Markdown section into ``docs/benchmarks.md`` between
   ``<!-- retrieve:start -->`` and ``<!-- retrieve:end -->`` (the rest of the file
   is left alone) and the raw data into ``bench/results/retrieve.json``.

Bounded: every request and process has a timeout; the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench.common import GATEWAY_AE, LOOPBACK, REPO
from bench.store_receive import _cpu_seconds, _log, _rotated

DOC_PATH = REPO / "docs" / "benchmarks.md"
RESULTS_PATH = REPO / "bench" / "results" / "retrieve.json"
MARK_START = "<!-- retrieve:start -->"
MARK_END = "<!-- retrieve:end -->"

STORESCP_AE = "STORESCP"
MOVESCU_AE = "MOVESCU"
NODE = "orthanc"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TARGETS = ("gateway", "movescu", "orthanc", "ceiling")  # gateway = cold then warm
KINDS = ("cold", "warm", "movescu", "orthanc", "ceiling")
# Series metadata (DICOM JSON): the gateway's first request after a cold retrieve
# (files cached, nothing encoded yet), its repeat, and Orthanc's plugin.
META_KINDS = ("meta_first", "meta_again", "orthanc_meta")
META_ACCEPT = "application/dicom+json"
LABEL = {
    "cold": "(a) gateway WADO-RS, cold cache (C-MOVE + stream)",
    "warm": "(b) gateway WADO-RS, warm cache",
    "movescu": "(c) DCMTK `movescu` -> `storescp -pdu 131072 -od DIR`",
    "orthanc": "(d) Orthanc WADO-RS",
    "ceiling": "(f) loopback ceiling: the same body from `bench/ceiling.py` (sendfile)",
    "meta_first": "gateway, first request after the cold retrieve",
    "meta_again": "gateway, the same request again",
    "orthanc_meta": "Orthanc DICOMweb plugin",
}
AIM_COLD_RATIO = 0.8  # cold gateway throughput / movescu-storescp throughput
AIM_WARM_RATIO = 2.0  # warm gateway throughput / Orthanc WADO-RS throughput
AIM_TTFB_MS = 150.0
AIM_RSS_MB = 300.0
BIG_SERIES = 7
BIG_ACCESSION = "ACC2025011510"
CURL_TIMEOUT = 300
# A C-MOVE's log line, or a C-GET's with a node configured `retrieve = "get"`.
_CMOVE_LINE = re.compile(
    r"C-(?:MOVE|GET) \S+ level=(?P<level>\S+) (?:-> \S+ )?status=0x(?P<status>[0-9A-F]{4}) "
    r"completed=(?P<completed>\d+) failed=(?P<failed>\d+) warning=\d+ "
    r"(?:.*? )?elapsed=(?P<ms>[\d.]+)ms"
)


def _status_kb(pid: int, key: str) -> int:
    """A ``kB`` value of /proc/PID/status (VmHWM, VmRSS), 0 when unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants: the gateway runs its storage SCP as a child."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            total += _cpu_seconds(member)
    return total


def _tree_kb(pid: int, key: str) -> int:
    """Sum of a /proc status value over a process and its descendants (for VmHWM
    an upper bound of the peak they reached together)."""
    return sum(_status_kb(member, key) for member in _tree(pid))


# --------------------------------------------------------------------------- the gateway


class GatewayProcess(common.GatewayProcess):
    """The gateway on one Orthanc node, restartable with an empty cache (same
    ports, same config).  ``node_options``: TOML lines added to the node."""

    def __init__(
        self,
        workdir: Path,
        orthanc_aet: str,
        orthanc_port: int,
        storage_port: int,
        node_options: Sequence[str] = (),
    ):
        node: dict[str, common.TomlValue] = {
            "name": NODE,
            "ae_title": orthanc_aet,
            "host": LOOPBACK,
            "port": orthanc_port,
            "default": True,
            "dimse_timeout": 120,
        }
        for option in node_options:
            node.update(tomllib.loads(option))
        super().__init__(
            workdir, nodes=[node], storage_port=storage_port, written_by="bench/retrieve.py"
        )

    def restart_empty(self, route: str = "") -> None:
        """Stop, delete ``work_dir/cache``, start a fresh process and warm it up."""
        self.stop()
        shutil.rmtree(self.work_dir / "cache", ignore_errors=True)
        self.start()
        self.warm_up(route)

    def warm_up(self, route: str = "") -> None:
        """One request through the series route (``route`` appended: ``/nifti``)
        that touches neither the cache nor the PACS (an invalid UID: 400), so that
        a cold run measures a cold cache, not a process's first request on that
        route (FastAPI builds a route's state lazily: 25-55 ms)."""
        url = f"{self.url}/dicomweb/studies/1.2.3/series/not-a-uid{route}"
        response = httpx.get(url, headers={"Accept": ACCEPT}, timeout=10, trust_env=False)
        if response.status_code != 400:
            raise RuntimeError(f"warm-up request: HTTP {response.status_code}, expected 400")

    def moves(self) -> list[dict[str, Any]]:
        """Every C-MOVE line the gateway logged so far."""
        return [m.groupdict() for m in _CMOVE_LINE.finditer(self.log_text())]


# --------------------------------------------------------------------------- clients


@dataclass
class CurlResult:
    status: int
    ttfb: float  # seconds to the first byte of the response
    total: float  # seconds to the last byte
    size: int  # body bytes


def curl_get(url: str, accept: str = ACCEPT) -> CurlResult:
    """GET ``url`` (the WADO-RS Accept by default), body to /dev/null."""
    cmd = [
        "curl",
        "-s",
        "--noproxy",
        "*",
        "-o",
        "/dev/null",
        "-H",
        f"Accept: {accept}",
        "--max-time",
        str(CURL_TIMEOUT),
        "-w",
        "%{http_code} %{time_starttransfer} %{time_total} %{size_download}",
        url,
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT + 10,
        check=False,
        env=common.clean_env(),
    )
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 4:
        raise RuntimeError(f"curl {url} failed ({out.returncode}): {out.stdout} {out.stderr}")
    return CurlResult(int(fields[0]), float(fields[1]), float(fields[2]), int(fields[3]))


def verify_multipart(url: str, expected: set[str]) -> int:
    """Read a whole response with httpx, check it holds one part per expected
    SOPInstanceUID and ends with the closing delimiter; the body size."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    response = httpx.get(url, headers={"Accept": ACCEPT}, timeout=CURL_TIMEOUT, trust_env=False)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    match = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"])
    if match is None:
        raise RuntimeError(f"{url}: no boundary in {response.headers['content-type']}")
    delimiter = b"--" + match.group(1).encode()
    body = response.content
    if not body.rstrip(b"\r\n").endswith(delimiter + b"--"):
        raise RuntimeError(f"{url}: the body does not end with the closing delimiter")
    seen: set[str] = set()
    for chunk in body.split(delimiter)[1:-1]:
        _head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        ds = dcmread(DicomBytesIO(payload[:-2]), stop_before_pixels=True)
        seen.add(str(ds.SOPInstanceUID))
    if seen != expected:
        raise RuntimeError(
            f"{url}: {len(seen)} instances, {len(seen & expected)} of {len(expected)} expected"
        )
    return len(body)


def verify_metadata(url: str, expected: set[str]) -> None:
    """Check a series metadata answer holds one object per expected instance."""
    response = httpx.get(
        url, headers={"Accept": META_ACCEPT}, timeout=CURL_TIMEOUT, trust_env=False
    )
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
    seen = {obj["00080018"]["Value"][0] for obj in response.json()}
    if seen != expected:
        raise RuntimeError(f"{url}: {len(seen & expected)} of {len(expected)} instances")


class RssSampler:
    """VmRSS of a process every ``interval`` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, _tree_kb(self.pid, "VmRSS")))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_kb(self) -> int:
        return max((kb for _, kb in self.samples), default=0)


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    kind: str  # cold, warm, movescu, orthanc
    round: int
    seconds: float
    ttfb: float | None = None
    body_bytes: int | None = None
    gateway_cpu: float | None = None
    orthanc_cpu: float | None = None
    move_ms: float | None = None  # the C-MOVE as the gateway logged it (cold runs)


@dataclass
class Report:
    rounds: int
    instances: int
    data_bytes: int
    runs: list[Run] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)

    def of(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]

    def seconds(self, kind: str) -> list[float]:
        return [r.seconds for r in self.of(kind)]


def _big_study(seed: str) -> tuple[str, list[Any]]:
    """7 CT series of 300 slices in one study, other UIDs than ``benchmark_ct()``."""
    from app.sampledata import PatientInfo, StudyInfo, ct_series, derive_uid

    patient = PatientInfo("DGW0901", "Bench^Study", "19800101", "O", "")
    study = StudyInfo(
        date="20250116",
        time="120000",
        accession_number=BIG_ACCESSION,
        study_id="9002",
        description="CT Benchmark, 7 series",
        referring_physician="",
    )
    study_uid = derive_uid(seed, "study", BIG_ACCESSION)

    def series(number: int) -> Any:
        return ct_series(
            patient=patient,
            study=study,
            study_uid=study_uid,
            series_number=number,
            slices=300,
            description=f"Benchmark series {number}",
            seed=seed,
        )

    return study_uid, [series(n) for n in range(1, BIG_SERIES + 1)]


PYSPY_RATE = 1000  # samples per second and thread: one sample = 1 ms of that thread


def _spy(pid: int, out: Path, duration: int, mode: str) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        _log("py-spy is not installed in the venv (pip install py-spy); no profile")
        return None
    cmd = [
        str(spy),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(PYSPY_RATE),
        # wall: every thread all the time (idle waits too); gil: only the GIL holder.
        "--idle" if mode == "wall" else "--gil",
        "--threads",
        "--subprocesses",
        "--format",
        "raw",
        "--duration",
        str(duration),
        "--output",
        str(out),
        "--nonblocking",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    return proc


_THREAD = re.compile(r"^thread \(\d+\): ")
# With --subprocesses every stack starts with its process.
_PROCESS = re.compile(r'^process \d+:"([^"]*)";')
CHILD = "storage SCP process: "


def _thread_group(name: str) -> str:
    """``storescp-127.0.0.1:41234`` -> ``storescp-127.0.0.1:N``, ``asyncio_3`` -> ``asyncio_N``."""
    return re.sub(r"\d+$", "N", name)


# Frames that only wrap a thread's whole life or pass a message on: left out of the
# per-function lists.
_WRAPPER_SHARE = 0.97
_WRAPPER = re.compile(
    r"\((threading\.py|concurrent/futures/thread\.py|asyncio/runners\.py|uvicorn/_compat\.py"
    r"|uvicorn/main\.py|uvicorn/server\.py|uvicorn/middleware/.*|app/cli\.py|dimse-gateway"
    r"|starlette/middleware/.*|starlette/_exception_handler\.py|starlette/routing\.py"
    r"|starlette/applications\.py|fastapi/middleware/.*|fastapi/telemetry/.*"
    r"|fastapi/applications\.py|anyio/_core/_tasks\.py)\)$"
    r"|^StreamingResponse\.__call__"
)


def summarise_profile(path: Path, instances: int, top: int = 40) -> dict[str, Any]:
    """Per thread group: ms per instance in total (one sample = 1000 / PYSPY_RATE ms of
    that thread) and the functions it spent them in, inclusive (the function and what
    it calls), from py-spy's collapsed stacks; frames present in nearly every sample
    of a thread (``Thread.run``, the event loop's ``run``) are left out."""
    per_sample_ms = 1000 / PYSPY_RATE / instances
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        role = ""
        while (process := _PROCESS.match(stack)) is not None:
            # The child's stacks carry the parent's process line first.
            role = CHILD if "app.dimse.storeproc" in process.group(1) else ""
            stack = stack[process.end() :]
        frames = _THREAD.sub("", stack).split(";")
        thread = role + _thread_group(frames[0])
        threads[thread] += count
        # One count per function and stack: recursion must not count twice.
        functions = {re.sub(r" \(([^:]*):\d+\)$", r" (\1)", f) for f in frames[1:]}
        bucket = inclusive.setdefault(thread, Counter())
        for function in functions:
            bucket[function] += count
    return {
        "threads_ms_per_instance": {
            t: round(c * per_sample_ms, 3) for t, c in threads.most_common()
        },
        "inclusive_ms_per_instance": {
            t: [
                (f, round(c * per_sample_ms, 3))
                for f, c in bucket.most_common()
                if c < _WRAPPER_SHARE * threads[t] and not _WRAPPER.search(f)
            ][:top]
            for t, bucket in inclusive.items()
        },
    }


def measure(args: argparse.Namespace) -> Report:
    from app.sampledata import DEFAULT_SEED, benchmark_ct, write_datasets
    from tests.peers.common import (
        StorescpPeer,
        dcmtk_available,
        dcmtk_env,
        dcmtk_tool,
        free_port,
        read_instance_info,
    )
    from tests.peers.orthanc import OrthancPeer, orthanc_available

    if not orthanc_available():
        raise SystemExit("Orthanc or its DICOMweb plugin is not installed")
    for tool in ("storescp", "movescu"):
        if not dcmtk_available(tool):
            raise SystemExit(f"DCMTK {tool} is not installed (apt: dcmtk)")
    for tool in ("curl",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-retrieve-")))
        _log(f"generating the CT series and the {BIG_SERIES}-series study in {work}")
        files = write_datasets(benchmark_ct(), work / "ct")
        study_uid_big, generators = _big_study(DEFAULT_SEED)
        big_files: list[Path] = []
        for number, generator in enumerate(generators, 1):
            big_files += write_datasets(generator, work / "big" / str(number))
        infos = [read_instance_info(p) for p in files]
        study, series = infos[0].study_instance_uid, infos[0].series_instance_uid
        expected = {i.sop_instance_uid for i in infos}
        big_expected = {read_instance_info(p).sop_instance_uid for p in big_files}

        storage_port, storescp_port = free_port(), free_port()
        modalities = {
            GATEWAY_AE: (GATEWAY_AE, LOOPBACK, storage_port),
            STORESCP_AE: (STORESCP_AE, LOOPBACK, storescp_port),
            MOVESCU_AE: (MOVESCU_AE, LOOPBACK, free_port()),
        }
        orthanc = OrthancPeer(work / "orthanc", modalities=modalities, sync_storage=False)
        stack.callback(orthanc.stop)
        _log("starting Orthanc and loading both studies")
        orthanc.start()
        t0 = time.monotonic()
        loaded = orthanc.load([*files, *big_files])
        load_s = time.monotonic() - t0
        if len(loaded.loaded) != len(files) + len(big_files):
            raise SystemExit(
                f"Orthanc kept {len(loaded.loaded)} of {len(files) + len(big_files)} files"
            )
        _log(f"loaded {len(loaded.loaded)} files in {load_s:.1f} s")
        assert orthanc.pid is not None
        orthanc_pid = orthanc.pid

        storescp = StorescpPeer(
            work / "storescp", aet=STORESCP_AE, port=storescp_port, extra_args=["-pdu", "131072"]
        )
        stack.callback(storescp.stop)
        storescp.start()
        received = storescp.output_dir

        gateway = GatewayProcess(
            work / "gateway", orthanc.aet, orthanc.dicom_port, storage_port, args.node_option
        )
        stack.callback(gateway.stop)

        movescu_cmd = [
            dcmtk_tool("movescu"),
            "-S",
            "-aet",
            MOVESCU_AE,
            "-aec",
            orthanc.aet,
            "-aem",
            STORESCP_AE,
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={study}",
            "-k",
            f"SeriesInstanceUID={series}",
            LOOPBACK,
            str(orthanc.dicom_port),
        ]
        series_path = f"/studies/{study}/series/{series}"
        gw_url = f"{gateway.url}/dicomweb{series_path}"
        orthanc_url = f"{orthanc.dicomweb_url}{series_path}"

        report = Report(
            rounds=args.rounds,
            instances=len(files),
            data_bytes=sum(p.stat().st_size for p in files),
        )
        report.setup = {
            "orthanc_version": orthanc.rest_get("/system").get("Version", "?"),
            "orthanc_load_seconds": round(load_s, 1),
            "gateway_command": shlex.join(gateway.command).replace(str(work), "$TMP"),
            "gateway_config": gateway.config_text.replace(str(work), "$TMP"),
            "movescu": shlex.join(movescu_cmd).replace(study, "$ST").replace(series, "$SE"),
            "storescp": shlex.join(storescp._command()).replace(str(work), "$TMP"),
            "curl": f"curl -s -o /dev/null -H 'Accept: {ACCEPT}' -w "
            "'%{http_code} %{time_starttransfer} %{time_total} %{size_download}' URL",
        }
        sizes: dict[str, int] = {}

        ceiling_port = free_port()
        ceiling = subprocess.Popen(
            [sys.executable, "-m", "bench.ceiling", "--port", str(ceiling_port), *map(str, files)],
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(ceiling.kill)
        assert ceiling.stdout is not None
        _log(ceiling.stdout.readline().strip())
        ceiling_url = f"http://127.0.0.1:{ceiling_port}/"

        def http_run(kind: str, url: str, round_number: int) -> Run:
            moves_before = len(gateway.moves())
            gw_cpu = _tree_cpu(gateway.pid) if gateway.process else 0.0
            or_cpu = _cpu_seconds(orthanc_pid)
            meta = kind in META_KINDS
            result = curl_get(url, META_ACCEPT if meta else ACCEPT)
            run = Run(kind, round_number, result.total, result.ttfb, result.size)
            run.orthanc_cpu = _cpu_seconds(orthanc_pid) - or_cpu
            if kind in ("cold", "warm", "meta_first", "meta_again"):
                run.gateway_cpu = _tree_cpu(gateway.pid) - gw_cpu
                new_moves = gateway.moves()[moves_before:]
                if kind != "cold" and new_moves:
                    raise RuntimeError(f"the warm request caused a C-MOVE: {new_moves}")
                if kind == "cold":
                    if len(new_moves) != 1 or int(new_moves[0]["completed"]) != len(files):
                        raise RuntimeError(f"cold request: C-MOVEs logged {new_moves}")
                    run.move_ms = float(new_moves[0]["ms"])
            if result.status != 200:
                raise RuntimeError(f"{kind}: HTTP {result.status}")
            if meta:
                return run
            key = kind if kind in ("orthanc", "ceiling") else "gateway"
            if result.size != sizes[key]:
                raise RuntimeError(f"{kind}: {result.size} body bytes, expected {sizes[key]}")
            return run

        def movescu_run(round_number: int) -> Run:
            for entry in received.iterdir():
                entry.unlink()
            or_cpu = _cpu_seconds(orthanc_pid)
            started = time.perf_counter()
            out = subprocess.run(
                movescu_cmd,
                env=dcmtk_env(),
                capture_output=True,
                text=True,
                timeout=CURL_TIMEOUT,
                check=False,
            )
            elapsed = time.perf_counter() - started
            count = sum(1 for entry in received.iterdir() if entry.is_file())
            if out.returncode != 0 or count != len(files):
                raise RuntimeError(
                    f"movescu: exit {out.returncode}, {count} files\n{out.stdout}{out.stderr}"
                )
            run = Run("movescu", round_number, elapsed)
            run.orthanc_cpu = _cpu_seconds(orthanc_pid) - or_cpu
            return run

        def gateway_pair(round_number: int) -> list[Run]:
            gateway.restart_empty()
            cold = http_run("cold", gw_url, round_number)
            meta = http_run("meta_first", f"{gw_url}/metadata", round_number)
            warm = http_run("warm", gw_url, round_number)
            again = http_run("meta_again", f"{gw_url}/metadata", round_number)
            return [cold, warm, meta, again]

        def orthanc_pair(round_number: int) -> list[Run]:
            wado = http_run("orthanc", orthanc_url, round_number)
            meta = http_run("orthanc_meta", f"{orthanc_url}/metadata", round_number)
            return [wado, meta]

        def show(run: Run) -> None:
            mb = report.data_bytes / 1e6
            ttfb = f", TTFB {run.ttfb * 1000:5.1f} ms" if run.ttfb is not None else ""
            cpu = f", gateway CPU {run.gateway_cpu * 1000:4.0f} ms" if run.gateway_cpu else ""
            move = f", C-MOVE {run.move_ms:.0f} ms" if run.move_ms else ""
            rate = "" if run.kind in META_KINDS else f"{mb / run.seconds:6.0f} MB/s"
            _log(
                f"round {run.round} {run.kind:12s} {run.seconds * 1000:7.0f} ms "
                f"{rate}{ttfb}{cpu}{move}"
            )

        _log("verifying the responses and warming up (one run of each)")
        gateway.restart_empty()
        sizes["orthanc"] = verify_multipart(orthanc_url, expected)
        sizes["gateway"] = verify_multipart(gw_url, expected)  # cold, through a C-MOVE
        verify_multipart(gw_url, expected)  # warm
        sizes["ceiling"] = verify_multipart(ceiling_url, expected)
        verify_metadata(f"{gw_url}/metadata", expected)
        verify_metadata(f"{orthanc_url}/metadata", expected)
        for run in [
            *gateway_pair(0),
            movescu_run(0),
            *orthanc_pair(0),
            http_run("ceiling", ceiling_url, 0),
        ]:
            show(run)

        if args.hold:
            # For experiments by hand: the peers stay up, the cache is warm.
            _log(
                f"holding (Ctrl-C ends): gateway {gw_url} (pid {gateway.pid}), "
                f"Orthanc {orthanc_url}"
            )
            _log(f"movescu: {shlex.join(movescu_cmd)}")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return report

        load_before = os.getloadavg()
        report.setup["load_before"] = load_before
        for round_number in range(1, args.rounds + 1):
            for target in _rotated(TARGETS, round_number):
                if target == "gateway":
                    runs = gateway_pair(round_number)
                elif target == "movescu":
                    runs = [movescu_run(round_number)]
                elif target == "orthanc":
                    runs = orthanc_pair(round_number)
                else:
                    runs = [http_run("ceiling", ceiling_url, round_number)]
                for run in runs:
                    report.runs.append(run)
                    show(run)
        report.setup["load_after_rounds"] = os.getloadavg()

        if args.profile:
            report.profile = profile_gateway(gateway, gw_url, len(files), args.profile_runs)

        _log(f"(e) peak memory: a fresh gateway streams the {BIG_SERIES}-series study")
        report.study = study_memory(gateway, study_uid_big, big_files, big_expected)
        report.setup["load_after"] = os.getloadavg()
        return report


def study_memory(
    gateway: GatewayProcess, study_uid: str, big_files: list[Path], expected: set[str]
) -> dict[str, Any]:
    data_bytes = sum(p.stat().st_size for p in big_files)
    url = f"{gateway.url}/dicomweb/studies/{study_uid}"
    gateway.restart_empty()
    pid = gateway.pid
    out: dict[str, Any] = {
        "series": BIG_SERIES,
        "instances": len(big_files),
        "data_bytes": data_bytes,
        "idle_rss_kb": _tree_kb(pid, "VmRSS"),
    }
    for kind in ("cold", "warm"):
        moves_before = len(gateway.moves())
        cpu = _tree_cpu(pid)
        with RssSampler(pid) as sampler:
            result = curl_get(url)
        moves = gateway.moves()[moves_before:]
        if result.status != 200 or result.size < data_bytes:
            raise RuntimeError(f"study {kind}: HTTP {result.status}, {result.size} bytes")
        if kind == "cold" and sum(int(m["completed"]) for m in moves) != len(big_files):
            raise RuntimeError(f"study cold: C-MOVEs logged {moves}")
        if kind == "warm" and moves:
            raise RuntimeError(f"study warm: C-MOVEs logged {moves}")
        out[kind] = {
            "seconds": result.total,
            "ttfb": result.ttfb,
            "body_bytes": result.size,
            "gateway_cpu": _tree_cpu(pid) - cpu,
            "vmhwm_kb": _tree_kb(pid, "VmHWM"),
            "sampled_peak_rss_kb": sampler.peak_kb,
            "rss_after_kb": _tree_kb(pid, "VmRSS"),
            "moves": len(moves),
            "move_ms": [float(m["ms"]) for m in moves],
        }
        _log(
            f"study {kind}: {result.total:.2f} s, {data_bytes / result.total / 1e6:.0f} MB/s, "
            f"TTFB {result.ttfb * 1000:.0f} ms, VmHWM {out[kind]['vmhwm_kb'] / 1024:.0f} MB, "
            f"{len(moves)} C-MOVEs"
        )
    # The body, parsed once (warm, after VmHWM was read), holds every instance.
    verify_multipart(url, expected)
    return out


def profile_gateway(gateway: GatewayProcess, url: str, instances: int, runs: int) -> dict[str, Any]:
    """py-spy record on the gateway during ``runs`` cold and ``runs`` warm series
    retrieves, once in wall mode (``--idle``: where each thread spends its time, waits
    included) and once in GIL mode (``--gil``: who holds the interpreter).  One
    py-spy per run: a cold run needs a fresh gateway process."""
    out: dict[str, Any] = {}
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    for mode in ("wall", "gil"):
        for kind in ("cold", "warm"):
            path = RESULTS_PATH.parent / f"retrieve-pyspy-{mode}-{kind}.txt"
            path.unlink(missing_ok=True)
            seconds: list[float] = []
            for number in range(runs):
                if kind == "cold" or number == 0:
                    gateway.restart_empty()
                    if kind == "warm":
                        curl_get(url)  # fill the cache, outside the profile
                part = path.with_suffix(f".{number}")
                spy = _spy(gateway.pid, part, duration=10, mode=mode)
                if spy is None:
                    return out
                result = curl_get(url)
                seconds.append(result.total)
                spy.send_signal(signal.SIGINT)  # stop sampling, write the file
                try:
                    _, stderr = spy.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    _, stderr = spy.communicate()
                if not part.exists():
                    _log(f"py-spy wrote nothing: {stderr.decode(errors='replace')[-500:]}")
                    return out
                with path.open("a", encoding="utf-8") as merged:
                    merged.write(part.read_text("utf-8", "replace"))
                part.unlink()
            out[f"{mode}-{kind}"] = {
                "mode": mode,
                "kind": kind,
                "runs": runs,
                "seconds": seconds,
                "file": str(path.relative_to(REPO)),
                **summarise_profile(path, instances * runs),
            }
            _log(
                f"profile {mode} {kind}: {', '.join(f'{s * 1000:.0f}' for s in seconds)} ms, "
                f"raw stacks in {path}"
            )
    return out


# --------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("dimse-gateway", "uvicorn", "fastapi", "starlette", "pydicom", "pynetdicom"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    from tests.peers.common import dcmtk_tool

    dcmtk = re.search(r"v(\d+\.\d+\.\d+)", common.sh([dcmtk_tool("movescu"), "--version"]))
    versions["dcmtk"] = dcmtk.group(1) if dcmtk else "?"
    versions["curl"] = [*common.sh(["curl", "--version"]).split(), "?", "?"][1]
    return versions


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _load(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def summary(report: Report) -> dict[str, Any]:
    mb = report.data_bytes / 1e6
    med = {k: statistics.median(report.seconds(k)) for k in KINDS}
    ttfb = [r.ttfb for r in report.of("cold") if r.ttfb is not None]
    by_round: dict[str, list[float]] = {"cold": [], "warm": []}
    for n in range(1, report.rounds + 1):
        t = {r.kind: r.seconds for r in report.runs if r.round == n}
        by_round["cold"].append(t["movescu"] / t["cold"])
        by_round["warm"].append(t["orthanc"] / t["warm"])
    return {
        "mb": mb,
        "median_s": med,
        "mb_s": {k: mb / v for k, v in med.items()},
        "cold_ratio": med["movescu"] / med["cold"],
        "warm_ratio": med["orthanc"] / med["warm"],
        "ratio_by_round": by_round,
        "cold_ttfb_ms": statistics.median(ttfb) * 1000,
        "warm_of_ceiling": med["ceiling"] / med["warm"],
        "ceiling_vs_orthanc": med["orthanc"] / med["ceiling"],
        "meta_median_s": {
            k: statistics.median(report.seconds(k)) for k in META_KINDS if report.of(k)
        },
        "study_vmhwm_mb": report.study["cold"]["vmhwm_kb"] / 1024 if report.study else None,
    }


def _ratio(value: float, aim: float) -> str:
    # Enough digits that a miss never reads as the aim itself (0.797 is not 0.80).
    return f"{value:.3f}" if abs(value - aim) < 0.005 else f"{value:.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(
    report: Report,
    command: str,
    started: _dt.datetime,
    duration: float,
    machine: dict[str, Any],
    versions: dict[str, str],
    code: str,
) -> str:
    s = summary(report)
    med = s["median_s"]
    setup = report.setup
    study = report.study
    lines = [
        MARK_START,
        "## WADO-RS retrieve: gateway cold and warm vs movescu/storescp and Orthanc WADO-RS",
        "",
        f"Written by `bench/retrieve.py` on {started:%Y-%m-%d %H:%M} UTC; "
        f"{machine['nproc']} vCPU {machine['cpu']}, {machine['memory_gib']} GiB, Linux "
        f"{machine['kernel']}; load average (1/5/15 min) {_load(machine['load_start'])} at the "
        f"start, {_load(setup['load_after'])} at the end; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; Orthanc {setup['orthanc_version']}; gateway code: {code}; command "
        f"`{command}` ({duration:.0f} s).",
        "",
        "| aim | result | |",
        "|---|---|---|",
        f"| cold gateway throughput >= {AIM_COLD_RATIO}x movescu->storescp | "
        f"**{_ratio(s['cold_ratio'], AIM_COLD_RATIO)}x** (per round "
        f"{min(s['ratio_by_round']['cold']):.2f} .. {max(s['ratio_by_round']['cold']):.2f}) | "
        f"{_verdict(s['cold_ratio'] >= AIM_COLD_RATIO)} |",
        f"| warm gateway throughput >= {AIM_WARM_RATIO:.0f}x Orthanc WADO-RS | "
        f"**{_ratio(s['warm_ratio'], AIM_WARM_RATIO)}x** (per round "
        f"{min(s['ratio_by_round']['warm']):.2f} .. {max(s['ratio_by_round']['warm']):.2f}) | "
        f"{_verdict(s['warm_ratio'] >= AIM_WARM_RATIO)} |",
        f"| cold time to first byte < {AIM_TTFB_MS:.0f} ms | **{s['cold_ttfb_ms']:.0f} ms** "
        f"(median) | {_verdict(s['cold_ttfb_ms'] < AIM_TTFB_MS)} |",
    ]
    if study:
        hwm = study["cold"]["vmhwm_kb"] / 1024
        lines.append(
            f"| gateway peak RSS streaming a {study['data_bytes'] / 1e9:.2f} GB study cold "
            f"< {AIM_RSS_MB:.0f} MB | **{hwm:.0f} MB** VmHWM | {_verdict(hwm < AIM_RSS_MB)} |"
        )
    lines += [
        "",
        f"Series: the 300-slice 512x512 CT of `benchmark_ct()` ({report.instances} files, "
        f"{s['mb']:.1f} MB), {report.rounds} interleaved rounds (order rotated each round) "
        "after one warm-up of each; MB/s = the series' file bytes / median time (the "
        "multipart bodies are 0.1 % larger).",
        "",
        "| run | median | min .. max | MB/s | TTFB median (min .. max) | gateway CPU "
        "| Orthanc CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        runs = report.of(kind)
        secs = [r.seconds for r in runs]
        ttfbs = [r.ttfb * 1000 for r in runs if r.ttfb is not None]
        ttfb = (
            f"{statistics.median(ttfbs):.1f} ms ({min(ttfbs):.1f} .. {max(ttfbs):.1f})"
            if ttfbs
            else "-"
        )
        gw = [r.gateway_cpu for r in runs if r.gateway_cpu is not None]
        oc = [r.orthanc_cpu for r in runs if r.orthanc_cpu is not None]
        lines.append(
            f"| {LABEL[kind]} | {_ms(med[kind])} ms | {_ms(min(secs))} .. {_ms(max(secs))} ms "
            f"| {s['mb_s'][kind]:.0f} | {ttfb} | "
            + (f"{_ms(statistics.median(gw))} ms" if gw else "-")
            + " | "
            + (f"{_ms(statistics.median(oc))} ms" if oc else "-")
            + " |"
        )
    move_ms = [r.move_ms for r in report.of("cold") if r.move_ms is not None]
    lines += [
        "",
        f"Warm against the ceiling: (f) sends the same bytes with nothing but `sendfile` "
        f"and took {_ms(med['ceiling'])} ms, {s['ceiling_vs_orthanc']:.2f}x Orthanc; the warm "
        f"gateway runs at {s['warm_of_ceiling'] * 100:.0f} % of that.  "
        f"{AIM_WARM_RATIO:.0f}x Orthanc means {_ms(med['orthanc'] / AIM_WARM_RATIO)} ms"
        + (
            ", which is below what this machine's loopback and curl allow."
            if med["orthanc"] / AIM_WARM_RATIO < med["ceiling"]
            else "."
        ),
    ]
    if s["meta_median_s"]:
        lines += [
            "",
            "Series metadata (`GET .../metadata`, `Accept: application/dicom+json`, "
            f"{report.instances} instances, curl), per round after the series' retrieves:",
            "",
            "| metadata | median | min .. max |",
            "|---|---|---|",
        ]
        for kind in META_KINDS:
            secs = report.seconds(kind)
            lines.append(
                f"| {LABEL[kind]} | {_ms(statistics.median(secs))} ms | {_ms(min(secs))} .. "
                f"{_ms(max(secs))} ms |"
            )
    lines += [
        "",
        "Times per round (ms): "
        + "; ".join(f"{k} " + ", ".join(_ms(x) for x in report.seconds(k)) for k in KINDS)
        + ".  The C-MOVE inside the cold runs, as the gateway logged it (C-MOVE-RQ to final "
        f"response): {', '.join(f'{m:.0f}' for m in move_ms)} ms.",
    ]
    if study:
        c, w = study["cold"], study["warm"]
        lines += [
            "",
            f"(e) Study of {study['series']} series ({study['instances']} files, "
            f"{study['data_bytes'] / 1e9:.2f} GB), `GET /dicomweb/studies/{{st}}` by curl on "
            "a fresh gateway process with an empty cache: "
            f"cold {c['seconds']:.2f} s ({study['data_bytes'] / c['seconds'] / 1e6:.0f} MB/s, "
            f"TTFB {c['ttfb'] * 1000:.0f} ms, {c['moves']} C-MOVEs, gateway CPU "
            f"{c['gateway_cpu']:.1f} s), VmHWM **{c['vmhwm_kb'] / 1024:.0f} MB** (RSS idle "
            f"before {study['idle_rss_kb'] / 1024:.0f} MB, sampled peak "
            f"{c['sampled_peak_rss_kb'] / 1024:.0f} MB, after {c['rss_after_kb'] / 1024:.0f} "
            f"MB); then warm {w['seconds']:.2f} s "
            f"({study['data_bytes'] / w['seconds'] / 1e6:.0f} MB/s), VmHWM after it "
            f"{w['vmhwm_kb'] / 1024:.0f} MB.",
        ]
    lines += [
        "",
        "Setup, all on 127.0.0.1: Orthanc (Debian) started by the script with "
        "`TCP_NODELAY=1` in its environment and `SyncStorageArea: false` (ingest only; "
        f"loading both studies took {setup['orthanc_load_seconds']} s).  The gateway runs as "
        f"`{setup['gateway_command']}` in a session of its own, with its storage SCP in a "
        "child process (gateway CPU and memory count both); before every cold run it is "
        "stopped, `work_dir/cache` deleted, the process started again and given one "
        "request on the retrieve route with an invalid UID (400, no cache, no PACS: FastAPI "
        "builds its route state on a process's first request, ~25 ms), none of it timed.  "
        f"HTTP client: `{setup['curl']}` (TTFB = `time_starttransfer`, time = `time_total`).  "
        f"Native ceiling: `TCP_NODELAY=1 {setup['movescu']}` into `{setup['storescp']}` "
        "(TCP_NODELAY=1), timed as the movescu process's wall time, which includes DCMTK's "
        "~20 ms start-up.  Ceiling (f): `python -m bench.ceiling` in a process of its own, "
        "one thread per connection, the body's part headers from `app.dicomweb.multipart`.  "
        "Checks: every HTTP answer 200 with the body size of a response "
        "verified by parsing (300 parts, the expected SOPInstanceUIDs, closing delimiter); "
        "each cold run logged exactly one C-MOVE with 300 completed sub-operations and each "
        "warm run none; each movescu run exit 0 and 300 files.",
        "",
    ]
    if report.profile:
        lines += profile_lines(report.profile)
    lines += [MARK_END, ""]
    return "\n".join(lines)


def profile_lines(profile: dict[str, Any], top: int = 7) -> list[str]:
    lines = [
        f"py-spy `record --threads --subprocesses --rate {PYSPY_RATE} --nonblocking` on the "
        "gateway process and its storage SCP child (`--profile`), in ms per instance; "
        "*wall* (`--idle`): where a thread "
        "spends its time, waits for the network, the disk and the GIL included; *GIL* "
        "(`--gil`): who holds the interpreter.  Functions are inclusive; the raw "
        "collapsed stacks are in `bench/results/`.",
        "",
    ]
    for data in profile.values():
        runs = ", ".join(_ms(x) for x in data["seconds"])
        lines.append(f"- {data['mode']}, {data['kind']} ({data['runs']} runs: {runs} ms):")
        for thread, ms in data["threads_ms_per_instance"].items():
            busy = "storescp-1" in thread or thread == "MainThread"
            if data["mode"] == "wall" and not busy:
                continue  # idle threads: their wall time is the recording's length
            if ms < 0.02:
                continue
            functions = data["inclusive_ms_per_instance"].get(thread, [])[:top]
            # In wall mode the event loop's total is the recording's length.
            total = "" if data["mode"] == "wall" and thread == "MainThread" else f" {ms:.2f}"
            lines.append(
                f"  - `{thread}`{total}: "
                + "; ".join(f"`{name}` {value:.2f}" for name, value in functions)
            )
    lines.append("")
    return lines


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    """Replace our section of ``path`` (or append it), leaving the rest alone.  The
    file is read right before writing: other scripts write their own sections."""
    text = path.read_text(encoding="utf-8") if path.exists() else common.DOC_INTRO
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(MARK_END) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def render_saved(path: Path, *, write: bool) -> int:
    """The Markdown section of a saved ``retrieve.json`` (same numbers, current wording)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    report = Report(
        rounds=data["rounds"],
        instances=data["instances"],
        data_bytes=data["data_bytes"],
        runs=[Run(**run) for run in data["runs"]],
        setup=data["setup"],
        study=data["study"],
        profile=data["profile"],
    )
    section = render(
        report,
        data["command"],
        _dt.datetime.fromisoformat(data["started"]),
        data["duration_s"],
        data["machine"],
        data["versions"],
        data["code"],
    )
    print(section)
    if write:
        write_doc(section)
        _log(f"wrote {DOC_PATH}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 9")
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds (default 9, --quick 2)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the gateway on cold and warm runs"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="after the warm-up, keep Orthanc and the gateway up for experiments; no report",
    )
    parser.add_argument(
        "--profile-runs", type=int, default=3, help="cold and warm runs profiled (default 3)"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--node-option",
        action="append",
        default=[],
        metavar="TOML",
        help="a line added to the node's configuration, e.g. 'expected_instances = \"counts\"'",
    )
    parser.add_argument(
        "--render-json",
        type=Path,
        help="no measuring: write the section again from a results file of this script",
    )
    args = parser.parse_args(argv)
    if args.render_json:
        return render_saved(args.render_json, write=not args.no_doc)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 9
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    started = _dt.datetime.now(_dt.UTC)
    machine = common.machine()
    versions = _versions()
    code = common.code()
    t0 = time.monotonic()
    report = measure(args)
    duration = time.monotonic() - t0
    if args.hold:
        return 0
    command = shlex.join([".venv/bin/python", "-m", "bench.retrieve", *(argv or sys.argv[1:])])
    section = render(report, command, started, duration, machine, versions, code)
    print(section)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "command": command,
                "duration_s": duration,
                "machine": machine,
                "versions": versions,
                "code": code,
                "summary": summary(report),
                **asdict(report),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    _log(f"wrote {RESULTS_PATH}")
    if not args.no_doc:
        write_doc(section)
        _log(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
