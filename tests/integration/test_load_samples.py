"""``dimse-gateway load-samples``: what docker-compose's ``samples`` service runs,
against a real Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.peers.orthanc import OrthancPeer, orthanc_available

pytestmark = pytest.mark.integration


def test_load_samples_stores_the_demo_studies_in_orthanc(tmp_path: Path) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt: orthanc orthanc-dicomweb)")
    peer = OrthancPeer(tmp_path / "orthanc")
    peer.start()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "load-samples",
                "127.0.0.1",
                str(peer.dicom_port),
                "--called-ae",
                peer.aet,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        url = f"http://127.0.0.1:{peer.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            stats = json.load(resp)
        stored = int(proc.stdout.split()[1])
        assert stats["CountInstances"] == stored > 0
        assert stats["CountPatients"] == 4
        # A PACS that is not there: an exit status and a message, no traceback.
        down = subprocess.run(
            [sys.executable, "-m", "app.cli", "load-samples", "127.0.0.1", "1", "--called-ae", "X"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert down.returncode == 1
        assert "load-samples:" in down.stderr and "Traceback" not in down.stderr
    finally:
        peer.stop()
