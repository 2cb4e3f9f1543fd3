"""The device's bundles on disk, and which one is live.

Layout under the agent's data dir:
  bundles/<sha256>/          an unpacked, verified bundle (only ever appears by an atomic rename)
  active.json                {"active": sha, "previous": sha, "trial": bool}; replaced atomically
A crash at any point leaves `active.json` naming a complete bundle: the old one until the switch, the new
one after. `trial` is true between the switch and the end of the health check, so a restart in that window
resumes the check (and rolls back if it fails) instead of trusting an unproven bundle.
"""

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgekit.bundle import SIGNATURE_FILE, TrustKeys, add_member, open_bundle, sha256_file
from edgekit.manifest import Manifest
from edgekit.protocol import BundleRef
from edgekit.schema import StrictModel

MANIFEST = "manifest.json"


class ActiveRecord(StrictModel):
    active: str | None = None
    previous: str | None = None
    trial: bool = False
    shadow: str | None = None  # installed and running beside the active one, never switched to (updater.set_shadow)


@dataclass(frozen=True)
class Installed:
    id: str
    root: Path
    manifest: Manifest
    size: int

    @property
    def ref(self) -> BundleRef:
        return BundleRef(id=self.id, name=self.manifest.name, version=self.manifest.version, size=self.size)

    @property
    def label(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def semver_key(version: str) -> tuple:
    """Semantic-version order: a pre-release sorts before its release; build metadata is ignored."""
    core, _, pre = version.split("+", 1)[0].partition("-")
    numbers = tuple(int(part) for part in core.split("."))
    if not pre:
        return (*numbers, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*numbers, 0, parts)


class BundleStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "bundles"
        self.record_path = data_dir / "active.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Half-unpacked bundles from a crash are never referenced; remove them."""
        for path in self.dir.glob(".*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def record(self) -> ActiveRecord:
        try:
            return ActiveRecord.model_validate_json(self.record_path.read_bytes())
        except FileNotFoundError:
            return ActiveRecord()
        except ValidationError:
            # Only ever written atomically, so this is outside interference; start clean rather than crash-loop.
            return ActiveRecord()

    def set_record(self, record: ActiveRecord) -> None:
        write_atomically(self.record_path, record.model_dump_json().encode())

    def has(self, bundle_id: str) -> bool:
        return (self.dir / bundle_id / MANIFEST).is_file()

    def get(self, bundle_id: str) -> Installed:
        root = self.dir / bundle_id
        manifest = Manifest.model_validate_json((root / MANIFEST).read_bytes())
        size = json.loads((root / ".size").read_text()) if (root / ".size").is_file() else 0
        return Installed(bundle_id, root, manifest, size)

    def install(self, bundle_file: Path, trust_key: TrustKeys, expected_id: str | None = None) -> Installed:
        """Verify signature and every hash, then make it appear under bundles/<sha256> in one rename.

        Raises OperationFailed (from edgekit.bundle) naming what did not hold."""
        bundle_id = expected_id or sha256_file(bundle_file)
        if self.has(bundle_id):
            return self.get(bundle_id)
        staging = Path(tempfile.mkdtemp(dir=self.dir, prefix=f".{bundle_id[:12]}-"))
        try:
            open_bundle(bundle_file, staging, trust_key)
            # Not a manifest file: the bundle's own size, so the device can name it as the hub does.
            (staging / ".size").write_text(str(bundle_file.stat().st_size))
            os.replace(staging, self.dir / bundle_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.get(bundle_id)

    def repack(self, installed: Installed) -> bytes | None:
        """The .ekb file an installed bundle was unpacked from, rebuilt from its files (the base of a delta update);
        None when the rebuilt bytes do not hash to its id (a bundle packed by another tool), so nothing is kept
        twice on the device's disk."""
        buffer = io.BytesIO()
        try:
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for name in (MANIFEST, SIGNATURE_FILE, *(entry.path for entry in installed.manifest.files)):
                    add_member(tar, name, (installed.root / name).read_bytes())
        except OSError:  # a file of it gone or unreadable: no base, the update downloads the whole bundle
            return None
        data = buffer.getvalue()
        return data if hashlib.sha256(data).hexdigest() == installed.id else None

    def prune(self, keep: set[str]) -> None:
        for path in self.dir.iterdir():
            if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
