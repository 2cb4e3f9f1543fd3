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
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from edgekit.errors import BadInput, OperationFailed
from edgekit.manifest import FileEntry, Manifest
from edgekit.schema import describe_validation_error, unknown
from edgekit.signing import key_id, sign, signature_matches

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
RESERVED = {MANIFEST_FILE, SIGNATURE_FILE}
SIGNATURE_BYTES = 64  # raw Ed25519
# A manifest lists each file in ~150 bytes: 4 MiB is tens of thousands of files, far beyond any model bundle, and
# bounds what is read into memory before the signature is checked.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
COPY_BLOCK = 1 << 20
# One key, the keys of a trust root (any of them), or None: no signature check (hashes only).
TrustKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey] | None


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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One regular file with fixed headers (mode, mtime 0): a bundle repacked from its files has the same bytes."""
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
            add_member(tar, MANIFEST_FILE, manifest_bytes)
            add_member(tar, SIGNATURE_FILE, sign(private_key, manifest_bytes))
            for entry in manifest.files:
                add_member(tar, entry.path, (root / entry.path).read_bytes())
        partial.replace(out)
    finally:
        # Interrupted (Ctrl-C) or failed: never leave a half-written bundle behind.
        partial.unlink(missing_ok=True)


def open_bundle(bundle: Path, dest: Path, trust_key: TrustKeys) -> Manifest:
    """Check, then unpack into dest: the signature (by the key, or by one of the keys, when given) and the manifest
    are checked before anything is written, and then only the files the manifest lists are written, each no larger
    than it declares.

    manifest.json and manifest.sig are the tar's first two members (write_bundle puts them there). Each listed
    file must be a regular, non-sparse member at a safe relative path, and is streamed with its declared size as
    a hard limit and hashed on the way; links, devices, sparse files, unlisted and repeated members are refused.
    So a bundle writes at most what its manifest declares, and, with a trust key, nothing before the signature
    holds. Checked here rather than with tarfile's `filter="data"` (Python 3.11.4+): Debian 12 and Raspberry Pi
    OS ship 3.11.2, where the agent must open bundles just the same."""
    if not bundle.is_file():
        raise BadInput(f"{bundle}: no such bundle file")
    try:
        with tarfile.open(bundle, "r:") as tar:
            manifest_bytes = _read_small_member(bundle, tar, MANIFEST_FILE, MAX_MANIFEST_BYTES)
            signature = _read_small_member(bundle, tar, SIGNATURE_FILE, SIGNATURE_BYTES)
            if trust_key is not None:
                _check_signature(bundle, manifest_bytes, signature, trust_key)
            manifest = _parse_manifest(bundle, manifest_bytes)
            _check_listed_paths(bundle, manifest)
            dest.mkdir(parents=True, exist_ok=True)
            (dest / MANIFEST_FILE).write_bytes(manifest_bytes)
            (dest / SIGNATURE_FILE).write_bytes(signature)
            _extract_listed(bundle, tar, manifest, dest)
            archive_end = tar.offset
    except (tarfile.TarError, EOFError) as error:
        raise OperationFailed(f"{bundle}: truncated or not an edgekit bundle ({error})") from None
    _check_archive_end(bundle, archive_end)
    return manifest


def _inside(path: PurePosixPath) -> bool:
    """A relative path that stays inside the folder it is joined to."""
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def _safe_member(bundle: Path, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path, if it is a regular, non-sparse file at a path inside the bundle."""
    path = PurePosixPath(member.name)
    regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None
    if not regular or not _inside(path):
        raise OperationFailed(f"{bundle}: unsafe member rejected: {member.name!r} (a bundle holds only regular "
                              "files at relative paths)")  # fmt: skip
    return path


def _read_small_member(bundle: Path, tar: tarfile.TarFile, name: str, limit: int) -> bytes:
    member = tar.next()
    if member is None or member.name != name:
        found = f"'{member.name}'" if member is not None else "nothing"
        raise OperationFailed(f"{bundle}: missing {name} (found {found} where an edgekit bundle has it; truncated, "
                              "unsigned or not an edgekit bundle)")  # fmt: skip
    _safe_member(bundle, member)
    if member.size > limit:
        raise OperationFailed(f"{bundle}: {name} is {member.size} bytes; a bundle's is at most {limit}")
    source = tar.extractfile(member)
    assert source is not None, "_safe_member admits regular files only"
    with source:
        return source.read()


