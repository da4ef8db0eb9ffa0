"""Alembic's environment for the job store, run by :mod:`service.migrations` with an open
connection in ``config.attributes["connection"]`` (no ``alembic.ini``, no URL in a file)."""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the job store's migrations with 'scsnet db upgrade', not the alembic command")
# render_as_batch: a migration's column changes work on SQLite too (table copy where needed)
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
