"""The OHIF viewer (npm ``@ohif/app``) served by the gateway: file lookup and its configuration.

The package ships a production build made for the root of a web server: its
``index.html`` and webpack runtimes load everything from ``/``.  The gateway
serves it under a path of its own (``/viewer/``), so those few absolute
prefixes are rewritten as files are served, and ``app-config.js`` is
generated with the gateway's DICOMweb bases as data sources.  No HTTP here:
``app/api/viewer.py`` turns these answers into responses.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from app.config import PacsNode


def default_viewer_dir() -> Path:
    """Where ``scripts/install-viewer.sh`` puts the package unless told otherwise."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dimse-gateway" / "ohif"


INDEX = "index.html"  # also checked by Settings.viewer_dir
APP_CONFIG = "app-config.js"

# Browsers refuse module scripts and WebAssembly streaming compilation with a
# wrong type, and the platform's mime.types may lack or disagree on these.
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
    ".onnx": "application/octet-stream",
}

# What a root-built OHIF refers to absolutely: the page's scripts, links,
# PUBLIC_URL, the fonts in its style sheets, and the public path each webpack
# runtime loads its chunks from.
_INDEX_ABSOLUTE = re.compile(rb'((?:src|href)=")/(?!/)')
_INDEX_PUBLIC_URL = re.compile(rb'(window\.PUBLIC_URL=")/(")')
_WEBPACK_PUBLIC_PATH = re.compile(rb'(__webpack_require__\.p = ")/(")')
_CSS_ABSOLUTE = re.compile(rb"""(url\(["']?)/(?!/)""")


def media_type(path: Path) -> str:
    """The Content-Type for a viewer file."""
    suffix = path.suffix.lower()
    if suffix in _MEDIA_TYPES:
        return _MEDIA_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


@dataclass(frozen=True)
class DataSource:
    """One OHIF DICOMweb data source: a gateway base such as ``/pacs/orthanc/dicomweb``."""

    name: str
    path: str
    friendly_name: str


def data_sources(nodes: list[PacsNode], default: PacsNode | None) -> list[DataSource]:
    """``/dicomweb`` for the default node (first, so OHIF opens it), then one per node."""
    sources = []
    if default is not None:
        sources.append(DataSource("dicomweb", "/dicomweb", f"{default.name} (default)"))
    sources += [DataSource(n.name, f"/pacs/{n.name}/dicomweb", n.name) for n in nodes]
    return sources


# With authentication on: the viewer is opened as /viewer/?token=<API key or
# OIDC access token>.  OHIF itself honours ?token= only on its viewer routes,
# not on the study list, and its data source ignores requestOptions.auth; so
# this runs before the app, keeps the token for the browser tab (sessionStorage,
# never in the URL or history), and adds it to every request to this origin
# that does not carry an Authorization header already (XHR: dicomweb-client and
# the image loader; fetch: thumbnails and the rest).
_CREDENTIALS_JS = """\
(() => {
  const KEY = "dimse-gateway-token";
  const params = new URLSearchParams(window.location.search);
  const given = params.get("token");
  if (given) {
    sessionStorage.setItem(KEY, given);
    params.delete("token");
    const rest = params.toString();
    window.history.replaceState(
      null, "", window.location.pathname + (rest ? "?" + rest : "") + window.location.hash);
  }
  if (!sessionStorage.getItem(KEY)) {
    // Opened without ?token=: ask once for this tab, rather than show a study
    // list whose every request is refused.
    const entered = window.prompt("This DICOMweb gateway needs an API key or access token:");
    if (entered && entered.trim()) sessionStorage.setItem(KEY, entered.trim());
  }
  const bearer = () => {
    const token = sessionStorage.getItem(KEY);
    return token ? "Bearer " + token : null;
  };
  const ours = (url) => {
    try {
      return new URL(url, window.location.href).origin === window.location.origin;
    } catch (e) {
      return false;
    }
  };
  const open = XMLHttpRequest.prototype.open;
  const setHeader = XMLHttpRequest.prototype.setRequestHeader;
  const send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url, ...rest) {
    this._gatewayOwn = ours(url);
    this._gatewayAuthorized = false;
    return open.call(this, method, url, ...rest);
  };
  XMLHttpRequest.prototype.setRequestHeader = function (name, value) {
    if (String(name).toLowerCase() === "authorization") this._gatewayAuthorized = true;
    return setHeader.call(this, name, value);
  };
  XMLHttpRequest.prototype.send = function (...args) {
    const value = bearer();
    if (value && this._gatewayOwn && !this._gatewayAuthorized) {
      setHeader.call(this, "Authorization", value);
    }
    return send.apply(this, args);
  };
  const fetchPlain = window.fetch.bind(window);
  window.fetch = (input, init = {}) => {
    const value = bearer();
    const url = input instanceof Request ? input.url : String(input);
    if (value && ours(url)) {
      const given = init.headers || (input instanceof Request ? input.headers : undefined);
      const headers = new Headers(given);
      if (!headers.has("Authorization")) headers.set("Authorization", value);
      init = { ...init, headers };
    }
    return fetchPlain(input, init);
  };
})();
"""


