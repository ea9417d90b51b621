"""Alembic environment: runs migrations on the engine that `db.session.migrate` hands over in `config.attributes`.

Online mode only; the cloud migrates its own database at start. `render_as_batch` lets SQLite alter tables (it
cannot ALTER most things in place), so one revision file serves SQLite and PostgreSQL.
"""

from __future__ import annotations

from alembic import context

from edgefleet.cloud.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from edgefleet.cloud.db.session import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("edgefleet migrates online only: run `edgefleet-cloud serve` or db.session.migrate(url)")
run_migrations_online()
