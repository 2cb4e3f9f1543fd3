"""`/api/bundles`: the registry's bundles, the compile report inside each, and pushing one (streamed to disk,
verified before it is stored)."""

import hashlib
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from edgekit.errors import EdgekitError
from edgekit.hub.auth import Operator, audit
from edgekit.hub.db import BundleRecord
from edgekit.hub.deps import RegistryDep, Sessions
from edgekit.hub.routes import unprocessable
from edgekit.hub.schemas import BundleDetail, BundleOut, PushOut

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
WRITE_BLOCK = 4 * 1024 * 1024  # upload bytes gathered before one (threaded) disk write
REPORT_FILE = "report.json"
MAX_REPORT_BYTES = 8 * 1024 * 1024  # a report is a few KB per candidate; the cap only bounds what one request reads

router = APIRouter()


async def max_bundle_bytes() -> int:
    """The push size limit, a dependency so that tests can lower it (`app.dependency_overrides`)."""
    return MAX_BUNDLE_BYTES


BundleLimit = Annotated[int, Depends(max_bundle_bytes)]


@router.get("/bundles", response_model=list[BundleOut])
def list_bundles(registry: RegistryDep) -> list[BundleRecord]:
    return registry.all()


@router.get("/bundles/{bundle_id}", response_model=BundleDetail, summary="A bundle by sha256 or ≥8-character prefix")
def get_bundle(registry: RegistryDep, bundle_id: str) -> BundleRecord:
    return _find(registry, bundle_id)


@router.get(
    "/bundles/{bundle_id}/report",
    summary="The compile report packed in a bundle (report.json): every candidate with its backend, precision, "
    "verdict, accuracy, latency, size and mixed-precision layers",
)
def get_bundle_report(registry: RegistryDep, bundle_id: str) -> dict[str, Any]:
    record = _find(registry, bundle_id)
    entry = next((f for f in record.manifest.get("files", []) if f.get("path") == REPORT_FILE), None)
    path = registry.path(record.id)
    if entry is None or path is None:
        raise HTTPException(status_code=404, detail=f"bundle {record.name}@{record.version} has no compile report")
    if entry["size"] > MAX_REPORT_BYTES:
        raise HTTPException(status_code=413, detail=f"its {REPORT_FILE} is {entry['size']} bytes; the hub shows "
                            f"reports of at most {MAX_REPORT_BYTES >> 20} MiB")  # fmt: skip
    report: dict[str, Any] = json.loads(_listed_file(path, entry))
    return report


def _find(registry: RegistryDep, bundle_id: str) -> BundleRecord:
    try:
        return registry.find(bundle_id)
    except EdgekitError as error:
        raise HTTPException(status_code=404, detail=str(error)) from None


def _listed_file(bundle: Path, entry: dict[str, Any]) -> bytes:
    """A file the bundle's manifest lists, read from the registry's copy and held to the manifest's sha256: the
    copy was verified when it was pushed, and one more hash of a small file keeps this read as safe on its own."""
    with tarfile.open(bundle, "r:") as tar:
        source = tar.extractfile(tar.getmember(entry["path"]))
        assert source is not None, "the registry keeps verified bundles, whose listed members are regular files"
        with source:
            data = source.read(entry["size"] + 1)
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise HTTPException(status_code=500, detail=f"{entry['path']} in the registry's copy does not match its "
                            "manifest")  # fmt: skip
    return data


BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/bundles",
    response_model=PushOut,
    status_code=201,
    openapi_extra=BUNDLE_BODY,
    summary="Push a .ekb (raw body); verified before it is stored. 201 created, 200 already there",
    responses={200: {"model": PushOut}, 413: {}, 415: {}, 422: {}},
)
async def push_bundle(request: Request, response: Response, actor: Operator, registry: RegistryDep, sessions: Sessions,
                      limit: BundleLimit) -> PushOut:  # fmt: skip
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise HTTPException(status_code=415, detail="send the .ekb as the raw body, application/octet-stream")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    upload = await _receive(request, registry.dir, limit)
    try:
        if upload.stat().st_size == 0:
            raise unprocessable(["body"], "empty body: send the .ekb file's bytes")
        try:
            record, created = await to_thread.run_sync(registry.add, upload, actor)
        except EdgekitError as error:
            raise unprocessable(["body"], _user_message(error, upload), "bundle_invalid") from None
    finally:
        upload.unlink(missing_ok=True)
    audit(sessions, actor, "push", bundle_id=record.id, name=record.name, version=record.version,
          created=created)  # fmt: skip
    response.status_code = 201 if created else 200
    return PushOut(**BundleOut.model_validate(record).model_dump(), created=created)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"bundles are limited to {limit / (1 << 20):g} MiB")


async def _receive(request: Request, folder: Path, limit: int) -> Path:
    """Stream the body to a temporary file beside the registry (never all in memory), enforcing the size cap."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".ekb")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            size, block = 0, bytearray()
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked upload declares no length: count what arrives
                    raise _too_large(limit)
                block += chunk
                if len(block) >= WRITE_BLOCK:
                    await to_thread.run_sync(handle.write, bytes(block))
                    block.clear()
            await to_thread.run_sync(handle.write, bytes(block))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _user_message(error: Exception, *paths: Path) -> str:
    """An error's text without our temporary file names, which mean nothing to the caller."""
    message = str(error)
    for path in paths:
        message = message.replace(f"{path}: ", "").replace(str(path), "the upload")
    return message
