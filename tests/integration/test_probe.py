"""``dimse-gateway probe`` against the four real PACS; the expected profiles are
checked in under ``tests/data/profiles`` (what each PACS was found to support)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from app.demo import QrscpProcess
from tests.gateway_server import probed_profile
from tests.integration.conftest import GATEWAY_AE
from tests.peers.common import PeerProcess

pytestmark = pytest.mark.integration

PEERS = {
    "orthanc": "orthanc_peer",
    "dcmqrscp": "dcmqrscp_peer",
    "qrscp": "qrscp_peer",
    "ctn": "ctn_peer",
}


def expected_profile(pacs: str) -> dict[str, object]:
    return probed_profile(pacs).model_dump()


def _address(peer: PeerProcess | QrscpProcess) -> tuple[str, int]:
    if isinstance(peer, QrscpProcess):
        return peer.ae_title, peer.port
    return peer.aet, peer.dicom_port


def run_probe(
    tmp_path: Path, name: str, ae_title: str, port: int
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\nae_title = "{GATEWAY_AE}"\n\n'
        f'[[nodes]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "probe", name, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("pacs", list(PEERS))
def test_probe_finds_the_expected_profile(
    request: pytest.FixtureRequest, tmp_path: Path, pacs: str
) -> None:
    peer = request.getfixturevalue(PEERS[pacs])
    ae_title, port = _address(peer)
    done = run_probe(tmp_path, pacs, ae_title, port)
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    [node] = printed["nodes"]
    assert (node["name"], node["ae_title"], node["port"]) == (pacs, ae_title, port)
    assert node["profile"] == expected_profile(pacs), done.stdout


def test_probe_of_a_closed_port_fails_with_a_message(tmp_path: Path) -> None:
    from tests.peers.common import free_port

    done = run_probe(tmp_path, "nobody", "NOBODY", free_port())
    assert done.returncode == 1
    assert "probe nobody: FAILED: no association" in done.stderr
