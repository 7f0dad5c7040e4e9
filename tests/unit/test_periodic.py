"""The timer's cheap path: only the worker check while nothing is due."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pytest

from resultbackend_operator import api, reconcile
from resultbackend_operator.backends import BackendError, probe

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

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, pending: bool = False, parsed: bool = False
    ) -> None:
        self.full = 0
        self.checks = 0
        self.probes = 0
        self.failing = False
        self.pending = pending
        self.parsed = parsed  # the full reconcile hands on the parsed spec (as the real one)
        self.server_up = True
        monkeypatch.setattr(reconcile, "_reconcile", self._reconcile)
        monkeypatch.setattr(probe, "ask_server", self.ask)
        probe.forget()

    def ask(self, store: str, url: str, timeout: float) -> bool:
        self.probes += 1
        return self.server_up

    def check(self) -> None:
        self.checks += 1
        if self.failing:
            raise BackendError("Unreachable", "Consul is unreachable", transient=True)

    def _reconcile(
        self, body: Any, now: dt.datetime, thorough: bool, gate: object = None
    ) -> reconcile.Result:
        self.full += 1
        status = {"observedGeneration": 1, "phase": "Ready", "conditions": READY}
        result = reconcile.Result(status=status, check=self.check, pending=self.pending)
        if self.parsed:
            result.rb = api.parse(body)
            result.checked = True
        return result


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


def _settings(monkeypatch: pytest.MonkeyPatch, **changes: float) -> None:
    monkeypatch.setattr(reconcile, "SETTINGS", dataclasses.replace(reconcile.SETTINGS, **changes))


def test_while_the_server_answers_the_credentials_wait_for_their_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(monkeypatch, parsed=True)
    reconcile.reconcile(_body(), NOW)
    _run(5)
    # one probe of the server serves every tick within a quarter interval
    assert (store.full, store.checks, store.probes) == (1, 0, 1)


def test_a_server_that_does_not_answer_brings_the_worker_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(monkeypatch, parsed=True)
    store.server_up = False
    reconcile.reconcile(_body(), NOW)
    _run(2)
    assert (store.full, store.checks) == (1, 2)


def test_the_credential_check_interval_brings_the_worker_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, credential_check_interval=0)
    store = Store(monkeypatch, parsed=True)
    reconcile.reconcile(_body(), NOW)
    _run(3)
    assert (store.full, store.checks) == (1, 3)


def test_the_server_is_asked_again_once_its_answer_is_old(monkeypatch: pytest.MonkeyPatch) -> None:
    _settings(monkeypatch, check_interval=0)
    store = Store(monkeypatch, parsed=True)
    reconcile.reconcile(_body(), NOW)
    _run(3)
    assert store.probes == 3


def test_one_probe_answers_for_every_backend_of_a_server() -> None:
    asked: list[str] = []

    def ask(store: str, url: str, timeout: float) -> bool:
        asked.append(url)
        return True

    probe.forget()
    for _ in range(3):
        assert probe.server_answers("consul", "http://a:8500", 60, 1, ask=ask)
        assert probe.server_answers("consul", "http://b:8500", 60, 1, ask=ask)
    assert asked == ["http://a:8500", "http://b:8500"]


def test_worker_checks_of_a_burst_are_spread_over_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, credential_check_interval=600)
    start = time.monotonic()
    dues = [reconcile._next_credentials() - start for _ in range(200)]
    assert all(300 <= d <= 900 + 1 for d in dues)
    assert max(dues) - min(dues) > 300  # not one wave
