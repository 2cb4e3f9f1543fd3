"""`GET /dl/{bundle}`: a bundle by its signed download link (`edgekit.hub.downloads`), for devices; range requests
resume a cut download, `?base=ID` asks for a delta from a bundle the device holds."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import FileResponse

from edgekit.delta import DeltaError
from edgekit.hub.deps import DeltasDep, DownloadLinksDep, RegistryDep
from edgekit.protocol import DELTA_BASE_HEADER, DELTA_SHA256_HEADER, DEVICE_ID, SHA256

router = APIRouter()


class BundleFile(FileResponse):
    # Starlette reads 64 KiB per await by default; bundles are MBs, and each read is a hop to a worker thread.
    chunk_size = 1024 * 1024


@router.get("/dl/{bundle_id}", summary="A bundle by its signed download link (devices; range requests)",
            responses={206: {}, 403: {}, 404: {}})  # fmt: skip
def download(
    bundle_id: Annotated[str, Path(pattern=SHA256)],
    registry: RegistryDep,
    links: DownloadLinksDep,
    deltas: DeltasDep,
    device: Annotated[str, Query(pattern=DEVICE_ID)],
    expires: Annotated[int, Query(ge=0)],
    sig: Annotated[str, Query(max_length=64)],
    base: Annotated[str | None, Query(pattern=SHA256)] = None,
) -> BundleFile:
    links.check(bundle_id, device, expires, sig)
    path = registry.path(bundle_id)
    if path is None:
        raise HTTPException(status_code=404, detail=f"bundle {bundle_id[:12]} is not in the registry")
    if base is not None:
        try:
            delta = deltas.get(base, bundle_id)
        except DeltaError:
            pass  # no delta pays, or the base is unknown: the whole bundle, as over MQTT
        else:
            headers = {DELTA_BASE_HEADER: base, DELTA_SHA256_HEADER: delta.sha256}
            return BundleFile(delta.path, media_type="application/zstd", headers=headers)
    return BundleFile(path, media_type="application/octet-stream")
