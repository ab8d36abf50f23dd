"""Alembic environment of the result store, run by ``pneumoscan.store.migrate`` (never by hand).

The caller hands over an open connection in a transaction (``config.attributes["connection"]``),
so the migration runs inside the caller's lock (see migrate.upgrade).
"""

from alembic import context

from pneumoscan.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                  compare_type=True)
with context.begin_transaction():
    context.run_migrations()
