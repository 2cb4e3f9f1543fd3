"""The hub's signing key and the trust roots it issued, in `<data>/trust/`:

    hub.key          the private key that signs desired states and the next root (0600)
    hub.pub          its public key, for `edgekit agent --hub-key`
    root-NNNNNN.json each root's DSSE envelope, version 1 (signed by its own key) on

Devices learn the chain on `config/trust` (edgekit.trust). A rotation writes the new key beside the old one first,
then the root signed by both, then moves the key into place, so a crash at any point leaves a key that the newest
root names (`_finish_rotation`).
"""

import logging
import os
import re
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.enrollment import write_private
from edgekit.errors import BadInput
from edgekit.protocol import BenchJob, DesiredState, encode
from edgekit.signing import key_id, load_private_key, load_public_key
from edgekit.trust import (
    DEFAULT_DESIRED_TTL_S,
    MAX_CHAIN,
    ROOT_TYPE,
    Envelope,
    TrustChain,
    TrustRoot,
    public_key,
    public_pem,
    root_of,
    seal,
    sign_bench,
    sign_desired,
)

log = logging.getLogger(__name__)
KEY_FILE = "hub.key"
NEXT_KEY_FILE = "hub.key.next"
PUBLIC_FILE = "hub.pub"
ROOT_FILE = re.compile(r"^root-(\d{6})\.json$")


def _root_file(version: int) -> str:
    return f"root-{version:06d}.json"


def _private_pem(key: Ed25519PrivateKey) -> str:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


class HubTrust:
    def __init__(self, directory: Path, bundle_key: Path | None = None, desired_ttl_s: float = DEFAULT_DESIRED_TTL_S):
        """Open (or, the first time, create) the hub's key and roots. `bundle_key` is the one the first root trusts;
        later it must be one the newest root names (a different key is a rotation, not a restart option)."""
        self.dir = directory
        self.desired_ttl_s = desired_ttl_s
        self._lock = threading.Lock()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._roots = self._load_roots()
        if not self._roots:
            self._create_first(bundle_key)
        self._finish_rotation()
        self._key = load_private_key(directory / KEY_FILE)
        if public_pem(self._key) not in self.root.hub_keys:
            raise BadInput(f"{directory / KEY_FILE}: key {key_id(self._key.public_key())} is not a hub key of "
                           f"{self.root.describe()}; the trust folder was changed by hand")  # fmt: skip
        if bundle_key is not None:
            self._check_bundle_key(bundle_key)

    # ---- files --------------------------------------------------------------------------------------------------

    def _load_roots(self) -> list[Envelope]:
        files = sorted(p for p in self.dir.iterdir() if ROOT_FILE.match(p.name))
        roots = [Envelope.model_validate_json(path.read_bytes()) for path in files]
        for expected, envelope in enumerate(roots, start=1):
            if root_of(envelope).version != expected:
                raise BadInput(f"{self.dir}: trust roots are not numbered 1 to {len(roots)}; restore the folder")
        return roots

    def _write_root(self, envelope: Envelope) -> None:
        version = root_of(envelope).version
        write_private(self.dir / _root_file(version), envelope.model_dump_json(indent=2) + "\n")
        self._roots.append(envelope)

    def _create_first(self, bundle_key: Path | None) -> None:
        key = Ed25519PrivateKey.generate()
        write_private(self.dir / KEY_FILE, _private_pem(key))
        bundles = [public_pem(load_public_key(bundle_key))] if bundle_key else []
        root = TrustRoot(version=1, hub_keys=[public_pem(key)], bundle_keys=bundles, issued=time.time())
        self._write_root(seal(ROOT_TYPE, root, [key]))
        self._write_public(key)
        log.info("created the hub key %s and %s", key_id(key.public_key()), root.describe())

    def _write_public(self, key: Ed25519PrivateKey) -> None:
        # Public, but the data dir is the hub's alone (0600 like every file there); devices get it by enrolment.
        write_private(self.dir / PUBLIC_FILE, public_pem(key))

    def _finish_rotation(self) -> None:
        """A rotation cut short: keep the new key if the newest root names it, else forget it."""
        pending = self.dir / NEXT_KEY_FILE
        if not pending.exists():
            return
        key = load_private_key(pending)
        if public_pem(key) in self.root.hub_keys:
            os.replace(pending, self.dir / KEY_FILE)
            self._write_public(key)
        else:
            pending.unlink()

    def _check_bundle_key(self, bundle_key: Path) -> None:
        pem = public_pem(load_public_key(bundle_key))
        if pem not in self.root.bundle_keys:
            raise BadInput(f"--trust-key {bundle_key}: key {key_id(public_key(pem))} is not a bundle key of "
                           f"{self.root.describe()}; to trust it, rotate: edgekit hub rotate-keys --bundle-key "
                           f"{bundle_key}")  # fmt: skip

    # ---- what the hub serves ---------------------------------------------------------------------------------------

    @property
    def root(self) -> TrustRoot:
        return root_of(self._roots[-1])

    @property
    def public_key_file(self) -> Path:
        return self.dir / PUBLIC_FILE

    def chain(self) -> TrustChain:
        """The newest roots (all of them, up to the most a device reads), for `config/trust`."""
        return TrustChain(roots=self._roots[-MAX_CHAIN:])

    def bundle_keys(self) -> list[Ed25519PublicKey]:
        return self.root.bundle_public_keys()

    def sign_desired(self, device_id: str, desired: DesiredState) -> bytes:
        with self._lock:
            key = self._key
        return encode(sign_desired(key, device_id, desired, self.desired_ttl_s))

    def sign_bench(self, device_id: str, job: BenchJob, ttl_s: float) -> bytes:
        with self._lock:
            key = self._key
        return encode(sign_bench(key, device_id, job, ttl_s))

    def rotate(self, new_hub_key: bool, bundle_keys: list[str] | None) -> TrustRoot:
        """Issue the next root: a new hub key (signing it together with the old one) and/or a new list of bundle
        keys (PEM; an empty list trusts none). A key left out is no longer trusted by devices that take it."""
        with self._lock:
            current = self.root
            signers = [self._key]
            hub_keys = current.hub_keys
            if new_hub_key:
                fresh = Ed25519PrivateKey.generate()
                write_private(self.dir / NEXT_KEY_FILE, _private_pem(fresh))
                signers.append(fresh)
                hub_keys = [public_pem(fresh)]
            root = TrustRoot(version=current.version + 1, hub_keys=hub_keys,
                             bundle_keys=current.bundle_keys if bundle_keys is None else bundle_keys,
                             issued=time.time())  # fmt: skip
            self._write_root(seal(ROOT_TYPE, root, signers))
            if new_hub_key:
                self._finish_rotation()
                self._key = signers[-1]
        log.warning("trust rotated: %s", root.describe())
        return root
