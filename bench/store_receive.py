"""C-MOVE receive throughput: the gateway's storage SCP against DCMTK's storescp.

Run from the repository root::

    .venv/bin/python -m bench.store_receive              # 5 interleaved rounds
    .venv/bin/python -m bench.store_receive --rounds 9

What it does, all on 127.0.0.1 and in a fresh temporary folder:

1. generates the 300-slice 512x512 CT series (``app.sampledata.benchmark_ct()``,
   about 158 MB) and loads it into an Orthanc of its own
   (``tests.peers.orthanc.OrthancPeer``: free ports, ``TCP_NODELAY=1`` in its
   environment, ``SyncStorageArea: true`` as in a stock Orthanc; that only slows
   the loading, not a C-MOVE);
2. starts three move destinations, each registered in Orthanc and each a
   process of its own in a session of its own (Linux schedules sessions as
   groups, "autogroup": a receiver sharing a session with the load generator
   gets less CPU than one alone on a busy machine):
   (a) ``app.dimse.storescp.StorageSCP`` with a ``DirectorySink`` (a ``.part``
   file per instance, renamed when complete, no fsync), run by this script
   with ``--receiver``;
   (b) DCMTK ``storescp -pdu 131072 -od DIR`` (writes files, no fsync);
   (c) ``storescp -pdu 131072 --ignore`` (receives, stores nothing: the ceiling);
   both as ``tests.peers.common.StorescpPeer`` runs them (``TCP_NODELAY=1``,
   ``-dhl``: no host name look-up);
3. runs series-level Study Root C-MOVEs from Orthanc to each destination in
   interleaved rounds (target order rotated each round) after one warm-up move
   per target.  The C-MOVE SCU is pynetdicom in another process and session,
   the same for every target; the time runs from sending the C-MOVE-RQ to
   receiving the final C-MOVE-RSP, on an association opened beforehand.  The
   CPU time each receiver process used per move is read from /proc.  Every run
   is checked: final status Success, 300 completed sub-operations and, for (a)
   and (b), 300 files;
4. writes a Markdown section into ``docs/benchmarks.md`` between
   ``<!-- store-receive:start -->`` and ``<!-- store-receive:end -->`` (the rest
   of the file is left alone).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "benchmarks.md"
MARK_START = "<!-- store-receive:start -->"
MARK_END = "<!-- store-receive:end -->"

LOOPBACK = "127.0.0.1"
ORTHANC_AE = "ORTHANC"
MOVESCU_AE = "MOVESCU"
TARGETS = ("gateway", "storescp", "ignore")
AE_TITLES = {"gateway": "DIMSEGW", "storescp": "STORESCP", "ignore": "STORESCPIGN"}
LABEL = {
    "gateway": "gateway `StorageSCP` + `DirectorySink` (writes files)",
    "storescp": "DCMTK `storescp -pdu 131072 -od DIR`",
    "ignore": "DCMTK `storescp -pdu 131072 --ignore` (ceiling)",
}
AIM_RATIO = 0.8
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (/proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --------------------------------------------------------------------------- child processes


def mover_main(port: int) -> int:
    """``--mover PORT``: the C-MOVE SCU.  One JSON request per stdin line, one JSON
    answer per stdout line.  Each move runs on a fresh association, opened (and
    TCP_NODELAY set) before the clock starts."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae = AE(ae_title=MOVESCU_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.network_timeout = 60
    ae.dimse_timeout = 300
    for line in sys.stdin:
        request = json.loads(line)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = request["study"]
        identifier.SeriesInstanceUID = request["series"]
        assoc = ae.associate(LOOPBACK, port, ae_title=ORTHANC_AE)
        answer: dict[str, Any] = {"ok": False}
        if assoc.is_established:
            if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
                assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            final: Any = None
            for status, _identifier in assoc.send_c_move(
                identifier, request["dest"], StudyRootQueryRetrieveInformationModelMove
            ):
                if status and int(status.Status) not in (0xFF00, 0xFF01):
                    final = status
            elapsed = time.perf_counter() - started
            assoc.release()
            if final is not None:
                answer = {
                    "ok": True,
                    "seconds": elapsed,
                    "status": int(final.Status),
                    "completed": int(final.get("NumberOfCompletedSuboperations", -1)),
                    "failed": int(final.get("NumberOfFailedSuboperations", 0)),
                }
        print(json.dumps(answer), flush=True)
    return 0


