"""The cloud's database: ORM tables (`models`), engines and Alembic migration at start (`session`)."""

from edgefleet.cloud.db.session import make_engine, make_sessionmaker, migrate

__all__ = ["make_engine", "make_sessionmaker", "migrate"]
