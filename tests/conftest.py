"""Shared fixtures: real Mosquitto, real PostgreSQL, and a `db_url` that runs state tests on both databases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Mosquitto, PostgresDatabase


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
