"""Signed control messages: which keys a device trusts (the trust root) and what the hub wants it to run (a signed
desired state) or measure (a signed benchmark job).

Both travel in a DSSE envelope (github.com/secure-systems-lab/dsse, the envelope in-toto and Sigstore use): the
payload's bytes, a payload type, and Ed25519 signatures over `PAE(type, payload)`, so a signature for one kind of
message never verifies as another, and nothing is re-serialised before it is checked.

The trust root is TUF's root role cut to what a device needs: a version, the hub keys that sign desired states and
the next root, and the keys bundles are signed with. Root N+1 is accepted only when signed by a hub key of root N
*and* by one of its own hub keys (the new key proves itself), so a device walks from the root it has to the newest
one without re-enrolment, and a key left out of the newest root is no longer trusted (docs/security.md).
"""

import base64
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError, field_validator

from edgekit.protocol import DEVICE_ID, MAX_REV, BenchJob, DesiredState, Payload, PayloadRejected, decode
from edgekit.schema import Model, WireModel, describe_validation_error, unknown
from edgekit.signing import key_id, signature_matches

ROOT_TYPE = "application/vnd.edgekit.root+json"
DESIRED_TYPE = "application/vnd.edgekit.desired+json"
BENCH_TYPE = "application/vnd.edgekit.bench+json"
# A chain longer than this is refused unread; at one rotation a month it lasts five years.
MAX_CHAIN = 64
MAX_TRUST_PAYLOAD = MAX_CHAIN * 4096
# How long a signed desired state stays acceptable after the hub signed it (`edgekit hub --desired-ttl`).
DEFAULT_DESIRED_TTL_S = 24 * 3600.0


class Untrusted(Exception):
    """A signed message the device must not act on; the message says why (key, device, expiry, signature)."""


class Signature(WireModel):
    keyid: str = Field(max_length=64)
    sig: str = Field(max_length=128, description="base64 Ed25519 signature over PAE(payloadType, payload)")


class Envelope(Payload):
    """A DSSE envelope. Field names are DSSE's."""

    payloadType: str = Field(max_length=100)
    payload: str = Field(max_length=256 * 1024, description="base64 of the signed JSON")
    signatures: list[Signature] = Field(min_length=1, max_length=8)


class TrustRoot(WireModel):
    """Which keys a device trusts; version 0 is the one it was given (enrolment or --hub-key), never signed."""

    version: int = Field(ge=0, le=MAX_REV, strict=True)
    hub_keys: list[str] = Field(min_length=1, max_length=4, description="PEM keys that sign desired states and roots")
    bundle_keys: list[str] = Field([], max_length=8, description="PEM keys bundles may be signed with")
    issued: float = 0.0

    @field_validator("hub_keys", "bundle_keys")
    @classmethod
    def _ed25519_keys(cls, keys: list[str]) -> list[str]:
        for pem in keys:
            public_key(pem)
        return keys

    def hub_public_keys(self) -> list[Ed25519PublicKey]:
        return [public_key(pem) for pem in self.hub_keys]

    def bundle_public_keys(self) -> list[Ed25519PublicKey]:
        return [public_key(pem) for pem in self.bundle_keys]

    def describe(self) -> str:
        hubs = ", ".join(key_id(k) for k in self.hub_public_keys())
        bundles = ", ".join(key_id(k) for k in self.bundle_public_keys()) or "none"
        return f"trust root v{self.version} (hub keys {hubs}; bundle keys {bundles})"


class TrustChain(Payload):
    """`config/trust`: every signed root from version 1 on, oldest first, so a device that missed some can walk."""

    roots: list[Envelope] = Field(min_length=1, max_length=MAX_CHAIN)


class SignedStatement(WireModel):
    """What the hub signs for one device, for a time window: a desired state or a benchmark job."""

    device: str = Field(pattern=DEVICE_ID)
    issued: float
    expires: float


class DesiredStatement(SignedStatement):
    desired: DesiredState


class BenchStatement(SignedStatement):
    job: BenchJob


Statement = TypeVar("Statement", bound=SignedStatement)


