"""The bundle registry: bundles verified on upload, stored content-addressed under `<data>/bundles/<sha256>.ekb`."""

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from edgekit.bundle import open_bundle, sha256_file
from edgekit.errors import BadInput
from edgekit.hub.db import BundleRecord
from edgekit.manifest import Manifest


class Registry:
    def __init__(self, data_dir: Path, sessions: sessionmaker,
                 trust_keys: Callable[[], list[Ed25519PublicKey]]) -> None:  # fmt: skip
        """`trust_keys` gives the keys bundles may be signed with now (the hub's trust root names them); none
        accepts any correctly self-consistent bundle (hashes checked) — say so at start-up."""
        self.dir = data_dir / "bundles"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sessions = sessions
        self.trust_keys = trust_keys

    def add(self, upload: Path, actor: str) -> tuple[BundleRecord, bool]:
        """Verify and store an uploaded bundle file; (record, created). Re-pushing the same bytes is a no-op."""
        bundle_id = sha256_file(upload)
        with self.sessions() as session:
            existing = session.get(BundleRecord, bundle_id)
        if existing:
            return existing, False
        manifest = self._verify(upload)
        target = self.dir / f"{bundle_id}.ekb"
        with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".upload-", delete=False) as handle:
            temp = Path(handle.name)
        try:
            shutil.copyfile(upload, temp)
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)
        record = BundleRecord(
            id=bundle_id, name=manifest.name, version=manifest.version, size=target.stat().st_size,
            profile=manifest.profile, backend=manifest.backend, precision=manifest.precision,
            signing_key_id=manifest.signing_key_id, uploaded=time.time(), uploaded_by=actor,
            manifest=manifest.model_dump(mode="json"),
        )  # fmt: skip
        with self.sessions.begin() as session:
            session.merge(record)
        return record, True

    def _verify(self, upload: Path) -> Manifest:
        keys = self.trust_keys()
        with tempfile.TemporaryDirectory(prefix="edgekit-registry-") as scratch:
            return open_bundle(upload, Path(scratch), keys or None)

    def path(self, bundle_id: str) -> Path | None:
        """The stored file, for the transfer server; None for an unknown id."""
        path = self.dir / f"{bundle_id}.ekb"
        return path if len(bundle_id) == 64 and path.is_file() else None

    def get(self, bundle_id: str) -> BundleRecord:
        with self.sessions() as session:
            record = session.get(BundleRecord, bundle_id)
        if record is None:
            raise BadInput(f"bundle {bundle_id}: not in the registry (edgekit push it first)")
        return record

    def find(self, id_or_prefix: str) -> BundleRecord:
        """By full sha256 or an unambiguous prefix of at least 8 characters (as `edgekit devices` prints them)."""
        if len(id_or_prefix) < 8:
            raise BadInput(f"bundle id '{id_or_prefix}': give at least 8 characters of the sha256")
        # autoescape: `%` and `_` in the prefix are characters, not LIKE wildcards that match any bundle.
        statement = select(BundleRecord).where(BundleRecord.id.startswith(id_or_prefix, autoescape=True))
        with self.sessions() as session:
            matches = list(session.scalars(statement))
        if len(matches) != 1:
            raise BadInput(f"bundle id '{id_or_prefix}': {'no' if not matches else len(matches)} bundles match")
        return matches[0]

    def all(self) -> list[BundleRecord]:
        with self.sessions() as session:
            return list(session.scalars(select(BundleRecord).order_by(BundleRecord.uploaded.desc())))
