"""``dimse-gateway`` command line: serve, demo, echo, nodes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from app.config import PacsNode, Settings, load_settings
from app.errors import GatewayError

log = logging.getLogger("app.cli")


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except (ValidationError, ValueError) as exc:
        sys.exit(f"dimse-gateway: invalid configuration: {exc}")


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # pynetdicom logs every PDU at INFO; our own DIMSE lines say what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve(settings: Settings) -> None:
    import uvicorn

    # uvicorn shuts down on SIGTERM, then re-raises it under the handler found at
    # start-up: with this one, callers' finally blocks (the demo PACS) still run.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        log_level=settings.log_level.lower(),
        # One process: association pools and (later) retrieve correlation are in-process.
        workers=1,
        access_log=False,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.host:
        overrides["http_host"] = args.host
    if args.port is not None:
        overrides["http_port"] = args.port
    if args.viewer is not None:
        overrides["viewer_dir"] = args.viewer
    settings = _settings(args, **overrides)
    _logging(settings.log_level)
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

    nodes = sub.add_parser("nodes", help="list configured nodes")
    nodes.add_argument("--config")
    nodes.set_defaults(func=cmd_nodes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
