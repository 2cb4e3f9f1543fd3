"""Schema migrations against real parts: databases made by the previous release of edgekit (its code, checked out
from git history, run in a subprocess), on SQLite and on a throwaway PostgreSQL cluster, upgraded by the new hub
with every row kept; a database from the future refused; `edgekit hub migrate` and its dry run."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import BigInteger, MetaData, create_engine, inspect, select
from sqlalchemy.engine import Engine

from edgekit.errors import OperationFailed
from edgekit.hub import migrations
from edgekit.hub.broker import free_port
from edgekit.hub.db import Base, TelemetrySample, database_url, open_database
from edgekit.hub.service import Hub, HubSettings

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from hub.postgres import PostgresCluster, postgres_cluster  # noqa: E402
from reliability import record  # noqa: E402

REPO = TESTS.parent
# The last commit before schema migrations: its hub made databases with create_all and no alembic_version. Pinned,
# so the test keeps meaning "a database from the release before migrations" however far main moves on.
PREVIOUS_RELEASE = "1cf2a5ab713d07c79ef873806c06ec5dddf9ee90"
FILLER = Path(__file__).with_name("previous_release.py")
DATABASES = ["sqlite", "postgresql"]
WIDENED = migrations.WIDENED_TELEMETRY_COLUMNS
SCENARIO = "hub: schema migrations"
FUTURE = "9f3c0e7d2b1a"
# The next release's first revision, as a developer would write it: a column added (what, without migrations,
# started fine and then failed on the first query that touched it).
NEXT_REVISION = '''"""Devices get notes."""

import sqlalchemy as sa
from alembic import op

revision = "next"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("notes", sa.Text(), nullable=True))
'''
HUBS = 3  # hub processes starting at once on one database
# A hub process starting: everything imported, it waits for the word (stdin), then opens the database.
HUB_START = """
import sys
import edgekit.hub.migrations
from edgekit.hub.db import open_database
print("imported", flush=True)
input()
open_database(sys.argv[1])
"""


# ---- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def previous_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `edgekit` package, from git history (`git archive`), in a folder of its own."""
    tree = tmp_path_factory.mktemp("previous-release")
    known = subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True)
    assert known.returncode == 0, (
        f"commit {PREVIOUS_RELEASE} is not in {REPO}: a shallow clone? (git fetch --unshallow)"
    )
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", PREVIOUS_RELEASE, "edgekit"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    assert not (tree / "edgekit" / "hub" / "migrations").exists(), "PREVIOUS_RELEASE already has migrations"
    return tree


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    yield from postgres_cluster()


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a database that does not exist yet (SQLite) or is empty (a new PostgreSQL database)."""
    if request.param == "sqlite":
        (tmp_path / "data").mkdir()
        return database_url(None, tmp_path / "data")
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return database_url(cluster.create_database(f"m{uuid.uuid4().hex[:12]}"), tmp_path)


def fill_with_previous_release(tree: Path, url: str) -> str:
    """Create the database and rows of every kind through the previous release's code; its admin token."""
    done = subprocess.run([sys.executable, FILLER, url], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(out["db_module"]).is_relative_to(tree), f"the filler ran {out['db_module']}, not the previous release"
    return out["token"]


def plain_engine(url: str) -> Engine:
    """An engine that migrates nothing, to look at a database as it is."""
    return create_engine(url)


def snapshot(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table (alembic_version aside), in primary-key order."""
    engine = plain_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            return {name: [dict(row._mapping) for row in connection.execute(select(table).order_by(*table.primary_key))]
                    for name, table in metadata.tables.items() if name != "alembic_version"}  # fmt: skip
    finally:
        engine.dispose()


def revision(url: str) -> str | None:
    engine = plain_engine(url)
    try:
        with engine.connect() as connection:
            return migrations.current_revision(connection)
    finally:
        engine.dispose()


def telemetry_types(url: str) -> dict[str, str]:
    engine = plain_engine(url)
    try:
        with engine.connect() as connection:
            columns = inspect(connection).get_columns("telemetry")
    finally:
        engine.dispose()
    return {
        c["name"]: "BIGINT" if isinstance(c["type"], BigInteger) else str(c["type"])
        for c in columns
        if c["name"] in WIDENED
    }


def execute(url: str, *statements: str) -> None:
    engine = plain_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


def schema_differences(engine: Engine) -> list:
    """What Alembic's autogenerate finds between the database and the models: empty when they agree."""
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def as_it_was(after: dict[str, list[dict]], before: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """`after` with only the tables and columns `before` had: what later revisions added left out."""
    return {table: [{column: row[column] for column in rows[0]} for row in after[table]] if rows else after[table]
            for table, rows in before.items()}  # fmt: skip


def lost_rows(before: dict[str, list[dict]], after: dict[str, list[dict]]) -> int:
    """Rows of `before` not found unchanged in `after` (compared on the columns `before` had)."""
    lost = 0
    for table, rows in before.items():
        kept = [{column: row[column] for column in rows[0]} for row in after.get(table, [])] if rows else []
        lost += sum(row not in kept for row in rows)
    return lost


# ---- a previous release's database, upgraded by the new hub ------------------------------------------------------


def test_the_new_hub_upgrades_a_previous_release_database_keeping_every_row(
    db_url: str, previous_tree: Path, tmp_path: Path
) -> None:
    old_token = fill_with_previous_release(previous_tree, db_url)
    assert revision(db_url) is None
    before = snapshot(db_url)
    assert {table for table, rows in before.items() if not rows} == set(), "the filler left a table empty"

    hub = Hub(HubSettings(data_dir=tmp_path / "hub", db=db_url, http_port=free_port(), broker_port=free_port()))
    try:
        assert revision(db_url) == migrations.head()
        after = snapshot(db_url)
        lost = lost_rows(before, after)
        record(SCENARIO, f"rows lost upgrading a previous-release database ({db_url.split(':')[0]})", lost, 0)
        assert lost == 0
        assert as_it_was(after, before) == before  # nothing added or changed either
        assert schema_differences(hub.engine) == []
        hub.start()
        assert hub.wait_http(15), "the hub's HTTP server did not start"
        # The old release's admin token works, and the fleet it stored is the fleet the new hub shows.
        with httpx.Client(
            base_url=hub.http_url, headers={"Authorization": f"Bearer {old_token}"}, trust_env=False
        ) as api:
            devices = api.get("/api/devices")
            assert devices.status_code == 200, devices.text
            assert sorted(d["id"] for d in devices.json()) == ["cam-1", "cam-2", "cam-3"]
        # A 64-bit counter is stored now where the old release's column type would have had to hold it.
        with hub.sessions.begin() as session:
            session.add(TelemetrySample(device_id="cam-1", seq=99, ts=1.0, inferences=2**40))
        with hub.sessions() as session:
            assert session.get(TelemetrySample, ("cam-1", 99)).inferences == 2**40
    finally:
        hub.stop()


def test_a_postgresql_database_from_before_the_bigint_change_is_widened(
    pg_cluster: PostgresCluster, previous_tree: Path, tmp_path: Path, cli
) -> None:
    url = database_url(pg_cluster.create_database(f"m{uuid.uuid4().hex[:12]}"), tmp_path)
    fill_with_previous_release(previous_tree, url)
    # As a hub from before commit d960be6 (64-bit telemetry counters) and 3ffec8b (token scopes) left it.
    execute(url, "ALTER TABLE tokens DROP COLUMN scope",
            *(f"ALTER TABLE telemetry ALTER COLUMN {name} TYPE INTEGER" for name in WIDENED))  # fmt: skip
    assert telemetry_types(url) == dict.fromkeys(WIDENED, "INTEGER")
    before = snapshot(url)

    shown = cli("hub", "migrate", "--db", url, "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    for name in WIDENED:
        assert f"ALTER TABLE telemetry ALTER COLUMN {name} TYPE BIGINT" in shown.stdout
    assert migrations.TOKEN_SCOPE_COLUMN in shown.stdout
    assert telemetry_types(url) == dict.fromkeys(WIDENED, "INTEGER"), "--dry-run changed the database"
    assert revision(url) is None

    engine, sessions = open_database(url)
    try:
        assert telemetry_types(url) == dict.fromkeys(WIDENED, "BIGINT")
        after = snapshot(url)
        assert lost_rows(before, after) == 0
        assert {token["scope"] for token in after["tokens"]} == {"admin"}  # made before scopes: admin, as before
        assert schema_differences(engine) == []
        with sessions.begin() as session:
            session.add(TelemetrySample(device_id="cam-2", seq=99, ts=1.0, queue_depth=2**40, store_depth=-(2**40)))
    finally:
        engine.dispose()


def test_hubs_starting_at_once_upgrade_the_database_one_after_another(db_url: str, previous_tree: Path) -> None:
    fill_with_previous_release(previous_tree, db_url)
    before = snapshot(db_url)
    # Each process imports first, then all open the database together: the race is in the upgrade, not the imports.
    hubs = [subprocess.Popen([sys.executable, "-c", HUB_START, db_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(HUBS)]  # fmt: skip
    for hub in hubs:
        assert hub.stdout and hub.stdout.readline() == "imported\n"
    for hub in hubs:
        assert hub.stdin
        hub.stdin.write("go\n")
        hub.stdin.flush()
    errors = [hub.communicate(timeout=120)[1] for hub in hubs]
    assert [hub.returncode for hub in hubs] == [0] * HUBS, errors
    assert revision(db_url) == migrations.head()
    assert as_it_was(snapshot(db_url), before) == before


def test_a_fresh_database_is_created_at_head_matching_the_models(db_url: str) -> None:
    engine, _ = open_database(db_url)
    try:
        assert revision(db_url) == migrations.head()
        assert schema_differences(engine) == []
    finally:
        engine.dispose()


# ---- a database from the future ----------------------------------------------------------------------------------


def test_a_database_newer_than_the_hub_is_refused(tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    url = database_url(None, data)
    data.mkdir()
    open_database(url)[0].dispose()
    execute(url, f"UPDATE alembic_version SET version_num = '{FUTURE}'")
    before = snapshot(url)
    message = f"database schema {FUTURE} is newer than this hub (knows up to {migrations.head()}): upgrade edgekit"

    with pytest.raises(OperationFailed) as refused:
        Hub(HubSettings(data_dir=data))
    assert str(refused.value) == message
    started = cli("hub", "--data", data, "--http", f"127.0.0.1:{free_port()}", "--broker-port", free_port())
    assert (started.exit_code, started.stderr.strip()) == (1, f"error: {message}")
    for dry_run in ([], ["--dry-run"]):
        result = cli("hub", "migrate", "--data", data, *dry_run)
        assert result.exit_code == 1
        assert result.stderr.strip() == f"error: {message}"
    assert revision(url) == FUTURE
    assert snapshot(url) == before


# ---- edgekit hub migrate -----------------------------------------------------------------------------------------


def test_migrate_dry_run_changes_nothing_then_migrate_upgrades(previous_tree: Path, tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = database_url(None, data)
    fill_with_previous_release(previous_tree, url)
    before = snapshot(url)
    file_before = hashlib.sha256((data / "hub.sqlite").read_bytes()).hexdigest()

    shown = cli("hub", "migrate", "--data", data, "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    assert hashlib.sha256((data / "hub.sqlite").read_bytes()).hexdigest() == file_before, "--dry-run wrote"
    assert "SQL that would run:" in shown.stdout
    assert "current revision: none (tables made before migrations)" in shown.stdout
    assert f"target revision:  {migrations.head()}" in shown.stdout
    assert f"pending: adopt the tables made before migrations as {migrations.BASELINE}" in shown.stdout
    assert f"INSERT INTO alembic_version (version_num) VALUES ('{migrations.BASELINE}')" in shown.stdout
    assert "dry run: nothing changed" in shown.stdout
    assert revision(url) is None
    assert snapshot(url) == before

    done = cli("hub", "migrate", "--data", data)
    assert done.exit_code == 0, done.stderr
    assert "was at revision: none (tables made before migrations)" in done.stdout
    assert f"ran: adopt the tables made before migrations as {migrations.BASELINE}" in done.stdout
    assert f"upgraded to {migrations.head()}" in done.stdout
    assert revision(url) == migrations.head()
    assert as_it_was(snapshot(url), before) == before

    again = cli("hub", "migrate", "--data", data, "--dry-run")
    assert again.exit_code == 0
    assert f"current revision: {migrations.head()}" in again.stdout and "pending:" not in again.stdout
    assert f"already at {migrations.head()}" in cli("hub", "migrate", "--data", data).stdout


def test_the_next_releases_revision_is_shown_by_the_dry_run_then_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    url = database_url(None, data)
    open_database(url)[0].dispose()  # this release's database, at its head
    execute(url, "INSERT INTO devices (id, labels, online, first_seen, last_seen, runtimes, last_seq, desired_rev) "
                 "VALUES ('cam-1', '{}', 0, 1.0, 2.0, '[]', 5, 1)")  # fmt: skip
    before = snapshot(url)
    next_release = tmp_path / "next-release-migrations"
    shutil.copytree(migrations.SCRIPTS, next_release, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrations.head()
    (next_release / "versions" / "next_device_notes.py").write_text(NEXT_REVISION.replace("{head}", head))
    monkeypatch.setattr(migrations, "SCRIPTS", next_release)

    shown = cli("hub", "migrate", "--data", data, "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    assert f"current revision: {head}" in shown.stdout
    assert "target revision:  next" in shown.stdout
    assert f"pending: {head} -> next: Devices get notes." in shown.stdout
    assert "ALTER TABLE devices ADD COLUMN notes TEXT" in shown.stdout
    assert revision(url) == head

    engine, _ = open_database(url)  # the next release's hub starting
    try:
        assert revision(url) == "next"
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT id, notes FROM devices").all() == [("cam-1", None)]
    finally:
        engine.dispose()
    assert lost_rows(before, snapshot(url)) == 0


def test_migrate_on_an_empty_database_shows_the_baseline_sql_then_creates_it(tmp_path: Path, cli) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    shown = cli("hub", "migrate", "--db", f"sqlite:///{empty}", "--dry-run")
    assert shown.exit_code == 0, shown.stderr
    assert "current revision: none (no hub tables yet)" in shown.stdout
    assert f"pending: empty -> {migrations.BASELINE}" in shown.stdout
    assert "CREATE TABLE devices" in shown.stdout
    assert inspect(plain_engine(f"sqlite:///{empty}")).get_table_names() == []
    assert cli("hub", "migrate", "--db", f"sqlite:///{empty}").exit_code == 0
    assert revision(f"sqlite:///{empty}") == migrations.head()


def test_migrate_without_a_database_is_bad_input(tmp_path: Path, cli) -> None:
    missing = cli("hub", "migrate", "--data", tmp_path / "nothing-here")
    assert missing.exit_code == 2
    assert "no hub database there" in missing.stderr
    assert not (tmp_path / "nothing-here").exists()
    wrong = cli("hub", "migrate", "--db", f"sqlite:///{tmp_path / 'typo.sqlite'}", "--dry-run")
    assert wrong.exit_code == 2 and "no such SQLite database file" in wrong.stderr
    assert not (tmp_path / "typo.sqlite").exists()
