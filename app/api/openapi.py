"""OpenAPI text shared by the routers, and the schema touch-ups done in one place.

Each route carries its own summary and description (its docstring); what many
routes share is written once here: path parameters by name, the QIDO-RS query
parameters, the Accept header, the error body and examples of the answers.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.dicomweb.query import UID_RE

WINDOW = (
    "VOI window as `center,width[,function]` with function `linear` (default), "
    "`linear-exact` or `sigmoid` (PS3.18 §8.3.5.1.4), applied after Rescale Slope/Intercept. "
    "Without it the header's first Window Center/Width and VOI LUT Function are used, else "
    "the frame's own value range."
)
VIEWPORT = (
    "`vw,vh` or `vw,vh,sx,sy,sw,sh` (PS3.18 §8.3.5.1.3): the source region (default: the "
    "whole image; negative `sw`/`sh` flip) is scaled to fit `vw` x `vh` pixels, aspect "
    "ratio kept."
)
QUALITY = "JPEG quality 1-100 (default 90); ignored for PNG and GIF (lossless)."
ANNOTATION = (
    "`patient` and/or `technique` (PS3.18 §8.3.5.1.1): checked, not applied (no burned-in text)."
)
ICCPROFILE = (
    "`no`, `yes`, `srgb`, `adobergb` or `rommrgb` (PS3.18 §8.3.5.1.5): checked, not applied."
)

_RENDER_COMMON = (
    "\n\nMedia type by `Accept` header or `accept` query parameter: `image/jpeg` (default), "
    "`image/png` or `image/gif`. Grayscale images go through Rescale Slope/Intercept, the VOI "
    "window and, for MONOCHROME1, inversion; colour images (RGB, YBR converted to RGB, "
    "PALETTE COLOR) are shown as stored. The instance is retrieved from the PACS the way "
    "WADO-RS retrieves are (C-MOVE or C-GET, then the cache)."
)
RENDERED_MANY = (
    "Retrieves the {level} and renders the first frame of each instance, as "
    '`multipart/related; type="image/jpeg"` (or PNG/GIF) with one part per instance, '
    "streamed as instances arrive. Instances without pixel data are left out. A retrieve "
    "that delivers only part of the {level} answers 206 with a `Warning` header." + _RENDER_COMMON
)
RENDERED_INSTANCE = (
    "The instance's first frame as one image (a multi-frame instance: use the frames "
    "resource for the others)." + _RENDER_COMMON
)
RENDERED_FRAMES = (
    "The listed frames (comma-separated, 1-based): one image for one frame, "
    '`multipart/related; type="image/jpeg"` for several. A frame beyond NumberOfFrames '
    "is 404." + _RENDER_COMMON
)
THUMBNAIL = (
    "A small image of the resource (PS3.18 §10.4.1.1.4): {choice}, fitted into 256 x 256 "
    "pixels (never enlarged) unless `viewport` says otherwise. No annotations, no patient "
    "data." + _RENDER_COMMON
)

_JPEG_EXAMPLE = {"schema": {"type": "string", "format": "binary"}}
RENDERED_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The rendered image, or a multipart body of images",
        "content": {
            "image/jpeg": _JPEG_EXAMPLE,
            "image/png": _JPEG_EXAMPLE,
            "image/gif": _JPEG_EXAMPLE,
            'multipart/related; type="image/jpeg"': _JPEG_EXAMPLE,
        },
    },
}

PATH_PARAMETERS = {
    "node": "Name of a configured PACS node (see `GET /pacs`); the `/dicomweb` routes use "
    "the default node.",
    "study": "Study Instance UID (0020,000D).",
    "series": "Series Instance UID (0020,000E).",
    "instance": "SOP Instance UID (0008,0018).",
    "frames": "Comma-separated frame numbers, starting at 1 (e.g. `1` or `1,2,3`).",
    "patient_id": "One literal Patient ID (0010,0020), no wildcards.",
    "job_id": "The job's id, from the `Location` header of `POST .../jobs`.",
    "tag_path": "Bulk data location as in the metadata's `BulkDataURI`: tags as 8 hex "
    "digits, sequence items as numbers (e.g. `7FE00010` or `00540016/0/00181072`).",
}

# The UID grammar (PS3.5 9.1) the routes check with check_uid (400 otherwise);
# declared so that clients, and the API fuzz tests, know it.
_UID_SCHEMA = {"pattern": UID_RE.pattern.replace("\\Z", "$"), "maxLength": 64}
_UID_PARAMETERS = {"study", "series", "instance"}

_QIDO_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "{attributeID}",
        "in": "query",
        "required": False,
        "description": "Match on any attribute by keyword or tag, e.g. `PatientName=DOE*`, "
        "`00100020=12345`, `StudyDate=20200101-20201231`, `ModalitiesInStudy=CT`, "
        "`SeriesInstanceUID=1.2.3,1.2.4` (PS3.18 §8.3.4.1, matching as in PS3.4 C.2.2.2: "
        "`*` and `?` wildcards, date/time ranges, UID lists). Repeat for several keys. "
        "Keys the PACS cannot match are checked by the gateway; those it cannot check "
        "either are named in a `Warning` header.",
        "schema": {"type": "string"},
    },
    {
        "name": "includefield",
        "in": "query",
        "required": False,
        "description": "Extra attributes to return, by keyword or tag, repeated or as one "
        "comma list; `all` returns every attribute the PACS gives (PS3.18 §8.3.4.3).",
        "schema": {"type": "string"},
        "example": "StudyDescription,00080060",
    },
    {
        "name": "fuzzymatching",
        "in": "query",
        "required": False,
        "description": "`true` asks for fuzzy matching of person names; DIMSE has none, so "
        "it is reported in a `Warning` and ignored.",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "At most this many results (PS3.18 §8.3.4.4); a `Warning` says when "
        "more exist.",
        "schema": {"type": "integer", "minimum": 1},
    },
    {
        "name": "offset",
        "in": "query",
        "required": False,
        "description": "Skip this many results first (paging together with `limit`).",
        "schema": {"type": "integer", "minimum": 0, "default": 0},
    },
]

_ACCEPT_HEADER: dict[str, Any] = {
    "name": "Accept",
    "in": "header",
    "required": False,
    "description": "Media type wanted (PS3.18 §8.7). Searches and metadata: "
    "`application/dicom+json` (default). Instances: "
    '`multipart/related; type="application/dicom"` with an optional `transfer-syntax` '
    "(default Explicit VR Little Endian, `*` as stored). Frames and bulk data: "
    '`multipart/related; type="application/octet-stream"`. Rendered: `image/jpeg`, '
    "`image/png`, `image/gif`. The `accept` query parameter overrides the header.",
    "schema": {"type": "string"},
}

ERROR_EXAMPLE = {
    "error": "PacsFailureStatus",
    "message": "C-FIND on node 'orthanc' failed with status 0xC000",
    "node": "orthanc",
    "dimse_status": "0xC000",
    "dimse_meaning": "Failed: unable to process",
}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "Error class, e.g. InvalidQuery"},
        "message": {"type": "string", "description": "What went wrong, for a person"},
        "parameter": {"type": "string", "description": "The query parameter at fault"},
        "node": {"type": "string", "description": "The PACS node involved"},
        "dimse_status": {"type": "string", "description": "DIMSE status, as 0xNNNN"},
        "dimse_meaning": {"type": "string"},
        "error_comment": {"type": "string", "description": "Error Comment from the PACS"},
    },
}

_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "400": (
        "Malformed request: a bad UID, query parameter or media range",
        {
            "error": "InvalidQuery",
            "message": "query parameter 'StudyDate': '2020-01' is not a date or date range",
            "parameter": "StudyDate",
        },
    ),
    "404": (
        "Nothing there, or no such node",
        {"error": "NotFound", "message": "study 1.2.3 was not found on 'orthanc'"},
    ),
    "406": (
        "None of the accepted media types can be produced",
        {"error": "NotAcceptable", "message": "none of the media types asked for ..."},
    ),
    "502": (
        "The PACS refused or failed (DIMSE failure status, association rejected or aborted)",
        ERROR_EXAMPLE,
    ),
    "503": (
        "The PACS cannot be reached, or every association is busy (see Retry-After)",
        {"error": "PoolExhausted", "message": "all 4 associations to 'orthanc' are busy"},
    ),
    "504": (
        "The PACS did not answer in time",
        {"error": "DimseTimeout", "message": "C-FIND: no answer within 30 s", "node": "orthanc"},
    ),
}

DICOM_JSON_EXAMPLE = [
    {
        "00080020": {"vr": "DA", "Value": ["20200601"]},
        "00080050": {"vr": "SH", "Value": ["ACC0001"]},
        "00080061": {"vr": "CS", "Value": ["CT"]},
        "00081030": {"vr": "LO", "Value": ["CT CHEST"]},
        "00081190": {
            "vr": "UR",
            "Value": ["http://127.0.0.1:8000/dicomweb/studies/1.2.826.0.1.3680043.8.498.1"],
        },
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
        "00100020": {"vr": "LO", "Value": ["DGW0001"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.8.498.1"]},
        "00201206": {"vr": "IS", "Value": [2]},
    }
]


def _is_dicomweb(path: str) -> bool:
    return "/dicomweb/" in path


def _touch_up(schema: dict[str, Any]) -> None:
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            # A router prefix's parameter ({node}) is read from the request, not
            # declared by the endpoint: the schema would not mention it.
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            for name in re.findall(r"{(\w+)(?::\w+)?}", path):
                if name not in declared:
                    operation.setdefault("parameters", []).insert(
                        0,
                        {
                            "name": name,
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    )
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and not parameter.get("description"):
                    text = PATH_PARAMETERS.get(parameter["name"])
                    if text:
                        parameter["description"] = text
                if parameter.get("in") == "path" and parameter["name"] in _UID_PARAMETERS:
                    parameter.setdefault("schema", {}).update(_UID_SCHEMA)
            responses = operation.setdefault("responses", {})
            if path.startswith("/pacs/") and not _is_dicomweb(path):
                _add_errors(responses, ("404", "502", "503", "504"))
            if not _is_dicomweb(path):
                continue
            parameters = operation.setdefault("parameters", [])
            tags = operation.get("tags", [])
            if "QIDO-RS search" in tags or path.endswith("/nifti"):
                parameters.extend(dict(p) for p in _QIDO_PARAMETERS)
            parameters.append(dict(_ACCEPT_HEADER))
            if "QIDO-RS search" in tags:
                responses["200"] = {
                    "description": "Matches as a DICOM JSON array (PS3.18 Annex F), each "
                    "with its Retrieve URL (0008,1190)",
                    "content": {"application/dicom+json": {"example": DICOM_JSON_EXAMPLE}},
                }
                responses["204"] = {"description": "No match (or 200 with [] per node setting)"}
            elif path.endswith("/metadata"):
                responses["200"] = {
                    "description": "DICOM JSON of every instance, bulk data as BulkDataURI",
                    "content": {"application/dicom+json": {"example": DICOM_JSON_EXAMPLE}},
                }
            _add_errors(responses, tuple(_ERRORS))


def _add_errors(responses: dict[str, Any], statuses: tuple[str, ...]) -> None:
    for status in statuses:
        description, example = _ERRORS[status]
        responses.setdefault(
            status,
            {
                "description": description,
                "content": {"application/json": {"schema": _ERROR_SCHEMA, "example": example}},
            },
        )


def install(app: FastAPI) -> None:
    """Build the schema once, with the shared parameters and responses added."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
            )
            _touch_up(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# Swagger UI and ReDoc come from the fastapi-offline package, served by the
# gateway itself: FastAPI's own pages load them from a CDN, which a hospital
# network often does not reach (the page is then blank).
DOCS_ASSETS = "/docs-assets"


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI), its OAuth2 redirect page and ``/redoc``, offline.

    The app must be built with ``docs_url=None, redoc_url=None``.
    """
    assets = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    redirect = "/docs/oauth2-redirect"

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=f"{base}/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{base}{redirect}",
            swagger_js_url=f"{base}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{base}{DOCS_ASSETS}/favicon.png",
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(
            openapi_url=f"{base}/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
