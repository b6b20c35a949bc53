"""Rendered and thumbnail resources through the gateway, in front of a real Orthanc.

The reference is pydicom's own pixel pipeline on the file Orthanc was loaded with
(``tests.render_reference``): PNG must match it exactly, JPEG within the loss
of the codec.  Orthanc's ``/dicom-web/.../rendered`` is compared where both
implement the same thing (an explicit window).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from tests.gateway_server import GatewayServer, gateway_settings, local_node
from tests.peers.common import InstanceInfo
from tests.peers.orthanc import OrthancPeer
from tests.render_reference import reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(
    orthanc_peer: OrthancPeer, gateway_storage_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gw-rendered"),
        local_node("orthanc", orthanc_peer.aet, orthanc_peer.dicom_port, default=True),
        storage_port=gateway_storage_port,
    )
    with GatewayServer(settings) as gw:
        yield gw


def _loaded(peer: OrthancPeer, suffix: str) -> InstanceInfo:
    for info in peer.loaded.values():
        if info.path.as_posix().endswith(suffix):
            return info
    pytest.fail(f"Orthanc does not hold {suffix}")


def _url(gw: GatewayServer, info: InstanceInfo) -> str:
    return (
        f"{gw.dicomweb}/studies/{info.study_instance_uid}/series/{info.series_instance_uid}"
        f"/instances/{info.sop_instance_uid}"
    )


def _pixels(resp: httpx.Response, media_type: str) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == media_type
    image = Image.open(io.BytesIO(resp.content))
    return np.asarray(image)


def _parts(resp: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    match = re.search(r'boundary="?([^";]+)"?', resp.headers["content-type"])
    assert match, resp.headers["content-type"]
    boundary = b"--" + match.group(1).encode()
    body = resp.content
    assert body.endswith(boundary + b"--\r\n"), body[-80:]
    parts = []
    for chunk in body.split(boundary)[1:-1]:
        head, _, payload = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((headers, payload[:-2]))
    return parts


def test_png_of_an_mr_image_equals_the_reference_exactly(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    info = _loaded(orthanc_peer, "dcm_qa_ts/In/1.dcm")
    resp = httpx.get(f"{_url(gateway, info)}/rendered", headers={"Accept": "image/png"}, timeout=60)
    got = _pixels(resp, "image/png")
    want = reference(info.path)
    assert got.shape == (384, 384)
    # The header window (763/1639) made the image: not a constant picture.
    assert want.std() > 20
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("suffix", "window", "function"),
    [
        ("dcm_qa_ts/In/5.dcm", "700,300", "LINEAR"),  # JPEG lossless, stored compressed
        ("dcm_qa_ts/In/9.dcm", "900,1200,sigmoid", "SIGMOID"),  # JPEG 2000
        ("dcm_qa_ts/In/7.dcm", "500,800,linear-exact", "LINEAR_EXACT"),  # JPEG-LS
    ],
)
def test_a_window_from_the_query_is_applied(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, suffix: str, window: str, function: str
) -> None:
    info = _loaded(orthanc_peer, suffix)
    url = f"{_url(gateway, info)}/rendered"
    center, width = window.split(",")[:2]
    want = reference(info.path, window=(float(center), float(width), function))

    png = _pixels(
        httpx.get(url, params={"window": window, "accept": "image/png"}, timeout=60), "image/png"
    )
    np.testing.assert_array_equal(png, want)

    jpeg = _pixels(
        httpx.get(url, params={"window": window, "quality": "95"}, timeout=60), "image/jpeg"
    )
    diff = np.abs(jpeg.astype(int) - want.astype(int))
    # JPEG at quality 95: small errors, spread thinly.
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (diff.mean(), diff.max())


def test_rescale_slope_and_intercept_are_applied_to_ct(
    gateway: GatewayServer, orthanc_peer: OrthancPeer, sample_files: list[Path]
) -> None:
    samples = {p.resolve() for p in sample_files}
    ct = next(
        info
        for info in orthanc_peer.loaded.values()
        if info.path.resolve() in samples
        and dcmread(info.path, stop_before_pixels=True).Modality == "CT"
    )
    ds = dcmread(ct.path, stop_before_pixels=True)
    assert float(ds.RescaleIntercept) == -1024
    got = _pixels(
        httpx.get(f"{_url(gateway, ct)}/rendered?accept=image/png", timeout=60), "image/png"
    )
    np.testing.assert_array_equal(got, reference(ct.path))
    # Without the intercept, a 40/400 HU window would turn nearly everything white.
    assert got.mean() < 200


def test_a_frame_of_an_enhanced_multiframe_uses_its_own_rescale_and_window(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    info = _loaded(orthanc_peer, "Philips/IM_0027_fMAP.dcm")
    url = _url(gateway, info)
    frame41 = _pixels(
        httpx.get(f"{url}/frames/41/rendered", headers={"Accept": "image/png"}, timeout=60),
        "image/png",
    )
    frame3 = _pixels(
        httpx.get(f"{url}/frames/3/rendered", headers={"Accept": "image/png"}, timeout=60),
        "image/png",
    )
    np.testing.assert_array_equal(frame41, reference(info.path, 41))
    np.testing.assert_array_equal(frame3, reference(info.path, 3))
    assert not np.array_equal(frame3, frame41)

    both = httpx.get(f"{url}/frames/3,41/rendered", headers={"Accept": "image/png"}, timeout=60)
    assert both.status_code == 200
    assert both.headers["content-type"].startswith('multipart/related; type="image/png"')
    parts = _parts(both)
    assert [h["Content-Location"].rsplit("/", 2)[-2] for h, _ in parts] == ["3", "41"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(parts[1][1]))), frame41)

    missing = httpx.get(f"{url}/frames/65/rendered", timeout=60)
    assert missing.status_code == 404
    assert "64 frames" in missing.json()["message"]


def test_viewport_scales_with_the_aspect_ratio_kept_and_crops(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    info = _loaded(orthanc_peer, "dcm_qa_ts/In/1.dcm")
    url = f"{_url(gateway, info)}/rendered"
    fit = _pixels(httpx.get(url, params={"viewport": "128,64"}, timeout=60), "image/jpeg")
    assert fit.shape == (64, 64)
    # A region: the left half, flipped horizontally, at its own size.
    region = _pixels(
        httpx.get(
            url, params={"viewport": "192,384,0,0,-192,384", "accept": "image/png"}, timeout=60
        ),
        "image/png",
    )
    np.testing.assert_array_equal(region, reference(info.path)[:, :192][:, ::-1])
    bad = httpx.get(url, params={"viewport": "0,10"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["parameter"] == "viewport"


def test_thumbnails_of_instance_series_and_study(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    middle = _loaded(orthanc_peer, "Siemens/XA10/6_2.dcm")  # of 4, by Instance Number
    base = f"{gateway.dicomweb}/studies/{middle.study_instance_uid}"

    instance = _pixels(
        httpx.get(
            f"{_url(gateway, _loaded(orthanc_peer, 'dcm_qa_ts/In/1.dcm'))}/thumbnail", timeout=60
        ),
        "image/jpeg",
    )
    assert instance.shape == (256, 256)  # 384 x 384 fitted into the 256 box

    series = httpx.get(
        f"{base}/series/{middle.series_instance_uid}/thumbnail",
        headers={"Accept": "image/png"},
        timeout=60,
    )
    got = _pixels(series, "image/png")
    assert got.shape == (64, 64)  # a small image is not enlarged
    np.testing.assert_array_equal(got, reference(middle.path, 1))

    study = httpx.get(f"{base}/thumbnail", params={"viewport": "32,32"}, timeout=60)
    assert _pixels(study, "image/jpeg").shape == (32, 32)


def test_series_rendered_is_one_part_per_instance(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    first = _loaded(orthanc_peer, "Siemens/XA10/6_1.dcm")
    members = {
        info.sop_instance_uid: info
        for info in orthanc_peer.loaded.values()
        if info.series_instance_uid == first.series_instance_uid
    }
    resp = httpx.get(
        f"{gateway.dicomweb}/studies/{first.study_instance_uid}/series/"
        f"{first.series_instance_uid}/rendered",
        headers={"Accept": "image/png"},
        timeout=120,
    )
    assert resp.status_code == 200
    parts = _parts(resp)
    assert len(parts) == len(members) == 4
    for headers, payload in parts:
        assert headers["Content-Type"] == "image/png"
        sop = headers["Content-Location"].split("/instances/")[1].split("/")[0]
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(payload))), reference(members[sop].path, 1)
        )


def test_media_types_by_accept(gateway: GatewayServer, orthanc_peer: OrthancPeer) -> None:
    url = f"{_url(gateway, _loaded(orthanc_peer, 'dcm_qa_ts/In/1.dcm'))}/rendered"
    assert httpx.get(url, timeout=60).headers["content-type"] == "image/jpeg"
    gif = httpx.get(url, headers={"Accept": "image/gif"}, timeout=60)
    assert gif.headers["content-type"] == "image/gif" and gif.content.startswith(b"GIF8")
    refused = httpx.get(url, headers={"Accept": "application/dicom"}, timeout=60)
    assert refused.status_code == 406


def test_orthanc_renders_an_explicit_window_the_same_way(
    gateway: GatewayServer, orthanc_peer: OrthancPeer
) -> None:
    """Orthanc's plugin implements ``window=c,w,linear`` with the same PS3.3 formula
    (float32, rounded the same way): PNGs agree to within one grey level."""
    info = _loaded(orthanc_peer, "dcm_qa_ts/In/1.dcm")
    path = (
        f"/studies/{info.study_instance_uid}/series/{info.series_instance_uid}"
        f"/instances/{info.sop_instance_uid}/rendered"
    )
    # Literal commas: Orthanc does not decode %2C in query values.
    query = "?window=763,1639,linear"
    png = {"Accept": "image/png"}
    ours = _pixels(httpx.get(gateway.dicomweb + path + query, headers=png, timeout=60), "image/png")
    theirs_resp = httpx.get(orthanc_peer.dicomweb_url + path + query, headers=png, timeout=60)
    assert theirs_resp.status_code == 200
    theirs = np.asarray(Image.open(io.BytesIO(theirs_resp.content)).convert("L"))
    assert theirs.shape == ours.shape
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
