"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resultbackend_operator.backends import STORES

from .fakes import MEMO, MemoStore


@pytest.fixture
def memo_store() -> Iterator[MemoStore]:
    """A third store type, "memo", registered for the test like CouchDB and Consul are."""
    store = MemoStore()
    STORES[MEMO] = store
    yield store
    del STORES[MEMO]
