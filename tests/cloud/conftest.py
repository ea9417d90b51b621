"""Fixtures the cloud's tests share: a migrated `Store` on each database of `db_url` (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from edgefleet.cloud.store import Store


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    try:
        yield s
    finally:
        s.close()