def _check_signature(bundle: Path, manifest_bytes: bytes, signature: bytes, trust_key: TrustKeys) -> None:
    keys = [trust_key] if isinstance(trust_key, Ed25519PublicKey) else list(trust_key or [])
    if not any(signature_matches(key, signature, manifest_bytes) for key in keys):
        trusted = ", ".join(key_id(key) for key in keys) or "none"
        raise OperationFailed(
            f"{bundle}: signature check failed: {MANIFEST_FILE} was not signed by a trusted key ({trusted}; it was "
            "modified, or signed by another key)"
        )


def _parse_manifest(bundle: Path, data: bytes) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as error:
        raise OperationFailed(f"{bundle}: {MANIFEST_FILE} is invalid: {describe_validation_error(error)}") from None
    unknown.note(manifest)
    return manifest


def _check_listed_paths(bundle: Path, manifest: Manifest) -> None:
    """Every listed path is a distinct, safe relative file path, and none is also another one's folder."""
    paths = [entry.path for entry in manifest.files]
    folders = {str(parent) for path in paths for parent in PurePosixPath(path).parents}
    for path in paths:
        if not _inside(PurePosixPath(path)) or path in RESERVED:
            raise OperationFailed(f"{bundle}: {MANIFEST_FILE} lists an unsafe path {path!r}")
        if path in folders:
            raise OperationFailed(f"{bundle}: {MANIFEST_FILE} lists {path!r} both as a file and as a folder")
    if len(set(paths)) != len(paths):
        raise OperationFailed(f"{bundle}: {MANIFEST_FILE} lists a file twice")


def _extract_listed(bundle: Path, tar: tarfile.TarFile, manifest: Manifest, dest: Path) -> None:
    expected = {entry.path: entry for entry in manifest.files}
    written: set[str] = set()
    while (member := tar.next()) is not None:
        path = _safe_member(bundle, member).as_posix()
        if path in written:
            raise OperationFailed(f"{bundle}: {path} appears twice in the archive")
        entry = expected.get(path)
        if entry is None:
            raise OperationFailed(f"{bundle}: files not listed in the manifest: {path}")
        if member.size != entry.size:
            raise OperationFailed(f"{bundle}: {path} is {member.size} bytes, manifest says {entry.size}")
        _stream_member(bundle, tar, member, entry, dest)
        written.add(path)
    missing = sorted(set(expected) - written)
    if missing:
        raise OperationFailed(f"{bundle}: missing file {missing[0]} listed in the manifest")


def _stream_member(bundle: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, entry: FileEntry, dest: Path) -> None:
    """Copy one member to its listed path, never past its declared size, and check its sha256 on the way."""
    target = dest.joinpath(*PurePosixPath(entry.path).parts)
    source = tar.extractfile(member)
    assert source is not None, "_safe_member admits regular files only"
    digest, size = hashlib.sha256(), 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "xb") as out:
        while block := source.read(min(COPY_BLOCK, entry.size - size + 1)):
            size += len(block)
            if size > entry.size:
                raise OperationFailed(f"{bundle}: {entry.path} is longer than the {entry.size} bytes listed")
            digest.update(block)
            out.write(block)
    if size != entry.size:
        raise OperationFailed(f"{bundle}: {entry.path} is {size} bytes, manifest says {entry.size}")
    if digest.hexdigest() != entry.sha256:
        raise OperationFailed(f"{bundle}: {entry.path} sha256 does not match the manifest (file was modified)")


def _check_archive_end(bundle: Path, archive_end: int) -> None:
    """tarfile accepts an archive cut after its last member; a complete one has the two zero blocks and whole
    512-byte blocks, so anything shorter was truncated in transfer."""
    size = bundle.stat().st_size
    if size % tarfile.BLOCKSIZE or size < archive_end + 2 * tarfile.BLOCKSIZE:
        raise OperationFailed(f"{bundle}: truncated ({size} bytes; the archive's end-of-file marker is missing)")


def verify_bundle(bundle: Path, trust_key: Ed25519PublicKey | Sequence[Ed25519PublicKey]) -> Manifest:
    """Full check of a bundle file without keeping what it unpacked."""
    with tempfile.TemporaryDirectory(prefix="edgekit-verify-") as scratch:
        return open_bundle(bundle, Path(scratch), trust_key)