def app_config(
    router_basename: str, sources: list[DataSource], *, credentials: bool = False
) -> str:
    """OHIF's ``window.config`` for the gateway (docs/conformance.md, "OHIF viewer").

    The DICOMweb roots are completed in the browser with its own origin, so the
    viewer works under whatever host name or address it was opened with.
    *credentials*: authentication is on; the viewer then sends the token it was
    opened with (``/viewer/?token=...``) on every request to the gateway.
    """
    config = {
        "routerBasename": router_basename,
        # Empty lists: the extensions and modes the package was built with.
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "defaultDataSourceName": sources[0].name if sources else "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": source.name,
                "configuration": {
                    "friendlyName": f"dimse-gateway: {source.friendly_name}",
                    "name": source.name,
                    # Made absolute below, in the browser.
                    "qidoRoot": source.path,
                    "wadoRoot": source.path,
                    "wadoUriRoot": source.path,
                    # What the gateway implements; OHIF otherwise filters and pages itself.
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "staticWado": False,
                    # Series metadata as series are shown, not the whole study up front.
                    "enableStudyLazyLoad": True,
                    # Pixels and thumbnails from .../frames (no rendered resources).
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                    "dicomUploadEnabled": False,
                    "supportsReject": False,
                    "supportsStow": False,
                },
            }
            for source in sources
        ],
    }
    return (
        "// Generated by dimse-gateway: OHIF with the gateway as its DICOMweb server.\n"
        f"window.config = {json.dumps(config, indent=2, ensure_ascii=False)};\n"
        "for (const source of window.config.dataSources) {\n"
        "  const root = window.location.origin + source.configuration.qidoRoot;\n"
        "  const roots = { qidoRoot: root, wadoRoot: root, wadoUriRoot: root };\n"
        "  Object.assign(source.configuration, roots);\n"
        "}\n" + (_CREDENTIALS_JS if credentials else "")
    )


class ViewerFiles:
    """Files of the built viewer, with the root-relative prefixes moved under the mount."""

    def __init__(self, dist: Path) -> None:
        self.dist = dist.resolve()
        self._patched: dict[tuple[str, str], bytes | None] = {}
        self._lock = threading.Lock()

    def resolve(self, relative: str) -> Path | None:
        """The file for a URL path below the mount, or None (missing, or outside the build)."""
        if not relative or "\x00" in relative:
            return None
        path = (self.dist / relative).resolve()
        if not path.is_relative_to(self.dist) or not path.is_file():
            return None
        return path

    def patched(self, path: Path, prefix: str) -> bytes | None:
        """The file's bytes rewritten for *prefix* (``/viewer/``), or None if it needs no change.

        Blocking (reads the file once, then answers from memory).
        """
        key = (str(path), prefix)
        with self._lock:
            if key in self._patched:
                return self._patched[key]
        result: bytes | None = None
        if path.suffix in (".html", ".js", ".css"):
            data = path.read_bytes()
            target = prefix.encode()
            if path.suffix == ".html":
                new = _INDEX_ABSOLUTE.sub(rb"\1" + target, data)
                new = _INDEX_PUBLIC_URL.sub(rb"\1" + target + rb"\2", new)
            elif path.suffix == ".css":
                new = _CSS_ABSOLUTE.sub(rb"\1" + target, data)
            else:
                new = _WEBPACK_PUBLIC_PATH.sub(rb"\1" + target + rb"\2", data)
            result = new if new != data else None
        with self._lock:
            self._patched[key] = result
        return result
