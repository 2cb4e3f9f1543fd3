"""`edgekit hub migrate`: bring the hub's database schema to this edgekit's newest revision by hand, or show what
that would run (--dry-run). The hub does the same on every start; this is for operators who upgrade in a
maintenance window, or want to read the SQL first."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from edgekit.cli.console import console
from edgekit.cli.hub_cmd import DEFAULT_DATA, DataOpt, DbOpt
from edgekit.errors import BadInput, OperationFailed

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from edgekit.hub.migrations import Plan


def migrate(
    data: DataOpt = DEFAULT_DATA,
    db: DbOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the pending revisions and their SQL; change nothing.")
    ] = False,
) -> None:
    """Upgrade the hub's database schema (stop the hub processes first, or let the first to start do it)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from edgekit.hub.db import database_url, hub_engine

    url = database_url(db, data)
    _check_sqlite_file(url, data, db)
    # A dry run looks through a plain engine: the hub's would set SQLite's journal mode, a write.
    engine = create_engine(url) if dry_run else hub_engine(url)
    try:
        if dry_run:
            _dry_run(engine)
        else:
            _upgrade(engine)
    except OperationalError as error:
        reason = str(error.orig or error).strip().splitlines()[0]
        raise OperationFailed(f"database {_shown(engine)}: {reason}") from None
    finally:
        engine.dispose()


def _check_sqlite_file(url: str, data: Path, db: str | None) -> None:
    """A mistyped --data or --db path must not quietly make an empty database (and migrate that)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or Path(parsed.database or "").is_file():
        return
    if db:
        raise BadInput(f"--db {db}: no such SQLite database file")
    raise BadInput(f"--data {data}: no hub database there (start `edgekit hub --data {data}` once, or pass --db)")


def _shown(engine: "Engine") -> str:
    return escape(engine.url.render_as_string(hide_password=True))


def _report(steps: "Plan", done: bool) -> None:
    if steps.current is not None:
        current = steps.current
    elif steps.adoption is not None:
        current = "none (tables made before migrations)"
    else:
        current = "none (no hub tables yet)"
    console.print(f"{'was at revision:' if done else 'current revision:'} {current}", highlight=False)
    console.print(f"target revision:  {steps.head} (the newest this edgekit knows)", highlight=False)
    label = "ran:" if done else "pending:"
    for line in steps.steps():
        console.print(f"{label} {escape(line)}" if not line.startswith(" ") else f"   {escape(line)}", highlight=False)


def _dry_run(engine: "Engine") -> None:
    from edgekit.hub import migrations

    with engine.connect() as connection:
        steps = migrations.plan(connection)
    console.print(f"database: {_shown(engine)}", highlight=False)
    _report(steps, done=False)
    if steps.pending:
        console.print("SQL that would run:", highlight=False)
        print(migrations.offline_sql(steps, engine.url.render_as_string(hide_password=True)))
    console.print("dry run: nothing changed", highlight=False)


def _upgrade(engine: "Engine") -> None:
    from edgekit.hub import migrations
    from edgekit.hub.db import migration_lock

    with migration_lock(engine) as connection:
        steps = migrations.upgrade(connection)
    console.print(f"database: {_shown(engine)}", highlight=False)
    _report(steps, done=True)
    if steps.pending:
        console.print(f"upgraded to {steps.head}", highlight=False)
    else:
        console.print(f"already at {steps.head}: nothing to do", highlight=False)
