"""The keys this device trusts: the root it was given (enrolment, or --hub-key and --trust-key), then each newer root
the hub announces on `config/trust`, kept in the data directory so a restart never falls back to a retired key.

The given root wins over the stored one only at a higher version or the same one (an operator re-enrolling the
device), never when it is older: a unit file that still names the first keys must not undo a rotation.
"""

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgekit.agents.bundles import write_atomically
from edgekit.signing import load_public_key
from edgekit.trust import (
    BenchStatement,
    DesiredStatement,
    Envelope,
    TrustChain,
    TrustRoot,
    Untrusted,
    open_bench,
    open_desired,
    public_pem,
    root_of,
    walk_chain,
)

log = logging.getLogger(__name__)
TRUST_FILE = "trust.json"


class DeviceTrust:
    def __init__(self, data_dir: Path, hub_key: Path | None, bundle_key: Path | None, version: int = 0) -> None:
        """`hub_key`/`bundle_key`: the PEM files the device was given, as root `version`; no `hub_key` and no stored
        root means the device refuses every desired state."""
        self._path = data_dir / TRUST_FILE
        given = self._given(hub_key, bundle_key, version)
        stored = self._load()
        self.root: TrustRoot | None = stored if stored and (given is None or stored.version > given.version) else given
        # Without a hub key there is no root, but a device may still run a --bundle it can verify.
        self._bundle_only = [load_public_key(bundle_key)] if bundle_key is not None and self.root is None else []

    @staticmethod
    def _given(hub_key: Path | None, bundle_key: Path | None, version: int) -> TrustRoot | None:
        if hub_key is None:
            return None
        bundles = [public_pem(load_public_key(bundle_key))] if bundle_key is not None else []
        return TrustRoot(version=version, hub_keys=[public_pem(load_public_key(hub_key))], bundle_keys=bundles)

    def _load(self) -> TrustRoot | None:
        try:
            return root_of(Envelope.model_validate_json(self._path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, Untrusted) as error:
            log.error("%s: unreadable (%s); using the keys the agent was given", self._path, error)
            return None

    def bundle_keys(self) -> list[Ed25519PublicKey]:
        """The keys a bundle may be signed with now."""
        return self.root.bundle_public_keys() if self.root else self._bundle_only

    def describe(self) -> str:
        return self.root.describe() if self.root else "no hub key: every desired state is refused"

    def open_desired(self, payload: bytes, device_id: str, max_bytes: int) -> DesiredStatement:
        """PayloadRejected when it is not a signed envelope; Untrusted when it is one this device must not act on."""
        return open_desired(payload, self.root, device_id, max_bytes)

    def open_bench(self, payload: bytes, device_id: str, max_bytes: int) -> BenchStatement:
        """As `open_desired`, for a `bench/job` payload."""
        return open_bench(payload, self.root, device_id, max_bytes)

    def accept(self, chain: TrustChain) -> TrustRoot | None:
        """Move to the newest root the chain leads to, and store it; None when it had nothing newer. Untrusted when
        a root in it does not verify (the device keeps its root)."""
        if self.root is None:
            raise Untrusted("no hub key to check the trust chain with (enrol the device, or pass --hub-key)")
        root, envelope = walk_chain(self.root, chain)
        if envelope is None:
            return None
        write_atomically(self._path, envelope.model_dump_json().encode())
        self.root = root
        return root
