"""Serving the OHIF viewer: files under /viewer/, the SPA's routes, the generated app-config.js.

A small stand-in for the npm package's ``dist/`` holds what the real build
refers to absolutely (checked against @ohif/app 3.13.2); the browser test
(tests/integration/test_ohif_viewer.py) runs the real one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from app.cli import build_parser
from app.cli import main as cli_main
from app.config import PacsNode, Settings
from app.viewer import ViewerFiles
from tests.gateway_server import GatewayServer, free_port

INDEX_HTML = (
    '<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
    '<link rel="manifest" href="/manifest.json">'
    '<script src="//cdn.example.org/x.js"></script>'
    '<script src="/app-config.js"></script>'
    '<script defer src="/app.bundle.0f61.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body></html>'
)
APP_BUNDLE = b'(() => { __webpack_require__.p = "/"; })(); const route = "/viewer";\n'
CHUNK = b"(self.webpackChunk = self.webpackChunk || []).push([[100], {}]);\n"
STYLE = b"@font-face{src:url(/a34f.woff2) format('woff2')}.x{background:url('//cdn/y.png')}\n"
WASM = b"\x00asm\x01\x00\x00\x00"


def _write_dist(folder: Path) -> Path:
    dist = folder / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX_HTML)
    (dist / "app.bundle.0f61.js").write_bytes(APP_BUNDLE)
    (dist / "100.bundle.cb02.js").write_bytes(CHUNK)
    (dist / "app.bundle.css").write_bytes(STYLE)
    (dist / "0ddf.wasm").write_bytes(WASM)
    (dist / "a34f.woff2").write_bytes(b"wOF2")
    (dist / "app-config.js").write_text("window.config = { dataSources: [] };")
    (dist / "assets" / "favicon.ico").write_bytes(b"\x00\x00\x01\x00")
    (folder / "package.json").write_text('{"name": "@ohif/app", "version": "3.13.2"}')
    return dist


def _settings(work: Path, viewer_dir: Path | None) -> Settings:
    port = free_port()
    return Settings(
        http_port=0,
        storage_port=0,
        work_dir=work,
        viewer_dir=viewer_dir,
        nodes=[
            PacsNode(name="main", ae_title="MAIN", host="127.0.0.1", port=port, default=True),
            PacsNode(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=port),
        ],
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ohif")
    _write_dist(folder)
    return folder


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, package: Path) -> Iterator[httpx.Client]:
    # The package folder, as scripts/install-viewer.sh leaves it: dist/ is found inside.
    settings = _settings(tmp_path_factory.mktemp("gw"), package)
    with GatewayServer(settings) as gw, httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def test_viewer_dir_is_the_dist_folder_or_the_package_holding_it(
    package: Path, tmp_path: Path
) -> None:
    dist = (package / "dist").resolve()
    assert _settings(tmp_path, package).viewer_dir == dist
    assert _settings(tmp_path, package / "dist").viewer_dir == dist


def test_viewer_dir_without_a_build_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"no built viewer.*install-viewer\.sh"):
        _settings(tmp_path, tmp_path)


def test_no_viewer_configured_means_no_viewer_route(tmp_path: Path) -> None:
    with GatewayServer(_settings(tmp_path, None)) as gw:
        assert httpx.get(f"{gw.url}/viewer/", timeout=10).status_code == 404


def test_index_is_moved_under_the_mount(client: httpx.Client) -> None:
    resp = client.get("/viewer/")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache"
    html = resp.text
    assert 'window.PUBLIC_URL="/viewer/"' in html
    assert 'src="/viewer/app-config.js"' in html
    assert 'src="/viewer/app.bundle.0f61.js"' in html
    assert 'href="/viewer/app.bundle.css"' in html
    assert 'href="/viewer/manifest.json"' in html
    # Other hosts' addresses are left alone.
    assert 'src="//cdn.example.org/x.js"' in html


def test_mount_without_slash_redirects(client: httpx.Client) -> None:
    resp = client.get("/viewer")
    assert resp.status_code == 308
    assert resp.headers["location"] == "/viewer/"


@pytest.mark.parametrize(
    "route",
    [
        "/viewer/viewer?StudyInstanceUIDs=1.2.3",
        "/viewer/local",
        "/viewer/viewer/dicomjson?url=x",
        "/viewer/segmentation?StudyInstanceUIDs=1.2.3&SeriesInstanceUIDs=1.2.3.4",
    ],
)
def test_client_routes_get_the_app(client: httpx.Client, route: str) -> None:
    resp = client.get(route, headers={"Accept": "text/html,*/*"})
    assert resp.status_code == 200
    assert 'window.PUBLIC_URL="/viewer/"' in resp.text


def test_a_missing_asset_is_404_not_the_app(client: httpx.Client) -> None:
    resp = client.get("/viewer/999.bundle.deadbeef.js", headers={"Accept": "*/*"})
    assert resp.status_code == 404
    assert resp.json()["error"] == "NotFound"


@pytest.mark.parametrize("path", ["/viewer/%2e%2e/package.json", "/viewer/..%2fpackage.json"])
def test_nothing_outside_the_build_is_served(client: httpx.Client, path: str) -> None:
    resp = client.get(path, headers={"Accept": "*/*"})
    # Refused before routing: no path of the gateway climbs with '..' or '%2f'.
    assert resp.status_code == 400
    assert "@ohif/app" not in resp.text


def test_webpack_runtime_loads_chunks_from_the_mount(client: httpx.Client) -> None:
    resp = client.get("/viewer/app.bundle.0f61.js")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
    assert resp.content == APP_BUNDLE.replace(b'.p = "/"', b'.p = "/viewer/"')


def test_files_without_root_references_are_served_as_they_are(client: httpx.Client) -> None:
    resp = client.get("/viewer/100.bundle.cb02.js")
    assert resp.content == CHUNK
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
    assert resp.headers["etag"]


def test_style_sheet_fonts_come_from_the_mount(client: httpx.Client) -> None:
    resp = client.get("/viewer/app.bundle.css")
    assert resp.headers["content-type"] == "text/css; charset=utf-8"
    assert b"url(/viewer/a34f.woff2)" in resp.content
    assert b"url('//cdn/y.png')" in resp.content


@pytest.mark.parametrize(
    ("path", "ctype"),
    [
        ("/viewer/0ddf.wasm", "application/wasm"),
        ("/viewer/a34f.woff2", "font/woff2"),
        ("/viewer/assets/favicon.ico", "image/x-icon"),
    ],
)
def test_media_types(client: httpx.Client, path: str, ctype: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == ctype
    head = client.head(path)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(resp.content))


def _config(client: httpx.Client) -> tuple[str, dict[str, object]]:
    resp = client.get("/viewer/app-config.js")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache"
    script = resp.text
    start = script.index("window.config = ") + len("window.config = ")
    config: dict[str, object] = json.JSONDecoder().raw_decode(script[start:])[0]
    return script, config


def test_app_config_points_every_data_source_at_the_gateway(client: httpx.Client) -> None:
    _, config = _config(client)
    assert config["routerBasename"] == "/viewer"
    assert config["defaultDataSourceName"] == "dicomweb"
    sources = config["dataSources"]
    assert isinstance(sources, list)
    assert [s["sourceName"] for s in sources] == ["dicomweb", "main", "archive"]
    roots = [s["configuration"]["qidoRoot"] for s in sources]
    assert roots == ["/dicomweb", "/pacs/main/dicomweb", "/pacs/archive/dicomweb"]
    for source in sources:
        assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
        conf = source["configuration"]
        assert conf["wadoRoot"] == conf["wadoUriRoot"] == conf["qidoRoot"]
        assert conf["imageRendering"] == conf["thumbnailRendering"] == "wadors"
        assert conf["enableStudyLazyLoad"] is True
        assert conf["supportsFuzzyMatching"] is True
        assert conf["qidoSupportsIncludeField"] is True
        assert conf["omitQuotationForMultipartRequest"] is True


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_app_config_runs_and_makes_roots_absolute_in_the_browser(client: httpx.Client) -> None:
    script, _ = _config(client)
    probe = (
        "const window = { location: { origin: 'http://pacs.example:8042' } };\n"
        + script
        + "\nconsole.log(JSON.stringify(window.config.dataSources.map(s => s.configuration)));"
    )
    out = subprocess.run(
        ["node", "-e", probe], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    confs = json.loads(out)
    assert [c["qidoRoot"] for c in confs] == [
        "http://pacs.example:8042/dicomweb",
        "http://pacs.example:8042/pacs/main/dicomweb",
        "http://pacs.example:8042/pacs/archive/dicomweb",
    ]
    assert all(c["wadoRoot"] == c["qidoRoot"] == c["wadoUriRoot"] for c in confs)


def test_the_package_default_config_is_never_served(client: httpx.Client) -> None:
    script, _ = _config(client)
    assert "dataSources: []" not in script


@pytest.mark.parametrize(
    "relative", ["../package.json", "assets/../../package.json", "/etc/passwd", "assets", ""]
)
def test_lookup_stays_inside_the_build_and_finds_only_files(package: Path, relative: str) -> None:
    files = ViewerFiles(package / "dist")
    assert files.resolve(relative) is None
    assert files.resolve("assets/favicon.ico") == (package / "dist/assets/favicon.ico").resolve()


def test_cli_viewer_option_defaults_to_the_install_scripts_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = build_parser().parse_args(["demo", "--viewer", "--http-port", "8001"])
    assert args.viewer == tmp_path / "dimse-gateway" / "ohif"
    assert args.http_port == 8001
    assert build_parser().parse_args(["serve"]).viewer is None
    assert build_parser().parse_args(["serve", "--viewer", "/opt/ohif"]).viewer == Path("/opt/ohif")


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_cli_without_an_installed_viewer_says_how_to_install_it(
    command: str, tmp_path: Path
) -> None:
    work = tmp_path / "demo"
    argv = [command, "--viewer", str(tmp_path / "nothing")]
    if command == "demo":
        argv += ["--work-dir", str(work)]
    with pytest.raises(SystemExit, match=r"install-viewer\.sh"):
        cli_main(argv)
    # The demo stops before it starts its PACS.
    assert not work.exists()
