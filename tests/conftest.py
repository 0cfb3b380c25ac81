"""Fixtures shared by the whole suite (servers come from ``tests.plugins.servers``)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from writer import Writer


@pytest.fixture
def writer(database_url: str) -> Iterator[Writer]:
    with Writer.connect(database_url, max_size=4) as w:
        yield w


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to this test's database, for assertions."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
