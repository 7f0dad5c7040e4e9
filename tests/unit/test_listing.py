"""What a full reconcile lists: the selected workloads, everything only when it must."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from resultbackend_operator import api, kube
from resultbackend_operator.reconcile.workers import Listing, Seen, listing
from resultbackend_operator.watched import WatchedLabels

from .test_injection import workload

UID = "uid-listing"


def _rb(selector: dict[str, Any] | None) -> api.ResultBackend:
    workers = {"selector": selector} if selector is not None else {}
    return api.parse(
        {
            "metadata": {"namespace": "shop", "name": "orders", "uid": UID, "generation": 1},
            "spec": {
                "storeRef": {"kind": "ClusterResultStore", "name": "couch"},
                "workers": workers,
            },
        }
    )


class Api:
    """Answers list calls from `workloads`, recording each call's label selector."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.workloads: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        monkeypatch.setattr(kube, "list_workloads_of", self.list_of)

    def list_of(self, namespace: str, kind: str, selector: str = "") -> list[dict[str, Any]]:
        self.calls.append((kind, selector))
        wanted = {} if not selector else dict(p.split("=") for p in selector.split(","))
        return [
            wl
            for wl in self.workloads
            if wl["kind"] == kind
            and all(wl["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    return Api(monkeypatch)


IO = concurrent.futures.ThreadPoolExecutor(max_workers=4)


def _listing(
    rb: api.ResultBackend,
    *,
    injected: Iterable[str] = (),
    everything: bool = False,
    watched: WatchedLabels | None = None,
) -> Listing:
    """What a reconcile lists that saw `rb` inject the workloads `injected` (Kind/name)."""
    seen = {i: Seen(i.split("/")[1], True) for i in injected}
    labels = watched if watched is not None else WatchedLabels()
    return listing(IO, rb, seen, labels, everything=everything)


def test_no_selector_and_nothing_injected_lists_nothing(cluster: Api) -> None:
    assert _listing(_rb(None)).result() == []
    assert cluster.calls == []


def test_a_selector_lists_only_what_it_selects_of_each_kind(cluster: Api) -> None:
    cluster.workloads = [workload(), workload(name="other")]

    found = _listing(_rb({"matchLabels": {"app": "orders-worker"}})).result()

    assert [wl["metadata"]["name"] for wl in found] == ["orders-worker"]
    assert sorted(cluster.calls) == [
        ("Deployment", "app=orders-worker"),
        ("StatefulSet", "app=orders-worker"),
    ]


def test_an_injected_workload_the_selector_lost_makes_it_list_everything(cluster: Api) -> None:
    old = workload(name="old-worker")
    cluster.workloads = [workload(), old]
    found = _listing(
        _rb({"matchLabels": {"app": "orders-worker"}}), injected=["Deployment/old-worker"]
    ).result()

    assert old in found  # so that sync_workers releases it
    assert ("Deployment", "") in cluster.calls


def test_injected_workloads_still_selected_cost_no_second_list(cluster: Api) -> None:
    cluster.workloads = [workload()]
    _listing(
        _rb({"matchLabels": {"app": "orders-worker"}}), injected=["Deployment/orders-worker"]
    ).result()

    assert len(cluster.calls) == 2
    assert all(selector for _, selector in cluster.calls)


def test_not_knowing_what_was_injected_lists_everything(cluster: Api) -> None:
    _listing(_rb({"matchLabels": {"app": "x"}}), everything=True).result()

    assert sorted(cluster.calls) == [("Deployment", ""), ("StatefulSet", "")]


# --- with the watches' labels: only the kinds that have a selected workload ---------


@pytest.fixture
def watched() -> WatchedLabels:
    labels = WatchedLabels()
    labels.activate()
    return labels


SELECT = {"matchLabels": {"app": "orders-worker"}}


def test_the_watched_labels_let_a_reconcile_list_only_the_kind_selected(
    cluster: Api, watched: WatchedLabels
) -> None:
    cluster.workloads = [workload()]
    watched.put("shop", "d1", "Deployment", {"app": "orders-worker"})
    watched.put("shop", "s1", "StatefulSet", {"app": "other"})

    found = _listing(_rb(SELECT), watched=watched).result()

    assert [wl["metadata"]["name"] for wl in found] == ["orders-worker"]
    assert cluster.calls == [("Deployment", "app=orders-worker")]


def test_nothing_selected_in_the_watched_labels_lists_nothing(
    cluster: Api, watched: WatchedLabels
) -> None:
    watched.put("shop", "d1", "Deployment", {"app": "other"})
    watched.put("elsewhere", "d2", "Deployment", {"app": "orders-worker"})

    assert _listing(_rb(SELECT), watched=watched).result() == []
    assert cluster.calls == []


def test_an_injected_kind_is_listed_even_when_the_watch_no_longer_sees_it_selected(
    cluster: Api, watched: WatchedLabels
) -> None:
    cluster.workloads = [workload(kind="StatefulSet")]
    found = _listing(_rb(SELECT), injected=["StatefulSet/orders-worker"], watched=watched).result()

    assert [wl["kind"] for wl in found] == ["StatefulSet"]
    assert cluster.calls == [("StatefulSet", "app=orders-worker")]


def test_a_deleted_workload_leaves_the_watched_labels() -> None:
    labels = WatchedLabels()
    labels.activate()
    labels.put("shop", "d1", "Deployment", {"app": "a"})
    labels.drop("shop", "d1")

    assert labels.kinds_selected("shop", lambda _: True) == set()
    assert len(labels) == 0


def test_watched_labels_know_nothing_until_activated() -> None:
    labels = WatchedLabels()
    labels.put("shop", "d1", "Deployment", {"app": "a"})

    assert labels.kinds_selected("shop", lambda _: True) is None
