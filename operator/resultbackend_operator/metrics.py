"""Prometheus metrics of the operator, served on RBO_METRICS_PORT / --metrics-port.

Every metric of ours is named `resultbackend_*` and lives in `REGISTRY`, a registry
of its own rather than prometheus_client's global one: `serve()` exposes exactly
this registry, and unit tests build a `Metrics` on a fresh `CollectorRegistry`
and swap it in for `METRICS`, so no test sees another's counts. The process,
platform and GC collectors are added to `REGISTRY` too, so the endpoint also
shows `process_resident_memory_bytes`, `process_cpu_seconds_total` (Linux) and
`python_info` / `python_gc_*`.

Label values are bounded on purpose: each one passes through `_bounded`, which
maps anything outside a fixed set to "other". No object name, namespace, URL,
user name, password or token is ever a label value, so a metric can neither
leak a credential nor grow a series per ResultBackend.

What is counted, and where:

- reconciles: every full reconcile of a ResultBackend (reconcile/resultbackend.py:
  create, spec update, resume, a retry, a changed Secret, a periodic check that
  found something off or a resync due). A periodic check that needed no full
  reconcile, a workload event's sync and the deletion are not counted there (their
  requests are).
- backend checks: the check as the worker (CouchDB: read the database with the
  worker's user; Consul: a session and a key write with the worker token) that
  each reconcile runs after provisioning.
- API requests: every Kubernetes call of `kube.py` goes through `kube._request`;
  every HTTP request to a store goes through `CountingAdapter`, mounted
  on the clients' `requests` sessions. A request is counted when it is sent,
  whatever the answer, including attempts that never connect.

  Not counted: Kopf's own requests to the API server (its watch streams, the
  patches it makes for finalizers, annotations and the status a handler
  returns, the Events it posts, peering). Kopf talks to the API server through
  its own aiohttp client, which this module cannot see.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, get_args

import requests
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from requests.adapters import HTTPAdapter

from .backends.base import (
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    STORES,
    BackendError,
)

OTHER = "other"
UNKNOWN_STORE = "unknown"  # a ResultBackend whose store is not known (yet)

# What one reconcile came to, one per reconcile. Provisioning stops at its first
# failure (error or conflict); once provisioned, a workload conflict outranks a
# failed check (degraded).
# exception   an unexpected error escaped the reconcile (Kopf retries it)
# invalid     the spec cannot be acted on (a permanent error)
# error       provisioning failed: store unreachable, credentials refused, Secret missing ...
# conflict    an object of that name exists and is not ours (store object, Secret, workload)
# degraded    provisioned, but the worker check failed or workloads could not be updated
# ok          provisioned, the worker credentials work, every selected workload injected
Outcome = Literal["ok", "degraded", "conflict", "error", "invalid", "exception"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)

# A backend check's result: "ok" or the reason the BackendReachable condition gets.
CHECK_RESULTS = (
    "ok",
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    REASON_BACKEND,
    REASON_INVALID,
    REASON_ADMIN_AUTH,
    REASON_FORBIDDEN,
    REASON_CONFLICT,
    "exception",
)

# The kinds of the API server's objects; the stores' requests count under their
# `Store.api_kind` ("CouchDB", "Consul").
ApiKind = Literal[
    "Secret",
    "Namespace",
    "Deployment",
    "StatefulSet",
    "ResultBackend",
    "ResultStore",
    "ClusterResultStore",
]
API_KINDS: tuple[str, ...] = get_args(ApiKind)


def api_kinds() -> tuple[str, ...]:
    """The `kind` label's values: the API server's kinds and each store's."""
    return API_KINDS + tuple(store.api_kind for store in STORES.values())


# Kubernetes verbs for the API server; HTTP methods (lower case) for CouchDB and Consul.
API_VERBS = (
    "get",
    "list",
    "create",
    "update",
    "patch",
    "delete",
    "head",
    "post",
    "put",
    "options",
)

# A reconcile makes a few requests to the API server and the store; a backend
# check a few to the store. Each request may take up to RBO_BACKEND_TIMEOUT (10s).
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _bounded(value: object, allowed: Collection[str]) -> str:
    """`value` if it is one of `allowed`, else "other": label sets stay fixed and small."""
    return value if isinstance(value, str) and value in allowed else OTHER


def stores() -> tuple[str, ...]:
    """The store types a module registered (backends.STORES): the `store` label's values.

    Read when used: the store modules import this module (to count their
    requests) before they register."""
    return tuple(STORES)


def store_label(store_type: object) -> str:
    """The `store` label for a store type: a registered store's type, or unknown."""
    return store_type if isinstance(store_type, str) and store_type in stores() else UNKNOWN_STORE


def store_of(body: Mapping[str, Any]) -> str:
    """The `store` label of a ResultBackend body, parsed or not: its store's type as
    status says it, else the option block it sets, else unknown."""
    status, spec = body.get("status"), body.get("spec")
    store = status.get("store") if isinstance(status, Mapping) else None
    if isinstance(store, Mapping) and store.get("type"):
        return store_label(store.get("type"))
    blocks = [b for b in STORES if isinstance(spec, Mapping) and spec.get(b) is not None]
    return store_label(blocks[0] if len(blocks) == 1 else None)


