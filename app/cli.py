"""``dimse-gateway`` command line: serve, demo, echo, probe, nodes, hash-key; find and get from a
running gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import PacsNode, Settings, load_settings
from app.errors import GatewayError
from app.logs import LogFormat, configure

log = logging.getLogger("app.cli")
API_KEY_ENV = "DIMSE_GATEWAY_API_KEY"


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except (ValidationError, ValueError) as exc:
        sys.exit(f"dimse-gateway: invalid configuration: {exc}")


def _logging(level: str, fmt: LogFormat = "text") -> None:
    configure(level, fmt)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(settings: Settings) -> None:
    import uvicorn

    # uvicorn shuts down on SIGTERM, then re-raises it under the handler found at
    # start-up: with this one, callers' finally blocks (the demo PACS) still run.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from app.main import create_app
    from app.serving import DrainingServer

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
        # One process: association pools and (later) retrieve correlation are in-process.
        workers=1,
        access_log=False,
        # uvicorn's own lines go through our handler (JSON when asked for).
        log_config=None,
    )
    DrainingServer(config, app.state.draining, settings.shutdown_grace).run()


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.host:
        overrides["http_host"] = args.host
    if args.port is not None:
        overrides["http_port"] = args.port
    if args.viewer is not None:
        overrides["viewer_dir"] = args.viewer
    settings = _settings(args, **overrides)
    _logging(settings.log_level, settings.log_format)
    _serve(settings)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    settings = _settings(args)
    default = settings.default_node
    if not settings.nodes:
        print("no nodes configured")
        return 1
    for node in settings.nodes:
        mark = " (default)" if default is not None and node.name == default.name else ""
        print(
            f"{node.name}{mark}: {node.ae_title}@{node.host}:{node.port} "
            f"query_model={node.query_model} retrieve={node.retrieve}"
            + (" tls" if node.tls else "")
        )
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from app.runtime import Gateway
    from app.services.health import echo

    settings = _settings(args)
    _logging("WARNING")

    async def run() -> float:
        gateway = Gateway(settings)
        await gateway.start()
        try:
            return await echo(gateway, gateway.node(args.node))
        finally:
            await gateway.close()

    try:
        rtt = asyncio.run(run())
    except GatewayError as exc:
        print(f"C-ECHO {args.node}: FAILED: {exc.message}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.node}: ok, {rtt * 1000:.1f} ms")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from app.dimse.probe import ProbeFailed, probe_node, profile_toml

    settings = _settings(args)
    _logging("WARNING")
    node = settings.node(args.node)
    if node is None:
        known = ", ".join(n.name for n in settings.nodes) or "none"
        print(f"probe: no node {args.node!r} (configured: {known})", file=sys.stderr)
        return 1
    try:
        report = probe_node(node, settings.ae_title)
    except ProbeFailed as exc:
        print(f"probe {node.name}: FAILED: {exc}", file=sys.stderr)
        return 1
    print(profile_toml(node, report), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import QrscpProcess, load_demo_data

    if args.viewer is not None:
        _settings(args, viewer_dir=args.viewer)  # a missing viewer fails before the PACS starts
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _logging("INFO")
    gateway_ae = "DIMSEGW"
    with QrscpProcess(
        work / "pacs",
        port=args.pacs_port,
        ae_title="DEMOPACS",
        # Stock qrscp answers without a character set; non-Latin names become "?".
        utf8_answers=True,
        move_destinations={gateway_ae: ("127.0.0.1", args.storage_port)},
    ) as pacs:
        count = load_demo_data(pacs, work / "sample-data")
        settings = _settings(
            args,
            ae_title=gateway_ae,
            http_host=args.host,
            http_port=args.http_port,
            storage_port=args.storage_port,
            work_dir=work / "gateway",
            **({"viewer_dir": args.viewer} if args.viewer is not None else {}),
            nodes=[
                PacsNode(
                    name="demo",
                    ae_title=pacs.ae_title,
                    host="127.0.0.1",
                    port=pacs.port,
                    default=True,
                    # The demo PACS answers both ways; the default shows the JSON 204 rule.
                    no_match_status=204,
                )
            ],
        )
        base = f"http://{args.host}:{args.http_port}"
        print(
            f"\nDemo PACS {pacs.ae_title} on port {pacs.port} holds {count} instances.\n"
            f"Gateway on {base} — try:\n\n"
            f"  curl -s '{base}/dicomweb/studies'\n"
            f"  curl -s '{base}/dicomweb/studies?PatientName=M*&includefield=StudyDescription'\n"
            f"  curl -s '{base}/pacs/demo/echo'\n",
            flush=True,
        )
        if settings.viewer_dir is not None:
            print(f"OHIF viewer: {base}/viewer/\n", flush=True)
        _serve(settings)
    return 0


def cmd_load_samples(args: argparse.Namespace) -> int:
    """Generate the demo studies and C-STORE them into a PACS (docker-compose's loader)."""
    import tempfile

    from app.demo import DemoPacsError, store_files
    from app.sampledata import write_sample_studies

    _logging("INFO")
    with tempfile.TemporaryDirectory(prefix="dimse-gateway-samples-") as tmp:
        paths = write_sample_studies(Path(tmp))
        try:
            stored = store_files(
                paths,
                host=args.host,
                port=args.port,
                called_ae=args.called_ae,
                calling_ae=args.calling_ae,
            )
        except DemoPacsError as exc:
            print(f"load-samples: {exc}", file=sys.stderr)
            return 1
    print(f"stored {stored} sample instances in {args.called_ae} at {args.host}:{args.port}")
    return 0


def _client_key() -> str | None:
    # From the environment, never an option: argv is visible to every local user (ps).
    return os.environ.get(API_KEY_ENV) or None


def cmd_find(args: argparse.Namespace) -> int:
    from app.client.commands import find, parse_keys, run
    from app.client.gateway import GatewayClient

    try:
        params = parse_keys(args.keys)
    except ValueError as exc:
        print(f"dimse-gateway find: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        params.append(("limit", str(args.limit)))
    with GatewayClient(args.url, args.node, api_key=_client_key()) as client:
        return run(
            find, client, args.level, params, as_json=args.json, out=sys.stdout, err=sys.stderr
        )


def cmd_get(args: argparse.Namespace) -> int:
    from app.client.commands import get, run
    from app.client.gateway import GatewayClient

    show = args.progress if args.progress is not None else sys.stderr.isatty()
    with GatewayClient(args.url, args.node, api_key=_client_key()) as client:
        return run(
            get,
            client,
            study=args.study,
            series=args.series,
            to=Path(args.to),
            transfer_syntax=args.transfer_syntax,
            use_job=not args.no_job,
            echo=args.echo,
            volume=args.volume,
            show_progress=show,
            out=sys.stdout,
            err=sys.stderr,
        )


def _client_options(parser: argparse.ArgumentParser) -> None:
    from app.client.commands import default_url

    parser.add_argument(
        "--url",
        default=default_url(),
        help="the gateway (default: $DIMSE_GATEWAY_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--node", help="PACS node name (default: the gateway's default node)")


def _viewer_option(parser: argparse.ArgumentParser) -> None:
    from app.viewer import default_viewer_dir

    default = default_viewer_dir()
    parser.add_argument(
        "--viewer",
        nargs="?",
        const=default,
        type=Path,
        metavar="DIR",
        help=f"serve the OHIF viewer at /viewer/ from DIR (default {default}; "
        "scripts/install-viewer.sh installs it there)",
    )


def cmd_hash_key(args: argparse.Namespace) -> int:
    from app.auth.keys import generate_key, hash_key, sha256_hash

    if args.stdin:
        # Never on the command line: argv is visible to every local user (ps).
        key = sys.stdin.readline().rstrip("\r\n")
        if not key:
            print("dimse-gateway hash-key: no key on standard input", file=sys.stderr)
            return 2
    else:
        key = generate_key()
    stored = sha256_hash(key) if args.sha256 else hash_key(key)
    nodes = ", ".join(json.dumps(n.strip()) for n in args.nodes.split(",") if n.strip())
    if not args.stdin:
        print(f"# the key (give it to the client; it is not stored anywhere): {key}")
    # JSON strings are valid TOML basic strings.
    print(f"[[api_keys]]\nname = {json.dumps(args.name)}\nhash = {json.dumps(stored)}")
    print(f"nodes = [{nodes}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dimse-gateway", description="DICOMweb gateway in front of DIMSE-only PACS"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML configuration file (or DIMSE_GATEWAY_CONFIG)")
    serve.add_argument("--host", help="override http_host")
    serve.add_argument("--port", type=int, help="override http_port")
    _viewer_option(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the gateway in front of an embedded demo PACS")
    demo.add_argument("--work-dir", default=".demo", help="where the demo PACS keeps its data")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--http-port", type=int, default=8000)
    demo.add_argument("--pacs-port", type=int, default=11113)
    demo.add_argument("--storage-port", type=int, default=11112)
    _viewer_option(demo)
    demo.set_defaults(func=cmd_demo)

    echo = sub.add_parser("echo", help="C-ECHO a configured node")
    echo.add_argument("node")
    echo.add_argument("--config")
    echo.set_defaults(func=cmd_echo)

    load = sub.add_parser(
        "load-samples", help="generate the demo studies and C-STORE them into a PACS"
    )
    load.add_argument("host")
    load.add_argument("port", type=int)
    load.add_argument("--called-ae", required=True, help="the PACS's AE title")
    load.add_argument("--calling-ae", default="DEMOLOAD", help="our AE title (default DEMOLOAD)")
    load.set_defaults(func=cmd_load_samples)
    hkey = sub.add_parser(
        "hash-key",
        help="make an API key and the [[api_keys]] entry that stores its hash",
        description="Without --stdin a new random key is made and printed once. The "
        "printed [[api_keys]] entry goes into the configuration file.",
    )
    hkey.add_argument("--stdin", action="store_true", help="hash a key read from standard input")
    hkey.add_argument("--name", default="client", help="name of the key in the audit log")
    hkey.add_argument("--nodes", default="*", help="comma-separated node names ('*': all)")
    hkey.add_argument(
        "--sha256", action="store_true", help="plain SHA-256 (fast; only for long random keys)"
    )
    hkey.set_defaults(func=cmd_hash_key)

    probe = sub.add_parser(
        "probe", help="find out what a configured node supports; prints its profile as TOML"
    )
    probe.add_argument("node")
    probe.add_argument("--config")
    probe.set_defaults(func=cmd_probe)

    nodes = sub.add_parser("nodes", help="list configured nodes")
    nodes.add_argument("--config")
    nodes.set_defaults(func=cmd_nodes)

    find = sub.add_parser(
        "find",
        help="search a running gateway (QIDO-RS) and print a table",
        description="Exit codes: 0 done (also when nothing matched), 1 the gateway refused, "
        "2 bad arguments, 3 the gateway could not be reached.",
    )
    _client_options(find)
    find.add_argument("--level", choices=["studies", "series", "instances"], default="studies")
    find.add_argument("--limit", type=int)
    find.add_argument("--json", action="store_true", help="print the DICOM JSON as answered")
    find.add_argument(
        "keys", nargs="*", metavar="KEY=VALUE", help="QIDO parameters, e.g. PatientName='DOE*'"
    )
    find.set_defaults(func=cmd_find)

    get = sub.add_parser(
        "get",
        help="download a study or series from a running gateway",
        description="Instances go to DIR/<series>/<sop>.dcm; a target ending in .nii or .nii.gz "
        "gets the series as one NIfTI volume.  Exit codes: 0 done, 1 the gateway refused or "
        "the retrieve failed or was incomplete, 2 bad arguments, 3 the gateway could not be "
        "reached, 130 interrupted (the job is cancelled).",
    )
    _client_options(get)
    get.add_argument("--study", required=True, help="StudyInstanceUID")
    get.add_argument("--series", help="SeriesInstanceUID (default: the whole study)")
    get.add_argument("--to", required=True, metavar="DIR|FILE.nii.gz")
    get.add_argument(
        "--transfer-syntax",
        default="*",
        help="as the PACS stored them (*, the default) or a transfer syntax UID",
    )
    get.add_argument("--echo", type=int, help="NIfTI: the echo of a multi-echo series")
    get.add_argument("--volume", type=int, help="NIfTI: the volume of a series that has several")
    get.add_argument(
        "--no-job",
        action="store_true",
        help="download directly, without a job (no progress counts from the PACS)",
    )
    get.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    get.set_defaults(func=cmd_get)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
