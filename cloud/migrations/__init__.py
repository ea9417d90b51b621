"""Alembic migrations for the cloud database. Run at start by `edgefleet.cloud.db.session.migrate(url)`."""
