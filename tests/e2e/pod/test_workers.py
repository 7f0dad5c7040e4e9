"""Real Celery workers as pods: the worker image, the env the kubelet resolved.

The worker Deployment runs `celery worker` from the worker image
(tests/e2e/worker/Dockerfile); the operator pod injects CELERY_RESULT_BACKEND (and
for Consul CONSUL_HTTP_TOKEN) as secretKeyRefs, and the kubelet resolves them. The
client runs in the worker's pod (`kubectl exec`), with exactly that environment.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl
from tests.e2e.harness import (
    HASH,
    assert_result_contract,
    client,
    consul_value,
    couchdb_doc,
    injected_hash,
    new_queue,
    ready_worker,
    worker_deployment,
)
from tests.e2e.pod.conftest import OperatorPod
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    wait_condition,
    wait_for,
)

BACKENDS = {
    "couchdb": "celery_resultstores.couchdb.CouchBackend",
    "consul": "celery_resultstores.consul.ConsulBackend",
}


def _worker(ns: str, name: str, image: str, broker: str) -> dict[str, Any]:
    return worker_deployment(ns, name, image, broker, new_queue())


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_tasks_round_trip_through_the_store_from_worker_pods(
    kubectl: Kubectl,
    operator_pod: OperatorPod,
    worker_image: str,
    stack_env: dict[str, str],
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    store: str,
) -> None:
    ns = operator_pod.watched
    name = f"{store}-worker"
    apply(kubectl, _worker(ns, name, worker_image, stack_env["REDIS_URL"]))
    workers = {"selector": {"matchLabels": {"celery": name}}}
    if store == "couchdb":
        # A ResultStore: this operator watches one namespace, and such an operator
        # serves no ClusterResultStore (tests/e2e/test_couchdb.py uses one).
        apply(
            kubectl,
            couchdb_admin_secret(ns, "couch-admin", couchdb_server),
            couchdb_store(ns, "couchdb", couchdb_server.url, "couch-admin"),
        )
        rb = result_backend(ns, f"{store}-tasks", "couchdb", "Delete", workers=workers)
    else:
        apply(
            kubectl,
            admin_secret(ns, "consul-mgmt", {"token": consul_server.management_token}),
            consul_store(ns, "consul", consul_server.url, "consul-mgmt"),
        )
        rb = result_backend(ns, f"{store}-tasks", "consul", "Delete", workers=workers)
    apply(kubectl, rb)
    status = wait_condition(kubectl, ns, f"{store}-tasks", "Ready", "True", timeout=120)["status"]
    pod = ready_worker(kubectl, ns, name, injected_hash(kubectl, ns, name))

    out = client(kubectl, ns, pod, "contract")
    # Celery picked the backend from the env the kubelet resolved from the Secret.
    assert_result_contract(out, BACKENDS[store])
    # The results are in the store the operator provisioned, written by the worker pod.
    if store == "couchdb":
        doc = couchdb_doc(couchdb_server, status["couchdb"]["database"], out["add"]["id"])
        assert doc.status_code == 200, doc.text
        assert json.loads(doc.json()["value"])["result"] == 5
    else:
        stored = consul_value(consul_server, status["consul"]["keyPrefix"], out["add"]["id"])
        assert stored is not None
        assert (stored["status"], stored["result"]) == ("SUCCESS", 5)
    logs = kubectl("logs", pod, "-n", ns).stdout
    assert f"[{out['add']['id']}] succeeded" in logs


def test_a_rotation_rolls_the_worker_pods_once_and_revokes_after_the_rollout(
    kubectl: Kubectl,
    operator_pod: OperatorPod,
    worker_image: str,
    stack_env: dict[str, str],
    consul_server: ConsulServer,
) -> None:
    """The old Consul token is revoked because the workers rolled out (not because the
    grace period, 600 s by default, ended), and the rotation rolled them exactly once."""
    ns = operator_pod.watched
    name = "rotating-worker"
    apply(kubectl, _worker(ns, name, worker_image, stack_env["REDIS_URL"]))
    apply(
        kubectl,
        admin_secret(ns, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(ns, "consul", consul_server.url, "consul-mgmt"),
    )
    rb = result_backend(ns, "rotating", "consul", "Delete",
                        workers={"selector": {"matchLabels": {"celery": name}}})  # fmt: skip
    apply(kubectl, rb)
    wait_condition(kubectl, ns, "rotating", "Ready", "True", timeout=120)
    pod = ready_worker(kubectl, ns, name, injected_hash(kubectl, ns, name))
    assert client(kubectl, ns, pod, "add")["value"] == 5
    old_token = base64.b64decode(
        get_json(kubectl, "secret", "rotating-result-backend", "-n", ns)["data"]["token"]
    ).decode()
    replicasets = len(get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={name}")["items"])
    old_hash = get_json(kubectl, "pod", pod, "-n", ns)["metadata"]["annotations"][HASH]

    trigger = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {"spec": {"rotation": {"trigger": trigger}}}
    kubectl("patch", "rb", "rotating", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    new_pod = ready_worker(kubectl, ns, name, injected_hash(kubectl, ns, name, old=old_hash))
    assert new_pod != pod
    assert client(kubectl, ns, new_pod, "add")["value"] == 5

    def revoked() -> str | None:
        events = get_json(kubectl, "events", "-n", ns, "--field-selector",
                          "involvedObject.name=rotating,reason=Revoked")["items"]  # fmt: skip
        return str(events[0]["message"]) if events else None

    message = wait_for("the Revoked Event", revoked, timeout=120)
    assert "every injected workload rolled out" in message
    refused = requests.get(
        f"{consul_server.url}/v1/acl/token/self", headers={"X-Consul-Token": old_token}, timeout=10
    )
    assert refused.status_code == 403, refused.text
    rolled = len(get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={name}")["items"])
    assert rolled == replicasets + 1
