"""HTTP calls to a running gateway; its JSON error bodies become ``GatewayRefused``.

::

    ClientError                 exit code 1 unless said otherwise
    ├── GatewayRefused          the gateway answered 4xx/5xx (its JSON error body, as text)
    └── GatewayUnreachable      no HTTP answer at all (exit code 3)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from app.client.sse import iter_sse

# Retrieves may wait for a PACS a long time before the first byte; connecting may not.
_TIMEOUT = httpx.Timeout(30.0, connect=10.0, read=300.0)


class ClientError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class GatewayRefused(ClientError):
    def __init__(self, status: int, error: str, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {error}: {message}")
        self.status = status
        self.error = error
        self.body = body


class GatewayUnreachable(ClientError):
    exit_code = 3


def _refusal(resp: httpx.Response) -> GatewayRefused:
    try:
        body = json.loads(resp.read())
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        return GatewayRefused(
            resp.status_code, str(body.get("error", "Error")), str(body["message"]), body
        )
    text = resp.text.strip()[:200] or resp.reason_phrase
    return GatewayRefused(resp.status_code, "HTTPError", text, {})


def raise_for_status(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        raise _refusal(resp)


class GatewayClient:
    """One gateway at *url*; DICOMweb calls go to *node*'s base (the default node if None)."""

    def __init__(
        self,
        url: str,
        node: str | None = None,
        *,
        timeout: httpx.Timeout = _TIMEOUT,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.base = f"/pacs/{node}/dicomweb" if node else "/dicomweb"
        headers = {"X-API-Key": api_key} if api_key else None
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response with a success status (errors raised with the gateway's text)."""
        try:
            with self.http.stream(method, path, **kwargs) as resp:
                raise_for_status(resp)
                yield resp
        except httpx.TransportError as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {self.url}: {exc}") from exc

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise GatewayUnreachable(f"cannot reach the gateway at {self.url}: {exc}") from exc
        raise_for_status(resp)
        return resp

    # -- QIDO-RS -------------------------------------------------------------

    def search(
        self, level: str, params: list[tuple[str, str]]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Matches (DICOM JSON) and the gateway's Warning texts."""
        resp = self.request(
            "GET",
            f"{self.base}/{level}",
            params=params,
            headers={"Accept": "application/dicom+json"},
        )
        warnings = resp.headers.get_list("warning")
        if resp.status_code == 204 or not resp.content:
            return [], warnings
        matches: list[dict[str, Any]] = resp.json()
        return matches, warnings

    # -- jobs ----------------------------------------------------------------

    def start_job(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A new job, or None if this gateway has no jobs (an older version)."""
        try:
            resp = self.request("POST", f"{self.base}/jobs", json=body)
        except GatewayRefused as exc:
            if exc.status == 405 or (exc.status == 404 and exc.error == "HTTPError"):
                return None
            raise
        job: dict[str, Any] = resp.json()
        return job

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self.request("GET", f"/jobs/{job_id}").json()
        return job

    def follow(self, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The job's states until it ends: its event stream, else polling."""
        try:
            with self.stream(
                "GET", f"/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
            ) as resp:
                for event in iter_sse(resp.iter_lines()):
                    state: dict[str, Any] = json.loads(event.data)
                    yield state
                    if event.event == "end":
                        return
        except (GatewayUnreachable, httpx.HTTPError):
            pass  # the stream broke (a proxy, a timeout): poll instead
        while True:
            state = self.job(job["id"])
            yield state
            if state["state"] in ("done", "failed", "cancelled"):
                return
            time.sleep(0.5)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        resp = self.request("DELETE", f"/jobs/{job_id}")
        return resp.json() if resp.status_code == 200 else None
