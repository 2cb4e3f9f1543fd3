"""Ed25519 keys: generate, load, sign and check the bundle manifest."""

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgekit.errors import BadInput
from edgekit.paths import edgekit_home

PRIVATE_KEY_FILE = "edgekit.key"
PUBLIC_KEY_FILE = "edgekit.pub"


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable fingerprint of a public key, shown in manifests and error messages."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `edgekit.key` (private, mode 0600) and `edgekit.pub` into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if private_path.exists() and not overwrite:
        raise BadInput(f"{private_path} already exists; refusing to overwrite a signing key (use --force)")
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInput(f"{path}: cannot read {what}: {error.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_key_file(path, "signing key"), password=None)
    except (ValueError, TypeError) as error:
        raise BadInput(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read_key_file(path, "public key"))
    except ValueError as error:
        raise BadInput(f"{path}: not a PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def default_signing_key() -> tuple[Path, bool]:
    """The per-user signing key, created on first use. Returns (path, created_now)."""
    directory = edgekit_home() / "keys"
    path = directory / PRIVATE_KEY_FILE
    if path.exists():
        return path, False
    generate_keypair(directory)
    return path, True


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    return private_key.sign(data)


def signature_matches(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
