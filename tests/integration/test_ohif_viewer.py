"""End to end: the OHIF viewer served by the gateway, in headless Chromium, in front of Orthanc.

A person's path: open the study list at ``/viewer/``, find a generated
patient, open the study in the Basic Viewer, and see the CT slice.  The
pixels on the viewport canvas are compared with the slice as the DICOM file
holds it (windowed as the header says), because OHIF draws its overlays and a
slice counter over a black viewport even when no frame arrived.  The gateway
records every request it answered, so the test also sees that the metadata
and frames came through it, and that nothing the browser asked of it failed.

Needs Debian's ``chromium`` and the npm package ``@ohif/app`` (both installed
by ``scripts/test.sh``; the viewer also by ``scripts/install-viewer.sh``).
Without them the test is skipped with the reason, except under CI, where a
missing browser or viewer is a broken set-up and fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.keys import sha256_hash
from app.config import ApiKey
from app.viewer import default_viewer_dir
from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.orthanc import OrthancPeer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
VIEWER_ENV = "DIMSE_GATEWAY_TEST_VIEWER_DIR"
CHROMIUM = os.environ.get("DIMSE_GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
# The generated CT study of Doe^John (app.sampledata): 60 slices of 256 x 256.
ACCESSION = "ACC2019031401"
PATIENT_LISTED = "Doe, John"
SLICES = 60
CHROMIUM_ARGS = [
    "--no-sandbox",
    # WebGL without a GPU, as cornerstone3D renders with it.
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    # This machine reaches no outside hosts: do not try.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The bound on everything from starting the browser to the checked viewport:
# each step waits only for what is left of it, so a stuck step fails by name.
BROWSER_BUDGET_S = 90.0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must be able to run the viewer test)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    """The built viewer; installed with scripts/install-viewer.sh when absent."""
    folder = Path(os.environ.get(VIEWER_ENV) or default_viewer_dir())
    if not (folder / "dist" / "index.html").is_file():
        if shutil.which("npm") is None:
            _unavailable("npm is not installed, so the OHIF viewer cannot be (apt: npm)")
        install = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "install-viewer.sh"), str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if install.returncode != 0:
            _unavailable(f"scripts/install-viewer.sh failed:\n{install.stdout}{install.stderr}")
    return folder / "dist"


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt: chromium; scripts/test.sh installs it)")
    return CHROMIUM


@dataclass
class Seen:
    method: str
    path: str
    query: str
    status: int | None
    authorization: bytes | None = None


class RequestLog:
    """ASGI middleware keeping each request the gateway answered, with its status."""

    def __init__(self, app: ASGIApp, seen: list[Seen]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        entry = Seen(
            scope["method"],
            scope["path"],
            scope["query_string"].decode(),
            None,
            headers.get(b"authorization"),
        )
        self.seen.append(entry)

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        await self.app(scope, receive, record)


# With authentication on, the viewer is opened with ?token=<this API key>.
VIEWER_KEY = "dgw_viewer-test-key-0123456789"


@pytest.fixture(scope="module", params=["open", "api-key"])
def viewer_gateway(
    request: pytest.FixtureRequest,
    orthanc_peer: OrthancPeer,
    gateway_storage_port: int,
    tmp_path_factory: pytest.TempPathFactory,
    ohif_dist: Path,
) -> Iterator[tuple[GatewayServer, list[Seen]]]:
    auth: dict[str, Any] = {}
    if request.param == "api-key":
        auth["api_keys"] = [ApiKey(name="viewer", hash=sha256_hash(VIEWER_KEY), nodes=["*"])]
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-viewer"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
        viewer_dir=ohif_dist,
        **auth,
    )
    seen: list[Seen] = []
    server = GatewayServer(settings)
    server.app.add_middleware(RequestLog, seen=seen)
    with server as gw:
        yield gw, seen


def expected_slices(sample_files: list[Path]) -> list[np.ndarray[Any, np.dtype[np.float64]]]:
    """The study's slices as a viewer shows them: HU windowed to 0..255 by the header's window."""
    slices = []
    for path in sample_files:
        ds = dcmread(path)
        if ds.AccessionNumber != ACCESSION:
            continue
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        # PS3.3 C.11.2.1.2.1, linear function.
        shown = ((hu - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1) * 255
        slices.append((int(ds.InstanceNumber), shown))
    assert len(slices) == SLICES
    return [image for _, image in sorted(slices, key=lambda item: item[0])]


# The viewport canvas, sampled in the browser: the centred square the image is
# fitted into, as a side x side grid of red values (the image is grey).
_CANVAS_SAMPLE = """
(side) => {
  const canvas = document.querySelector('canvas.cornerstone-canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const ctx = canvas.getContext('2d');
  const { width, height } = canvas;
  const data = ctx.getImageData(0, 0, width, height).data;
  const square = Math.min(width, height);
  const x0 = Math.floor((width - square) / 2), y0 = Math.floor((height - square) / 2);
  const out = [];
  for (let i = 0; i < side; i++) {
    const y = y0 + Math.floor((i + 0.5) * square / side);
    for (let j = 0; j < side; j++) {
      const x = x0 + Math.floor((j + 0.5) * square / side);
      out.push(data[(y * width + x) * 4]);
    }
  }
  return { width, height, values: out };
}
"""

# True once the viewport shows more than a blank or an overlay: a quarter of
# the canvas lit (the phantom's body fills about a third of it).
_CANVAS_LIT = """
() => {
  const canvas = document.querySelector('canvas.cornerstone-canvas');
  if (!canvas || !canvas.width) return false;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] > 20) lit++;
  return lit > 0.25 * data.length / 4;
}
"""


def correlation(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_ohif_opens_a_generated_study_and_shows_its_pixels(
    viewer_gateway: tuple[GatewayServer, list[Seen]],
    chromium: str,
    sample_files: list[Path],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import Request, sync_playwright

    gw, seen = viewer_gateway
    authenticated = gw.settings.auth_enabled
    browser_started = len(seen)
    if authenticated:
        # Authentication is really on: the same search without the key is refused.
        assert httpx.get(f"{gw.url}/dicomweb/studies", timeout=30).status_code == 401
    browser_started = len(seen)
    expected = expected_slices(sample_files)
    failed: list[str] = []

    def on_failed(request: Request) -> None:
        # ERR_ABORTED is the page dropping a request it no longer needs (the study
        # list's queries when the viewer opens); a gateway failing mid-answer
        # shows as another error.
        if request.url.startswith(gw.url) and request.failure != "net::ERR_ABORTED":
            failed.append(f"{request.url}: {request.failure}")

    def on_finished(request: Request) -> None:
        response = request.response()
        if request.url.startswith(gw.url) and response is not None and response.status >= 400:
            failed.append(f"{request.url}: HTTP {response.status}")

    deadline = time.monotonic() + BROWSER_BUDGET_S

    def left() -> float:
        """Milliseconds of the budget still left, for Playwright's timeouts."""
        return max(1.0, (deadline - time.monotonic()) * 1000)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=left())
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(left())
        page.on("requestfailed", on_failed)
        page.on("requestfinished", on_finished)
        try:
            opened = f"{gw.url}/viewer/" + (f"?token={VIEWER_KEY}" if authenticated else "")
            page.goto(opened, timeout=left())
            # OHIF's own notice; a person reads it and hides it.
            page.get_by_role("button", name="Confirm and hide").click(timeout=left())
            # The key is kept by the tab, not left in the address bar and history.
            assert "token=" not in page.url
            row = page.get_by_text(ACCESSION)
            row.wait_for(timeout=left())
            listed = page.inner_text("body")
            assert PATIENT_LISTED in listed
            # From Orthanc through the gateway's includefield handling.
            assert "CT Thorax" in listed
            page.screenshot(path=str(tmp_path / "study-list.png"))

            row.click(timeout=left())
            page.get_by_role("button", name="Basic Viewer").click(timeout=left())
            page.wait_for_url(re.compile(r"/viewer/viewer\?StudyInstanceUIDs="), timeout=left())
            page.wait_for_function(_CANVAS_LIT, polling=250, timeout=left())
            # The first slice, once two looks 300 ms apart agree (rendering settled).
            sample = page.evaluate(_CANVAS_SAMPLE, 256)
            while left() > 1000:
                page.wait_for_timeout(300)
                again = page.evaluate(_CANVAS_SAMPLE, 256)
                if again == sample:
                    break
                sample = again
            page.screenshot(path=str(tmp_path / "viewer.png"))
        except Exception:
            # What a person would have seen, beside the test's other screenshots.
            page.screenshot(path=str(tmp_path / "failure.png"), timeout=10_000)
            raise
        finally:
            browser.close()

    problems = "\n".join(failed)
    assert not failed, f"requests to the gateway failed (screenshots in {tmp_path}):\n{problems}"

    shown = np.array(sample["values"], dtype=np.float64).reshape(256, 256)
    scores = [correlation(shown, image) for image in expected]
    best = int(np.argmax(scores))
    # OHIF opens a series at its first slice (instance 1, the head end).  The
    # phantom's other slices score about 0.9; a blank, a wrong image or garbled
    # bytes far below.
    assert best == 0 and scores[best] > 0.95, (
        f"the viewport is closest to slice {best + 1}, at r={scores[best]:.3f} "
        f"(expected slice 1, r > 0.95; screenshots in {tmp_path})"
    )

    study_paths = [s for s in seen[browser_started:] if "/dicomweb/" in s.path]
    metadata = [s for s in study_paths if s.path.endswith("/metadata")]
    frames = [s for s in study_paths if "/frames/" in s.path]
    assert any(s.path.endswith("/dicomweb/studies") for s in study_paths)
    assert metadata and all(s.status == 200 for s in metadata)
    # Frames still on their way when the browser closed have no status.
    assert any(s.status == 200 for s in frames)
    assert all(s.status in (200, None) for s in frames), [s for s in frames if s.status != 200]
    if authenticated:
        bearer = f"Bearer {VIEWER_KEY}".encode()
        assert all(s.authorization == bearer for s in study_paths), [
            (s.path, s.authorization) for s in study_paths if s.authorization != bearer
        ]


# An open gateway needs no token and asks for none.
@pytest.mark.parametrize("viewer_gateway", ["api-key"], indirect=True)
def test_opened_without_a_token_the_viewer_asks_for_one(
    viewer_gateway: tuple[GatewayServer, list[Seen]], chromium: str
) -> None:
    from playwright.sync_api import Dialog, sync_playwright

    gw, seen = viewer_gateway
    assert gw.settings.auth_enabled
    asked: list[str] = []

    def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept(VIEWER_KEY)

    deadline = time.monotonic() + BROWSER_BUDGET_S
    before = len(seen)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("dialog", answer)
            page.goto(f"{gw.url}/viewer/")
            page.get_by_text(ACCESSION).wait_for(
                timeout=max(1.0, (deadline - time.monotonic()) * 1000)
            )
        finally:
            browser.close()
    assert len(asked) == 1 and "API key" in asked[0]
    searches = [s for s in seen[before:] if s.path.endswith("/dicomweb/studies")]
    assert searches and all(s.status == 200 for s in searches)
    assert all(s.authorization == f"Bearer {VIEWER_KEY}".encode() for s in searches)
