"""An in-memory cluster and a third store, for unit tests of the generic reconcile.

`FakeCluster` stands in for kube.py (the only module that talks to the API
server) with dicts: ResultBackends with resourceVersions, Secrets, workloads
(server-side apply as test_injection.simulate_apply does it). `MemoStore` is a
store of a third type, "memo", kept in a dict, registered through the same
registry as CouchDB and Consul. `Harness` runs the real ResultBackends
controller (queue, workers, reconcile) on them in an asyncio loop, with a Ready
memo ResultStore the ResultBackends reference (`store_body`).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import itertools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from resultbackend_operator import api, injection, kube
from resultbackend_operator.backends import (
    AdminSecretRef,
    BackendError,
    Provisioned,
    Superseded,
    generate_password,
)
from resultbackend_operator.reconcile.events import Event
from resultbackend_operator.reconcile.resultbackend import ResultBackends
from resultbackend_operator.reconcile.store import ResultStores

from .test_injection import simulate_apply, workload

MEMO = "memo"


@dataclass
class MemoStore:
    """A store of type "memo": a dict of {namespace/name: token}, old tokens kept on
    rotation until the generic reconcile says they may go (like Consul)."""

    type: str = MEMO
    api_kind: str = "Consul"
    keeps_superseded: bool = True
    extra_env: Mapping[str, str] = field(default_factory=lambda: {"MEMO_TOKEN": "token"})
    tokens: dict[str, list[str]] = field(default_factory=dict)  # ident -> [active, superseded...]
    writes: int = 0
    calls: int = 0  # every request to the store
    admin_checks: int = 0
    checks: int = 0
    provisions: int = 0
    down: bool = False
    removed: list[str] = field(default_factory=list)
    hold: threading.Event | None = None  # provision waits for it (a run held mid-way)
    entered: threading.Event = field(default_factory=threading.Event)

    def admin_secret(self, store: api.ResultStore, namespace: str) -> AdminSecretRef:
        block = store.spec.blocks()[MEMO]
        return AdminSecretRef(namespace, block["secret"], {"token": "token"})

    def check_admin(self, url: str, admin: Mapping[str, str]) -> str:
        self.admin_checks += 1
        self._up()
        if admin["token"] != "admin-token":
            raise BackendError("AdminAuthFailed", "memo refused the admin token", transient=True)
        return "1.0"

    def _up(self) -> None:
        self.calls += 1
        if self.down:
            raise BackendError("Unreachable", "memo is down", transient=True)

    def provision(
        self,
        rb: api.ResultBackend,
        admin: Mapping[str, str],
        existing: Mapping[str, str] | None,
        *,
        rotate: bool,
        superseded: Superseded,
        io: concurrent.futures.Executor,
    ) -> Provisioned:
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        self.provisions += 1
        self._up()
        ident = f"{rb.namespace}/{rb.name}"
        tokens = self.tokens.setdefault(ident, [])
        known = (existing or {}).get("token")
        revoked = None
        if rotate or not tokens:
            tokens.insert(0, generate_password())
            self.writes += 1
        elif known in tokens and tokens[0] != known:
            tokens.remove(known)
            tokens.insert(0, known)
        if not rotate and not superseded.keep and len(tokens) > 1:
            del tokens[1:]
            self.writes += 1
            revoked = f"revoked superseded tokens: {superseded.why}"
        token = tokens[0]
        return Provisioned(
            secret_data={"type": MEMO, "uri": f"memo://server/{ident}", "token": token},
            fields={"url": f"memo://server/{ident}", MEMO: {"tokens": len(tokens)}},
            writes=self.writes,
            revoked=revoked,
            pending=rotate or superseded.keep,
        )

    def check_worker(
        self,
        rb: api.ResultBackend,
        secret_data: Mapping[str, str],
        io: concurrent.futures.Executor,
    ) -> None:
        self.checks += 1
        self._up()
        if secret_data.get("token") not in self.tokens.get(f"{rb.namespace}/{rb.name}", []):
            raise BackendError("WorkerCredentialsRejected", "token refused", transient=True)

    def remove(self, rb: api.ResultBackend, admin: Mapping[str, str]) -> str:
        self._up()
        ident = f"{rb.namespace}/{rb.name}"
        if self.tokens.pop(ident, None) is not None:
            self.writes += 1
        self.removed.append(ident)
        return f"deleted {self.describe(rb)}"

    def describe(self, rb: api.ResultBackend) -> str:
        return f"the tokens of {rb.namespace}/{rb.name}"


def rb_body(
    name: str = "orders",
    namespace: str = "shop",
    uid: str = "uid-1",
    spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": dict(
            spec
            or {
                "storeRef": {"name": MEMO},
                "workers": {"selector": {"matchLabels": {"app": "orders-worker"}}},
            }
        ),
    }


def store_body(
    name: str = MEMO,
    namespace: str = "shop",
    uid: str = "store-1",
    *,
    ready: bool = True,
    version: int = 1,
    kind: str = api.STORE_KIND,
    spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A memo store as the store controller left it (finalizer, status of its generation)."""
    status: dict[str, Any] = {
        "observedGeneration": 1,
        "type": MEMO,
        "url": "memo://server",
        "conditions": [
            api.condition("Ready", ready, "Ready" if ready else "AdminAuthFailed", "memo", 1)
        ],
    }
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {
            "name": name,
            **({"namespace": namespace} if kind == api.STORE_KIND else {}),
            "uid": uid,
            "generation": 1,
            "resourceVersion": str(version),
            "finalizers": [api.FINALIZER],
        },
        "spec": dict(spec or {MEMO: {"url": "memo://server", "secret": "memo-admin"}}),
        "status": status,
    }


