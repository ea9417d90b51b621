"""Engines, sessions and migration at start.

Theory: `migrate(url)` runs Alembic's `upgrade head` programmatically, on the package's own migration scripts (no
alembic.ini on disk is needed), then returns an engine for the same URL. SQLite gets the settings a multi-threaded
server needs (a busy timeout instead of "database is locked", WAL, foreign keys on); PostgreSQL gets pre-ping so a
restarted server does not fail the first request. SQLAlchemy errors here are wrapped as `Unavailable`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud.errors import Invalid, Unavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# 30 s: long enough to ride out another writer's transaction (bundle builds commit quickly), short enough that a
# wedged writer shows up as an error rather than a hung request.
SQLITE_BUSY_TIMEOUT_S = 30

# Two migrations of one SQLite file from one process would race on CREATE TABLE; serialise them.
_migrate_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (below) instead of pysqlite's implicit, deferred BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # BEGIN IMMEDIATE takes the write lock up front. A deferred transaction that reads, then writes, fails at once
    # with SQLITE_BUSY when another writer committed in between (the busy timeout does not apply to that case);
    # read-then-write is exactly how versions and generations are allocated. SQLite serialises writers anyway.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for `url`: sqlite:///path or postgresql+psycopg://... (a bare postgresql:// picks psycopg 3)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise Invalid(f"database_url {url!r} is not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (SQLAlchemyError, ImportError) as exc:
        raise Invalid(f"database_url {url!r} cannot be used: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows handed out after commit keep their loaded values (they are flat, see models.py).
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # The engine travels in attributes, not as a URL option: URLs with '%' would break ConfigParser interpolation.
    cfg.attributes["engine"] = engine
    return cfg


def migrate(url: str) -> Engine:
    """Bring the database at `url` to the newest schema and return an engine for it."""
    from alembic import command

    engine = make_engine(url)
    with _migrate_lock:
        try:
            command.upgrade(alembic_config(engine), "head")
        except SQLAlchemyError as exc:
            engine.dispose()
            raise Unavailable(
                f"cannot migrate the database at {engine.url.render_as_string(hide_password=True)}: "
                f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}; check that it is running and reachable"
            ) from None
    return engine
