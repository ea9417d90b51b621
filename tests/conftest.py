"""Shared fixtures: real Mosquitto, real PostgreSQL, and a `db_url` that runs state tests on both databases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Mosquitto, PostgresDatabase  # noqa: E402


@pytest.fixture
def mosquitto(tmp_path: Path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pg_url():
    db = PostgresDatabase().create()
    try:
        yield db.url
    finally:
        db.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    else:
        db = PostgresDatabase().create()
        try:
            yield db.url
        finally:
            db.drop()