def _merge(into: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """JSON merge patch (RFC 7386) of `patch` into `into`."""
    for key, value in patch.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


class FakeCluster:
    """kube.py's calls on dicts; every write is recorded in `writes`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.rv = itertools.count(2)
        self.rbs: dict[str, dict[str, Any]] = {}  # uid -> object
        self.secrets: dict[tuple[str, str], kube.SecretData] = {}
        self.workloads: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, Kind/name)
        self.writes: list[str] = []
        self.status_writes: list[dict[str, Any]] = []
        self.fail_status_patch = False
        self.terminating: set[str] = set()
        self.namespaces: dict[str, dict[str, str]] = {}
        self.deleted: dict[str, dict[str, Any]] = {}  # uid -> the object as it went
        for name in (
            "namespace_labels",
            "read_secret",
            "ensure_secret",
            "list_workloads_of",
            "list_workloads",
            "apply_workload",
            "patch_resultbackend_status",
            "patch_status",
            "list_resultbackends_of",
            "add_finalizer",
            "remove_finalizer",
            "namespace_terminating",
        ):
            monkeypatch.setattr(kube, name, getattr(self, name))

    # --- what the tests do as users and controllers -----------------------------

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        with self.lock:
            obj = copy.deepcopy(dict(body))
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            self.rbs[obj["metadata"]["uid"]] = obj
            return copy.deepcopy(obj)

    def edit(self, uid: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """A user's spec change: a new generation."""
        with self.lock:
            obj = self.rbs[uid]
            change(obj["spec"])
            obj["metadata"]["generation"] += 1
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            return copy.deepcopy(obj)

    def delete(self, uid: str) -> dict[str, Any] | None:
        """kubectl delete: with finalizers it only gets a deletionTimestamp."""
        with self.lock:
            obj = self.rbs[uid]
            if not obj["metadata"].get("finalizers"):
                del self.rbs[uid]
                return None
            obj["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            return copy.deepcopy(obj)

    def get(self, uid: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.rbs.get(uid)
            return copy.deepcopy(obj) if obj is not None else None

    def put_secret(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        version = str(next(self.rv))
        self.secrets[(namespace, name)] = kube.SecretData(dict(data), frozenset(), version)

    def put_workload(self, wl: dict[str, Any]) -> None:
        meta = wl["metadata"]
        meta.setdefault("uid", f"wl-{meta['name']}")
        meta.setdefault("generation", 1)
        self.workloads[(meta["namespace"], f"{wl['kind']}/{meta['name']}")] = wl

    # --- kube.py ---------------------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> kube.SecretData | None:
        return self.secrets.get((namespace, name))

    def ensure_secret(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        owner_reference: Mapping[str, Any],
        current: kube.SecretData | None,
    ) -> bool:
        have = self.secrets.get((namespace, name))
        if have is not None and have.data == dict(data):
            return False
        self.secrets[(namespace, name)] = kube.SecretData(
            dict(data), frozenset({str(owner_reference["uid"])})
        )
        self.writes.append(f"secret {namespace}/{name}")
        return True

    def list_workloads_of(
        self, namespace: str, kind: str, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(wl)
            for (ns, ident), wl in self.workloads.items()
            if ns == namespace and ident.startswith(f"{kind}/")
        ]

    def list_workloads(self, namespace: str) -> list[dict[str, Any]]:
        return self.list_workloads_of(namespace, "Deployment") + self.list_workloads_of(
            namespace, "StatefulSet"
        )

    def apply_workload(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        key = (meta["namespace"], f"{body['kind']}/{meta['name']}")
        live = self.workloads[key]
        if api.INJECTED_BY_ANNOTATION in body["metadata"].get("annotations", {}):
            after = simulate_apply(live, body)
        else:
            after = _released(live)
        if after["spec"]["template"] != live["spec"]["template"]:
            after["metadata"]["generation"] = live["metadata"]["generation"] + 1
        self.workloads[key] = after
        self.writes.append(f"apply {key[1]}")
        return copy.deepcopy(after)

    def patch_resultbackend_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        with self.lock:
            if self.fail_status_patch:
                raise ApiException(status=500)
            (obj,) = (
                o
                for o in self.rbs.values()
                if o["kind"] == api.KIND
                and o["metadata"]["name"] == name
                and o["metadata"]["namespace"] == namespace
            )
            current = obj.setdefault("status", {})
            _merge(current, status)
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            self.writes.append("status")
            self.status_writes.append(copy.deepcopy(dict(status)))
            return copy.deepcopy(obj)

    def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A store's status (the stores live in `rbs` too, by uid)."""
        with self.lock:
            (obj,) = (
                o
                for o in self.rbs.values()
                if o["kind"] == kind
                and o["metadata"]["name"] == name
                and o["metadata"].get("namespace", "") == namespace
            )
            _merge(obj.setdefault("status", {}), status)
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            self.writes.append(f"{kind} status")
            return copy.deepcopy(obj)

    def list_resultbackends_of(self, key: tuple[str, str, str]) -> list[str]:
        kind, namespace, name = key
        with self.lock:
            return [
                f"{o['metadata']['namespace']}/{o['metadata']['name']}"
                for o in self.rbs.values()
                if o["kind"] == api.KIND
                and o["spec"].get("storeRef") == {"kind": kind, "name": name}
                and (kind != api.STORE_KIND or o["metadata"]["namespace"] == namespace)
            ]

    def add_finalizer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        with self.lock:
            obj = self.rbs.get(body["metadata"]["uid"])
            if obj is None:
                raise ApiException(status=404)
            if obj["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]:
                raise ApiException(status=422)
            obj["metadata"].setdefault("finalizers", []).append(api.FINALIZER)
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            self.writes.append("finalizer")
            return copy.deepcopy(obj)

    def remove_finalizer(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            obj = self.rbs.get(body["metadata"]["uid"])
            if obj is None:
                return None
            obj["metadata"]["finalizers"].remove(api.FINALIZER)
            obj["metadata"]["resourceVersion"] = str(next(self.rv))
            self.writes.append("finalizer off")
            if not obj["metadata"]["finalizers"] and obj["metadata"].get("deletionTimestamp"):
                self.deleted[body["metadata"]["uid"]] = copy.deepcopy(obj)
                del self.rbs[body["metadata"]["uid"]]
            return copy.deepcopy(obj)

    def namespace_terminating(self, name: str) -> bool:
        return name in self.terminating

    def namespace_labels(self, name: str) -> dict[str, str] | None:
        return self.namespaces.get(name)


def _released(live: Mapping[str, Any]) -> dict[str, Any]:
    """The workload after a release: what our field manager owned is gone."""
    out = copy.deepcopy(dict(live))
    out["metadata"].get("annotations", {}).pop(api.INJECTED_BY_ANNOTATION, None)
    template = out["spec"]["template"]
    template["metadata"].get("annotations", {}).pop(api.CONFIG_HASH_ANNOTATION, None)
    for container in template["spec"]["containers"]:
        container["env"] = [
            e
            for e in container.get("env", [])
            if "secretKeyRef" not in e.get("valueFrom", {})
            or not e["valueFrom"]["secretKeyRef"]["name"].endswith("-result-backend")
        ]
    out["metadata"]["managedFields"] = [
        m for m in out["metadata"].get("managedFields", []) if m["manager"] != api.FIELD_MANAGER
    ]
    return out


def worker(name: str = "orders-worker", labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    wl = workload(name=name)
    wl["metadata"]["labels"] = dict(labels or {"app": name})
    return wl


def secret_event_body(
    namespace: str, name: str, data: Mapping[str, str], owner_uid: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": namespace, "name": name}
    if owner_uid:
        meta["ownerReferences"] = [{"kind": api.KIND, "uid": owner_uid, "name": "x"}]
    return {"metadata": meta, "data": injection.encode_secret_data(data)}


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class Harness:
    """The real ResultBackends controller on a FakeCluster, in an asyncio loop.

    `events` collects what the runs posted; `watch(uid)` plays the watch: it
    feeds the cluster's current object to the controller as an event.
    """

    def __init__(self, cluster: FakeCluster, *, workers: int = 2, store: bool = True) -> None:
        self.cluster = cluster
        self.events: list[tuple[str, Event]] = []
        self.store_events: list[tuple[str, Event]] = []
        self.rbs = ResultBackends(self._post, workers=workers)
        self.controller = self.rbs.controller
        # Its runs start only with start(stores=True); else it is a cache of stores.
        self.stores = ResultStores(self._post_store, self.rbs)
        self.stores.controller.backoff = 0.01
        self.stores.controller.max_backoff = 0.08
        self._stores_run = False
        if store:
            self.put_store(store_body())
        # Retries come fast in the tests; the doubling is what they look at.
        self.controller.backoff = 0.01
        self.controller.max_backoff = 0.08

    def put_store(self, body: Mapping[str, Any]) -> None:
        """The store as the store controller's watch sees it."""
        key = (
            str(body["kind"]),
            str(body["metadata"].get("namespace") or ""),
            body["metadata"]["name"],
        )
        self.stores.cache.put(body)
        self.stores._uids[key] = str(body["metadata"]["uid"])

    def _post_store(self, body: Mapping[str, Any], events: list[Event]) -> None:
        self.store_events.extend((str(body["metadata"].get("name")), e) for e in events)

    def watch_store(self, uid: str, event_type: str | None = "MODIFIED") -> None:
        obj = self.cluster.get(uid)
        if obj is None:
            last = self.stores.cache.get(uid)  # a DELETED event carries the last object
            if last is not None:
                self.stores.on_event("DELETED", last)
        else:
            self.stores.on_event(event_type, obj)

    def _post(self, meta: Mapping[str, Any], events: list[Event]) -> None:
        self.events.extend((str(meta.get("name")), e) for e in events)

    def reasons(self) -> list[str]:
        return [e.reason for _, e in self.events]

    def watch(self, uid: str, event_type: str | None = "MODIFIED") -> None:
        obj = self.cluster.get(uid)
        if obj is None:
            # A DELETED event carries the object as it went.
            last = self.cluster.deleted.get(uid) or {"metadata": {"uid": uid}}
            self.rbs.on_event("DELETED", last)
        else:
            self.rbs.on_event(event_type, obj)

    async def start(self, *, stores: bool = False) -> None:
        self.controller.start()
        if stores:
            self.stores.controller.start()
        self._stores_run = stores

    async def idle(self, timeout: float = 5.0) -> None:
        """Until no key is queued or running (delayed ones may wait)."""
        await until(lambda: not self._busy(), timeout, "the queue to drain")

    def _busy(self) -> bool:
        queues = [self.controller.queue]
        if self._stores_run:
            queues.append(self.stores.controller.queue)
        return any(len(q) > 0 or bool(q._processing) for q in queues)

    def stop(self) -> None:
        self.controller.shutdown()
        self.stores.controller.shutdown()
        self.rbs.io.shutdown(wait=False, cancel_futures=True)


async def until(probe: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait on the loop until `probe()` is true (bounded; not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not probe():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or probe}")
        await asyncio.sleep(0.005)
