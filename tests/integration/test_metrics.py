"""The operator process's /metrics after it reconciled a real ResultBackend.

The operator fixture serves metrics on a free port (RBO_METRICS_PORT). The
operator is shared by the session, so counters are compared before and after
this test's ResultBackend became Ready: they only grow, whatever else runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ConsulServer, CouchDBServer, Kubectl, OperatorProcess
from tests.integration.helpers import (
    admin_secret,
    apply,
    assert_no_secret,
    consul_store,
    couchdb_store,
    result_backend,
    secret_data,
    unique,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_text(operator: OperatorProcess) -> str:
    operator.assert_running()
    url = f"http://127.0.0.1:{operator.env['RBO_METRICS_PORT']}/metrics"

    def get() -> str | None:
        try:
            res = requests.get(url, timeout=10)
        except requests.ConnectionError:
            return None  # the operator is still starting
        res.raise_for_status()
        return res.text

    return wait_for(f"the operator's metrics at {url}", get)


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def worker(ns: str, name: str) -> dict[str, Any]:
    """A Deployment to inject into; no replicas, so no image is ever pulled."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"tier": "metrics-worker"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "worker", "image": "python:3.11-slim"}]},
            },
        },
    }


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_a_ready_resultbackend_shows_in_reconcile_check_request_and_injection_metrics(
    store: str,
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    before = parse(metrics_text(operator))
    name = unique("metered")
    selector = {"selector": {"matchLabels": {"tier": "metrics-worker"}}}
    if store == "couchdb":
        admin_values = {
            "username": couchdb_server.admin_user,
            "password": couchdb_server.admin_password,
        }
        admin_secret_value = couchdb_server.admin_password
        store_obj = couchdb_store(namespace, store, couchdb_server.url, "store-admin")
    else:
        admin_values = {"token": consul_server.management_token}
        admin_secret_value = consul_server.management_token
        store_obj = consul_store(namespace, store, consul_server.url, "store-admin")
    apply(
        kubectl,
        admin_secret(namespace, "store-admin", admin_values),
        store_obj,
        worker(namespace, "w1"),
        result_backend(namespace, name, store, workers=selector),
    )
    obj = wait_condition(kubectl, namespace, name, "Ready", "True")
    assert obj["status"]["workers"]["injected"] == 1

    # Ready may have been written by another operator process watching the same
    # cluster (tests run concurrently share the devstack), so this operator's own
    # ok reconcile may come a timer tick later: wait for it, then compare.
    def scrape_after_ok() -> tuple[str, Samples] | None:
        text = metrics_text(operator)
        now = parse(text)
        labels = {"store": store, "outcome": "ok"}
        done = sample(now, "resultbackend_reconciles_total", **labels) > sample(
            before, "resultbackend_reconciles_total", **labels
        )
        return (text, now) if done else None

    text, after = wait_for(f"an ok {store} reconcile in the metrics", scrape_after_ok)

    def grew(metric: str, **labels: str) -> bool:
        return sample(after, metric, **labels) > sample(before, metric, **labels)

    assert grew("resultbackend_reconcile_duration_seconds_count", store=store, outcome="ok")
    # An ok reconcile ran the check as the worker, and it passed.
    assert grew("resultbackend_backend_checks_total", store=store, result="ok")
    assert grew("resultbackend_backend_check_duration_seconds_count", store=store)
    assert sample(after, "resultbackend_workloads_injected", store=store) >= 1
    # Requests every reconcile makes. Writes (the Secret's create, the injection's
    # patch) are not asserted: a concurrent operator may have made them first.
    # Nor are the workload lists: a reconcile lists only the kinds the watches
    # have seen a selected workload of, and the worker may arrive after it.
    requests_made = [("Secret", "get")]  # the admin Secret and the worker Secret
    if store == "consul":
        requests_made.append(("Consul", "put"))  # the check's session and key, as the worker
    else:
        requests_made.append(("CouchDB", "get"))  # the check's read, as the worker
    for kind, verb in requests_made:
        assert grew("resultbackend_api_requests_total", kind=kind, verb=verb), (kind, verb)

    # Process metrics come along; no object name and no credential is a label.
    assert sample(after, "process_resident_memory_bytes") > 0
    assert namespace not in text
    assert name not in text
    worker_data = secret_data(kubectl, namespace, f"{name}-result-backend")
    worker_secret = worker_data["password"] if store == "couchdb" else worker_data["token"]
    assert_no_secret([text], [admin_secret_value, worker_secret])
