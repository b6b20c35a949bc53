"""NIfTI conversion: the gateway's converter against dcm2niix, .nii and .nii.gz.

Run from the repository root::

    .venv/bin/python -m bench.nifti              # 5 interleaved rounds
    .venv/bin/python -m bench.nifti --quick      # 2 rounds

What it does:

1. writes the 300-slice 512x512 CT series of ``app.sampledata.benchmark_ct()``
   (300 files, 157.8 MB; int16 stored values, RescaleIntercept -1024) to a
   fresh temporary folder (``--data DIR`` reuses a folder that holds it);
2. converts it, each converter in a process of its own so that peak memory
   and CPU are its own (GNU ``/usr/bin/time``), with:
   our converter (``app.convert.nifti.build_volume`` + ``write_nifti``) to
   ``.nii``, and to ``.nii.gz`` with ISA-L at level 1 on 1 and 2 threads and
   at level 3 on 2 threads; ``dcm2niix -z n -b n`` and ``dcm2niix -z y -b n``
   (which uses ``pigz`` when it is installed; the script records whether it
   is).  Wall time is measured around the child process, so for ours it
   includes starting Python and importing numpy and pydicom; the child also
   reports its in-process time (what the gateway pays, imports already done);
3. runs one warm-up per target, then ``--rounds`` rounds with the target order
   rotated each round (the machine is shared and noisy: only same-run
   comparisons mean anything), with the page cache warm for every target;
4. checks the outputs once: our ``.nii`` holds int16 voxels equal (after
   reorienting both with nibabel's ``as_closest_canonical``) to dcm2niix's
   scaled values with the same affine (1e-3 mm), and our ``.nii.gz``
   decompresses to our ``.nii``;
5. writes a Markdown section into ``docs/benchmarks.md`` between
   ``<!-- nifti:start -->`` and ``<!-- nifti:end -->`` (the file is re-read
   right before writing and only that section is replaced or appended), and
   with ``--json FILE`` the raw numbers.

Aims: ``.nii`` no slower than ``dcm2niix -z n``; ``.nii.gz`` at least 4x faster
than ``dcm2niix -z y``; int16 kept; peak memory below 3x the volume size.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import machine

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "benchmarks.md"
MARK_START = "<!-- nifti:start -->"
MARK_END = "<!-- nifti:end -->"
TIME = "/usr/bin/time"  # GNU time (Debian package "time")
AIM_GZIP_SPEEDUP = 4.0
AIM_MEMORY_FACTOR = 3.0


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    kind: str  # "ours" or "dcm2niix"
    compress: bool
    level: int = 1
    threads: int = 1


TARGETS = (
    Target("ours-nii", "ours `.nii`", "ours", False),
    Target(
        "ours-gz-l1-t2", "ours `.nii.gz`, ISA-L level 1, 2 threads (default)", "ours", True, 1, 2
    ),
    Target("ours-gz-l1-t1", "ours `.nii.gz`, ISA-L level 1, 1 thread", "ours", True, 1, 1),
    Target("ours-gz-l3-t2", "ours `.nii.gz`, ISA-L level 3, 2 threads", "ours", True, 3, 2),
    Target("d2n-n", "`dcm2niix -z n -b n`", "dcm2niix", False),
    Target("d2n-y", "`dcm2niix -z y -b n`", "dcm2niix", True),
)


@dataclass
class Run:
    wall: float
    cpu: float
    max_rss_kb: int
    size: int
    inner: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- child


def _child(output: Path, source: Path, level: int, threads: int) -> int:
    """Convert in this process and report in-process times (run by the parent)."""
    started = time.perf_counter()
    from app.convert.nifti import build_volume, write_nifti

    imported = time.perf_counter()
    paths = sorted(p for p in source.iterdir() if p.suffix == ".dcm")
    volume = build_volume(paths)
    built = time.perf_counter()
    write_nifti(volume, output, level=level, threads=threads)
    written = time.perf_counter()
    report = {
        "import_s": imported - started,
        "build_s": built - imported,
        "write_s": written - built,
        "convert_s": written - imported,
        "dtype": str(volume.voxels.dtype),
        "shape": list(volume.shape),
        "voxel_bytes": int(volume.voxels.nbytes),
    }
    print(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------ parent


def _measure(command: list[str], out_file: Path, log: Path) -> Run:
    """Run ``command`` under ``/usr/bin/time``: wall time around it, and that command's
    own peak RSS and CPU (a child forked from this process would inherit this
    process's RSS high-water mark; ``time`` is small)."""
    usage_file = log.with_suffix(".time")
    wrapped = [TIME, "-f", "%M %U %S", "-o", str(usage_file), *command]
    with open(log, "wb") as sink:
        started = time.perf_counter()
        result = subprocess.run(
            wrapped, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, check=False
        )
        wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if result.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{text[-2000:]}")
    max_rss_kb, user, system = usage_file.read_text().split()[-3:]
    inner: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("{"):
            inner = json.loads(line)
    return Run(wall, float(user) + float(system), int(max_rss_kb), out_file.stat().st_size, inner)


def _run(target: Target, source: Path, work: Path, dcm2niix: str) -> tuple[Run, Path]:
    out_dir = work / target.key
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if target.kind == "ours":
        out = out_dir / ("out.nii.gz" if target.compress else "out.nii")
        command = [
            sys.executable, "-m", "bench.nifti", "--child", str(out), str(source),
            "--level", str(target.level), "--threads", str(target.threads),
        ]  # fmt: skip
    else:
        out = out_dir / ("out.nii.gz" if target.compress else "out.nii")
        command = [
            dcm2niix, "-z", "y" if target.compress else "n", "-b", "n",
            "-o", str(out_dir), "-f", "out", str(source),
        ]  # fmt: skip
    return _measure(command, out, work / f"{target.key}.log"), out


def _check_outputs(work: Path, source: Path, dcm2niix: str) -> dict[str, Any]:
    """Our .nii equals dcm2niix's after scaling and reorientation; .nii.gz equals .nii."""
    import nibabel as nib
    import numpy as np

    ours_run, ours = _run(TARGETS[0], source, work / "check", dcm2niix)
    _, theirs = _run(TARGETS[4], source, work / "check", dcm2niix)
    _, ours_gz = _run(TARGETS[1], source, work / "check", dcm2niix)
    raw = nib.load(theirs)
    a = nib.as_closest_canonical(nib.load(ours))
    b = nib.as_closest_canonical(raw)
    same_voxels = bool(
        a.shape == b.shape
        and np.array_equal(np.asarray(a.dataobj, np.float32), np.asarray(b.dataobj, np.float32))
    )
    affine_diff = float(np.abs(a.affine - b.affine).max())
    with gzip.open(ours_gz, "rb") as fh:
        unpacked = hashlib.sha256(fh.read()).hexdigest()
    plain = hashlib.sha256(ours.read_bytes()).hexdigest()
    return {
        "ours_dtype": str(nib.load(ours).get_data_dtype()),
        "dcm2niix_dtype": str(nib.load(theirs).get_data_dtype()),
        "dcm2niix_scl": [float(raw.dataobj.slope), float(raw.dataobj.inter)],
        "same_voxels": same_voxels,
        "affine_max_diff_mm": affine_diff,
        "gzip_roundtrip": unpacked == plain,
        "voxel_bytes": ours_run.inner.get("voxel_bytes", 0),
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _summary(runs: dict[str, list[Run]]) -> dict[str, dict[str, Any]]:
    result = {}
    for key, items in runs.items():
        result[key] = {
            "wall_s": [r.wall for r in items],
            "median_wall_s": _median([r.wall for r in items]),
            "min_wall_s": min(r.wall for r in items),
            "max_wall_s": max(r.wall for r in items),
            "median_cpu_s": _median([r.cpu for r in items]),
            "max_rss_mb": max(r.max_rss_kb for r in items) / 1024,
            "size_mb": items[-1].size / 1e6,
            "median_convert_s": _median([r.inner["convert_s"] for r in items if r.inner]),
            "median_import_s": _median([r.inner["import_s"] for r in items if r.inner]),
            "dtype": items[-1].inner.get("dtype", ""),
        }
    return result


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _section(result: dict[str, Any]) -> str:
    s, check, meta = result["summary"], result["check"], result["meta"]
    volume_mb = check["voxel_bytes"] / 1e6
    nii, d2n_n, d2n_y = s["ours-nii"], s["d2n-n"], s["d2n-y"]
    gz = s["ours-gz-l1-t2"]
    gz_speedup = d2n_y["median_wall_s"] / gz["median_wall_s"]
    nii_ratio = nii["median_wall_s"] / d2n_n["median_wall_s"]
    in_process_ratio = nii["median_convert_s"] / d2n_n["median_wall_s"]
    memory_factor = max(v["max_rss_mb"] for k, v in s.items() if k.startswith("ours")) * (
        1.048576 / volume_mb
    )
    lines = [
        MARK_START,
        "## NIfTI conversion: `app.convert` vs dcm2niix",
        "",
        f"Written by `bench/nifti.py` on {meta['started']} UTC; {meta['machine']['nproc']} vCPU "
        f"{meta['machine']['cpu']}, Linux {meta['machine']['kernel']}, load average "
        f"{meta['load_start']} at the start and {meta['load_end']} at the end; Python "
        f"{meta['python']}, {meta['dcm2niix']}, "
        f"{'pigz installed (dcm2niix -z y uses it)' if meta['pigz'] else 'no pigz'}"
        f"; command `{meta['command']}` ({meta['duration_s']:.0f} s).",
        "",
        f"Input: the 300-slice 512x512 CT of `benchmark_ct()` ({meta['files']} files, "
        f"{meta['input_mb']:.1f} MB; int16 stored values, RescaleIntercept -1024), page cache "
        f"warm.  Each conversion runs in a process of its own; wall time is measured around "
        f"it (for ours that includes starting Python and importing numpy and pydicom, "
        f"{nii['median_import_s']:.2f} s), peak memory is that process's maximum RSS "
        f"(GNU `time`).  'in-process' is what our child reported for reading, checking "
        f"and writing alone (what the gateway pays per request).  "
        f"{meta['rounds']} rounds after one warm-up per target, order rotated each round.",
        "",
        "| aim | result | |",
        "|---|---|---|",
        f"| `.nii` no slower than `dcm2niix -z n` | process {nii_ratio:.2f}x its time "
        f"({nii['median_wall_s']:.2f} s vs {d2n_n['median_wall_s']:.2f} s); in-process "
        f"{in_process_ratio:.2f}x ({nii['median_convert_s']:.2f} s) | "
        f"process {_verdict(nii_ratio <= 1.0)}, in-process {_verdict(in_process_ratio <= 1.0)} |",
        f"| `.nii.gz` >= {AIM_GZIP_SPEEDUP:.0f}x faster than `dcm2niix -z y` | "
        f"**{gz_speedup:.1f}x** "
        f"({gz['median_wall_s']:.2f} s vs {d2n_y['median_wall_s']:.2f} s) | "
        f"{_verdict(gz_speedup >= AIM_GZIP_SPEEDUP)} |",
        f"| int16 kept | ours {check['ours_dtype']} (Hounsfield units, scl 1/0); dcm2niix "
        f"{check['dcm2niix_dtype']} (stored values, scl {check['dcm2niix_scl'][0]:g}/"
        f"{check['dcm2niix_scl'][1]:g}) | {_verdict(check['ours_dtype'] == 'int16')} |",
        f"| peak memory < {AIM_MEMORY_FACTOR:.0f}x the volume ({volume_mb:.0f} MB) | "
        f"**{memory_factor:.2f}x** (largest of our runs) | "
        f"{_verdict(memory_factor < AIM_MEMORY_FACTOR)} |",
        f"| same result as dcm2niix | voxels after scaling "
        f"{'equal' if check['same_voxels'] else '**differ**'}, affines within "
        f"{check['affine_max_diff_mm']:.1e} mm, `.nii.gz` decompresses to the `.nii`: "
        f"{'yes' if check['gzip_roundtrip'] else '**no**'} | "
        f"{_verdict(check['same_voxels'] and check['affine_max_diff_mm'] < 1e-3)} |",
        "",
        "| converter | wall median | min .. max | in-process | CPU (user+sys) | peak RSS "
        "| output |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        row = s[target.key]
        inner = f"{row['median_convert_s']:.2f} s" if target.kind == "ours" else "-"
        lines.append(
            f"| {target.label} | {row['median_wall_s']:.2f} s | {row['min_wall_s']:.2f} .. "
            f"{row['max_wall_s']:.2f} s | {inner} | {row['median_cpu_s']:.2f} s | "
            f"{row['max_rss_mb']:.0f} MiB | {row['size_mb']:.1f} MB |"
        )
    lines += [
        "",
        "Wall times per round (s): "
        + "; ".join(
            f"{t.key} " + ", ".join(f"{w:.2f}" for w in s[t.key]["wall_s"]) for t in TARGETS
        )
        + ".",
        "",
        "How: headers are parsed with pydicom with the pixel data deferred (only its file "
        "offset kept) and text attributes read from the raw element bytes; slices are sorted "
        "along the normal; each slice is read with one `readinto` straight into the "
        "preallocated int16 array and the integral rescale applied in place (modular int16 "
        "arithmetic is exact when the result fits); the 352-byte header is written by hand and "
        "the voxels are handed out as memoryviews (no copy).  `.nii.gz` is one gzip member "
        "deflated by ISA-L (`isal`, `igzip_threaded`: blocks compressed in parallel with the "
        "previous block as dictionary, as pigz does).  What separates our process from "
        "dcm2niix's is fixed cost the gateway pays once, not per request: starting Python, "
        "importing pydicom (which imports its pixel plugins, requests, PIL and GDCM) and "
        "numpy, and tearing it all down again take about as long as dcm2niix's whole run.",
    ]
    if result.get("e2e"):
        lines += _e2e_lines(result["e2e"])
    lines += ["", MARK_END]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------- end to end

E2E_KINDS = ("gw-gz", "gw-nii", "hand-gz", "hand-nii")
E2E_LABEL = {
    "gw-gz": "(a) gateway, cold cache: `GET .../nifti` (`.nii.gz`)",
    "gw-nii": "(a) gateway, cold cache: `GET .../nifti?compress=false` (`.nii`)",
    "hand-gz": "(b) by hand: `movescu` -> `storescp -od DIR`, then `dcm2niix -z y -b n DIR`",
    "hand-nii": "(b) by hand: `movescu` -> `storescp -od DIR`, then `dcm2niix -z n -b n DIR`",
}
E2E_PAIRS = (("gw-gz", "hand-gz"), ("gw-nii", "hand-nii"))


def _curl_to_file(url: str, out: Path) -> tuple[int, float, float, int]:
    """GET ``url`` into ``out``: HTTP status, time to first byte, to last byte, size."""
    from bench.common import clean_env as _clean_env
    from bench.retrieve import CURL_TIMEOUT

    command = [
        "curl", "-s", "--noproxy", "*", "-o", str(out), "--max-time", str(CURL_TIMEOUT),
        "-w", "%{http_code} %{time_starttransfer} %{time_total} %{size_download}", url,
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CURL_TIMEOUT + 10, check=False,
        env=_clean_env(),
    )  # fmt: skip
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 4:
        raise RuntimeError(f"curl {url} failed ({done.returncode}): {done.stdout} {done.stderr}")
    return int(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])


def _check_nifti(path: Path, shape: tuple[int, ...], full: bool = False) -> tuple[int, ...]:
    """``path`` loads with nibabel with ``shape`` (and, with ``full``, its voxels read)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(path)
    if tuple(image.shape) != shape:
        raise RuntimeError(f"{path}: shape {image.shape}, expected {shape}")
    if full:
        data = np.asarray(image.dataobj)
        if data.shape != shape:
            raise RuntimeError(f"{path}: voxels of shape {data.shape}, expected {shape}")
    return tuple(image.shape)


def end_to_end(files: list[Path], rounds: int, work: Path, dcm2niix: str) -> dict[str, Any]:
    """Orthanc holding the CT; per round (kinds rotated), the gateway with a cold cache
    (``.nii.gz`` and ``.nii``) against movescu -> storescp -> dcm2niix (-z y, -z n)."""
    import contextlib

    from bench.retrieve import GATEWAY_AE, LOOPBACK, MOVESCU_AE, STORESCP_AE, GatewayProcess
    from bench.store_receive import _rotated
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
            raise SystemExit(f"{tool} is not installed (apt: dcmtk, curl)")
    info = read_instance_info(files[0])
    study, series = info.study_instance_uid, info.series_instance_uid
    shape = (512, 512, len(files))
    with contextlib.ExitStack() as stack:
        storage_port, storescp_port = free_port(), free_port()
        modalities = {
            GATEWAY_AE: (GATEWAY_AE, LOOPBACK, storage_port),
            STORESCP_AE: (STORESCP_AE, LOOPBACK, storescp_port),
            MOVESCU_AE: (MOVESCU_AE, LOOPBACK, free_port()),
        }
        orthanc = OrthancPeer(work / "orthanc", modalities=modalities, sync_storage=False)
        stack.callback(orthanc.stop)
        orthanc.start()
        t0 = time.perf_counter()
        loaded = orthanc.load(files)
        load_s = time.perf_counter() - t0
        if len(loaded.loaded) != len(files):
            raise RuntimeError(f"Orthanc kept {len(loaded.loaded)} of {len(files)} files")
        print(f"e2e: Orthanc loaded {len(files)} files in {load_s:.1f} s", flush=True)
        storescp = StorescpPeer(
            work / "storescp", aet=STORESCP_AE, port=storescp_port, extra_args=["-pdu", "131072"]
        )
        stack.callback(storescp.stop)
        storescp.start()
        received = storescp.output_dir
        gateway = GatewayProcess(work / "gateway", orthanc.aet, orthanc.dicom_port, storage_port)
        stack.callback(gateway.stop)
        movescu = [
            dcmtk_tool("movescu"), "-S",
            "-aet", MOVESCU_AE, "-aec", orthanc.aet, "-aem", STORESCP_AE,
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
            "-k", f"SeriesInstanceUID={series}", LOOPBACK, str(orthanc.dicom_port),
        ]  # fmt: skip
        base = f"{gateway.url}/dicomweb/studies/{study}/series/{series}/nifti"
        outputs = work / "e2e-out"

        def gateway_run(kind: str, full: bool = False) -> dict[str, Any]:
            compress = kind == "gw-gz"
            gateway.restart_empty("/nifti")  # stop, delete the cache, start, warm the route
            moves = len(gateway.moves())
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir()
            out = outputs / ("out.nii.gz" if compress else "out.nii")
            status, ttfb, total, size = _curl_to_file(
                base if compress else base + "?compress=false", out
            )
            if status != 200:
                raise RuntimeError(f"{kind}: HTTP {status}: {out.read_bytes()[:300]!r}")
            new = gateway.moves()[moves:]
            if len(new) != 1 or int(new[0]["completed"]) != len(files):
                raise RuntimeError(f"{kind}: C-MOVEs logged {new}")
            _check_nifti(out, shape, full)
            return {"s": total, "ttfb_s": ttfb, "size": size, "move_ms": float(new[0]["ms"])}

        def by_hand(kind: str, full: bool = False) -> dict[str, Any]:
            compress = kind == "hand-gz"
            for entry in received.iterdir():
                entry.unlink()
            shutil.rmtree(outputs, ignore_errors=True)
            outputs.mkdir()
            convert = [
                dcm2niix, "-z", "y" if compress else "n", "-b", "n",
                "-o", str(outputs), "-f", "out", str(received),
            ]  # fmt: skip
            started = time.perf_counter()
            moved = subprocess.run(
                movescu, env=dcmtk_env(), capture_output=True, text=True, timeout=300, check=False
            )
            middle = time.perf_counter()
            converted = subprocess.run(
                convert, capture_output=True, text=True, timeout=300, check=False
            )
            ended = time.perf_counter()
            count = sum(1 for entry in received.iterdir() if entry.is_file())
            if moved.returncode != 0 or count != len(files):
                raise RuntimeError(
                    f"movescu: exit {moved.returncode}, {count} files\n"
                    f"{moved.stdout[-1000:]}{moved.stderr[-1000:]}"
                )
            out = outputs / ("out.nii.gz" if compress else "out.nii")
            if converted.returncode != 0 or not out.exists():
                raise RuntimeError(
                    f"dcm2niix: exit {converted.returncode}\n"
                    f"{converted.stdout[-1000:]}{converted.stderr[-1000:]}"
                )
            _check_nifti(out, shape, full)
            return {
                "s": ended - started, "move_s": middle - started, "convert_s": ended - middle,
                "size": out.stat().st_size,
            }  # fmt: skip

        def one(kind: str, full: bool = False) -> dict[str, Any]:
            return (gateway_run if kind.startswith("gw") else by_hand)(kind, full)

        for kind in E2E_KINDS:  # warm-up, with the voxels read in full once
            print(f"e2e warm-up {kind:8s} {one(kind, full=True)['s']:6.2f} s", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in E2E_KINDS}
        for index in range(1, rounds + 1):
            for kind in _rotated(E2E_KINDS, index):
                run = one(kind)
                runs[kind].append(run)
                extra = (
                    f"C-MOVE {run['move_ms']:.0f} ms, TTFB {run['ttfb_s']:.2f} s"
                    if "move_ms" in run
                    else f"movescu {run['move_s']:.2f} s + dcm2niix {run['convert_s']:.2f} s"
                )
                print(f"e2e round {index} {kind:8s} {run['s']:6.2f} s  ({extra})", flush=True)
        setup = {
            "orthanc_version": orthanc.rest_get("/system").get("Version", "?"),
            "orthanc_load_s": load_s,
            "gateway_command": shlex.join(gateway.command)
            .replace(str(work), "$TMP")
            .replace(str(REPO) + "/", ""),
            "movescu": shlex.join(movescu).replace(study, "$ST").replace(series, "$SE"),
            "storescp": shlex.join(storescp._command()).replace(str(work), "$TMP"),
        }
    summary = {}
    for kind, items in runs.items():
        secs = [r["s"] for r in items]
        row: dict[str, Any] = {
            "s": secs, "median_s": _median(secs), "min_s": min(secs), "max_s": max(secs),
            "size_mb": items[-1]["size"] / 1e6,
        }  # fmt: skip
        for part in ("move_s", "convert_s", "ttfb_s", "move_ms"):
            if part in items[0]:
                row[f"median_{part}"] = _median([r[part] for r in items])
        summary[kind] = row
    return {"rounds": rounds, "shape": list(shape), "setup": setup, "summary": summary}


def _e2e_lines(e2e: dict[str, Any]) -> list[str]:
    s, setup = e2e["summary"], e2e["setup"]
    lines = [
        "",
        "### End to end: from the PACS to a NIfTI file",
        "",
        f"The same CT in an Orthanc {setup['orthanc_version']} started by the script "
        "(`TCP_NODELAY=1`, as `bench/retrieve.py` does; the gateway's AE, `STORESCP` and "
        "`MOVESCU` registered), all on 127.0.0.1.  (a) The gateway as a process of its own "
        f"(`{setup['gateway_command']}`), before every run stopped, `work_dir/cache` "
        "deleted, started again and warmed with one 400 request on the NIfTI route (an "
        "invalid UID, untimed; FastAPI builds a route's state on its first request, about "
        "55 ms here): a cold cache, "
        "so each request makes the gateway C-MOVE the series, stack it and stream it (each "
        "instance is read, header and pixels, as soon as it is stored; when the move ends "
        "only the checks and the rescale remain, and the `.nii` streams from the slices "
        "read); timed by `curl -o FILE -w '%{time_total}'` (request to last byte, written "
        "to disk).  "
        f"(b) By hand: `TCP_NODELAY=1 {setup['movescu']}` into `{setup['storescp']}` "
        "(TCP_NODELAY=1; DIR emptied before), then `dcm2niix -b n -o OUT DIR`; the wall time "
        "of both processes together.  Every output is loaded with nibabel and has shape "
        f"{tuple(e2e['shape'])} (the warm-up run of each also reads all voxels); each "
        "gateway run logged exactly one C-MOVE of 300 instances; each movescu run wrote "
        f"300 files.  {e2e['rounds']} rounds after one warm-up of each, order rotated each "
        "round.",
        "",
        "| aim: gateway end to end faster than by hand | gateway | by hand | by hand / gateway | |",
        "|---|---|---|---|---|",
    ]
    for gw, hand in E2E_PAIRS:
        ratio = s[hand]["median_s"] / s[gw]["median_s"]
        label = "`.nii.gz`" if gw == "gw-gz" else "`.nii`"
        lines.append(
            f"| {label} | {s[gw]['median_s']:.2f} s | {s[hand]['median_s']:.2f} s | "
            f"**{ratio:.2f}x** | {_verdict(ratio > 1.0)} |"
        )
    lines += [
        "",
        "| run | median | min .. max | of which | output |",
        "|---|---|---|---|---|",
    ]
    for kind in E2E_KINDS:
        row = s[kind]
        if kind.startswith("gw"):
            parts = (
                f"C-MOVE {row['median_move_ms'] / 1000:.2f} s (gateway log), first byte at "
                f"{row['median_ttfb_s']:.2f} s"
            )
        else:
            parts = (
                f"movescu {row['median_move_s']:.2f} s, dcm2niix {row['median_convert_s']:.2f} s"
            )
        lines.append(
            f"| {E2E_LABEL[kind]} | {row['median_s']:.2f} s | {row['min_s']:.2f} .. "
            f"{row['max_s']:.2f} s | {parts} | {row['size_mb']:.1f} MB |"
        )
    lines += [
        "",
        "Times per round (s): "
        + "; ".join(f"{k} " + ", ".join(f"{x:.2f}" for x in s[k]["s"]) for k in E2E_KINDS)
        + ".",
    ]
    return lines


def write_doc(section: str, path: Path = DOC_PATH) -> None:
    # Here, not at the top: the measured child imports this module (and no httpx).
    from bench.common import DOC_INTRO, write_doc_section

    write_doc_section(path, section, MARK_START, MARK_END, DOC_INTRO)


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def bench(args: argparse.Namespace) -> dict[str, Any]:
    dcm2niix = shutil.which("dcm2niix")
    if dcm2niix is None:
        raise SystemExit("dcm2niix is not installed (apt: dcm2niix)")
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is not installed (apt: time)")
    version = subprocess.run(
        [dcm2niix, "-v"], capture_output=True, text=True, check=False
    ).stdout.strip()
    began, load_start = time.perf_counter(), _load()
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="bench-nifti-") as tmp:
        work = Path(tmp)
        source = args.data
        if source is None:
            from app.sampledata import benchmark_ct, write_datasets

            source = work / "ct"
            write_datasets(benchmark_ct(), source)
        files = sorted(source.glob("*.dcm"))
        input_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"input: {len(files)} files, {input_mb:.1f} MB in {source}", flush=True)

        check = _check_outputs(work, source, dcm2niix)
        print(f"check: {check}", flush=True)
        for target in TARGETS:  # warm-up: page cache, interpreter caches
            _run(target, source, work, dcm2niix)
        runs: dict[str, list[Run]] = {t.key: [] for t in TARGETS}
        for index in range(args.rounds):
            order = TARGETS[index % len(TARGETS) :] + TARGETS[: index % len(TARGETS)]
            for target in order:
                run, _ = _run(target, source, work, dcm2niix)
                runs[target.key].append(run)
                print(
                    f"round {index + 1} {target.key:14s} {run.wall:6.2f} s  cpu {run.cpu:5.2f} s "
                    f"rss {run.max_rss_kb / 1024:6.0f} MiB  {run.inner.get('convert_s', 0):.2f} s",
                    flush=True,
                )
        e2e = end_to_end(files, args.e2e_rounds, work / "e2e", dcm2niix) if args.end_to_end else {}
    return {
        "meta": {
            "started": started,
            "machine": machine(),
            "load_start": load_start,
            "load_end": _load(),
            "python": platform.python_version(),
            "dcm2niix": "dcm2niix " + (version.splitlines()[-1] if version else "(unknown)"),
            "pigz": shutil.which("pigz") is not None,
            "command": shlex.join([".venv/bin/python", "-m", "bench.nifti", *args.argv]),
            "duration_s": time.perf_counter() - began,
            "rounds": args.rounds,
            "files": len(files),
            "input_mb": input_mb,
        },
        "check": check,
        "summary": _summary(runs),
        "e2e": e2e,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.nifti", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--data", type=Path, help="folder holding benchmark_ct() already")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--end-to-end",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time PACS -> NIfTI: the gateway (cold cache) against movescu -> storescp "
        "-> dcm2niix, with an Orthanc of its own (default: on)",
    )
    parser.add_argument(
        "--e2e-rounds", type=int, default=3, help="end-to-end rounds (default 3, --quick 2)"
    )
    parser.add_argument(
        "--child", nargs=2, type=Path, metavar=("OUT", "IN"), help=argparse.SUPPRESS
    )
    parser.add_argument("--level", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child[0], args.child[1], args.level, args.threads)
    if args.quick:
        args.rounds = 2
        args.e2e_rounds = min(args.e2e_rounds, 2)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = bench(args)
    section = _section(result)
    print(section)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        write_doc(section)
    check = result["check"]
    return 0 if check["same_voxels"] and check["gzip_roundtrip"] else 1


if __name__ == "__main__":
    sys.exit(main())
