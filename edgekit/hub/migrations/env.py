"""Alembic's environment for the hub's database, configured in code by edgekit.hub.migrations (there is no
alembic.ini): online on the connection the hub holds under its migration lock, offline (SQL text only, for
`edgekit hub migrate --dry-run`) for the database's dialect."""

from alembic import context

config = context.config

if context.is_offline_mode():
    context.configure(url=config.attributes["url"], literal_binds=True)
else:
    # Batch mode makes drafted ALTERs work on SQLite too (it copies the table), so one revision serves both databases.
    context.configure(
        connection=config.attributes["connection"],
        target_metadata=config.attributes.get("target_metadata"),
        render_as_batch=True,
    )
with context.begin_transaction():
    context.run_migrations()