class Metrics:
    """The operator's metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconcile_duration = Histogram(
            "resultbackend_reconcile_duration_seconds",
            "Time one reconcile of a ResultBackend took, by store type and outcome.",
            ["store", "outcome"],
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.reconciles = Counter(
            "resultbackend_reconciles_total",
            "Full reconciles of ResultBackends (create, spec update, resume, retry, a changed "
            "Secret, a periodic check that found something due), by store type and outcome.",
            ["store", "outcome"],
            registry=registry,
        )
        self.checks = Counter(
            "resultbackend_backend_checks_total",
            "Checks of the worker credentials against the store, by store type and result "
            '("ok" or the reason of the BackendReachable condition).',
            ["store", "result"],
            registry=registry,
        )
        self.check_duration = Histogram(
            "resultbackend_backend_check_duration_seconds",
            "Time one check of the worker credentials against the store took, by store type.",
            ["store"],
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
        self.workloads_injected = Gauge(
            "resultbackend_workloads_injected",
            "Deployments and StatefulSets that carry the current injection, summed over the "
            "ResultBackends this operator process reconciled, by store type.",
            ["store"],
            registry=registry,
        )
        self.api_requests = Counter(
            "resultbackend_api_requests_total",
            "Requests the operator's own code sent to the Kubernetes API server (kinds Secret, "
            "Deployment, StatefulSet, ResultBackend) and to the stores (kinds CouchDB, Consul; "
            "the verb is the HTTP method), by kind and verb. Kopf's own requests are not "
            "included.",
            ["kind", "verb"],
            registry=registry,
        )
        self._lock = threading.Lock()
        self._injected: dict[str, tuple[str, int]] = {}
        self._primed: set[str] = set()
        self.prime()

    def prime(self) -> None:
        """Series that exist from the start read 0 instead of being absent, so
        rate() and alerts work from the first event on (again when `serve` starts:
        every store module has registered by then)."""
        for store in stores():
            if store not in self._primed:
                self._primed.add(store)
                self.workloads_injected.labels(store).set(0)
                self.check_duration.labels(store)
                for outcome in OUTCOMES:
                    self.reconciles.labels(store, outcome)
                for result in CHECK_RESULTS:
                    self.checks.labels(store, result)

    def record_reconcile(self, store: str, outcome: str, seconds: float) -> None:
        labels = (store_label(store), _bounded(outcome, OUTCOMES))
        self.reconciles.labels(*labels).inc()
        self.reconcile_duration.labels(*labels).observe(seconds)

    def record_check(self, store: str, result: str, seconds: float) -> None:
        store = store_label(store)
        self.checks.labels(store, _bounded(result, CHECK_RESULTS)).inc()
        self.check_duration.labels(store).observe(seconds)

    def api_request(self, kind: str, verb: str) -> None:
        self.api_requests.labels(_bounded(kind, api_kinds()), _bounded(verb, API_VERBS)).inc()

    def set_workloads_injected(self, uid: str, store: str, count: int) -> None:
        """Record how many workloads the ResultBackend `uid` injects (its status says)."""
        with self._lock:
            self._injected[uid] = (store_label(store), max(count, 0))
            self._publish()

    def forget(self, uid: str) -> None:
        """The ResultBackend is gone: its workloads no longer count."""
        with self._lock:
            if self._injected.pop(uid, None) is not None:
                self._publish()

    def _publish(self) -> None:
        totals = dict.fromkeys(stores(), 0)
        for store, count in self._injected.values():
            totals[store] = totals.get(store, 0) + count
        for store, total in totals.items():
            self.workloads_injected.labels(store).set(total)


def _process_registry() -> CollectorRegistry:
    """A registry with the collectors prometheus_client puts on its global one."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


REGISTRY = _process_registry()
METRICS = Metrics(REGISTRY)


# --- recording: the functions the rest of the package calls -------------------


class ReconcileTiming:
    """Set `outcome` before the block ends; left unset, the reconcile raised."""

    def __init__(self) -> None:
        self.outcome: Outcome = "exception"


@contextmanager
def reconcile_timer(store: str) -> Iterator[ReconcileTiming]:
    """Time a reconcile and count it by store and outcome, also when it raises."""
    timing = ReconcileTiming()
    started = time.perf_counter()
    try:
        yield timing
    finally:
        METRICS.record_reconcile(store, timing.outcome, time.perf_counter() - started)


@contextmanager
def backend_check(store: str) -> Iterator[None]:
    """Time the check as the worker and count its result; exceptions pass through."""
    result = "exception"
    started = time.perf_counter()
    try:
        yield
        result = "ok"
    except BackendError as exc:
        result = exc.reason
        raise
    finally:
        METRICS.record_check(store, result, time.perf_counter() - started)


def api_request(kind: str, verb: str) -> None:
    METRICS.api_request(kind, verb)


def set_workloads_injected(uid: str, store: str, count: int) -> None:
    METRICS.set_workloads_injected(uid, store, count)


def forget(uid: str) -> None:
    METRICS.forget(uid)


class CountingAdapter(HTTPAdapter):
    """requests' transport adapter that counts each request it sends as (kind, method)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        api_request(self.kind, (request.method or "").lower())
        return super().send(request, *args, **kwargs)


def count_requests(session: requests.Session, kind: str) -> None:
    """Count every HTTP(S) request `session` sends from now on under `kind`."""
    adapter = CountingAdapter(kind)
    session.mount("http://", adapter)
    session.mount("https://", adapter)


# --- serving ------------------------------------------------------------------


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104
    """Serve REGISTRY at http://addr:port/metrics in a daemon thread.

    All interfaces by default: in a pod the chart's metrics Service must reach it.
    """
    METRICS.prime()
    start_http_server(port, addr=addr, registry=REGISTRY)
