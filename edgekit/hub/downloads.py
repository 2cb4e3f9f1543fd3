"""Bundle downloads over HTTP(S): capability links that any hub replica on the database honours.

A desired state that names a bundle carries links to it (`DesiredBundle.urls`), one per address the hub is reached
at (`--public-url`). A link names the bundle, the device and an expiry, and is signed with an HMAC key derived from
the secret every replica shares through the database: no device login to manage, links that a leak cannot widen
(one bundle, until the desired state's own expiry), and any replica (or a load balancer in front of them) can
answer. The device checks the bytes as it does chunks: the whole file's sha256, then the bundle's signature.

Devices fetch them from `GET /dl/{bundle}` (`edgekit.hub.routes.downloads`), which answers range requests.
"""

import hashlib
import hmac
import time
from urllib.parse import urlencode

from fastapi import HTTPException

PURPOSE = b"edgekit bundle download links v1"


class DownloadLinks:
    """Makes and checks the signed links; `public_urls` are the hub's addresses as devices reach them."""

    def __init__(self, secret: bytes, public_urls: list[str]) -> None:
        # A key of its own: a link's signature can never pass for a session cookie's, nor the reverse.
        self._key = hmac.new(secret, PURPOSE, hashlib.sha256).digest()
        self.public_urls = [url.rstrip("/") for url in public_urls]

    def _signature(self, bundle_id: str, device_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{bundle_id}\n{device_id}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def urls(self, bundle_id: str, device_id: str, expires: float) -> list[str]:
        query = urlencode({"device": device_id, "expires": int(expires),
                           "sig": self._signature(bundle_id, device_id, int(expires))})  # fmt: skip
        return [f"{base}/dl/{bundle_id}?{query}" for base in self.public_urls]

    def check(self, bundle_id: str, device_id: str, expires: int, signature: str) -> None:
        """Raises HTTPException 403 unless the link is this hub's and still valid."""
        expected = self._signature(bundle_id, device_id, expires)
        if not hmac.compare_digest(expected, signature):
            raise HTTPException(status_code=403, detail="download link: bad signature")
        if expires < time.time():
            raise HTTPException(status_code=403, detail="download link expired: the device gets a new one with its "
                                                        "desired state when it reconnects")  # fmt: skip
