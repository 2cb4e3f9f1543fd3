"""The hub's REST API from the command line's side: one method per call, HTTP failures as one-line errors.

Exit codes follow the CLI's rule: 2 when the caller can fix the request (bad token, unknown id, invalid field),
1 when the hub could not be reached or failed.
"""

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from edgekit.errors import BadInput, OperationFailed
from edgekit.protocol import BenchResult, TrialResult

DEFAULT_HUB = "http://127.0.0.1:8080"
UPLOAD_CHUNK = 1024 * 1024


class HubClient:
    def __init__(self, url: str | None, token: str | None, timeout_s: float = 30.0) -> None:
        """`url`/`token` None: EDGEKIT_HUB / EDGEKIT_TOKEN from the environment (the hub default for the URL)."""
        self.url = (url or os.environ.get("EDGEKIT_HUB") or DEFAULT_HUB).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise BadInput(f"--hub '{self.url}': expected http://HOST:PORT or https://…")
        token = token or os.environ.get("EDGEKIT_TOKEN")
        if not token:
            raise BadInput("no API token: pass --token or set EDGEKIT_TOKEN (edgekit hub token create NAME)")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s, trust_env=False
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "HubClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise OperationFailed(
                f"cannot reach the hub at {self.url} (is `edgekit hub` running? --hub / EDGEKIT_HUB)"
            ) from None
        except httpx.TimeoutException:
            raise OperationFailed(f"the hub at {self.url} did not answer in {self._http.timeout.read:g} s") from None
        except httpx.HTTPError as error:
            raise OperationFailed(f"talking to the hub at {self.url}: {error}") from None
        if response.is_success:
            return response.json()
        raise http_error(response, self.url)

    def devices(self, labels: list[str] | None = None, online: bool | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"label": labels or []}
        if online is not None:
            params["online"] = str(online).lower()
        return self._request("GET", "/api/devices", params=params)

    def device(self, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/devices/{device_id}")

    def set_config(self, target: str, change: dict[str, Any]) -> dict[str, Any]:
        """`target`: a device id or group:KEY[=VALUE] (edgekit.hub.config)."""
        if target.startswith("group:"):
            return self._request("PUT", f"/api/groups/{quote(target.removeprefix('group:'), safe='=')}/config",
                                 json=change)  # fmt: skip
        return self._request("PUT", f"/api/devices/{quote(target, safe='')}/config", json=change)

    def device_config(self, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/devices/{quote(device_id, safe='')}/config")

    def bundles(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/bundles")

    def push(self, bundle: Path) -> dict[str, Any]:
        """Upload a .ekb as the raw body, streamed; the record comes back with `created`."""
        if not bundle.is_file():
            raise BadInput(f"{bundle}: no such bundle file")
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(bundle.stat().st_size)}
        # Uploads of big bundles over slow links take a while; only the connect phase keeps the short timeout.
        timeout = httpx.Timeout(self._http.timeout.connect, read=600, write=600, pool=None)
        return self._request("POST", "/api/bundles", content=_chunks(bundle), headers=headers, timeout=timeout)

    def deploy(self, bundle_id: str, target: str, **options: Any) -> dict[str, Any]:
        body = {"bundle_id": bundle_id, "target": target, **{k: v for k, v in options.items() if v is not None}}
        return self._request("POST", "/api/deployments", json=body)

    def deployments(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/deployments")

    def deployment(self, deployment_id: int) -> dict[str, Any]:
        return self._request("GET", f"/api/deployments/{deployment_id}")

    def trust(self) -> dict[str, Any]:
        return self._request("GET", "/api/trust")

    def rotate_keys(self, hub_key: bool, bundle_keys: list[str] | None) -> dict[str, Any]:
        return self._request("POST", "/api/trust/rotate", json={"hub_key": hub_key, "bundle_keys": bundle_keys})

    def datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/datasets")

    def purge(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/api/datasets/{quote(name, safe='')}")

    def export(self, name: str) -> tuple[bytes, int]:
        """The dataset's .npz and how many samples it holds."""
        try:
            response = self._http.get(f"/api/datasets/{quote(name, safe='')}/export", timeout=600)
        except httpx.HTTPError as error:
            raise OperationFailed(f"exporting from the hub at {self.url}: {error}") from None
        if not response.is_success:
            raise http_error(response, self.url)
        return response.content, int(response.headers.get("x-edgekit-samples", "0"))

    def bench(self, bundle_id: str, target: str, seconds: float, timeout_s: float | None = None,
              mode: str = "bundle") -> dict[str, Any]:  # fmt: skip
        body = {"bundle": bundle_id, "target": target, "seconds": seconds, "timeout_s": timeout_s, "mode": mode}
        return self._request("POST", "/api/bench", json={k: v for k, v in body.items() if v is not None})

    def bench_job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/bench/{quote(job_id, safe='')}")

    def time_bundle(self, bundle: Path, target: str, seconds: float, mode: str = "bundle",
                    poll_s: float = 0.5) -> dict[str, Any]:  # fmt: skip
        """Push `bundle` (a no-op when the registry has it), have a device of `target` time it, and wait for the
        job to end; the finished job. OperationFailed with the device's or the hub's reason when it failed."""
        record = self.push(bundle)
        job = self.bench(record["id"], target, seconds, mode=mode)
        while job["state"] == "running":
            time.sleep(poll_s)
            job = self.bench_job(job["id"])
        if job["state"] != "done":
            raise OperationFailed(f"on {job['device_id']}: {job['reason']}")
        return job

    def halt(self, deployment_id: int, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else None
        return self._request("POST", f"/api/deployments/{deployment_id}/halt", json=body)


class FleetMeasurer:
    """`edgekit compile --measure-on`: a candidate bundle timed on a device of `target` through the hub
    (`edgekit.compile.device.DeviceMeasurer`)."""

    def __init__(self, client: HubClient, target: str, seconds: float) -> None:
        self.client, self.target, self.seconds = client, target, seconds

    def measure(self, bundle: Path) -> tuple[str, BenchResult]:
        job = self.client.time_bundle(bundle, self.target, self.seconds)
        return job["device_id"], BenchResult.model_validate(job["result"])

    def measure_trials(self, bundle: Path) -> tuple[str, TrialResult]:
        job = self.client.time_bundle(bundle, self.target, self.seconds, mode="tvm-trials")
        return job["device_id"], TrialResult.model_validate(job["result"])


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            yield chunk


def describe_detail(detail: Any) -> str:
    """FastAPI's error body as one line: `field: reason; …` for validation errors, the text otherwise."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            # loc is ["body", "field", …] or ["query", "name"]; the first element only says where.
            loc = [str(p) for p in item.get("loc", [])]
            field = ".".join(loc[1:]) if len(loc) > 1 else (loc[0] if loc else "")
            message = str(item.get("msg", "invalid"))
            parts.append(f"{field}: {message}" if field and field != "body" else message)
        return "; ".join(parts)
    return str(detail)


def http_error(response: httpx.Response, url: str) -> Exception:
    try:
        raw = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        raw = response.text.strip()[:300] or response.reason_phrase
    detail, status = describe_detail(raw), response.status_code
    if status == 422 and isinstance(raw, list) and any(isinstance(i, dict) and i.get("type") == "bundle_invalid"
                                                       for i in raw):  # fmt: skip
        # A bundle that fails verification is a failed operation (exit 1), like `edgekit verify`.
        return OperationFailed(f"the hub refused the bundle: {detail}")
    if status == 401:
        return BadInput(f"the hub refused the token ({detail}); check --token / EDGEKIT_TOKEN")
    if status == 403:
        return BadInput(f"the hub forbids this: {detail}")
    if status == 422:
        return BadInput(f"the hub rejected the request: {detail}")
    if status in (404, 409, 413, 415):
        return BadInput(detail)
    return OperationFailed(f"the hub at {url} failed (HTTP {status}): {detail}")
