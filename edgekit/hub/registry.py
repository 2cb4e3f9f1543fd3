"""The bundle registry: bundles verified on upload, their bytes kept in a store every hub replica reads
(`edgekit.hub.store`: the database, or S3), and as files `<data>/bundles/<sha256>.ekb` of each replica: a cache,
filled from the store on first use and checked against the sha256 before it is served."""

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from edgekit.bundle import open_bundle, sha256_file
from edgekit.errors import BadInput
from edgekit.hub.db import BundleRecord
from edgekit.hub.store import BundleStore, DatabaseStore
from edgekit.manifest import Manifest

log = logging.getLogger(__name__)
SHA256_HEX = re.compile("[0-9a-f]{64}")


class Registry:
    def __init__(self, data_dir: Path, sessions: sessionmaker, trust_keys: Callable[[], list[Ed25519PublicKey]],
                 store: BundleStore | None = None) -> None:  # fmt: skip
        """`trust_keys` gives the keys bundles may be signed with now (the hub's trust root names them); none
        accepts any correctly self-consistent bundle (hashes checked) — say so at start-up. `store`: where the
        bytes are kept for every replica, the database by default."""
        self.dir = data_dir / "bundles"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.sessions = sessions
        self.trust_keys = trust_keys
        self.store = store or DatabaseStore(sessions)
        self._filling = threading.Lock()  # one copy from the store at a time: many devices ask for one bundle

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
            session.flush()  # the parts refer to the record
            self.store.save(bundle_id, target, session)
        return record, True

    def _verify(self, upload: Path) -> Manifest:
        keys = self.trust_keys()
        with tempfile.TemporaryDirectory(prefix="edgekit-registry-") as scratch:
            return open_bundle(upload, Path(scratch), keys or None)

    def path(self, bundle_id: str) -> Path | None:
        """The bundle's file, for chunks, deltas and downloads: this replica's copy, made from the store the first
        time (another replica may have received the push); None for a bundle the registry does not have."""
        path = self.dir / f"{bundle_id}.ekb"
        if not SHA256_HEX.fullmatch(bundle_id):
            return None
        if path.is_file():
            return path
        with self._filling:
            return path if path.is_file() or self._copy_from_store(bundle_id, path) else None

    def _copy_from_store(self, bundle_id: str, path: Path) -> bool:
        """Copy the bundle from the store into `path`, only if its bytes hash to the id."""
        with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".fill-", delete=False) as handle:
            temp = Path(handle.name)
        try:
            if not self.store.copy_to(bundle_id, temp):
                return False
            if sha256_file(temp) != bundle_id:
                log.error("bundle %s in %s does not match its sha256: not served", bundle_id, self.store.description)
                return False
            temp.replace(path)
            return True
        finally:
            temp.unlink(missing_ok=True)

    def store_local_files(self) -> int:
        """Put bundles that are only files here (pushed to a hub from before shared storage) into the store, so that
        every replica can serve them; how many. Run at start; idempotent."""
        stored = 0
        for record in self.all():
            path = self.dir / f"{record.id}.ekb"
            if not path.is_file() or self.store.has(record.id):
                continue
            if sha256_file(path) != record.id:
                log.error("%s does not match its sha256: not stored", path)
                continue
            try:
                with self.sessions.begin() as session:
                    self.store.save(record.id, path, session)
            except IntegrityError:  # another replica with the same file stored it first
                continue
            stored += 1
        if stored:
            log.info("copied %d bundle file(s) from %s into %s", stored, self.dir, self.store.description)
        return stored

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