def public_key(pem: str) -> Ed25519PublicKey:
    """The key in a PEM string; ValueError when it is not an Ed25519 public key."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"expected an Ed25519 public key, got {type(key).__name__}")
    return key


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def seal(payload_type: str, body: BaseModel, keys: Iterable[Ed25519PrivateKey]) -> Envelope:
    data = body.model_dump_json(exclude_none=True).encode()
    message = pae(payload_type, data)
    signatures = [
        Signature(keyid=key_id(key.public_key()), sig=base64.b64encode(key.sign(message)).decode()) for key in keys
    ]
    return Envelope(payloadType=payload_type, payload=base64.b64encode(data).decode(), signatures=signatures)


def _payload_bytes(envelope: Envelope, payload_type: str) -> bytes:
    if envelope.payloadType != payload_type:
        raise Untrusted(f"payload type {envelope.payloadType!r}, expected {payload_type!r}")
    try:
        return base64.b64decode(envelope.payload, validate=True)
    except ValueError:
        raise Untrusted("payload is not base64") from None


def _signers(envelope: Envelope, data: bytes, keys: Sequence[Ed25519PublicKey]) -> set[str]:
    """Ids of the keys in `keys` with a valid signature on the envelope."""
    message = pae(envelope.payloadType, data)
    by_id = {key_id(key): key for key in keys}
    valid = set()
    for signature in envelope.signatures:
        key = by_id.get(signature.keyid)
        try:
            raw = base64.b64decode(signature.sig, validate=True)
        except ValueError:
            continue
        if key is not None and signature_matches(key, raw, message):
            valid.add(signature.keyid)
    return valid


def _key_list(keys: Sequence[Ed25519PublicKey]) -> str:
    return ", ".join(key_id(key) for key in keys) or "none"


def _signed_by(envelope: Envelope, data: bytes, keys: Sequence[Ed25519PublicKey], whose: str) -> None:
    if not _signers(envelope, data, keys):
        found = ", ".join(s.keyid for s in envelope.signatures)
        raise Untrusted(f"not signed by {whose} ({_key_list(keys)}); signed by {found}")


def _parse(model: type[Model], data: bytes, what: str) -> Model:
    try:
        parsed = model.model_validate_json(data)
    except ValidationError as error:
        raise Untrusted(f"{what}: {describe_validation_error(error)}") from None
    unknown.note(parsed)
    return parsed


def next_root(current: TrustRoot, envelope: Envelope) -> TrustRoot:
    """Root `current.version + 1` from `envelope`, checked against `current`; Untrusted says why not."""
    data = _payload_bytes(envelope, ROOT_TYPE)
    root = _parse(TrustRoot, data, "trust root")
    if root.version != current.version + 1:
        raise Untrusted(f"trust root v{root.version} does not follow v{current.version}")
    _signed_by(envelope, data, current.hub_public_keys(), f"a hub key of trust root v{current.version}")
    _signed_by(envelope, data, root.hub_public_keys(), f"a hub key of trust root v{root.version} itself")
    return root


def walk_chain(current: TrustRoot, chain: TrustChain) -> tuple[TrustRoot, Envelope | None]:
    """The newest root the chain leads to from `current` (and its envelope; None when it had nothing newer).

    Roots at or below the current version are skipped; a root that does not verify stops the walk with Untrusted,
    after which the device keeps the root it has."""
    newest: Envelope | None = None
    for envelope in chain.roots:
        version = _peek_version(envelope)
        if version is None or version <= current.version:
            continue
        current, newest = next_root(current, envelope), envelope
    return current, newest


def _peek_version(envelope: Envelope) -> int | None:
    """The version a root envelope claims, unverified (to skip the ones the device is past)."""
    try:
        return TrustRoot.model_validate_json(_payload_bytes(envelope, ROOT_TYPE)).version
    except (Untrusted, ValidationError):
        return None


def root_of(envelope: Envelope) -> TrustRoot:
    """The root an envelope holds, unverified: for the device's own stored copy and the hub's own files."""
    return _parse(TrustRoot, _payload_bytes(envelope, ROOT_TYPE), "trust root")


def sign_desired(
    key: Ed25519PrivateKey, device_id: str, desired: DesiredState, ttl_s: float, now: float | None = None
) -> Envelope:
    issued = time.time() if now is None else now
    statement = DesiredStatement(device=device_id, issued=issued, expires=issued + ttl_s, desired=desired)
    return seal(DESIRED_TYPE, statement, [key])


def open_desired(payload: bytes, root: TrustRoot | None, device_id: str, max_bytes: int) -> DesiredStatement:
    """The signed statement in a `config/desired` payload, if a hub key of `root` signed it for `device_id`; its
    expiry is the caller's to check, after the rev (a repeat of an applied state is a no-op, expired or not).

    PayloadRejected for what is not an envelope at all; Untrusted for an envelope the device must not act on."""
    return _open_statement(payload, root, device_id, max_bytes, DESIRED_TYPE, DesiredStatement, "desired state")


def sign_bench(key: Ed25519PrivateKey, device_id: str, job: BenchJob, ttl_s: float) -> Envelope:
    issued = time.time()
    return seal(BENCH_TYPE, BenchStatement(device=device_id, issued=issued, expires=issued + ttl_s, job=job), [key])


def open_bench(payload: bytes, root: TrustRoot | None, device_id: str, max_bytes: int) -> BenchStatement:
    """The signed benchmark job in a `bench/job` payload, as `open_desired`; its expiry is the caller's to check."""
    return _open_statement(payload, root, device_id, max_bytes, BENCH_TYPE, BenchStatement, "benchmark job")


def _open_statement(payload: bytes, root: TrustRoot | None, device_id: str, max_bytes: int, payload_type: str,
                    model: type[Statement], what: str) -> Statement:  # fmt: skip
    try:
        envelope = decode(Envelope, payload, max_bytes)
    except PayloadRejected as error:
        raise PayloadRejected(f"not a signed {what} (a DSSE envelope): {error}") from None
    if root is None:
        raise Untrusted("no hub key to check it with (enrol the device, or pass --hub-key)")
    data = _payload_bytes(envelope, payload_type)
    _signed_by(envelope, data, root.hub_public_keys(), f"a hub key of trust root v{root.version}")
    statement = _parse(model, data, f"signed {what}")
    if statement.device != device_id:
        raise Untrusted(f"signed for device {statement.device!r}, not this one ({device_id!r})")
    return statement


def decode_chain(payload: bytes) -> TrustChain:
    try:
        chain: TrustChain = decode(TrustChain, payload, MAX_TRUST_PAYLOAD)
    except PayloadRejected as error:
        raise Untrusted(f"trust chain: {error}") from None
    return chain
