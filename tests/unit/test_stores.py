"""The store controller and how ResultBackends use stores, on the real queues.

The API server is FakeCluster and the store type is "memo" (fakes.MemoStore):
a store's check, its status, its finalizer, its admin Secret poll, and the
ResultBackends' StoreNotFound / StoreNotAllowed / StoreNotReady /
StoreTypeMismatch, with what each leaves untouched.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from resultbackend_operator import api
from resultbackend_operator.reconcile import resultbackend, store

from .fakes import MEMO, FakeCluster, Harness, MemoStore, rb_body, store_body, until, worker

RB = "uid-rb"
STORE = "uid-store"
CLUSTER_NS = "rbo-system"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, memo_store: MemoStore) -> FakeCluster:
    settings = dataclasses.replace(store.SETTINGS, cluster_resource_namespace=CLUSTER_NS)
    monkeypatch.setattr(store, "SETTINGS", settings)
    monkeypatch.setattr(resultbackend, "SETTINGS", settings)
    c = FakeCluster(monkeypatch)
    c.put_secret("shop", "memo-admin", {"token": "admin-token"})
    c.put_secret(CLUSTER_NS, "memo-admin", {"token": "admin-token"})
    c.put_workload(worker())
    return c


def new_store(kind: str = api.STORE_KIND, selector: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {MEMO: {"url": "memo://server", "secret": "memo-admin"}}
    if selector is not None:
        spec["namespaceSelector"] = selector
    meta: dict[str, Any] = {"name": MEMO, "uid": STORE, "generation": 1}
    if kind == api.STORE_KIND:
        meta["namespace"] = "shop"
    return {"apiVersion": api.API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def new_rb(
    kind: str = api.STORE_KIND, uid: str = RB, name: str = "orders", **extra: Any
) -> dict[str, Any]:
    spec = {
        "storeRef": {"kind": kind, "name": MEMO},
        "workers": {"selector": {"matchLabels": {"app": "orders-worker"}}},
        "deletionPolicy": "Delete",
        **extra,
    }
    return rb_body(name=name, uid=uid, spec=spec)


def status(cluster: FakeCluster, uid: str) -> dict[str, Any]:
    return (cluster.get(uid) or {}).get("status") or {}


def ready(cluster: FakeCluster, uid: str) -> tuple[str, str] | None:
    cond = api.get_condition(status(cluster, uid).get("conditions"), "Ready")
    return (cond["status"], cond["reason"]) if cond else None


def _run(cluster: FakeCluster, scenario: Callable[[Harness], Awaitable[None]]) -> Harness:
    h = Harness(cluster, store=False)

    async def main() -> None:
        await h.start(stores=True)
        try:
            await scenario(h)
        finally:
            h.stop()

    asyncio.run(main())
    return h


async def _both_ready(h: Harness, kind: str = api.STORE_KIND) -> None:
    h.cluster.create(new_store(kind))
    h.watch_store(STORE, "ADDED")
    await until(lambda: ready(h.cluster, STORE) == ("True", "Ready"), what="store Ready")
    h.cluster.create(new_rb(kind))
    h.watch(RB, "ADDED")
    await until(lambda: ready(h.cluster, RB) == ("True", "Ready"), what="backend Ready")
    await h.idle()


def test_a_store_is_checked_and_its_status_says_type_url_version_and_backends(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    async def scenario(h: Harness) -> None:
        await _both_ready(h)
        await until(lambda: status(cluster, STORE).get("resultBackends") == 1, what="count")

    h = _run(cluster, scenario)
    st = status(cluster, STORE)
    assert (st["type"], st["url"], st["serverVersion"], st["observedGeneration"]) == (
        MEMO,
        "memo://server",
        "1.0",
        1,
    )
    assert api.FINALIZER in cluster.get(STORE)["metadata"]["finalizers"]  # type: ignore[index]
    assert status(cluster, RB)["store"] == {"kind": "ResultStore", "name": MEMO, "type": MEMO}
    # The count came without another check of the server.
    assert memo_store.admin_checks == 1
    assert [e.reason for _, e in h.store_events] == ["Ready"]


def test_a_wrong_admin_token_fails_the_store_and_its_backends_without_touching_them(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    async def scenario(h: Harness) -> None:
        await _both_ready(h)
        tokens = copy.deepcopy(memo_store.tokens)
        secret = cluster.secrets[("shop", "orders-result-backend")]
        writes = list(cluster.writes)
        cluster.put_secret("shop", "memo-admin", {"token": "wrong"})
        for uid in await asyncio.get_running_loop().run_in_executor(None, h.stores.poll_admin, 5):
            h.stores.controller.enqueue(uid, {store.RESYNC: True})  # as watch_admin does
        await until(lambda: ready(cluster, STORE) == ("False", "AdminAuthFailed"), what="store")
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotReady"), what="backend")
        await h.idle()
        assert "AdminAuthFailed" in status(cluster, RB)["conditions"][1]["message"]
        assert memo_store.tokens == tokens
        assert cluster.secrets[("shop", "orders-result-backend")] == secret
        assert [w for w in cluster.writes[len(writes) :] if "status" not in w] == []
        # Fixed: everything recovers with nothing done to the ResultBackend.
        cluster.put_secret("shop", "memo-admin", {"token": "admin-token"})
        for uid in await asyncio.get_running_loop().run_in_executor(None, h.stores.poll_admin, 1):
            h.stores.controller.enqueue(uid, {store.RESYNC: True})
        await until(lambda: ready(cluster, RB) == ("True", "Ready"), what="backend again")
        await h.idle()
        assert memo_store.tokens == tokens
        assert [w for w in cluster.writes[len(writes) :] if "status" not in w] == []

    _run(cluster, scenario)


def test_a_store_in_use_waits_for_its_backends_then_goes(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    async def scenario(h: Harness) -> None:
        await _both_ready(h)
        cluster.delete(STORE)
        h.watch_store(STORE)
        await until(lambda: ready(cluster, STORE) == ("False", "InUse"), what="InUse")
        assert "1 ResultBackend(s)" in status(cluster, STORE)["conditions"][0]["message"]
        assert cluster.get(STORE) is not None
        cluster.delete(RB)
        h.watch(RB)
        await until(lambda: cluster.get(RB) is None, what="the ResultBackend gone")
        h.watch(RB)  # its DELETED event enqueues the store
        await until(lambda: cluster.get(STORE) is None, what="the store gone")

    h = _run(cluster, scenario)
    assert "shop/orders" in memo_store.removed  # the store was there for its deletion
    assert [e.reason for _, e in h.store_events] == ["Ready", "InUse"]


def test_a_cluster_store_serves_the_namespaces_its_selector_selects_and_follows_relabels(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    selector = {"matchLabels": {"team": "a"}}

    async def scenario(h: Harness) -> None:
        h.rbs.namespaces["shop"] = {}
        cluster.create(new_store(api.CLUSTER_STORE_KIND, selector))
        h.watch_store(STORE, "ADDED")
        await until(lambda: ready(cluster, STORE) == ("True", "Ready"), what="store Ready")
        cluster.create(new_rb(api.CLUSTER_STORE_KIND))
        h.watch(RB, "ADDED")
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotAllowed"), what="refused")
        assert status(cluster, RB)["phase"] == "Failed"
        assert memo_store.provisions == 0
        h.rbs.on_namespace("shop", {"team": "a"})
        await until(lambda: ready(cluster, RB) == ("True", "Ready"), what="allowed")
        tokens = copy.deepcopy(memo_store.tokens)
        h.rbs.on_namespace("shop", {"team": "b"})
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotAllowed"), what="again")
        await h.idle()
        # It keeps what it has: the store objects and its Secret.
        assert memo_store.tokens == tokens
        assert ("shop", "orders-result-backend") in cluster.secrets

    h = _run(cluster, scenario)
    assert "StoreNotAllowed" in h.reasons()
    # The admin Secret of a ClusterResultStore is the one in the cluster resource namespace.
    assert h.stores._secrets[STORE][0] == (CLUSTER_NS, "memo-admin")


def test_without_namespaced_stores_a_result_store_is_not_served_and_its_secret_never_read(
    cluster: FakeCluster, memo_store: MemoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = dataclasses.replace(store.SETTINGS, namespaced_stores=False)
    monkeypatch.setattr(store, "SETTINGS", off)
    monkeypatch.setattr(resultbackend, "SETTINGS", off)
    read = cluster.read_secret
    reads: list[tuple[str, str]] = []

    def counted(namespace: str, name: str) -> Any:
        reads.append((namespace, name))
        return read(namespace, name)

    monkeypatch.setattr(resultbackend.kube, "read_secret", counted)

    async def scenario(h: Harness) -> None:
        cluster.create(new_store())
        h.watch_store(STORE, "ADDED")
        await until(lambda: ready(cluster, STORE) is not None, what="store status")
        cluster.create(new_rb())
        h.watch(RB, "ADDED")
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotReady"), what="backend")

    _run(cluster, scenario)
    assert ready(cluster, STORE) == ("False", "NamespacedStoresDisabled")
    assert ("shop", "memo-admin") not in reads
    assert memo_store.admin_checks == memo_store.provisions == 0


def test_a_missing_store_is_reported_and_its_arrival_brings_the_backend_up(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    async def scenario(h: Harness) -> None:
        h.controller.backoff = h.controller.max_backoff = 300.0  # a retry would be far off
        cluster.create(new_rb())
        h.watch(RB, "ADDED")
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotFound"), what="not found")
        cluster.create(new_store())
        h.watch_store(STORE, "ADDED")
        await until(lambda: ready(cluster, RB) == ("True", "Ready"), what="Ready, no backoff")

    h = _run(cluster, scenario)
    assert h.reasons()[0] == "StoreNotFound"


def test_options_for_another_store_type_are_a_type_mismatch(
    cluster: FakeCluster, memo_store: MemoStore
) -> None:
    async def scenario(h: Harness) -> None:
        cluster.create(new_store())
        h.watch_store(STORE, "ADDED")
        await until(lambda: ready(cluster, STORE) == ("True", "Ready"), what="store Ready")
        cluster.create(new_rb(couchdb={"database": "orders"}))
        h.watch(RB, "ADDED")
        await until(lambda: ready(cluster, RB) == ("False", "StoreTypeMismatch"), what="mismatch")
        await until(lambda: h.controller.queue.failures(RB) >= 1, what="a retry with backoff")

    _run(cluster, scenario)
    assert memo_store.provisions == 0
    message = status(cluster, RB)["conditions"][0]["message"]
    assert message == ("spec.couchdb is set but ResultStore memo in namespace shop is a memo store")


def test_an_operator_of_some_namespaces_serves_no_cluster_store(
    cluster: FakeCluster, memo_store: MemoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespaced = dataclasses.replace(resultbackend.SETTINGS, cluster_stores=False)
    monkeypatch.setattr(resultbackend, "SETTINGS", namespaced)

    async def scenario(h: Harness) -> None:
        h.put_store(store_body(kind=api.CLUSTER_STORE_KIND))
        cluster.create(new_rb(api.CLUSTER_STORE_KIND))
        h.watch(RB, "ADDED")
        await until(lambda: ready(cluster, RB) == ("False", "StoreNotFound"), what="refused")

    _run(cluster, scenario)
    assert "use a ResultStore" in status(cluster, RB)["conditions"][0]["message"]
    assert memo_store.provisions == 0


def test_the_admin_poll_survives_an_unreachable_api_server(
    cluster: FakeCluster, memo_store: MemoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(cluster, store=False)
    h.stores._secrets[STORE] = (("shop", "memo-admin"), True)

    def unreachable(where: tuple[str, str]) -> bool:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(h.stores.admin, "changed", unreachable)
    assert h.stores.poll_admin(1) == []  # logged; the next tick asks again
    h.stop()