def receiver_main(ae_title: str, port: int, directory: Path, max_pdu: int) -> int:
    """``--receiver``: the gateway's StorageSCP with a DirectorySink until stdin closes."""
    from app.dimse.storescp import DirectorySink, StorageSCP

    scp = StorageSCP(
        ae_title,
        host=LOOPBACK,
        port=port,
        sink=DirectorySink(directory),
        allow=lambda _ae, _address: True,
        max_pdu=max_pdu,
    )
    scp.start()
    try:
        sys.stdin.read()
    finally:
        scp.stop()
    return 0


class Child:
    """A child process in a session of its own, stopped by closing its stdin, then
    SIGTERM to its PID, then SIGKILL."""

    def __init__(self, command: Sequence[str], log_path: Path, *, env: dict[str, str]) -> None:
        self.command = list(command)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_echo(self, aet: str, port: int, timeout: float = 20.0) -> None:
        from tests.peers.common import c_echo, port_is_open, wait_until

        def ready() -> bool:
            return port_is_open(LOOPBACK, port) and c_echo(LOOPBACK, port, aet, "ECHOSCU", 5.0)

        if not wait_until(ready, timeout):
            raise RuntimeError(f"{shlex.join(self.command)} not ready; see {self.log_path}")

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        for signal_it in (self.process.terminate, self.process.kill):
            try:
                self.process.wait(5)
                return
            except subprocess.TimeoutExpired:
                signal_it()
        self.process.wait(5)


