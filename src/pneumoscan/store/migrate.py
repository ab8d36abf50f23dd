"""Connecting to the store's database and bringing its schema to the newest migration.

Why here and not in a deploy step: a site runs ``pneumoscan node`` and ``pneumoscan serve``
against one URL; whichever opens the database first upgrades it, under a lock (PostgreSQL
advisory lock, SQLite write transaction), so two processes starting together never race.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from pneumoscan.core.errors import UserError

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_KEY = 0x706E6575  # pg_advisory_xact_lock key of the migration ("pneu")
SQLITE_BUSY_S = 30  # how long a SQLite writer waits for another's transaction before failing


class StoreError(UserError):
    """The store's database cannot be used: a bad URL, an unreachable server, a newer schema."""


def normalise_url(url: str) -> URL:
    """A path or URL as a SQLAlchemy URL: bare paths are SQLite files, PostgreSQL uses psycopg 3."""
    if "://" not in url:
        url = f"sqlite:///{Path(url).expanduser()}"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError("the database URL cannot be parsed (expected e.g. sqlite:///pneumoscan.db or "
                         "postgresql://user@host/db)") from None
    if parsed.get_backend_name() in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() != "sqlite":
        raise StoreError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    return parsed


def shown(url: URL) -> str:
    """The URL as it may appear in a message: never the password."""
    return url.render_as_string(hide_password=True)


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    memory = url.database in (None, "", ":memory:")
    if not memory:
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_S, "check_same_thread": False},
                           **({"poolclass": StaticPool} if memory else {}))
    _sqlite_transactions(engine, wal=not memory)
    return engine


def _sqlite_transactions(engine: Engine, wal: bool) -> None:
    """Let the store choose BEGIN IMMEDIATE for writes (the pysqlite driver's own BEGIN is deferred,
    and a deferred reader that later writes can fail with "database is locked" instead of waiting)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver issues no BEGIN of its own
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")  # readers (serve) do not block the writer (node)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head() -> str:
    head_revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert head_revision is not None
    return head_revision


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, url: URL) -> None:
    """Apply every migration not yet applied, under the lock; refuse a schema newer than this code."""
    cfg = _config()
    try:
        with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
            known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
            at = MigrationContext.configure(conn).get_current_revision()
            if at is not None and at not in known:
                raise StoreError(f"the database at {shown(url)} has schema {at}, newer than this "
                                 "pneumoscan knows: upgrade pneumoscan")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the store at {shown(url)}: {_reason(exc)}") from None


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's first line (no SQL, no parameters: those may hold identifiers)."""
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
