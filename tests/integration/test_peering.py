"""Two replicas with Kopf peering against the real API server: one works, one stands by.

Each test runs two operator processes, `python -m resultbackend_operator --namespace NS
--peering NAME --priority N` (LOW and HIGH), each with a metrics port of its own, as
the ServiceAccount of the Helm chart rendered for the test's namespace with peering on
(`isolated.namespaced_identity`): the chart's KopfPeering NAME in NS is what they keep
alive in, and its Role is what lets them, so the chart's namespaced peering RBAC is
proven on the way. NAME is the test's own, so no other operator is paused by it.

LOW starts alone, checks a CouchDB and a Consul ResultStore and provisions a
ResultBackend on each, so it holds all four when HIGH starts and it pauses in HIGH's
favour: the case where a standby has something it could go on doing (the stores'
periodic checks ask the servers every few seconds: a paused replica must not).

Isolation. The session's `operator` fixture is standalone and watches every
namespace: it would reconcile these ResultBackends beside the replicas, and a change
"converged by the standby" could be its work. So this module never requests it, and
requests `session_operator_stopped`, which stops it for the module when an earlier
module started it (and starts it again after). The replicas watch only the test's
namespace, so they touch nothing of the other tests either.

What is counted is each process's `resultbackend_api_requests_total`: the operator's
own requests to the API server (kind x verb) and every HTTP request to the stores
(kinds CouchDB and Consul). Kopf's own requests (watches, peering keep-alives) are not
in it, so a standby's count is flat exactly when it does nothing.

Takeover time is Kopf's: a SIGKILLed peer stays in the peering object until its last
keep-alive is older than its lifetime (RBO_PEERING_LIFETIME, Kopf's
settings.peering.lifetime: 15 s in the tests), then the standby resumes, lists and
reconciles.
TAKEOVER bounds that wait; it is not a performance figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    OPERATOR_TEST_ENV,
    ConsulServer,
    CouchDBServer,
    Helm,
    Kubectl,
    OperatorProcess,
)
from tests.integration.helpers import (
    admin_secret,
    apply,
    condition,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    settled_version,
    try_get_json,
    unique,
    wait_for,
)
from tests.integration.isolated import (
    Samples,
    counter,
    delete_resultbackends,
    delete_stores,
    moved,
    namespaced_identity,
    namespaced_operator,
    requests_by_kind_verb,
    scrape,
    writes_and_store_requests,
)

pytestmark = pytest.mark.integration

LOW, HIGH = 100, 200
STORES = ("couchdb", "consul")
# The peering lifetime (RBO_PEERING_LIFETIME, 15 s in the tests) after the last
# keep-alive of the killed replica, then the standby's resume, listing and reconcile,
# on a shared 2-core machine.
TAKEOVER = 90.0
PAUSED = "Pausing operations in favour of"
RESUMED = "Resuming operations after the pause"


@dataclass(frozen=True)
class Replicas:
    namespace: str
    low: OperatorProcess
    high: OperatorProcess
    names: dict[str, str]  # store -> ResultBackend name


def worker(ns: str, store: str) -> dict[str, Any]:
    """A Deployment for the spec change to select; no replicas, no image is pulled."""
    name = f"{store}-worker"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"role": name}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "worker", "image": "python:3.11-slim"}]},
            },
        },
    }


def select_worker(kubectl: Kubectl, ns: str, name: str, store: str) -> None:
    """The spec change: workers.selector now selects the store's worker Deployment."""
    patch = {"spec": {"workers": {"selector": {"matchLabels": {"role": f"{store}-worker"}}}}}
    kubectl("patch", "resultbackend", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


def wait_converged(
    kubectl: Kubectl, ns: str, name: str, store: str, timeout: float = 60.0
) -> dict[str, Any]:
    """Ready, observedGeneration = generation, and the change applied: worker injected."""

    def probe() -> dict[str, Any] | None:
        obj = try_get_json(kubectl, "resultbackend", name, "-n", ns)
        if obj is None:
            return None
        status = obj.get("status") or {}
        ready = condition(obj, "Ready")
        if (
            ready
            and ready.get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
            and (status.get("workers") or {}).get("injected") == 1
        ):
            return obj
        return None

    obj = wait_for(f"{ns}/{name} to converge on its new workers.selector", probe, timeout)
    deployment = get_json(kubectl, "deployment", f"{store}-worker", "-n", ns)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "CELERY_RESULT_BACKEND" in {e["name"] for e in container.get("env", [])}
    return obj


@pytest.fixture
def replicas(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    helm: Helm,
    crd: None,
    namespace: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    tmp_path: Path,
    session_operator_stopped: None,
) -> Iterator[Replicas]:
    """LOW active with both ResultBackends Ready, then HIGH active and LOW paused."""
    peering = unique("rbo-peering")
    with namespaced_identity(helm, kubectl, namespace, tmp_path, peering=peering) as kubeconfig:

        def replica(priority: int) -> OperatorProcess:
            return namespaced_operator(
                stack_env,
                kubeconfig,
                tmp_path / f"operator-priority-{priority}.log",
                namespace,
                OPERATOR_TEST_ENV,
                "--peering",
                peering,
                "--priority",
                str(priority),
            )

        low, high = replica(LOW), replica(HIGH)
        names = {store: unique(store) for store in STORES}
        apply(
            kubectl,
            couchdb_admin_secret(namespace, "couch-admin", couchdb_server),
            admin_secret(namespace, "consul-admin", {"token": consul_server.management_token}),
            couchdb_store(namespace, "couchdb", couchdb_server.url, "couch-admin"),
            consul_store(namespace, "consul", consul_server.url, "consul-admin"),
            *(result_backend(namespace, names[store], store, "Delete") for store in STORES),
            *(worker(namespace, store) for store in STORES),
        )
        try:
            low.start()
            for name in names.values():
                settled_version(kubectl, namespace, name)
            # Only LOW runs in this namespace: what made them Ready was LOW.
            assert writes_and_store_requests(scrape(low)), "LOW counted no request"

            high.start()
            wait_for(
                "the low-priority replica to pause in favour of the other",
                lambda: PAUSED in low.logs,
            )
            low.assert_running()

            # HIGH's first run of each ResultBackend (its resume at start-up).
            def high_reconciled() -> bool:
                now = scrape(high)
                return all(
                    counter(now, "resultbackend_reconciles_total", store=store) > 0
                    for store in STORES
                )

            wait_for("the high-priority replica's first reconcile of each", high_reconciled)
            yield Replicas(namespace=namespace, low=low, high=high, names=names)
        finally:
            delete_resultbackends(kubectl, namespace)
            delete_stores(kubectl, namespace)
            high.stop()
            low.stop()


def test_the_paused_replica_sends_no_api_write_and_no_store_request(
    replicas: Replicas, kubectl: Kubectl
) -> None:
    ns, low, high = replicas.namespace, replicas.low, replicas.high
    low_before = writes_and_store_requests(scrape(low))
    high_before = requests_by_kind_verb(scrape(high))

    # The window: a spec change of each ResultBackend, which the active replica
    # reconciles (it injects the newly selected worker) ...
    for store, name in replicas.names.items():
        select_worker(kubectl, ns, name, store)
    for store, name in replicas.names.items():
        wait_converged(kubectl, ns, name, store)
    after_change = scrape(high)
    injections = requests_by_kind_verb(after_change).get(("Deployment", "patch"), 0.0)
    assert injections >= high_before.get(("Deployment", "patch"), 0.0) + 2, (
        "the active replica did not inject the two workers itself"
    )

    # ... and periodic checks of each that it ran after that change, by its own count.
    def checks_after_change(now: Samples) -> list[float]:
        return [
            counter(now, "resultbackend_backend_checks_total", store=store)
            - counter(after_change, "resultbackend_backend_checks_total", store=store)
            for store in STORES
        ]

    wait_for(
        "two more checks of each store by the active replica",
        lambda: all(n >= 2 for n in checks_after_change(scrape(high))),
    )

    low.assert_running()
    sent = moved(low_before, writes_and_store_requests(scrape(low)))
    assert sent == {}, (
        f"the paused replica (priority {LOW}) sent API writes or store requests while "
        f"the other (priority {HIGH}) was active: {sent}"
    )


def test_the_standby_takes_over_when_the_active_replica_is_killed_and_converges_a_change(
    replicas: Replicas, kubectl: Kubectl
) -> None:
    ns, low, high = replicas.namespace, replicas.low, replicas.high
    low_before = requests_by_kind_verb(scrape(low))

    high.stop(kill=True)  # SIGKILL: it leaves no goodbye in the peering object
    # Changed while no replica is active: only the standby, once resumed, can converge it.
    for store, name in replicas.names.items():
        select_worker(kubectl, ns, name, store)
    for store, name in replicas.names.items():
        wait_converged(kubectl, ns, name, store, timeout=TAKEOVER)

    assert RESUMED in low.logs, "the standby never logged its resume"
    injections = requests_by_kind_verb(scrape(low)).get(("Deployment", "patch"), 0.0)
    assert injections >= low_before.get(("Deployment", "patch"), 0.0) + 2, (
        "the standby did not inject the two workers itself"
    )
