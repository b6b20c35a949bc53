"""Soak: 20 clients search and retrieve through a gateway process for minutes while
its PACS (Orthanc) is restarted twice.

Run from the repository root::

    .venv/bin/python -m bench.soak                 # 5 minutes, 20 clients, 2 restarts
    .venv/bin/python -m bench.soak --minutes 1     # while developing

What it does, all on 127.0.0.1 and in a fresh temporary folder:

1. generates the sample studies (``app.sampledata.sample_studies()``: 4 patients,
   6 studies, 7 series, 300 files) and a "tail" of small CT series for one more
   patient (one 10-slice series generated, cloned under new UIDs), loads all of
   it into an Orthanc of its own (``tests.peers.orthanc.OrthancPeer``) in which
   the gateway's AE title is registered, and writes down what every search and
   retrieve must answer: the UIDs, and per instance the length and CRC-32 of the
   data set as stored (the bytes after the file meta information);
2. runs the gateway as a separate process (``dimse-gateway serve --config``)
   with a small cache (``cache_max_bytes`` 64 MiB, below the data set: the
   least recently used tail series are evicted and come back cold) and a
   short ``idle_timeout``;
3. runs ``--clients`` threads (one ``httpx.Client`` each) for ``--minutes``:
   QIDO searches with known answers, series retrieves (hot sample series, and
   tail series in turn at one every ``--tail-interval`` seconds so that each
   comes back after its eviction), single-instance retrieves, and retrieves
   the client abandons after a few hundred kilobytes; Orthanc is stopped
   and started again on the same ports at one third (SIGTERM: it shuts down
   in order) and two thirds (SIGKILL: whatever is in flight is cut) of the run;
4. samples every second the gateway process and its storage SCP child
   (``/proc/PID/fd`` count, VmRSS), the pool state from ``/pacs`` and the
   established TCP connections from the gateway to Orthanc's DICOM port
   (``/proc/net/tcp``: the PACS side of the associations);
5. after the load it waits for the idle associations to expire and checks:
   no wrong answer (a complete body or a 200 search that differs from what is
   expected in any UID, length or checksum), errors only while Orthanc was
   restarting (from its stop until a few seconds after it answers again) and
   only 502/503/504 with a JSON message, no association, connection or file
   descriptor more than before the load, RSS growth within bounds, nothing left
   in the cache's temp folder;
6. writes a Markdown section into ``docs/benchmarks.md`` between
   ``<!-- soak:start -->`` and ``<!-- soak:end -->`` and the raw data into
   ``bench/results/soak.json``.  Exit status 1 when a check failed.

Bounded: every request has a timeout, the run a fixed duration, each restart a
time limit.  Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bench.common import (
    GATEWAY_AE,
    LOOPBACK,
    REPO,
    GatewayProcess,
    code,
    machine,
    sh,
    write_doc_section,
)

DOC_PATH = REPO / "docs" / "benchmarks.md"
RESULTS_PATH = REPO / "bench" / "results" / "soak.json"
MARK_START = "<!-- soak:start -->"
MARK_END = "<!-- soak:end -->"
NODE = "orthanc"
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
TAIL_PATIENT_ID = "DGW0009"
# Seconds after Orthanc answers again during which errors still count as the
# restart's: idle associations to the old process are found dead and replaced.
RESTART_GRACE = 3.0
# Pool settings of the soak's node: short idle time so the settle phase is short.
IDLE_TIMEOUT = 5.0
MAX_ASSOCIATIONS = 4
CACHE_BYTES = 64 * 1024 * 1024
# RSS may grow this much between the last sample before the first restart and
# the end (allocator arenas, sqlite page cache); a leak per request grows without bound.
RSS_SLACK_KB = 30 * 1024


# --------------------------------------------------------------------------- expected answers


@dataclass(frozen=True)
class Part:
    sop: str
    length: int  # bytes of the data set after the file meta information
    crc: int


@dataclass
class SeriesInfo:
    study: str
    series: str
    patient_id: str
    parts: dict[str, Part]
    tail: bool

    @property
    def size(self) -> int:
        return sum(p.length for p in self.parts.values())


def dataset_bytes(data: bytes | memoryview) -> memoryview:
    """The data set of a Part 10 file: what follows the file meta group (PS3.10 7.1)."""
    view = memoryview(data)
    if bytes(view[128:132]) != b"DICM" or bytes(view[132:136]) != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta Information Group Length")
    group_length = int.from_bytes(view[140:144], "little")
    return view[144 + group_length :]


def part_of(data: bytes | memoryview, sop: str) -> Part:
    body = dataset_bytes(data)
    return Part(sop, len(body), zlib.crc32(body))


def tail_datasets(count: int, slices: int, seed: str) -> Iterator[Dataset]:
    """``count`` small CT series of one patient: one generated, the rest clones under
    new UIDs (generating pixel data is the slow part; the soak needs many series)."""
    from app.sampledata import PatientInfo, ct_series

    patient = PatientInfo(TAIL_PATIENT_ID, "Soak^Tail", "19700101", "O", "")
    template = list(
        ct_series(
            patient=patient,
            study_uid=generate_uid(entropy_srcs=[seed, "tail-study"]),
            series_number=1,
            slices=slices,
            rows=256,
            cols=256,
            seed=seed,
        )
    )
    per_study = 4
    for index in range(count):
        study = generate_uid(entropy_srcs=[seed, "tail-study", str(index // per_study)])
        series = generate_uid(entropy_srcs=[seed, "tail-series", str(index)])
        for n, original in enumerate(template):
            ds = copy.deepcopy(original)
            sop = generate_uid(entropy_srcs=[seed, "tail-sop", str(index), str(n)])
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SeriesNumber = index + 1
            ds.StudyID = str(index // per_study + 1)
            ds.AccessionNumber = f"SOAK{index // per_study + 1:03d}"
            yield ds


@dataclass
class Expected:
    series: dict[str, SeriesInfo] = field(default_factory=dict)

    @property
    def hot(self) -> list[SeriesInfo]:
        return [s for s in self.series.values() if not s.tail]

    @property
    def tail(self) -> list[SeriesInfo]:
        return [s for s in self.series.values() if s.tail]

    def studies(self, patient_id: str | None = None) -> set[str]:
        return {
            s.study
            for s in self.series.values()
            if patient_id is None or s.patient_id == patient_id
        }

    def series_of(self, study: str) -> set[str]:
        return {s.series for s in self.series.values() if s.study == study}

    def searches(self) -> list[tuple[str, dict[str, str], str, set[str]]]:
        """(path, params, the UID tag each answer carries, the UIDs expected)."""
        out: list[tuple[str, dict[str, str], str, set[str]]] = [
            ("/studies", {}, "0020000D", self.studies())
        ]
        for pid in sorted({s.patient_id for s in self.series.values()}):
            out.append(("/studies", {"PatientID": pid}, "0020000D", self.studies(pid)))
        for study in sorted({s.study for s in self.hot}):
            out.append((f"/studies/{study}/series", {}, "0020000E", self.series_of(study)))
        for s in self.hot:
            out.append(
                (
                    f"/studies/{s.study}/series/{s.series}/instances",
                    {},
                    "00080018",
                    set(s.parts),
                )
            )
        return out


def prepare_data(folder: Path, tail_series: int, tail_slices: int, seed: str) -> Expected:
    from pydicom import dcmread

    from app.sampledata import sample_studies, write_datasets

    paths = write_datasets(sample_studies(seed=seed), folder / "sample")
    tail_paths = write_datasets(tail_datasets(tail_series, tail_slices, seed), folder / "tail")
    expected = Expected()
    for path, tail in [(p, False) for p in paths] + [(p, True) for p in tail_paths]:
        data = path.read_bytes()
        ds = dcmread(path, stop_before_pixels=True)
        info = expected.series.setdefault(
            str(ds.SeriesInstanceUID),
            SeriesInfo(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID), {}, tail
            ),
        )
        info.parts[str(ds.SOPInstanceUID)] = part_of(data, str(ds.SOPInstanceUID))
    return expected


# --------------------------------------------------------------------------- processes


def gateway_process(
    workdir: Path, orthanc_aet: str, orthanc_port: int, storage_port: int
) -> GatewayProcess:
    """The gateway with one node in front of the soak's Orthanc: a small cache
    (evictions happen), short idle time and time-outs (restarts show quickly)."""
    node = {
        "name": NODE,
        "ae_title": orthanc_aet,
        "host": LOOPBACK,
        "port": orthanc_port,
        "default": True,
        "max_associations": MAX_ASSOCIATIONS,
        "idle_timeout": IDLE_TIMEOUT,
        "dimse_timeout": 15,
        "acquire_timeout": 30,
    }
    return GatewayProcess(
        workdir,
        nodes=[node],
        gateway={"cache_max_bytes": CACHE_BYTES},
        storage_port=storage_port,
        written_by="bench/soak.py",
    )


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_targets(pid: int) -> list[str]:
    """What the open descriptors point at, sockets and pipes without their inode."""
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(re.sub(r"\[\d+\]", "", os.readlink(f"/proc/{pid}/fd/{fd}")))
    return sorted(out)


def rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def established_to(port: int) -> int:
    """Established TCP connections whose remote port is ``port`` (any local process:
    on this machine only the gateway connects to the soak's Orthanc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


# --------------------------------------------------------------------------- one request


@dataclass
class Record:
    client: int
    kind: str  # search, series, instance, abandon
    target: str
    started: float
    ended: float = 0.0
    status: int = 0
    outcome: str = ""  # ok, wrong, incomplete, error, abandoned
    detail: str = ""
    cold: bool | None = None
    nbytes: int = 0


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


def check_multipart(
    body: bytes, content_type: str, series: SeriesInfo, only: str | None = None
) -> tuple[str, str]:
    """``(outcome, detail)`` of a multipart retrieve body against what it must hold."""
    match = _BOUNDARY.search(content_type)
    if not match:
        return "wrong", f"no boundary in {content_type!r}"
    delimiter = b"--" + match.group(1).encode()
    complete = body.rstrip(b"\r\n").endswith(delimiter + b"--")
    chunks = body.split(delimiter)
    seen: list[str] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, rest = chunk.partition(b"\r\n\r\n")
        if not sep:
            if complete:
                return "wrong", "a part without headers"
            break  # cut inside the headers of the last part
        headers = dict(
            line.split(": ", 1)
            for line in head.decode("latin-1").strip().split("\r\n")
            if ": " in line
        )
        location = headers.get("Content-Location", "")
        sop = location.rsplit("/", 1)[-1]
        length = int(headers.get("Content-Length", "-1"))
        data = rest[:length] if length >= 0 else rest.removesuffix(b"\r\n")
        if len(data) < length or not rest[length:].startswith(b"\r\n"):
            if complete:
                return "wrong", f"part {sop}: Content-Length {length}, {len(rest)} bytes"
            break  # the last part of an unterminated body
        want = series.parts.get(sop)
        if want is None or (only is not None and sop != only):
            return "wrong", f"unexpected instance {sop}"
        try:
            got = part_of(data, sop)
        except ValueError as exc:
            return "wrong", f"part {sop}: {exc}"
        if got != want:
            return (
                "wrong",
                f"part {sop}: {got.length} bytes crc {got.crc:08x}, "
                f"expected {want.length} crc {want.crc:08x}",
            )
        seen.append(sop)
    if len(seen) != len(set(seen)):
        return "wrong", "an instance sent twice"
    wanted = {only} if only else set(series.parts)
    if complete:
        if set(seen) != wanted:
            return "wrong", f"complete body with {len(seen)} of {len(wanted)} instances"
        return "ok", ""
    return "incomplete", f"unterminated body after {len(seen)} of {len(wanted)} instances"


def _error_body_ok(response: httpx.Response) -> bool:
    with contextlib.suppress(ValueError):
        body = response.json()
        return isinstance(body, dict) and bool(body.get("message"))
    return False


class Client(threading.Thread):
    def __init__(self, soak: Soak, index: int) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.soak = soak
        self.index = index
        self.rng = random.Random(f"{soak.args.seed}-{index}")
        self.records: list[Record] = []

    def run(self) -> None:
        with httpx.Client(
            base_url=self.soak.gateway.url + "/dicomweb", timeout=60, trust_env=False
        ) as http:
            while not self.soak.stopping.is_set():
                record = self.one(http)
                record.ended = time.monotonic()
                self.records.append(record)
                self.soak.stopping.wait(self.rng.uniform(0.0, 0.3))

    def one(self, http: httpx.Client) -> Record:
        roll = self.rng.random()
        soak = self.soak
        if roll < 0.35:
            path, params, tag, want = self.rng.choice(soak.searches)
            record = Record(
                self.index, "search", f"{path} {params or ''}".strip(), time.monotonic()
            )
            self.search(http, record, path, params, tag, want)
            return record
        tail = soak.next_tail()
        series = tail or self.rng.choice(soak.expected.hot)
        url = f"/studies/{series.study}/series/{series.series}"
        if roll < 0.45 and tail is None:
            sop = self.rng.choice(sorted(series.parts))
            record = Record(self.index, "instance", f"{url}/instances/{sop}", time.monotonic())
            self.retrieve(http, record, series, f"{url}/instances/{sop}", only=sop)
        elif roll < 0.55 and tail is None:
            record = Record(self.index, "abandon", url, time.monotonic())
            self.abandon(http, record, series, url)
        else:
            record = Record(self.index, "series", url, time.monotonic())
            self.retrieve(http, record, series, url)
        return record

    def search(
        self,
        http: httpx.Client,
        record: Record,
        path: str,
        params: dict[str, str],
        tag: str,
        want: set[str],
    ) -> None:
        try:
            response = http.get(path, params=params, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            record.outcome, record.detail = "error", f"{type(exc).__name__}: {exc}"
            return
        record.status = response.status_code
        record.nbytes = len(response.content)
        if response.status_code != 200:
            record.outcome = "error"
            record.detail = (
                response.text[:200]
                if _error_body_ok(response)
                else f"no JSON message: {response.text[:100]!r}"
            )
            return
        try:
            got = [str(obj[tag]["Value"][0]) for obj in response.json()]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            record.outcome, record.detail = "wrong", f"unreadable answer: {exc}"
            return
        if len(got) != len(set(got)) or set(got) != want:
            record.outcome = "wrong"
            missing, extra = sorted(want - set(got))[:3], sorted(set(got) - want)[:3]
            record.detail = (
                f"{len(got)} answers, expected {len(want)}; missing {missing} extra {extra}"
            )
            return
        record.outcome = "ok"

    def retrieve(
        self,
        http: httpx.Client,
        record: Record,
        series: SeriesInfo,
        url: str,
        only: str | None = None,
    ) -> None:
        body = b""
        try:
            with http.stream("GET", url, headers={"Accept": ACCEPT}) as response:
                record.status = response.status_code
                record.cold = "content-length" not in response.headers
                if response.status_code not in (200, 206):
                    response.read()
                    record.outcome = "error"
                    record.detail = (
                        response.text[:200]
                        if _error_body_ok(response)
                        else f"no JSON message: {response.text[:100]!r}"
                    )
                    return
                content_type = response.headers.get("content-type", "")
                chunks = []
                try:
                    for chunk in response.iter_bytes():
                        chunks.append(chunk)
                except httpx.HTTPError as exc:
                    record.detail = f"body cut: {type(exc).__name__}"
                body = b"".join(chunks)
        except httpx.HTTPError as exc:
            record.outcome, record.detail = "error", f"{type(exc).__name__}: {exc}"
            return
        record.nbytes = len(body)
        outcome, detail = check_multipart(body, content_type, series, only)
        if outcome == "ok" and record.status == 206:
            outcome, detail = "wrong", "206 with every instance"
        if outcome == "incomplete" and record.status == 206:
            detail = "206: " + detail
        record.outcome, record.detail = outcome, detail or record.detail

    def abandon(self, http: httpx.Client, record: Record, series: SeriesInfo, url: str) -> None:
        stop_after = self.rng.randint(200_000, max(300_000, series.size // 2))
        try:
            with http.stream("GET", url, headers={"Accept": ACCEPT}) as response:
                record.status = response.status_code
                record.cold = "content-length" not in response.headers
                if response.status_code != 200:
                    response.read()
                    record.outcome = "error"
                    record.detail = (
                        response.text[:200]
                        if _error_body_ok(response)
                        else f"no JSON message: {response.text[:100]!r}"
                    )
                    return
                for chunk in response.iter_bytes():
                    record.nbytes += len(chunk)
                    if record.nbytes >= stop_after:
                        break
        except httpx.HTTPError as exc:
            record.outcome, record.detail = "error", f"{type(exc).__name__}: {exc}"
            return
        record.outcome = "abandoned"


# --------------------------------------------------------------------------- the run


@dataclass
class Sample:
    t: float
    gateway_fds: int | None
    gateway_rss_kb: int | None
    storage_pid: int | None
    storage_fds: int | None
    storage_rss_kb: int | None
    pool: dict[str, Any] | None
    pacs_connections: int
    storage_connections: int


@dataclass
class Restart:
    stopped_at: float
    hard: bool = False
    ready_at: float = 0.0
    port_kept: bool = True


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.stopping = threading.Event()
        self.samples: list[Sample] = []
        self.restarts: list[Restart] = []
        self.t0 = 0.0
        self._tail_lock = threading.Lock()
        self._tail_next = 0.0
        self._tail_index = 0
        self.expected = Expected()
        self.searches: list[tuple[str, dict[str, str], str, set[str]]] = []

    def next_tail(self) -> SeriesInfo | None:
        """The next tail series in turn, if one is due (one every ``--tail-interval`` s)."""
        with self._tail_lock:
            now = time.monotonic()
            if now < self._tail_next or not self.expected.tail:
                return None
            self._tail_next = now + self.args.tail_interval
            series = self.expected.tail[self._tail_index % len(self.expected.tail)]
            self._tail_index += 1
            return series

    def sample(self) -> Sample:
        gw = self.gateway
        kids = children(gw.pid)
        storage = kids[0] if kids else None
        pool = None
        with contextlib.suppress(httpx.HTTPError, ValueError, IndexError, KeyError):
            pool = httpx.get(f"{gw.url}/pacs", timeout=5, trust_env=False).json()[0]["pool"]
        return Sample(
            t=time.monotonic() - self.t0,
            gateway_fds=fd_count(gw.pid),
            gateway_rss_kb=rss_kb(gw.pid),
            storage_pid=storage,
            storage_fds=fd_count(storage) if storage else None,
            storage_rss_kb=rss_kb(storage) if storage else None,
            pool=pool,
            pacs_connections=established_to(self.orthanc.dicom_port),
            storage_connections=established_to(gw.storage_port),
        )

    def _sampler(self) -> None:
        while not self.stopping.wait(1.0):
            self.samples.append(self.sample())

    def _restart_orthanc(self, hard: bool) -> None:
        """Stop Orthanc (SIGTERM, or with ``hard`` SIGKILL at once: moves and
        searches in flight are cut) and start it again on the same ports."""
        port = self.orthanc.dicom_port
        restart = Restart(stopped_at=time.monotonic() - self.t0, hard=hard)
        self.restarts.append(restart)
        self.orthanc.stop(timeout=0 if hard else 10)
        time.sleep(self.args.downtime)
        self.orthanc.start()
        restart.ready_at = time.monotonic() - self.t0
        restart.port_kept = self.orthanc.dicom_port == port
        print(
            f"  Orthanc {'killed' if hard else 'stopped'} at {restart.stopped_at:.1f} s, "
            f"back at {restart.ready_at:.1f} s",
            flush=True,
        )

    def run(self) -> dict[str, Any]:
        from tests.peers.common import free_port
        from tests.peers.orthanc import OrthancPeer

        args = self.args
        started_wall = _dt.datetime.now(_dt.UTC)
        load_start = os.getloadavg()
        print("generating data ...", flush=True)
        t = time.monotonic()
        self.expected = prepare_data(
            self.workdir / "data", args.tail_series, args.tail_slices, args.seed
        )
        self.searches = self.expected.searches()
        generate_s = time.monotonic() - t
        storage_port = free_port()
        self.orthanc = OrthancPeer(
            self.workdir / "orthanc",
            modalities={GATEWAY_AE: (GATEWAY_AE, LOOPBACK, storage_port)},
        )
        self.orthanc.start()
        self.gateway = gateway_process(
            self.workdir / "gateway", self.orthanc.aet, self.orthanc.dicom_port, storage_port
        )
        try:
            print("loading Orthanc ...", flush=True)
            t = time.monotonic()
            files = sorted((self.workdir / "data").rglob("*.dcm"))
            loaded = self.orthanc.load(files)
            if loaded.refused or len(self.orthanc.loaded) != len(files):
                raise RuntimeError(f"Orthanc refused files: {list(loaded.refused.items())[:3]}")
            load_s = time.monotonic() - t
            self.gateway.start()
            self.t0 = time.monotonic()
            before = self.sample()
            fds_before = fd_targets(self.gateway.pid)
            print(
                f"gateway pid {self.gateway.pid}, storage SCP pid {before.storage_pid}; "
                f"{args.clients} clients for {args.minutes:g} min ...",
                flush=True,
            )
            duration = args.minutes * 60
            restart_at = [duration * (i + 1) / (args.restarts + 1) for i in range(args.restarts)]
            sampler = threading.Thread(target=self._sampler, daemon=True)
            sampler.start()
            clients = [Client(self, i) for i in range(args.clients)]
            for c in clients:
                c.start()
            for i, when in enumerate(restart_at):
                self.stopping.wait(max(0.0, when - (time.monotonic() - self.t0)))
                self._restart_orthanc(hard=i % 2 == 1)
            self.stopping.wait(max(0.0, duration - (time.monotonic() - self.t0)))
            load_end = time.monotonic() - self.t0
            self.stopping.set()
            for c in clients:
                c.join(90)
            stuck = [c.name for c in clients if c.is_alive()]
            sampler.join(5)
            # Idle associations expire after IDLE_TIMEOUT; the reaper looks every
            # IDLE_TIMEOUT / 4 s.
            time.sleep(IDLE_TIMEOUT + 3)
            after = self.sample()
            fds_after = fd_targets(self.gateway.pid)
            tmp_left = sorted(p.name for p in (self.gateway.work_dir / "cache" / "tmp").glob("*"))
            log_text = self.gateway.log_text()
        finally:
            self.gateway.stop()
            self.orthanc.stop()
        records = [r for c in clients for r in c.records]
        for r in records:
            r.started -= self.t0
            r.ended -= self.t0
        return self.report(
            records=records,
            before=before,
            after=after,
            stuck=stuck,
            tmp_left=tmp_left,
            log_text=log_text,
            load_end=load_end,
            fds_before=fds_before,
            fds_after=fds_after,
            started_wall=started_wall,
            load_start=load_start,
            generate_s=generate_s,
            load_s=load_s,
            files=len(files),
        )

    # ----------------------------------------------------------------- checks

    def in_restart(self, r: Record) -> bool:
        return any(
            r.started <= x.ready_at + RESTART_GRACE and r.ended >= x.stopped_at
            for x in self.restarts
        )

    def report(self, **run: Any) -> dict[str, Any]:
        records: list[Record] = run["records"]
        before: Sample = run["before"]
        after: Sample = run["after"]
        checks: dict[str, dict[str, Any]] = {}

        wrong = [r for r in records if r.outcome == "wrong"]
        failed = [r for r in records if r.outcome in ("error", "incomplete")]
        outside = [r for r in failed if not self.in_restart(r)]
        bad_status = [r for r in failed if r.status not in (0, 200, 206, 502, 503, 504)]
        no_json = [r for r in failed if r.detail.startswith("no JSON message")]
        checks["no wrong answer"] = {
            "ok": not wrong,
            "value": len(wrong),
            "examples": [asdict(r) for r in wrong[:5]],
        }
        checks["errors only during the restarts"] = {
            "ok": not outside,
            "value": len(outside),
            "examples": [asdict(r) for r in outside[:5]],
        }
        checks["error statuses only 502/503/504, each with a JSON message"] = {
            "ok": not bad_status and not no_json,
            "value": dict(Counter(r.status for r in failed)),
            "examples": [asdict(r) for r in (bad_status + no_json)[:5]],
        }
        checks["every client finished"] = {"ok": not run["stuck"], "value": run["stuck"]}
        checks["Orthanc came back on the same port"] = {
            "ok": all(x.port_kept for x in self.restarts)
            and len(self.restarts) == self.args.restarts,
            "value": len(self.restarts),
        }
        ok_after = [
            r
            for r in records
            if r.outcome in ("ok", "abandoned")
            and any(r.started > x.ready_at + RESTART_GRACE for x in self.restarts[-1:])
        ]
        checks["requests succeed after the last restart"] = {
            "ok": bool(ok_after) or not self.restarts,
            "value": len(ok_after),
        }
        pool = after.pool or {}
        checks["no association in use or open after the load"] = {
            "ok": pool.get("in_use") == 0
            and pool.get("idle") == 0
            and after.pacs_connections == 0
            and after.storage_connections == 0,
            "value": {
                "pool": pool,
                "tcp to Orthanc": after.pacs_connections,
                "tcp to the storage SCP": after.storage_connections,
            },
        }
        peak_pacs = max((s.pacs_connections for s in self.samples), default=0)
        peak_pool = max(
            ((s.pool or {}).get("in_use", 0) + (s.pool or {}).get("idle", 0) for s in self.samples),
            default=0,
        )
        checks["associations never above max_associations"] = {
            "ok": peak_pool <= MAX_ASSOCIATIONS and peak_pacs <= MAX_ASSOCIATIONS,
            "value": {"pool in_use+idle": peak_pool, "tcp to Orthanc": peak_pacs},
        }
        checks["gateway file descriptors back to their level before the load"] = {
            "ok": after.gateway_fds is not None
            and before.gateway_fds is not None
            and after.gateway_fds <= before.gateway_fds,
            "value": {
                "before": before.gateway_fds,
                "after": after.gateway_fds,
                "new": sorted((Counter(run["fds_after"]) - Counter(run["fds_before"])).elements()),
                "peak": max((s.gateway_fds or 0 for s in self.samples), default=0),
            },
        }
        same_child = after.storage_pid == before.storage_pid
        checks["storage SCP: same process, file descriptors back to their level"] = {
            "ok": same_child
            and after.storage_fds is not None
            and before.storage_fds is not None
            and after.storage_fds <= before.storage_fds,
            "value": {
                "pid before": before.storage_pid,
                "pid after": after.storage_pid,
                "before": before.storage_fds,
                "after": after.storage_fds,
                "peak": max((s.storage_fds or 0 for s in self.samples), default=0),
            },
        }
        first_restart = self.restarts[0].stopped_at if self.restarts else run["load_end"]
        pre = [s for s in self.samples if s.t < first_restart and s.gateway_rss_kb]
        ref_gw = max((s.gateway_rss_kb or 0 for s in pre), default=before.gateway_rss_kb or 0)
        ref_st = max((s.storage_rss_kb or 0 for s in pre), default=before.storage_rss_kb or 0)
        checks["RSS after the load within 30 MB of its peak before the first restart"] = {
            "ok": (after.gateway_rss_kb or 0) <= ref_gw + RSS_SLACK_KB
            and (after.storage_rss_kb or 0) <= ref_st + RSS_SLACK_KB,
            "value": {
                "gateway before load": before.gateway_rss_kb,
                "gateway peak before 1st restart": ref_gw,
                "gateway peak": max((s.gateway_rss_kb or 0 for s in self.samples), default=0),
                "gateway after": after.gateway_rss_kb,
                "storage before load": before.storage_rss_kb,
                "storage peak before 1st restart": ref_st,
                "storage after": after.storage_rss_kb,
            },
        }
        checks["nothing left in the cache temp folder"] = {
            "ok": not run["tmp_left"],
            "value": run["tmp_left"][:10],
        }
        lines = run["log_text"].splitlines()
        # pynetdicom logs the connection resets of a PACS going away with their
        # traceback; only the gateway's own are a finding.
        tracebacks = [
            "\n".join(lines[max(0, i - 1) : i + 40])
            for i, line in enumerate(lines)
            if line.startswith("Traceback") and i and " pynetdicom." not in lines[i - 1]
        ]
        checks["no traceback from the gateway's code in its log"] = {
            "ok": not tracebacks,
            "value": len(tracebacks),
            "examples": tracebacks[:3],
        }
        pynetdicom_errors = sum(1 for line in lines if " ERROR pynetdicom." in line)

        by_kind: dict[str, dict[str, Any]] = {}
        for kind in ("search", "series", "instance", "abandon"):
            rs = [r for r in records if r.kind == kind]
            lat = sorted((r.ended - r.started) * 1000 for r in rs if r.outcome == "ok")
            by_kind[kind] = {
                "requests": len(rs),
                "outcomes": dict(Counter(r.outcome for r in rs)),
                "cold": sum(1 for r in rs if r.cold),
                "warm": sum(1 for r in rs if r.cold is False),
                "p50_ms": round(statistics.median(lat), 1) if lat else None,
                "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
                "bytes": sum(r.nbytes for r in rs),
            }
        moves = len(re.findall(r"C-MOVE \S+ level=", run["log_text"]))
        return {
            "date": run["started_wall"].strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {
                **machine(),
                "load_start": [round(x, 2) for x in run["load_start"]],
                "load_end": [round(x, 2) for x in os.getloadavg()],
            },
            "code": code(),
            "versions": _versions(),
            "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
            "args": vars(self.args),
            "data": {
                "files": run["files"],
                "series": len(self.expected.series),
                "hot_series": len(self.expected.hot),
                "tail_series": len(self.expected.tail),
                "bytes": sum(s.size for s in self.expected.series.values()),
                "generate_s": round(run["generate_s"], 1),
                "orthanc_load_s": round(run["load_s"], 1),
            },
            "duration_s": round(run["load_end"], 1),
            "restarts": [asdict(x) for x in self.restarts],
            "requests": len(records),
            "by_kind": by_kind,
            "errors_by_status": dict(
                Counter(str(r.status) for r in records if r.outcome in ("error", "incomplete"))
            ),
            "incomplete_bodies": sum(1 for r in records if r.outcome == "incomplete"),
            "c_moves_logged": moves,
            "pynetdicom_error_lines": pynetdicom_errors,
            "checks": checks,
            "ok": all(c["ok"] for c in checks.values()),
            "before": asdict(before),
            "after": asdict(after),
            "samples": [asdict(s) for s in self.samples],
            "error_records": [
                asdict(r) for r in records if r.outcome in ("error", "incomplete", "wrong")
            ][:200],
        }


# --------------------------------------------------------------------------- report


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("dimse-gateway", "uvicorn", "fastapi", "httpx", "pydicom", "pynetdicom"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    orthanc = re.search(r"(\d+\.\d+\.\d+)", sh(["/usr/sbin/Orthanc", "--version"]))
    versions["orthanc"] = orthanc.group(1) if orthanc else "?"
    return versions


def _mb(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024:.0f} MB"


def render(result: dict[str, Any]) -> str:
    m, v, d = result["machine"], result["versions"], result["data"]
    lines = [
        "## Soak: 20 clients for minutes while the PACS restarts",
        "",
        f"Written by `bench/soak.py` on {result['date']}; {m['nproc']} vCPU {m['cpu']}, "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}; load average (1/5/15 min) "
        f"{' / '.join(f'{x:.2f}' for x in m['load_start'])} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in m['load_end'])} at the end; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + f"; gateway code: {result['code']}; command `{result['command']}`.",
        "",
        f"**{'All checks passed' if result['ok'] else 'CHECKS FAILED'}.** "
        f"{result['args']['clients']} client threads for {result['duration_s']:.0f} s, "
        f"{result['requests']} requests; Orthanc "
        + ", ".join(
            f"{'killed (SIGKILL)' if x.get('hard') else 'stopped (SIGTERM)'} at "
            f"{x['stopped_at']:.0f} s and back at {x['ready_at']:.0f} s"
            for x in result["restarts"]
        )
        + f"; {result['c_moves_logged']} C-MOVEs logged.",
        "",
        "| check | result | |",
        "|---|---|---|",
    ]
    for name, check in result["checks"].items():
        value = check["value"]
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, int) else str(value)
        lines.append(
            f"| {name} | {text.replace('|', '/')} | {'ok' if check['ok'] else '**failed**'} |"
        )
    lines += [
        "",
        "| requests | count | outcomes | cold / warm | median | p95 | bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, k in result["by_kind"].items():
        outcomes = ", ".join(f"{o} {n}" for o, n in sorted(k["outcomes"].items()))
        p50 = "-" if k["p50_ms"] is None else f"{k['p50_ms']} ms"
        p95 = "-" if k["p95_ms"] is None else f"{k['p95_ms']} ms"
        lines.append(
            f"| {kind} | {k['requests']} | {outcomes} | {k['cold']} / {k['warm']} | "
            f"{p50} | {p95} | {k['bytes'] / 1e6:.0f} MB |"
        )
    b, a, samples = result["before"], result["after"], result["samples"]

    def trio(key: str, fmt: Any = str) -> str:
        peak = max((s[key] or 0 for s in samples), default=None)
        return f"{fmt(b[key])} / {fmt(peak)} / {fmt(a[key])}"

    args, errors = result["args"], json.dumps(result["errors_by_status"])
    lines += [
        "",
        f"Errors by HTTP status (0: connection or body cut): {errors}; unterminated "
        f"multipart bodies: {result['incomplete_bodies']}; ERROR lines pynetdicom logged "
        f"(connection resets while Orthanc went down): {result['pynetdicom_error_lines']}.  "
        "Before the load / peak / after it, the gateway process: "
        f"{trio('gateway_fds')} file descriptors, {trio('gateway_rss_kb', _mb)} RSS; "
        f"its storage SCP child: {trio('storage_fds')} file descriptors, "
        f"{trio('storage_rss_kb', _mb)} RSS.",
        "",
        "Setup, all on 127.0.0.1: Orthanc (Debian) holding the sample studies and "
        f"{d['tail_series']} tail series ({d['files']} files, {d['bytes'] / 1e6:.0f} MB; "
        f"generated in {d['generate_s']} s, loaded in {d['orthanc_load_s']} s); the gateway "
        f"as its own process (`dimse-gateway serve`, one node, `max_associations = "
        f"{MAX_ASSOCIATIONS}`, `idle_timeout = {IDLE_TIMEOUT:g}`, `dimse_timeout = 15`, "
        f"`cache_max_bytes` {CACHE_BYTES // 2**20} MiB so that tail series are evicted and "
        "fetched again).  Each client loops with 0-0.3 s pauses: 35 % QIDO searches with "
        "known answers (all studies, studies per PatientID, series of a study, instances of "
        "a series), 10 % single-instance retrieves, 10 % series retrieves abandoned after "
        "0.2 MB to half the series, the rest whole-series retrieves (`transfer-syntax=*`); "
        f"one tail series every {args['tail_interval']:g} s, in turn.  A retrieve is right "
        "when its closing delimiter is there and its parts are exactly the series' "
        "instances, each data set (after the file meta) of the stored length and CRC-32; "
        "an unterminated body is an honest failure, counted with the errors.  Cold = "
        "streamed while the C-MOVE runs (no Content-Length), warm = from the cache.  An "
        "error counts as the restart's when the request overlaps the time from Orthanc's "
        f"stop to {RESTART_GRACE:g} s after it answers again.  After the load the script "
        f"waits {IDLE_TIMEOUT + 3:g} s (idle associations expire) before the last sample.  "
        "Raw data: `bench/results/soak.json`.",
        "",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    block = f"{MARK_START}\n{section}{MARK_END}\n"
    write_doc_section(DOC_PATH, block, MARK_START, MARK_END, "# Benchmarks\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the load (default 5)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=2, help="Orthanc restarts during the run")
    parser.add_argument("--downtime", type=float, default=2.0, help="seconds Orthanc stays down")
    parser.add_argument("--tail-series", type=int, default=48)
    parser.add_argument("--tail-slices", type=int, default=10)
    parser.add_argument(
        "--tail-interval", type=float, default=1.5, help="seconds between tail retrieves"
    )
    parser.add_argument("--seed", default="soak")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--render-json", type=Path, help="rewrite the docs section from a saved result"
    )
    args = parser.parse_args(argv)
    if args.render_json:
        write_doc(render(json.loads(args.render_json.read_text())))
        return 0
    if not 0 < args.minutes <= 30 or not 1 <= args.clients <= 64:
        parser.error("--minutes must be in (0, 30] and --clients in [1, 64]")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = Soak(args, Path(tmp)).run()
    result["wall_s"] = round(time.monotonic() - started, 1)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if not args.no_doc:
        write_doc(render(result))
    for name, check in result["checks"].items():
        print(
            "ok    " if check["ok"] else "FAILED",
            name,
            json.dumps(check["value"], default=str)[:300],
        )
        for example in check.get("examples", [])[:3]:
            print(f"         {example}")
    for kind, k in result["by_kind"].items():
        print(f"  {kind}: {k}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
