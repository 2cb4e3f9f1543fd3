"""Bundles over HTTP(S), from the signed links a desired state carries (`DesiredBundle.urls`, made by
`edgekit.hub.downloads`), before chunks over MQTT: a web server (or a CDN, or any hub replica) carries big files
better than a broker does, and a byte range resumes a cut download where it stopped.

Every link is tried in turn; when none works (a hub without links, a link expired, no route to the hub's HTTP port)
the bundle comes in chunks over MQTT (`fallback`), which reaches every device that reaches the broker. What arrives
is checked as chunks are: the whole file's sha256, then (by the updater) the bundle's signature. A download shares
the chunk download's partial file and budget (`Download`): a restart resumes it either way, and the update's
deadline counts time spent on both.
"""

import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from edgekit.agents.bundles import write_atomically
from edgekit.agents.runner import Report
from edgekit.agents.transfer import (
    Base,
    BundleFetcher,
    Download,
    Fetched,
    FetchFailed,
    FetchLimits,
    rebuilt_from_delta,
)
from edgekit.delta import DeltaError
from edgekit.protocol import DELTA_BASE_HEADER, DELTA_SHA256_HEADER, BundleRef, DesiredBundle

TIMEOUT_S = 15.0  # per connect and per read: a hub that stops sending is left for the next link
READ_BLOCK = 256 * 1024


class HttpFailed(Exception):
    """This link did not give the bundle; the next one, or chunks over MQTT, may."""


class HttpFetcher:
    def __init__(self, fallback: BundleFetcher, folder: Path, ca_file: str | None = None) -> None:
        """`ca_file`: the CA that signs the hub's HTTPS certificate, when not one the system trusts."""
        self._fallback = fallback
        self._folder = folder
        self._tls = ssl.create_default_context(cafile=ca_file)

    def fetch(
        self, target: BundleRef, report: Report, stopping: threading.Event, limits: FetchLimits, base: Base | None
    ) -> Fetched:
        urls = (target.urls or []) if isinstance(target, DesiredBundle) else []
        for url in urls:
            try:
                return self._fetch_from(url, target, report, stopping, limits, base)
            except HttpFailed as error:
                report("update.progress", f"download from {_where(url)} failed ({error}): trying "
                       f"{'the next link' if url != urls[-1] else 'chunks over MQTT'}", bundle=target.id,
                       fallback=str(error))  # fmt: skip
        return self._fallback.fetch(target, report, stopping, limits, base)

    def _fetch_from(
        self, url: str, target: BundleRef, report: Report, stopping: threading.Event, limits: FetchLimits,
        base: Base | None,
    ) -> Fetched:  # fmt: skip
        if base is not None and not Download.on_disk(self._folder, target):  # a begun download resumes instead
            fetched = self._fetch_delta(url, target, base, report)
            if fetched is not None:
                return fetched
        download = Download(self._folder, target, lambda _request: False, attempt=limits.attempt)
        received = self._fetch_whole(url, download, report, stopping, limits)
        return Fetched(download.done_path, "full", received, "http")

    def _open(self, url: str, headers: dict[str, str]):  # -> http.client.HTTPResponse
        request = urllib.request.Request(url, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self._tls)
        except urllib.error.HTTPError as error:
            raise HttpFailed(f"HTTP {error.code} {_detail(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            raise HttpFailed(str(getattr(error, "reason", error))) from None

    def _fetch_delta(self, url: str, target: BundleRef, base: Base, report: Report) -> Fetched | None:
        """The bundle rebuilt from a delta from `base`; None when the hub has no delta or it does not check out."""
        try:
            with self._open(f"{url}&base={base.id}", {}) as response:
                delta_sha256 = response.headers.get(DELTA_SHA256_HEADER)
                if delta_sha256 is None or response.headers.get(DELTA_BASE_HEADER) != base.id:
                    return None  # the whole bundle is on its way: asked for again with a range by the caller
                data = _read_at_most(response, target.size)
            bundle = rebuilt_from_delta(base, data, delta_sha256, target)
        except (HttpFailed, DeltaError, OSError) as error:
            report("update.progress", f"no delta update ({error}): downloading the whole bundle", bundle=target.id,
                   base=base.id, fallback=str(error))  # fmt: skip
            return None
        write_atomically(self._folder / f"{target.id}.ekb", bundle)
        return Fetched(self._folder / f"{target.id}.ekb", "delta", len(data), "http")

    def _fetch_whole(
        self, url: str, download: Download, report: Report, stopping: threading.Event, limits: FetchLimits
    ) -> int:
        """Download the rest of the bundle into `download`'s file; how many bytes came."""
        size = download.ref.size
        offset = download.bytes_on_disk
        if offset < size:
            with self._open(url, {"Range": f"bytes={offset}-"} if offset else {}) as response:
                offset = self._resume_point(response, offset, download)
                if offset:
                    report("update.progress", f"resuming download at byte {offset} of {size}",
                           bundle=download.ref.id, received=offset)  # fmt: skip
                self._copy(response, download, offset, report, stopping, limits)
        problem = download.complete()
        if problem:
            raise HttpFailed(problem)
        return size - offset

    @staticmethod
    def _resume_point(response, offset: int, download: Download) -> int:
        """Where the response's bytes start: `offset` for a range answer, 0 when the server sends all of it."""
        size = download.ref.size
        if response.status == 206:
            if response.headers.get("Content-Range", "") != f"bytes {offset}-{size - 1}/{size}":
                raise HttpFailed(f"answered range {response.headers.get('Content-Range')!r}, asked bytes {offset}-")
            return offset
        length = response.headers.get("Content-Length")
        if length is not None and int(length) != size:
            raise HttpFailed(f"sends {length} bytes, the desired bundle has {size}")
        download.restart()
        return 0

    @staticmethod
    def _copy(
        response, download: Download, offset: int, report: Report, stopping: threading.Event, limits: FetchLimits
    ) -> None:
        size = download.ref.size
        reported = 4 * offset // size
        last = time.monotonic()
        while offset < size:
            try:
                data = response.read(min(READ_BLOCK, size - offset))
            except OSError as error:
                raise HttpFailed(f"cut at byte {offset}: {error}") from None
            if not data:
                raise HttpFailed(f"the response ended at byte {offset} of {size}")
            download.append(data)
            offset += len(data)
            now = time.monotonic()
            download.spend(now - last)
            last = now
            if stopping.is_set():
                raise FetchFailed("agent stopping during download")
            over = download.over_budget(limits)
            if over:
                raise FetchFailed(over)
            if 4 * offset // size > reported:
                reported = 4 * offset // size
                report("update.progress", f"downloaded {25 * reported}%", bundle=download.ref.id, received=offset)


def _read_at_most(response, limit: int) -> bytes:
    data = response.read(limit + 1)
    if len(data) > limit:
        raise HttpFailed(f"a delta of more than {limit} bytes for a {limit}-byte bundle")
    return data


def _detail(error: urllib.error.HTTPError) -> str:
    """The hub's one-line reason from an error response (FastAPI's {"detail": …}), else the HTTP reason."""
    try:
        body = error.read(2048).decode("utf-8", "replace")
    except OSError:
        body = ""
    return body.strip() or str(error.reason)


def _where(url: str) -> str:
    """A link without its signature, for events and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
