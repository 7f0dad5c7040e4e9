"""Metrics: what reconciles, checks and requests record, with bounded labels.

Each test swaps a `Metrics` on a fresh registry in for the module's, so counts
never leak between tests. Reconciles run on tests/unit/fakes.py's cluster and
third store (no servers in unit tests).
"""

from __future__ import annotations

import ast
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, generate_latest

from resultbackend_operator import api, kube, metrics
from resultbackend_operator.__main__ import parse_args
from resultbackend_operator.backends import BackendError
from resultbackend_operator.reconcile.resultbackend import Result
from resultbackend_operator.settings import Settings

from .fakes import (
    MEMO,
    FakeCluster,
    Harness,
    MemoStore,
    rb_body,
    worker,
)


@pytest.fixture
def m(monkeypatch: pytest.MonkeyPatch) -> metrics.Metrics:
    fresh = metrics.Metrics(CollectorRegistry())
    monkeypatch.setattr(metrics, "METRICS", fresh)
    return fresh


def value(m: metrics.Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def reconciles(m: metrics.Metrics, store: str, outcome: str) -> float | None:
    return value(m, "resultbackend_reconciles_total", store=store, outcome=outcome)


# --- the Metrics object -------------------------------------------------------


def test_every_store_and_outcome_series_reads_zero_before_anything_happens(
    m: metrics.Metrics,
) -> None:
    for store in ("couchdb", "consul"):
        for outcome in ("ok", "degraded", "conflict", "error", "invalid", "exception"):
            assert reconciles(m, store, outcome) == 0
        assert value(m, "resultbackend_backend_checks_total", store=store, result="ok") == 0
        assert value(m, "resultbackend_workloads_injected", store=store) == 0


def test_a_recorded_reconcile_counts_once_and_is_timed_under_its_store_and_outcome(
    m: metrics.Metrics,
) -> None:
    m.record_reconcile("consul", "degraded", 0.2)
    m.record_reconcile("consul", "degraded", 0.3)
    assert reconciles(m, "consul", "degraded") == 2
    assert reconciles(m, "consul", "ok") == 0
    assert reconciles(m, "couchdb", "degraded") == 0
    duration = "resultbackend_reconcile_duration_seconds"
    assert value(m, f"{duration}_count", store="consul", outcome="degraded") == 2
    assert value(m, f"{duration}_sum", store="consul", outcome="degraded") == pytest.approx(0.5)


def test_label_values_outside_the_known_sets_collapse_to_other_or_unknown(
    m: metrics.Metrics,
) -> None:
    m.record_reconcile("redis", "surprising", 0.1)
    m.record_check("couchdb", "SomethingNew", 0.1)
    m.api_request("Pod", "watch")
    assert reconciles(m, "unknown", "other") == 1
    assert value(m, "resultbackend_backend_checks_total", store="couchdb", result="other") == 1
    assert value(m, "resultbackend_api_requests_total", kind="other", verb="other") == 1


def test_workloads_injected_sums_over_resultbackends_per_store_and_forgets_deleted_ones(
    m: metrics.Metrics,
) -> None:
    m.set_workloads_injected("uid-a", "couchdb", 2)
    m.set_workloads_injected("uid-b", "couchdb", 3)
    m.set_workloads_injected("uid-c", "consul", 1)
    assert value(m, "resultbackend_workloads_injected", store="couchdb") == 5
    m.set_workloads_injected("uid-a", "couchdb", 1)  # a workload stopped matching
    assert value(m, "resultbackend_workloads_injected", store="couchdb") == 4
    m.forget("uid-b")
    assert value(m, "resultbackend_workloads_injected", store="couchdb") == 1
    assert value(m, "resultbackend_workloads_injected", store="consul") == 1


def test_the_registry_also_serves_process_metrics() -> None:
    text = generate_latest(metrics.REGISTRY).decode()
    assert "process_resident_memory_bytes" in text
    assert "process_cpu_seconds_total" in text
    assert "resultbackend_reconciles_total" in text


# --- the context managers reconcile uses ---------------------------------------


def test_a_reconcile_that_raises_is_counted_as_exception_and_the_error_passes_through(
    m: metrics.Metrics,
) -> None:
    with pytest.raises(RuntimeError), metrics.reconcile_timer("couchdb"):
        raise RuntimeError("boom")
    assert reconciles(m, "couchdb", "exception") == 1


@pytest.mark.parametrize(
    ("fail", "result"),
    [
        (None, "ok"),
        (BackendError("Unreachable", "down", transient=True), "Unreachable"),
        (
            BackendError("WorkerCredentialsRejected", "401", transient=True),
            "WorkerCredentialsRejected",
        ),
        (KeyError("unexpected"), "exception"),
    ],
)
def test_a_backend_check_counts_ok_or_its_condition_reason_and_reraises(
    m: metrics.Metrics, fail: Exception | None, result: str
) -> None:
    def check() -> None:
        if fail is not None:
            raise fail

    if fail is None:
        with metrics.backend_check("consul"):
            check()
    else:
        with pytest.raises(type(fail)), metrics.backend_check("consul"):
            check()
    assert value(m, "resultbackend_backend_checks_total", store="consul", result=result) == 1
    assert value(m, "resultbackend_backend_check_duration_seconds_count", store="consul") == 1


# --- reconcile outcomes ---------------------------------------------------------


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, memo_store: MemoStore) -> FakeCluster:
    c = FakeCluster(monkeypatch)
    c.put_secret("shop", "memo-admin", {"token": "admin-token"})
    c.put_workload(worker())
    return c


