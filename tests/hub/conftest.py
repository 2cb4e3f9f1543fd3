"""Hub fixtures: `make_hub` (tests/conftest.py) and a default hub from it; a PostgreSQL cluster per module and a fresh
database on it per test, for hub replicas."""

import uuid
from collections.abc import Iterator

import pytest
from hub.postgres import PostgresCluster, postgres_cluster

from edgekit.hub.service import Hub


@pytest.fixture
def hub(make_hub) -> Hub:
    return make_hub()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    yield from postgres_cluster()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> str:
    return pg_cluster.create_database(f"r{uuid.uuid4().hex[:12]}")
