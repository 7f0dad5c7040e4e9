"""The ResultBackend controller end to end on the real queue and reconcile.

The API server is FakeCluster and the store is MemoStore, a third store type
registered for the test: the generic reconcile serves it unchanged. Runs are
driven on a real asyncio loop; every wait is on something observable.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import threading
from typing import Any

import pytest

from resultbackend_operator import api, injection
from resultbackend_operator.reconcile.resultbackend import CHECK, RESUME

from .fakes import (
    MEMO,
    FakeCluster,
    Harness,
    MemoStore,
    rb_body,
    secret_event_body,
    store_body,
    until,
    worker,
)

UID = "uid-1"
SECRET = ("shop", "orders-result-backend")


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, memo_store: MemoStore) -> FakeCluster:
    c = FakeCluster(monkeypatch)
    c.put_secret("shop", "memo-admin", {"token": "admin-token"})
    return c


def _run(cluster: FakeCluster, scenario: Any) -> Harness:
    h = Harness(cluster)

    async def main() -> None:
        await h.start()
        try:
            await scenario(h)
        finally:
            h.stop()

    asyncio.run(main())
    return h


async def _created(h: Harness, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply a ResultBackend as a user would and wait until it is Ready."""
    h.cluster.create(body or rb_body(uid=UID))
    h.watch(UID, "ADDED")
    await until(lambda: _ready(h.cluster.get(UID)), what="Ready")
    h.watch(UID)  # the watch event of our own status write
    await h.idle()
    obj = h.cluster.get(UID)
    assert obj is not None
    return obj


def _ready(obj: dict[str, Any] | None) -> bool:
    if obj is None:
        return False
    cond = api.get_condition((obj.get("status") or {}).get("conditions"), api.CONDITION_READY)
    return cond is not None and cond.get("status") == "True"


def _observed(h: Harness) -> int:
    obj = h.cluster.get(UID)
    return int(((obj or {}).get("status") or {}).get("observedGeneration") or 0)


# --- the store interface: a third store through the generic reconcile -----------------