def _reconcile(cluster: FakeCluster, body: dict[str, Any] | None = None) -> Result:
    """One full reconcile of `body` (a new ResultBackend of the memo store by default)."""
    h = Harness(cluster)
    try:
        obj = cluster.create(body or rb_body(uid=f"uid-{uuid.uuid4().hex}"))
        obj["metadata"]["finalizers"] = [api.FINALIZER]
        return h.rbs._full(obj, thorough=False)
    finally:
        h.stop()


def _refuse(store: MemoStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(*args: Any) -> None:
        raise BackendError("WorkerCredentialsRejected", "refused", transient=True)

    monkeypatch.setattr(store, "check_worker", check)


def _conflict(cluster: FakeCluster) -> None:
    wl = cluster.workloads[("shop", "Deployment/orders-worker")]
    env = wl["spec"]["template"]["spec"]["containers"][0].setdefault("env", [])
    env.append({"name": "CELERY_RESULT_BACKEND", "value": "redis://elsewhere"})


def _api_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise ApiException(status=500)

    monkeypatch.setattr(kube, "apply_workload", broken)


@pytest.mark.parametrize(
    ("refused", "workers", "outcome"),
    [
        (False, "ok", "ok"),
        (True, "ok", "degraded"),
        (False, "api-error", "degraded"),
        (False, "conflict", "conflict"),
        # A workload conflict needs the user more than a failing check does.
        (True, "conflict", "conflict"),
    ],
)
def test_a_provisioned_reconcile_is_counted_by_what_the_check_and_workers_came_to(
    m: metrics.Metrics,
    cluster: FakeCluster,
    memo_store: MemoStore,
    monkeypatch: pytest.MonkeyPatch,
    refused: bool,
    workers: str,
    outcome: str,
) -> None:
    if refused:
        _refuse(memo_store, monkeypatch)
    if workers == "conflict":
        _conflict(cluster)
    elif workers == "api-error":
        _api_error(monkeypatch)
    result = _reconcile(cluster)
    assert result.outcome == outcome
    assert reconciles(m, MEMO, outcome) == 1
    assert sum(reconciles(m, MEMO, o) or 0 for o in metrics.OUTCOMES) == 1
    check_result = "WorkerCredentialsRejected" if refused else "ok"
    assert value(m, "resultbackend_backend_checks_total", store=MEMO, result=check_result)


def test_workloads_injected_follows_the_reconciled_status_and_drops_on_forget(
    m: metrics.Metrics, cluster: FakeCluster
) -> None:
    h = Harness(cluster)
    try:
        obj = cluster.create(rb_body(uid="uid-m"))
        obj["metadata"]["finalizers"] = [api.FINALIZER]
        h.rbs._report(obj, h.rbs._full(obj, thorough=False))
        assert value(m, "resultbackend_workloads_injected", store=MEMO) == 1
        h.rbs.forget("uid-m")
        assert value(m, "resultbackend_workloads_injected", store=MEMO) == 0
    finally:
        h.stop()


def test_a_missing_admin_secret_is_counted_as_error(
    cluster: FakeCluster,
    m: metrics.Metrics,  # made after the memo store registered: its series read 0
) -> None:
    del cluster.secrets[("shop", "memo-admin")]
    result = _reconcile(cluster)
    assert result.outcome == "error"
    assert reconciles(m, MEMO, "error") == 1
    # No check runs when provisioning failed.
    assert value(m, "resultbackend_backend_check_duration_seconds_count", store=MEMO) == 0


def test_a_worker_secret_owned_by_someone_else_is_counted_as_conflict(
    m: metrics.Metrics, cluster: FakeCluster
) -> None:
    theirs = kube.SecretData(data={}, owner_uids=frozenset({"someone-else"}))
    cluster.secrets[("shop", "orders-result-backend")] = theirs
    assert _reconcile(cluster).outcome == "conflict"
    assert reconciles(m, MEMO, "conflict") == 1


def test_an_invalid_spec_is_counted_as_invalid_under_its_store(
    m: metrics.Metrics, cluster: FakeCluster
) -> None:
    both = {"storeRef": {"name": MEMO}, "couchdb": {}, "consul": {}}  # at most one may be set
    result = _reconcile(cluster, rb_body(spec=both))
    assert result.permanent
    assert reconciles(m, MEMO, "invalid") == 1


def test_an_unexpected_api_error_is_counted_as_exception(
    m: metrics.Metrics, cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ns: str, name: str) -> None:
        raise ApiException(status=500)

    monkeypatch.setattr(kube, "read_secret", broken)
    with pytest.raises(ApiException):
        _reconcile(cluster)
    assert reconciles(m, MEMO, "exception") == 1


def test_no_secret_value_reaches_the_metrics_output(
    m: metrics.Metrics,
    cluster: FakeCluster,
    memo_store: MemoStore,
) -> None:
    _reconcile(cluster)
    text = generate_latest(m.registry).decode()
    for token in memo_store.tokens.values():
        assert token[0] not in text
    assert "resultbackend_reconciles_total" in text


# --- API requests -----------------------------------------------------------------


class _FakeResponse:
    def __init__(self) -> None:
        self.status = 404
        self.reason = "Not Found"
        self.headers: dict[str, str] = {}
        self.data = b'{"kind": "Status", "code": 404}'

    def read(self) -> bytes:
        return self.data


class _FakeApiClient:
    """The two ApiClient methods kube._request uses."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def param_serialize(self, method: str, resource_path: str, **kw: Any) -> tuple[Any, ...]:
        return method, f"https://api{resource_path}", {}, kw.get("body"), []

    def call_api(self, method: str, url: str, **kw: Any) -> _FakeResponse:
        self.calls.append((method, url))
        return _FakeResponse()


def test_a_kube_request_is_counted_by_kind_and_verb_even_when_it_fails(
    m: metrics.Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeApiClient()
    monkeypatch.setattr(kube, "api_client", lambda: fake)
    assert kube.read_secret("ns", "absent") is None
    assert fake.calls == [("GET", "https://api/api/v1/namespaces/ns/secrets/absent")]
    assert value(m, "resultbackend_api_requests_total", kind="Secret", verb="get") == 1


def test_every_kube_request_goes_through_the_counting_wrapper() -> None:
    """One function of kube.py sends requests (and counts them); nothing else calls the client."""
    tree = ast.parse(Path(kube.__file__).read_text())
    senders = {
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Attribute) and node.attr in ("call_api", "request")
    }
    assert senders == {"_request"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }
    assert not names & {"CoreV1Api", "AppsV1Api", "CustomObjectsApi"}


def test_a_store_request_is_counted_when_sent_even_if_it_never_connects(
    m: metrics.Metrics,
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    session = requests.Session()
    metrics.count_requests(session, "Consul")
    with pytest.raises(requests.ConnectionError):
        session.put(f"http://127.0.0.1:{port}/v1/kv/x", data="v", timeout=5)
    assert value(m, "resultbackend_api_requests_total", kind="Consul", verb="put") == 1


# --- configuration ------------------------------------------------------------------


def test_metrics_port_comes_from_the_environment_and_defaults_to_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RBO_METRICS_PORT", raising=False)
    assert Settings.from_env().metrics_port == 0
    monkeypatch.setenv("RBO_METRICS_PORT", "9090")
    assert Settings.from_env().metrics_port == 9090
    monkeypatch.setenv("RBO_METRICS_PORT", "70000")
    with pytest.raises(ValueError, match="RBO_METRICS_PORT"):
        Settings.from_env()


def test_the_metrics_port_flag_overrides_and_rejects_non_ports() -> None:
    assert parse_args([]).metrics_port is None
    assert parse_args(["--metrics-port", "9100"]).metrics_port == 9100
    assert parse_args(["--metrics-port", "0"]).metrics_port == 0
    with pytest.raises(SystemExit):
        parse_args(["--metrics-port", "70000"])
