"""The timer's cheap path: only the worker check while nothing is due."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from resultbackend_operator import reconcile
from resultbackend_operator.backends import BackendError

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
READY = [{"type": "Ready", "status": "True", "reason": "Ready", "message": "ready"}]


def _body(generation: int = 1, uid: str = "uid-periodic") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "n", "uid": uid, "generation": generation},
        "spec": {
            "type": "consul",
            "consul": {"url": "http://c:8500", "tokenSecretRef": {"name": "t"}},
        },
    }


class Store:
    """Stands in for a full reconcile and counts the worker checks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, pending: bool = False) -> None:
        self.full = 0
        self.checks = 0
        self.failing = False
        self.pending = pending
        monkeypatch.setattr(reconcile, "_reconcile", self._reconcile)

    def check(self) -> None:
        self.checks += 1
        if self.failing:
            raise BackendError("Unreachable", "Consul is unreachable", transient=True)

    def _reconcile(self, body: Any, now: dt.datetime) -> reconcile.Result:
        self.full += 1
        status = {"observedGeneration": 1, "phase": "Ready", "conditions": READY}
        return reconcile.Result(status=status, check=self.check, pending=self.pending)


@pytest.fixture(autouse=True)
def _forget() -> Any:
    yield
    reconcile.forget("uid-periodic")


def _run(times: int, body: Callable[[], dict[str, Any]] = _body) -> None:
    for _ in range(times):
        reconcile.periodic(body(), NOW)


def test_ready_backend_is_only_checked_between_full_reconciles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(monkeypatch)
    reconcile.reconcile(_body(), NOW)
    _run(5)
    assert (store.full, store.checks) == (1, 5)


def test_first_tick_after_a_restart_reconciles_fully(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(monkeypatch)
    _run(1)
    assert store.full == 1


def test_a_failing_check_leads_to_a_full_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(monkeypatch)
    reconcile.reconcile(_body(), NOW)
    store.failing = True
    _run(1)
    assert (store.full, store.checks) == (2, 1)


def test_a_new_generation_reconciles_fully(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(monkeypatch)
    reconcile.reconcile(_body(), NOW)
    _run(1, lambda: _body(generation=2))
    assert store.full == 2


def test_credentials_awaiting_revocation_keep_the_full_reconcile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(monkeypatch, pending=True)
    reconcile.reconcile(_body(), NOW)
    _run(3)
    assert (store.full, store.checks) == (4, 0)


def test_the_resync_interval_brings_a_full_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        reconcile, "SETTINGS", dataclasses.replace(reconcile.SETTINGS, resync_interval=0)
    )
    store = Store(monkeypatch)
    reconcile.reconcile(_body(), NOW)
    _run(2)
    assert (store.full, store.checks) == (3, 0)