def test_a_third_store_is_provisioned_injected_and_reported(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        obj = await _created(h)
        status = obj["status"]
        assert status["phase"] == "Ready"
        assert status["url"] == "memo://server/shop/orders"
        assert status[MEMO] == {"tokens": 1}
        assert status["workers"] == {"selected": 1, "injected": 1, "names": ["orders-worker"]}
        assert obj["metadata"]["finalizers"] == [api.FINALIZER]

    h = _run(cluster, scenario)
    assert cluster.secrets[SECRET].data["token"] == memo_store.tokens["shop/orders"][0]
    env = cluster.workloads[("shop", "Deployment/orders-worker")]["spec"]["template"]["spec"]
    names = [e["name"] for e in env["containers"][0]["env"]]
    assert {"CELERY_RESULT_BACKEND", "MEMO_TOKEN"} <= set(names)  # the store's extra env too
    assert h.reasons() == ["Provisioned"]  # one Event for provisioning and injection


def test_a_no_op_resync_of_a_third_store_writes_nothing_anywhere(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        await _created(h)
        writes, store_writes, events = len(cluster.writes), memo_store.writes, len(h.events)
        for hints in ({"resync": True}, {RESUME: True}, {CHECK: True}):
            h.controller.enqueue(UID, hints)
            await h.idle()
        assert (len(cluster.writes), memo_store.writes, len(h.events)) == (
            writes,
            store_writes,
            events,
        )

    _run(cluster, scenario)


def test_a_third_store_rotates_and_revokes_only_after_the_workers_rolled(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        await _created(h)
        first = memo_store.tokens["shop/orders"][0]
        past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat()
        cluster.edit(UID, lambda spec: spec.update(rotation={"trigger": past}))
        h.watch(UID)
        await until(lambda: _observed(h) == 2, what="the rotation reconciled")
        tokens = memo_store.tokens["shop/orders"]
        assert tokens[1:] == [first]  # the old token stays while pods may use it
        assert cluster.secrets[SECRET].data["token"] == tokens[0] != first
        # The Deployment controller rolls the pods out: its status says so.
        key = ("shop", "Deployment/orders-worker")
        wl = cluster.workloads[key]
        wl["status"] = {
            "observedGeneration": wl["metadata"]["generation"],
            "replicas": 2,
            "updatedReplicas": 2,
            "availableReplicas": 2,
        }
        h.controller.enqueue(UID, {CHECK: True})  # the periodic check comes
        await until(lambda: len(memo_store.tokens["shop/orders"]) == 1, what="revocation")

    h = _run(cluster, scenario)
    assert "Rotated" in h.reasons()
    assert "Revoked" in h.reasons()
    assert h.reasons().count("Rolled") == 1


async def _created_then_deleted(h: Harness) -> None:
    """A Ready ResultBackend with deletionPolicy Delete, deleted until its finalizer is off."""
    body = rb_body(uid=UID)
    body["spec"]["deletionPolicy"] = "Delete"
    await _created(h, body)
    h.cluster.delete(UID)
    h.watch(UID)
    await until(lambda: h.cluster.get(UID) is None, what="the finalizer to come off")


def test_a_third_store_is_removed_on_deletion_and_the_workers_released(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        await _created_then_deleted(h)
        h.watch(UID, "DELETED")
        await h.idle()
        assert UID not in h.rbs.known

    h = _run(cluster, scenario)
    assert memo_store.removed == ["shop/orders"]
    wl = cluster.workloads[("shop", "Deployment/orders-worker")]
    assert not injection.is_injected_by(wl, "orders")
    assert h.reasons()[-2:] == ["Released", "Deleted"]


# --- nothing overtakes the newest object ------------------------------------------------


def test_a_periodic_check_due_during_a_spec_change_never_runs_the_old_spec(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    """(a) A periodic check and a spec change meet while a run is under way."""
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        await _created(h)
        memo_store.hold = threading.Event()
        memo_store.entered.clear()
        h.controller.enqueue(UID, {"resync": True})  # a run that will be held in the store
        await asyncio.get_running_loop().run_in_executor(None, memo_store.entered.wait, 5)
        h.controller.enqueue(UID, {CHECK: True})  # the periodic check comes due meanwhile
        cluster.edit(UID, lambda spec: spec["workers"].update(urlEnvName="RESULTS_URL"))
        h.watch(UID)  # the spec change's event
        memo_store.hold.set()
        await until(lambda: _observed(h) == 2, what="generation 2 observed")
        h.watch(UID)
        await h.idle()

    h = _run(cluster, scenario)
    generations = [
        w["observedGeneration"] for w in cluster.status_writes if "observedGeneration" in w
    ]
    assert generations == sorted(generations)  # never back to an older generation
    assert generations[-1] == 2
    assert h.reasons().count("Rolled") == 1  # the new spec rolled the workers once


def test_a_check_due_after_a_deletion_recreates_nothing(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    """(b) A periodic check that comes due after the deletion was handled."""
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        await _created_then_deleted(h)
        # The check was due before the deletion's events arrived; the DELETED
        # event itself comes later still.
        h.controller.enqueue(UID, {CHECK: True})
        await h.idle()
        h.watch(UID, "DELETED")
        await h.idle()

    h = _run(cluster, scenario)
    assert "shop/orders" not in memo_store.tokens  # not provisioned again
    assert cluster.writes.count("secret shop/orders-result-backend") == 1  # not written again
    wl = cluster.workloads[("shop", "Deployment/orders-worker")]
    assert not injection.is_injected_by(wl, "orders")  # not injected again
    assert h.rbs.known == {}
    assert h.rbs.cache.get(UID) is None


def test_a_failed_status_write_is_written_and_announced_on_the_retry(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    """(c) The store goes down, the status PATCH fails once, then works."""

    async def scenario(h: Harness) -> None:
        await _created(h)
        h.put_store(store_body(ready=False, version=2))
        cluster.fail_status_patch = True
        h.controller.enqueue(UID, {CHECK: True})
        await until(lambda: h.controller.queue.failures(UID) >= 1, what="the failed write")
        assert _ready(cluster.get(UID))  # the API server still shows Ready
        assert "Degraded" not in h.reasons()  # nothing announced that status does not show
        cluster.fail_status_patch = False
        await until(lambda: not _ready(cluster.get(UID)), what="the retry's status write")
        h.watch(UID)

    h = _run(cluster, scenario)
    assert h.reasons().count("Degraded") == 1
    obj = cluster.get(UID)
    assert obj is not None
    assert obj["status"]["phase"] == "Degraded"


# --- triggers ------------------------------------------------------------------------


def test_our_own_status_and_finalizer_events_make_no_run(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        calls = memo_store.calls
        h.watch(UID)
        h.watch(UID)
        assert not h.controller.busy(UID)
        assert memo_store.calls == calls

    _run(cluster, scenario)


def test_a_deleted_worker_secret_is_written_again_at_once(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        data = cluster.secrets.pop(SECRET).data
        h.rbs.on_secret("DELETED", secret_event_body(*SECRET, data, owner_uid=UID))
        await until(lambda: SECRET in cluster.secrets, what="the Secret back")

    _run(cluster, scenario)


def test_the_event_of_our_own_secret_write_makes_no_run(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        data = cluster.secrets[SECRET].data
        h.rbs.on_secret("ADDED", secret_event_body(*SECRET, data, owner_uid=UID))
        assert not h.controller.busy(UID)
        edited = {**data, "token": "someone-else"}
        h.rbs.on_secret("MODIFIED", secret_event_body(*SECRET, edited, owner_uid=UID))
        assert h.controller.busy(UID)

    _run(cluster, scenario)


def test_a_workload_labelled_later_is_injected_from_the_newest_spec(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        calls = memo_store.calls
        wl = worker()
        cluster.put_workload(wl)
        h.rbs.on_workload("Deployment", "ADDED", copy.deepcopy(wl))
        await until(lambda: "apply Deployment/orders-worker" in cluster.writes, what="injection")
        await h.idle()
        assert memo_store.calls == calls  # no store call, no Secret read for it

    h = _run(cluster, scenario)
    obj = cluster.get(UID)
    assert obj is not None
    assert obj["status"]["workers"]["injected"] == 1
    assert h.reasons()[-1] == "Injected"


def test_a_workload_event_during_the_first_run_is_not_lost(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        memo_store.hold = threading.Event()
        cluster.create(rb_body(uid=UID))
        h.watch(UID, "ADDED")
        await asyncio.get_running_loop().run_in_executor(None, memo_store.entered.wait, 5)
        wl = worker()  # created after the first run listed (nothing)
        cluster.put_workload(wl)
        h.rbs.on_workload("Deployment", "ADDED", copy.deepcopy(wl))
        memo_store.hold.set()
        await until(lambda: "apply Deployment/orders-worker" in cluster.writes, what="injection")

    _run(cluster, scenario)


def test_an_invalid_spec_is_reported_once_and_not_retried(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    body = rb_body(uid=UID, spec={"storeRef": {"name": MEMO}, "couchdb": {}, "consul": {}})

    async def scenario(h: Harness) -> None:
        cluster.create(body)
        h.watch(UID, "ADDED")
        await until(lambda: cluster.get(UID).get("status") is not None, what="status")  # type: ignore[union-attr]
        await h.idle()
        assert h.controller.queue.delayed(UID) is None
        assert h.controller.queue.failures(UID) == 0

    h = _run(cluster, scenario)
    assert h.reasons() == ["InvalidSpec"]


async def _with_worker(h: Harness) -> dict[str, Any]:
    """A Ready ResultBackend that injected its worker; the worker as it is now."""
    await _created(h)
    return copy.deepcopy(h.cluster.workloads[("shop", "Deployment/orders-worker")])


def test_the_event_of_our_own_apply_costs_nothing(cluster: FakeCluster) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        wl = await _with_worker(h)
        writes = len(cluster.writes)
        h.rbs.on_workload("Deployment", "MODIFIED", wl)
        await h.idle()
        assert len(cluster.writes) == writes

    _run(cluster, scenario)


def test_a_workload_nobody_selects_is_not_looked_at(cluster: FakeCluster) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        other = worker("other", labels={"app": "other"})
        cluster.put_workload(other)
        h.rbs.on_workload("Deployment", "ADDED", other)
        assert not h.controller.busy(UID)

    _run(cluster, scenario)


def test_a_workload_whose_labels_stop_matching_is_released(cluster: FakeCluster) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        wl = await _with_worker(h)
        wl["metadata"]["labels"] = {"app": "something-else"}
        cluster.workloads[("shop", "Deployment/orders-worker")] = wl
        h.rbs.on_workload("Deployment", "MODIFIED", copy.deepcopy(wl))
        await until(lambda: _injected(cluster) == 0, what="the release")

    h = _run(cluster, scenario)
    assert h.reasons()[-1] == "Released"
    assert not injection.is_injected_by(
        cluster.workloads[("shop", "Deployment/orders-worker")], "orders"
    )


def test_a_deleted_selected_workload_leaves_the_count(cluster: FakeCluster) -> None:
    cluster.put_workload(worker())

    async def scenario(h: Harness) -> None:
        wl = await _with_worker(h)
        del cluster.workloads[("shop", "Deployment/orders-worker")]
        h.rbs.on_workload("Deployment", "DELETED", wl)
        await until(lambda: _injected(cluster) == 0, what="the count")
        obj = cluster.get(UID)
        assert obj is not None
        assert obj["status"]["workers"] == {"selected": 0, "injected": 0, "names": []}
        assert obj["status"]["phase"] == "Ready"  # the other conditions stay as they were

    _run(cluster, scenario)


def test_an_event_older_than_our_own_apply_is_not_applied_again(cluster: FakeCluster) -> None:
    before = worker()
    cluster.put_workload(before)

    async def scenario(h: Harness) -> None:
        await _with_worker(h)
        writes = len(cluster.writes)
        # The watch delivers the workload as it was before our apply, late.
        stale = copy.deepcopy(before)
        stale["metadata"]["annotations"] = {"touched": "by someone, earlier"}
        h.rbs.on_workload("Deployment", "MODIFIED", stale)
        await h.idle()
        assert len(cluster.writes) == writes

    _run(cluster, scenario)


def _injected(cluster: FakeCluster) -> int:
    obj = cluster.get(UID)
    return int((((obj or {}).get("status") or {}).get("workers") or {}).get("injected", -1))


def test_being_told_to_adopt_runs_it_though_the_generation_stays(
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    async def scenario(h: Harness) -> None:
        await _created(h)
        obj = cluster.get(UID)
        assert obj is not None
        obj["metadata"]["annotations"] = {api.ADOPT_ANNOTATION: "old-uid"}
        obj["metadata"]["resourceVersion"] = "999"
        h.rbs.on_event("MODIFIED", obj)
        assert h.controller.busy(UID)

    _run(cluster, scenario)
