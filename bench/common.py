"""What the benchmark scripts share: the gateway as a child process, shell
output, the machine and code measured for their reports, and their own
section of ``docs/benchmarks.md``."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
GATEWAY_AE = "DIMSEGW"

TomlValue = str | int | float | bool

DOC_INTRO = """# Benchmarks

Reproducible measurements of the gateway against the PACS it fronts.  Each
section below is written by the script it names (run from the repository root);
re-running a script replaces only its own section.  The machines are shared and
noisy: compare numbers within one run, not across runs.
"""


def sh(cmd: Sequence[str]) -> str:
    """A command's output (stdout, else stderr) for a report; never raises."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False, cwd=REPO)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(failed: {exc})"
    return (out.stdout or out.stderr).strip()


def machine() -> dict[str, object]:
    """CPU model and count, memory, kernel and load average now."""
    cpu = platform.processor() or "?"
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def code() -> str:
    """The commit measured, and whether app/ differs from it (others edit concurrently)."""
    head = sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "app"]).splitlines()
    if not dirty:
        return f"commit {head}"
    names = ", ".join(line.split(maxsplit=1)[-1] for line in dirty)
    return f"commit {head} with uncommitted changes in {names}"


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _table(header: str, values: Mapping[str, TomlValue]) -> str:
    return header + "\n" + "".join(f"{key} = {_toml(v)}\n" for key, v in values.items())


def clean_env() -> dict[str, str]:
    """This process's environment without ``DIMSE_GATEWAY_*`` and proxy variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIMSE_GATEWAY_")}
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy"):
        env.pop(proxy, None)
    return env


class GatewayProcess:
    """``dimse-gateway serve --config FILE`` as a child process in its own session,
    running this checkout's code, without the caller's ``DIMSE_GATEWAY_*`` or proxy
    variables.  ``gateway`` adds to (or overrides) the ``[gateway]`` table the
    process needs (AE title, ports on loopback, work directory, INFO log);
    ``nodes`` are the ``[[nodes]]`` tables."""

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: Sequence[Mapping[str, TomlValue]],
        gateway: Mapping[str, TomlValue] | None = None,
        storage_port: int | None = None,
        written_by: str = "a benchmark",
    ) -> None:
        from tests.peers.common import free_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.work_dir = workdir / "work"
        self.http_port = free_port()
        self.storage_port = storage_port or free_port()
        self.config_path = workdir / "gateway.toml"
        self.log_path = workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        settings: dict[str, TomlValue] = {
            "ae_title": GATEWAY_AE,
            "storage_port": self.storage_port,
            "storage_host": LOOPBACK,
            "http_host": LOOPBACK,
            "http_port": self.http_port,
            "work_dir": str(self.work_dir),
            # The default level: one INFO line per DIMSE operation, as deployed.
            "log_level": "INFO",
            **(gateway or {}),
        }
        self.config_text = f"# Written by {written_by}\n" + "\n".join(
            [_table("[gateway]", settings), *(_table("[[nodes]]", node) for node in nodes)]
        )
        self.config_path.write_text(self.config_text, encoding="utf-8")
        script = Path(sys.executable).with_name("dimse-gateway")
        self.command = ([str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]) + [
            "serve",
            "--config",
            str(self.config_path),
        ]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the gateway was not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until both ports listen and ``/health`` answers."""
        from tests.peers.common import port_is_open

        env = clean_env()
        # This checkout's code, whatever the venv's editable install points at.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        with self.log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {shlex.join(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited during start-up:\n{self.log_tail()}")
            if port_is_open(LOOPBACK, self.http_port) and port_is_open(LOOPBACK, self.storage_port):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).is_success:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the gateway is not ready after {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (the graceful shutdown), SIGKILL after 20 s."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode("utf-8", "replace")

    def log_text(self) -> str:
        return self.log_since(0) if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"


def write_doc_section(path: Path, block: str, start: str, end: str, intro: str) -> None:
    """Put *block* (which begins with the *start* marker and ends with the *end*
    one) in place of the file's block between those markers, or append it.  The
    file is read right before writing: other scripts write their own sections."""
    text = path.read_text(encoding="utf-8") if path.exists() else intro
    first, last = text.find(start), text.find(end)
    if first != -1 and last > first:
        last += len(end)
        if text[last : last + 1] == "\n":
            last += 1
        text = text[:first] + block.rstrip("\n") + "\n" + text[last:]
    else:
        text = text.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
