"""Workload events touch one workload and the ResultBackends it concerns, nothing more."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from resultbackend_operator import api, kube, reconcile
from resultbackend_operator.status import Observed, desired_status

from .test_injection import simulate_apply, workload

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
UID = "uid-workload-events"
SECRET_DATA = {"type": "couchdb", "uri": "couchdb://u:p@h:5984/d"}


def _body(selector: str = "orders-worker") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "shop", "name": "orders", "uid": UID, "generation": 1},
        "spec": {
            "type": "couchdb",
            "couchdb": {"url": "http://couch:5984", "adminSecretRef": {"name": "admin"}},
            "workers": {"selector": {"matchLabels": {"app": selector}}},
        },
    }


class Cluster:
    """Records the workload applies and lets the first reconcile see `listed`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied: list[dict[str, Any]] = []
        self.listed: list[dict[str, Any]] = []
        monkeypatch.setattr(kube, "apply_workload", self.applied.append)
        monkeypatch.setattr(reconcile, "_reconcile", self._reconcile)

    def _reconcile(
        self, body: Mapping[str, Any], now: dt.datetime, thorough: bool, gate: object = None
    ) -> reconcile.Result:
        rb = api.parse(body)
        workers = reconcile.sync_workers(rb, SECRET_DATA, self.listed)
        obs = Observed(
            generation=1,
            provisioned=(True, "Provisioned", "ok"),
            reachable=(True, "CredentialsWork", "ok"),
            injected=workers.condition(),
            fields={"workers": workers.status()},
        )
        return reconcile.Result(
            status=desired_status(body.get("status"), obs, now),
            check=lambda: None,
            rb=rb,
            secret_data=SECRET_DATA,
            workers=workers.seen,
        )


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    yield Cluster(monkeypatch)
    reconcile.forget(UID)


def _after_apply(live: dict[str, Any], cluster: Cluster) -> dict[str, Any]:
    return simulate_apply(live, cluster.applied[-1])


def test_event_before_any_full_reconcile_is_left_to_that_reconcile(cluster: Cluster) -> None:
    assert reconcile.workload_changed(UID, workload(), now=NOW) is None
    assert cluster.applied == []


def test_an_event_during_the_first_reconcile_waits_for_it_and_is_not_lost(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first reconcile listed the namespace before the workload existed; the
    # workload's event comes while that reconcile still runs.
    listed = threading.Event()
    release = threading.Event()
    inner = cluster._reconcile

    def slow(
        body: Mapping[str, Any], now: dt.datetime, thorough: bool, gate: object = None
    ) -> reconcile.Result:
        result = inner(body, now, thorough)
        listed.set()
        release.wait(5)
        return result

    monkeypatch.setattr(reconcile, "_reconcile", slow)
    first = threading.Thread(target=reconcile.reconcile, args=(_body(), NOW))
    first.start()
    assert listed.wait(5)
    results: list[reconcile.Result | None] = []
    event = threading.Thread(
        target=lambda: results.append(reconcile.workload_changed(UID, workload(), now=NOW))
    )
    event.start()
    release.set()
    first.join(5)
    event.join(5)

    assert len(results) == 1
    assert results[0] is not None
    assert len(cluster.applied) == 1
    assert results[0].status["workers"]["injected"] == 1


def test_a_new_selected_workload_is_injected_and_counted(cluster: Cluster) -> None:
    reconcile.reconcile(_body(), NOW)
    result = reconcile.workload_changed(UID, workload(), now=NOW)
    assert result is not None
    assert len(cluster.applied) == 1
    assert result.status["workers"] == {"selected": 1, "injected": 1, "names": ["orders-worker"]}
    assert [e.reason for e in result.events] == ["Injected"]
    assert result.previous is not None
    assert result.previous["workers"]["selected"] == 0


def test_the_event_of_our_own_apply_costs_nothing(cluster: Cluster) -> None:
    reconcile.reconcile(_body(), NOW)
    live = workload()
    reconcile.workload_changed(UID, live, now=NOW)
    assert reconcile.workload_changed(UID, _after_apply(live, cluster), now=NOW) is None
    assert len(cluster.applied) == 1


def test_a_workload_nobody_selects_is_not_looked_at(cluster: Cluster) -> None:
    reconcile.reconcile(_body(), NOW)
    assert reconcile.workload_changed(UID, workload(name="billing-worker"), now=NOW) is None
    assert cluster.applied == []


def test_a_workload_whose_labels_stop_matching_is_released(cluster: Cluster) -> None:
    live = workload()
    cluster.listed = [live]
    reconcile.reconcile(_body(), NOW)
    injected = _after_apply(live, cluster)
    injected["metadata"]["labels"] = {"app": "something-else"}
    result = reconcile.workload_changed(UID, injected, now=NOW)
    assert result is not None
    assert cluster.applied[-1]["metadata"] == {"name": "orders-worker", "namespace": "shop"}
    assert result.status["workers"] == {"selected": 0, "injected": 0, "names": []}
    assert [e.reason for e in result.events] == ["Released"]


def test_a_deleted_selected_workload_leaves_the_count(cluster: Cluster) -> None:
    live = workload()
    cluster.listed = [live]
    reconcile.reconcile(_body(), NOW)
    result = reconcile.workload_changed(UID, _after_apply(live, cluster), deleted=True, now=NOW)
    assert result is not None
    assert result.status["workers"]["selected"] == 0
    assert len(cluster.applied) == 1  # nothing is applied to a deleted workload


def test_a_workload_event_keeps_the_other_conditions_as_they_were(cluster: Cluster) -> None:
    reconcile.reconcile(_body(), NOW)
    before = {c["type"]: c for c in reconcile._last_status[UID]["conditions"]}
    result = reconcile.workload_changed(UID, workload(), now=NOW + dt.timedelta(minutes=5))
    assert result is not None
    after = {c["type"]: c for c in result.status["conditions"]}
    for type_ in (api.CONDITION_PROVISIONED, api.CONDITION_REACHABLE, api.CONDITION_READY):
        assert after[type_] == before[type_]
    assert after[api.CONDITION_INJECTED]["reason"] == "Injected"


def test_an_event_older_than_our_own_apply_is_not_applied_again(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reconcile listed the workload and injected it (generation 1 -> 2); the
    # workload's ADDED event, still showing generation 1, arrives after that.
    def apply(body: dict[str, Any]) -> dict[str, Any]:
        cluster.applied.append(body)
        return {"metadata": {"generation": 2}}

    monkeypatch.setattr(kube, "apply_workload", apply)
    stale = workload()
    stale["metadata"]["generation"] = 1
    cluster.listed = [stale]
    reconcile.reconcile(_body(), NOW)
    assert len(cluster.applied) == 1

    assert reconcile.workload_changed(UID, stale, now=NOW) is None
    assert len(cluster.applied) == 1

    newer = workload()  # someone replaced the pod template: a newer generation
    newer["metadata"]["generation"] = 3
    assert reconcile.workload_changed(UID, newer, now=NOW) is not None
