"""Where bundle bytes live so that every hub replica can serve every bundle: the hub's database (the default; a
table of 1 MiB parts, which SQLite and PostgreSQL both hold without size limits on one value), or an S3 bucket
(`--bundle-store s3://BUCKET/PREFIX`, any service with S3's API; boto3 finds the endpoint and credentials the way
the AWS CLI does: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `~/.aws/…`).

Each replica keeps a copy of what it serves as a file in its `<data>/bundles` (`edgekit.hub.registry`): chunks,
deltas and HTTP range requests read that file, so the store is read once per bundle and replica.
"""

import importlib.util
import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import BundlePart

PART_SIZE = 1024 * 1024


class BundleStore(Protocol):
    description: str  # for logs and docs: where the bytes are

    def save(self, bundle_id: str, path: Path, session: Session) -> None:
        """Store the file's bytes as the bundle's; `session` is the transaction that adds the bundle's record, so
        that a bundle is listed only once its bytes are stored."""

    def has(self, bundle_id: str) -> bool: ...

    def copy_to(self, bundle_id: str, target: Path) -> bool:
        """Write the bundle's bytes to `target`; False when the store does not have them."""


class DatabaseStore:
    description = "the hub database"

    def __init__(self, sessions: sessionmaker) -> None:
        self._sessions = sessions

    def save(self, bundle_id: str, path: Path, session: Session) -> None:
        with open(path, "rb") as handle:
            for part, data in enumerate(iter(lambda: handle.read(PART_SIZE), b"")):
                row = BundlePart(bundle_id=bundle_id, part=part, data=data)
                session.add(row)
                session.flush()  # one part in memory at a time, however big the bundle
                session.expunge(row)

    def has(self, bundle_id: str) -> bool:
        with self._sessions() as session:
            return bool(session.scalar(select(exists().where(BundlePart.bundle_id == bundle_id))))

    def copy_to(self, bundle_id: str, target: Path) -> bool:
        written = 0
        with self._sessions() as session, open(target, "wb") as handle:
            parts = session.scalars(
                select(BundlePart.data).where(BundlePart.bundle_id == bundle_id).order_by(BundlePart.part)
            )
            for data in parts.yield_per(1):
                handle.write(data)
                written += 1
        return written > 0


class S3Store:
    """Bundles as objects `PREFIX/<sha256>.ekb` in a bucket (boto3, imported only when configured)."""

    def __init__(self, url: str) -> None:
        check_store_url(url)
        import boto3
        from botocore.exceptions import ClientError

        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.description = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = boto3.client("s3")
        self._missing = ClientError

    def _key(self, bundle_id: str) -> str:
        return f"{self.prefix}/{bundle_id}.ekb" if self.prefix else f"{bundle_id}.ekb"

    def save(self, bundle_id: str, path: Path, session: Session) -> None:
        self._client.upload_file(str(path), self.bucket, self._key(bundle_id))

    def has(self, bundle_id: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(bundle_id))
        except self._missing:
            return False
        return True

    def copy_to(self, bundle_id: str, target: Path) -> bool:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(bundle_id))["Body"]
        except self._missing:
            return False
        with open(target, "wb") as handle:
            shutil.copyfileobj(body, handle, PART_SIZE)
        return True


def check_store_url(url: str) -> None:
    """Before anything starts: an s3:// URL with a bucket, and boto3 installed to reach it."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise BadInput(f"--bundle-store {url}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    if importlib.util.find_spec("boto3") is None:
        raise BadInput(f"--bundle-store {url} needs boto3: pip install 'edgekit[s3]'")


def open_store(url: str | None, sessions: sessionmaker) -> BundleStore:
    """The store `--bundle-store` names: None for the database."""
    return DatabaseStore(sessions) if url is None else S3Store(url)