class Mover:
    """The ``--mover`` child, driven through its stdin/stdout."""

    def __init__(self, orthanc_port: int) -> None:
        command = [sys.executable, "-m", "bench.store_receive", "--mover", str(orthanc_port)]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def move(self, study: str, series: str, dest: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {"study": study, "series": series, "dest": dest}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the mover process died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    target: str
    round: int
    seconds: float
    cpu_seconds: float  # the receiver process's CPU time during the move


@dataclass
class Report:
    rounds: int
    instances: int
    data_bytes: int
    runs: list[Run] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    def seconds(self, target: str) -> list[float]:
        return [r.seconds for r in self.runs if r.target == target]

    def cpu(self, target: str) -> list[float]:
        return [r.cpu_seconds for r in self.runs if r.target == target]


def _rotated(items: Sequence[str], by: int) -> list[str]:
    by %= len(items)
    return [*items[by:], *items[:by]]


def measure(args: argparse.Namespace) -> Report:
    from app.sampledata import benchmark_ct, write_datasets
    from tests.peers.common import StorescpPeer, dcmtk_available, dcmtk_env, free_port
    from tests.peers.orthanc import OrthancPeer, orthanc_available

    if not orthanc_available():
        raise SystemExit("Orthanc or its DICOMweb plugin is not installed")
    if not dcmtk_available("storescp"):
        raise SystemExit("DCMTK storescp is not installed")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-store-")))
        _log(f"generating the CT series in {work}")
        files = write_datasets(benchmark_ct(), work / "ct")
        ports = {target: free_port() for target in TARGETS}
        modalities = {AE_TITLES[t]: (AE_TITLES[t], LOOPBACK, ports[t]) for t in TARGETS}
        modalities[MOVESCU_AE] = (MOVESCU_AE, LOOPBACK, free_port())
        orthanc = OrthancPeer(work / "orthanc", modalities=modalities, sync_storage=True)
        stack.callback(orthanc.stop)
        _log("starting Orthanc and loading the series")
        orthanc.start()
        loaded = orthanc.load(files)
        if len(loaded.loaded) != len(files):
            raise SystemExit(f"Orthanc kept {len(loaded.loaded)} of {len(files)} files")
        info = next(iter(loaded.loaded.values()))

        gateway_dir = work / "recv-gateway"
        gateway_dir.mkdir()
        gateway = Child(
            [
                sys.executable,
                "-m",
                "bench.store_receive",
                "--receiver",
                f"{AE_TITLES['gateway']}:{ports['gateway']}:{args.max_pdu}:{gateway_dir}",
            ],
            work / "gateway.log",
            env=dcmtk_env(),
        )
        stack.callback(gateway.stop)
        gateway.wait_echo(AE_TITLES["gateway"], ports["gateway"])
        dcmtk: dict[str, StorescpPeer] = {}
        for target, extra in (("storescp", []), ("ignore", ["--ignore"])):
            peer = StorescpPeer(
                work / target,
                aet=AE_TITLES[target],
                port=ports[target],
                extra_args=["-pdu", "131072", *extra],
            )
            stack.callback(peer.stop)
            dcmtk[target] = peer.start()
        pids = {"gateway": gateway.pid, **{t: p.pid for t, p in dcmtk.items()}}
        dirs = {"gateway": gateway_dir, "storescp": dcmtk["storescp"].output_dir}
        mover = Mover(orthanc.dicom_port)
        stack.callback(mover.close)

        report = Report(
            rounds=args.rounds,
            instances=len(files),
            data_bytes=sum(p.stat().st_size for p in files),
        )
        report.setup = {
            "orthanc_version": orthanc.rest_get("/system").get("Version", "?"),
            "max_pdu": args.max_pdu,
            "storescp": shlex.join(dcmtk["storescp"]._command()).replace(str(work), "$TMP"),
            "ignore": shlex.join(dcmtk["ignore"]._command()).replace(str(work), "$TMP"),
        }

        def one(target: str, round_number: int) -> Run:
            if target in dirs:
                for entry in dirs[target].iterdir():
                    entry.unlink()
            pid = pids[target]
            assert pid is not None
            cpu_before = _cpu_seconds(pid)
            answer = mover.move(
                info.study_instance_uid, info.series_instance_uid, AE_TITLES[target]
            )
            cpu = _cpu_seconds(pid) - cpu_before
            if not answer.get("ok") or answer["status"] != 0 or answer["completed"] != len(files):
                raise RuntimeError(f"C-MOVE to {target} failed: {answer}")
            if target in dirs:
                count = sum(1 for entry in dirs[target].iterdir() if entry.is_file())
                if count != len(files):
                    raise RuntimeError(f"{target} holds {count} of {len(files)} files")
            return Run(target, round_number, float(answer["seconds"]), cpu)

        _log("warm-up (one move per target)")
        for target in TARGETS:
            one(target, 0)
        for round_number in range(1, args.rounds + 1):
            for target in _rotated(TARGETS, round_number):
                run = one(target, round_number)
                report.runs.append(run)
                _log(
                    f"round {round_number} {target:9s} {run.seconds * 1000:7.0f} ms "
                    f"{report.data_bytes / run.seconds / 1e6:6.0f} MB/s, "
                    f"receiver CPU {run.cpu_seconds * 1000:4.0f} ms"
                )
        return report


# --------------------------------------------------------------------------- report


def _machine() -> str:
    m = common.machine()
    return (
        f"{m['nproc']} vCPU {m['cpu']}, Linux {m['kernel']}, "
        f"load average {m['load_start'][0]:.1f} at the start"
    )


def render(
    report: Report, command: str, started: _dt.datetime, duration: float, machine: str
) -> str:
    mb = report.data_bytes / 1e6
    med = {t: statistics.median(report.seconds(t)) for t in TARGETS}
    ratio_by_round = []
    for round_number in range(1, report.rounds + 1):
        by_target = {r.target: r.seconds for r in report.runs if r.round == round_number}
        ratio_by_round.append(by_target["storescp"] / by_target["gateway"])
    ratio = med["storescp"] / med["gateway"]
    lines = [
        MARK_START,
        "## C-MOVE receive: the gateway's storage SCP vs DCMTK storescp",
        "",
        f"Written by `bench/store_receive.py` on {started:%Y-%m-%d %H:%M} UTC; {machine}; "
        f"Python {platform.python_version()}; command `{command}` ({duration:.0f} s).",
        "",
        f"**Aim:** the gateway's storage SCP receives a C-MOVE at least **{AIM_RATIO}x** "
        "as fast as `storescp -pdu 131072 -od DIR` (ideally 1.0x).  "
        f"**Result: {ratio:.2f}x** (median storescp time / median gateway time; the "
        f"ratio within each round ranged {min(ratio_by_round):.2f} .. "
        f"{max(ratio_by_round):.2f}).",
        "",
        f"Setup, all on 127.0.0.1: Orthanc {report.setup['orthanc_version']} (Debian), "
        "started by the script with `TCP_NODELAY=1` in its environment and "
        "`SyncStorageArea: true`, holds the 300-slice 512x512 CT series of "
        f"`benchmark_ct()` ({report.instances} files, {mb:.1f} MB).  A series-level "
        "Study Root C-MOVE to each destination is issued by pynetdicom in another "
        "process on an association opened beforehand; time = C-MOVE-RQ sent to final "
        "C-MOVE-RSP received.  Orthanc uses one association per move and sends each "
        "instance after the previous C-STORE-RSP.  Each destination is a process in a "
        "session of its own: the gateway's `app.dimse.storescp.StorageSCP` with "
        "`DirectorySink` (a `.part` file per instance, renamed to `<uid>.dcm` when "
        f"complete, no fsync; max PDU announced {report.setup['max_pdu']}, which DCMTK "
        "senders such as Orthanc cap at 128 KiB), and DCMTK 3.6.7 "
        f"`{report.setup['storescp']}` (no fsync either) and `{report.setup['ignore']}`, "
        f"with `TCP_NODELAY=1`.  {report.rounds} interleaved rounds "
        "(order rotated each round) after one warm-up move per target; every run "
        f"checked: status Success, {report.instances} completed sub-operations, "
        f"{report.instances} files written.",
        "",
        "| destination | median | min .. max | MB/s | images/s | receiver CPU per move "
        "| vs storescp |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        seconds = report.seconds(target)
        lines.append(
            f"| {LABEL[target]} | {med[target] * 1000:.0f} ms | "
            f"{min(seconds) * 1000:.0f} .. {max(seconds) * 1000:.0f} ms | "
            f"{mb / med[target]:.0f} | {report.instances / med[target]:.0f} | "
            f"{statistics.median(report.cpu(target)) * 1000:.0f} ms | "
            f"{med['storescp'] / med[target]:.2f}x |"
        )
    lines += [
        "",
        "Times per round (ms): "
        + "; ".join(
            f"{t} " + ", ".join(f"{s * 1000:.0f}" for s in report.seconds(t)) for t in TARGETS
        )
        + ".",
        "",
        MARK_END,
        "",
    ]
    return "\n".join(lines)


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    """Replace our section of ``path`` (or append it), leaving the rest alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else common.DOC_INTRO
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(MARK_END) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--max-pdu", type=int, default=1048576, help="the gateway SCP's announced max PDU"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--mover", help=argparse.SUPPRESS)
    parser.add_argument("--receiver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mover:
        return mover_main(int(args.mover))
    if args.receiver:
        ae_title, port, max_pdu, directory = args.receiver.split(":", 3)
        return receiver_main(ae_title, int(port), Path(directory), int(max_pdu))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    started = _dt.datetime.now(_dt.UTC)
    machine = _machine()
    t0 = time.monotonic()
    report = measure(args)
    command = shlex.join([".venv/bin/python", "-m", "bench.store_receive", *sys.argv[1:]])
    section = render(report, command, started, time.monotonic() - t0, machine)
    print(section)
    if not args.no_doc:
        write_doc(section)
        _log(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
