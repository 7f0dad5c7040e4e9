"""The periodic check's cheap path: the store's Ready (no request), the worker check
now and then, a full reconcile only when something is off or due."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from resultbackend_operator import api
from resultbackend_operator.errors import Problem
from resultbackend_operator.reconcile import resultbackend
from resultbackend_operator.reconcile.resultbackend import CHECK

from .fakes import (
    FakeCluster,
    Harness,
    MemoStore,
    rb_body,
    store_body,
    until,
)

UID = "uid-periodic"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, memo_store: MemoStore) -> FakeCluster:
    c = FakeCluster(monkeypatch)
    c.put_secret("shop", "memo-admin", {"token": "admin-token"})
    return c


def _settings(monkeypatch: pytest.MonkeyPatch, **changes: float) -> None:
    changed = dataclasses.replace(resultbackend.SETTINGS, **changes)
    monkeypatch.setattr(resultbackend, "SETTINGS", changed)


def _checks(
    cluster: FakeCluster,
    store: MemoStore,
    ticks: int,
    *,
    pending: bool = False,
    store_ready: bool = True,
) -> Harness:
    """Create a Ready ResultBackend, then run `ticks` periodic checks of it."""

    async def main() -> None:
        await h.start()
        try:
            cluster.create(rb_body(uid=UID))
            h.watch(UID, "ADDED")
            await until(lambda: store.provisions == 1 and not h.controller.busy(UID))
            h.watch(UID)
            if pending:
                known = h.rbs.known[UID]
                h.rbs.known[UID] = dataclasses.replace(known, pending=True)
            if not store_ready:
                h.put_store(store_body(ready=False, version=2))
            for _ in range(ticks):
                h.controller.enqueue(UID, {CHECK: True})
                await h.idle()
        finally:
            h.stop()

    h = Harness(cluster)
    asyncio.run(main())
    return h


def test_a_ready_backend_costs_no_request_while_its_credentials_are_recent(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    _checks(cluster, memo_store, 5)
    # The create's own worker check; the store's Ready is the store controller's.
    assert (memo_store.provisions, memo_store.checks, memo_store.calls) == (1, 1, 2)


def test_a_failing_check_leads_to_a_full_reconcile(
    cluster: FakeCluster,
    memo_store: MemoStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, credential_check_interval=0)
    original = memo_store.check_worker
    failures = iter([False, True])  # the create's check passes, the tick's fails

    def check(*args: object) -> None:
        if next(failures, False):
            memo_store.checks += 1
            raise Problem("WorkerCredentialsRejected", "refused", transient=True)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(memo_store, "check_worker", check)
    _checks(cluster, memo_store, 1)
    assert memo_store.provisions == 2


def test_credentials_awaiting_revocation_keep_the_full_reconcile(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    _checks(cluster, memo_store, 1, pending=True)
    assert memo_store.provisions == 2


def test_the_resync_interval_brings_a_full_reconcile(
    cluster: FakeCluster,
    memo_store: MemoStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, resync_interval=0)
    _checks(cluster, memo_store, 2)
    assert memo_store.provisions == 3


def test_a_store_that_is_not_ready_brings_the_full_reconcile_and_touches_nothing(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    h = _checks(cluster, memo_store, 1, store_ready=False)
    # No store call at all: the ResultBackend says why and keeps what it has.
    assert (memo_store.provisions, memo_store.checks) == (1, 1)
    ready = api.get_condition(cluster.get(UID)["status"]["conditions"], "Ready")  # type: ignore[index]
    assert ready is not None
    assert ready["reason"] == "StoreNotReady"
    assert "memo" in ready["message"]
    assert ("shop", "orders-result-backend") in cluster.secrets
    assert h.reasons()[-1] == "Degraded"


def test_the_credential_check_interval_brings_the_worker_check(
    cluster: FakeCluster,
    memo_store: MemoStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, credential_check_interval=0)
    _checks(cluster, memo_store, 3)
    assert (memo_store.provisions, memo_store.checks) == (1, 4)


def test_worker_checks_of_a_burst_are_spread_over_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, credential_check_interval=600)
    start = time.monotonic()
    dues = [resultbackend._next_credentials() - start for _ in range(200)]
    assert all(300 <= d <= 900 + 1 for d in dues)
    assert max(dues) - min(dues) > 300  # not one wave


def test_periodic_checks_of_a_burst_do_not_come_in_lockstep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _settings(monkeypatch, check_interval=60)
    delays = [resultbackend._check_delay() for _ in range(200)]
    assert all(54 <= d <= 66 for d in delays)
    assert max(delays) - min(delays) > 6


def test_a_check_that_needs_no_request_ends_on_the_loop_without_a_thread(
    cluster: FakeCluster, memo_store: MemoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[str] = []  # where each tick ended: "loop" or "thread"
    quick, run = resultbackend.ResultBackends.quick, resultbackend.ResultBackends.run

    def on_loop(self: resultbackend.ResultBackends, *args: Any) -> Any:
        outcome = quick(self, *args)
        if outcome is not None and args[2] == {CHECK: True}:
            ended.append("loop")
        return outcome

    def in_thread(self: resultbackend.ResultBackends, *args: Any) -> Any:
        if args[2] == {CHECK: True}:
            ended.append("thread")
        return run(self, *args)

    monkeypatch.setattr(resultbackend.ResultBackends, "quick", on_loop)
    monkeypatch.setattr(resultbackend.ResultBackends, "run", in_thread)
    _checks(cluster, memo_store, 3)
    # The store's Ready and recent worker credentials: no request, no thread.
    assert ended == ["loop", "loop", "loop"]
