"""The `.ekb` bundle: one tar file holding a signed manifest, the artifacts and the self-test vectors.

Layout inside the tar (documented in docs/bundle.md):
    manifest.json      the Manifest, UTF-8 JSON
    manifest.sig       raw 64-byte Ed25519 signature over manifest.json's exact bytes
    <every file listed in manifest.files>, e.g. artifacts/model.onnx, selftest/vectors.npz, report.json

The signature covers the manifest, and the manifest pins every other file by size and sha256, so one
signature check plus one hash per file proves the whole bundle.
"""

import hashlib
import io
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edgekit.errors import BadInput, OperationFailed
from edgekit.manifest import FileEntry, Manifest
from edgekit.schema import describe_validation_error
from edgekit.signing import key_id, sign, signature_matches

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
RESERVED = {MANIFEST_FILE, SIGNATURE_FILE}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path) -> list[FileEntry]:
    """Size and hash of every file under root, in a stable order, for the manifest."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return [FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), size=p.stat().st_size) for p in paths]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_bundle(root: Path, manifest: Manifest, private_key: Ed25519PrivateKey, out: Path) -> None:
    """Sign the manifest and pack it with the files it lists; written to a temp name, then renamed."""
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w") as tar:
            _add_bytes(tar, MANIFEST_FILE, manifest_bytes)
            _add_bytes(tar, SIGNATURE_FILE, sign(private_key, manifest_bytes))
            for entry in manifest.files:
                _add_bytes(tar, entry.path, (root / entry.path).read_bytes())
        partial.replace(out)
    finally:
        # Interrupted (Ctrl-C) or failed: never leave a half-written bundle behind.
        partial.unlink(missing_ok=True)


def unpack(bundle: Path, dest: Path) -> None:
    """Extract every member; each must be a regular file at a relative path inside dest (no links, devices,
    absolute paths or `..`). Checked here rather than with tarfile's `filter="data"`, which arrived in Python
    3.11.4: Debian 12 and Raspberry Pi OS ship 3.11.2, where the agent must unpack bundles just the same."""
    if not bundle.is_file():
        raise BadInput(f"{bundle}: no such bundle file")
    try:
        with tarfile.open(bundle, "r:") as tar:
            for member in tar:
                target = _member_target(bundle, dest, member)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None, "_member_target admits regular files only"
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
            archive_end = tar.offset
    except (tarfile.TarError, EOFError) as error:
        raise OperationFailed(f"{bundle}: truncated or not an edgekit bundle ({error})") from None
    _check_archive_end(bundle, archive_end)


def _member_target(bundle: Path, dest: Path, member: tarfile.TarInfo) -> Path:
    path = PurePosixPath(member.name)
    if not member.isfile() or path.is_absolute() or ".." in path.parts or not path.parts:
        raise OperationFailed(f"{bundle}: unsafe member rejected: {member.name!r} (a bundle holds only regular "
                              "files at relative paths)")  # fmt: skip
    return dest.joinpath(*path.parts)


def _check_archive_end(bundle: Path, archive_end: int) -> None:
    """tarfile accepts an archive cut after its last member; a complete one has the two zero blocks and whole
    512-byte blocks, so anything shorter was truncated in transfer."""
    size = bundle.stat().st_size
    if size % tarfile.BLOCKSIZE or size < archive_end + 2 * tarfile.BLOCKSIZE:
        raise OperationFailed(f"{bundle}: truncated ({size} bytes; the archive's end-of-file marker is missing)")


def _read_manifest_bytes(bundle: Path, root: Path) -> bytes:
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise OperationFailed(f"{bundle}: missing {MANIFEST_FILE} (truncated or not an edgekit bundle)")
    return manifest_path.read_bytes()


def _parse_manifest(bundle: Path, data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as error:
        raise OperationFailed(f"{bundle}: {MANIFEST_FILE} is invalid: {describe_validation_error(error)}") from None


def _check_signature(bundle: Path, root: Path, manifest_bytes: bytes, trust_key: Ed25519PublicKey) -> None:
    signature_path = root / SIGNATURE_FILE
    if not signature_path.is_file():
        raise OperationFailed(f"{bundle}: missing {SIGNATURE_FILE}; the bundle is unsigned or truncated")
    if not signature_matches(trust_key, signature_path.read_bytes(), manifest_bytes):
        raise OperationFailed(
            f"{bundle}: signature check failed: {MANIFEST_FILE} was not signed by the trusted key "
            f"{key_id(trust_key)} (it was modified, or signed by another key)"
        )


def _check_files(bundle: Path, root: Path, manifest: Manifest) -> None:
    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        path = root / entry.path
        if entry.path in RESERVED or not path.is_file():
            raise OperationFailed(f"{bundle}: missing file {entry.path} listed in the manifest")
        if path.stat().st_size != entry.size:
            raise OperationFailed(f"{bundle}: {entry.path} is {path.stat().st_size} bytes, manifest says {entry.size}")
        if sha256_file(path) != entry.sha256:
            raise OperationFailed(f"{bundle}: {entry.path} sha256 does not match the manifest (file was modified)")
    extra = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in listed | RESERVED
    )
    if extra:
        raise OperationFailed(f"{bundle}: files not listed in the manifest: {', '.join(extra)}")


def open_bundle(bundle: Path, dest: Path, trust_key: Ed25519PublicKey | None) -> Manifest:
    """Unpack into dest and check it: every file hash always, the signature when a trust key is given."""
    unpack(bundle, dest)
    manifest_bytes = _read_manifest_bytes(bundle, dest)
    if trust_key is not None:
        _check_signature(bundle, dest, manifest_bytes, trust_key)
    manifest = _parse_manifest(bundle, manifest_bytes)
    _check_files(bundle, dest, manifest)
    return manifest


def verify_bundle(bundle: Path, trust_key: Ed25519PublicKey) -> Manifest:
    """Full check of a bundle file without keeping what it unpacked."""
    with tempfile.TemporaryDirectory(prefix="edgekit-verify-") as scratch:
        return open_bundle(bundle, Path(scratch), trust_key)
