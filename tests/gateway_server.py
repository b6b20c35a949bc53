"""Run the real gateway (uvicorn + the app) in a thread on a free port, for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
import tomllib
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import uvicorn

from app.config import DimseProfile, PacsNode, Settings
from app.main import create_app
from app.serving import DrainingServer

GATEWAY_AE = "DIMSEGW"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class GatewayServer:
    """``with GatewayServer(settings) as gw: httpx.get(gw.url + "/health")``."""

    def __init__(self, settings: Settings) -> None:
        """A stop behaves as ``dimse-gateway serve`` on SIGTERM (``shutdown_grace``)."""
        if settings.http_port == 0:
            settings = settings.model_copy(update={"http_port": free_port()})
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=settings.http_port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = DrainingServer(config, self.app.state.draining, settings.shutdown_grace)
        self._thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def local_node(name: str, ae_title: str, port: int, **options: Any) -> PacsNode:
    """A PACS on this machine."""
    return PacsNode(name=name, ae_title=ae_title, host="127.0.0.1", port=port, **options)


PROFILES = Path(__file__).resolve().parent / "data" / "profiles"


def probed_profile(pacs: str) -> DimseProfile:
    """The profile ``dimse-gateway probe`` found on a test PACS (orthanc, dcmqrscp,
    qrscp, ctn), as checked in under ``tests/data/profiles``."""
    data = tomllib.loads((PROFILES / f"{pacs}.toml").read_text(encoding="utf-8"))
    return DimseProfile(**data["profile"])


def gateway_settings(
    work_dir: Path, *nodes: PacsNode, storage_port: int = 0, **options: Any
) -> Settings:
    """Settings for a gateway under test: free HTTP port, storage SCP on loopback
    (``storage_port`` must be the one the PACS has on file when the test moves);
    ``options`` are further Settings fields."""
    return Settings(
        ae_title=GATEWAY_AE,
        http_port=0,
        storage_host="127.0.0.1",
        storage_port=storage_port,
        work_dir=work_dir,
        nodes=list(nodes),
        **options,
    )


def partial_files(temp_dir: Path) -> list[Path]:
    """Files in the cache's temp folder holding received bytes.

    The storage child keeps a few empty files there, created ahead of need;
    anything else is a receive in progress or one that was not cleaned up.
    """
    found = []
    for path in temp_dir.iterdir():
        try:
            if path.stat().st_size > 0:
                found.append(path)
        except FileNotFoundError:  # renamed into the cache or deleted meanwhile
            continue
    return found
