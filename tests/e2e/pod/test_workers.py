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
import uuid
from typing import Any

import pytest
import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl
from tests.e2e.harness import assert_result_contract, consul_value, couchdb_doc
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

HASH = "resultstores.io/config-hash"
BACKENDS = {
    "couchdb": "celery_resultstores.couchdb.CouchBackend",
    "consul": "celery_resultstores.consul.ConsulBackend",
}


def worker_deployment(ns: str, name: str, image: str, broker: str) -> dict[str, Any]:
    """The user's Celery worker: one pod, on the node's network (the devstack's
    servers answer on its loopback), a queue of its own (the Redis is shared)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {"celery": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostNetwork": True,
                    "terminationGracePeriodSeconds": 10,
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": [
                                "worker",
                                "--pool=solo",
                                "--loglevel=INFO",
                                "--without-mingle",
                                "--without-gossip",
                                "--without-heartbeat",
                            ],
                            "env": [
                                {"name": "CELERY_BROKER_URL", "value": broker},
                                {"name": "E2E_QUEUE", "value": f"e2e-{uuid.uuid4().hex[:10]}"},
                            ],
                        }
                    ],
                },
            },
        },
    }


def _ready_worker(kubectl: Kubectl, ns: str, name: str, old_hash: str | None = None) -> str:
    """The name of the worker pod that runs the injected template, once Celery is ready;
    with `old_hash`, of a template injected with another configuration than that."""

    def injected() -> dict[str, Any] | None:
        d = get_json(kubectl, "deployment", name, "-n", ns)
        digest = (d["spec"]["template"]["metadata"].get("annotations") or {}).get(HASH)
        return d if digest and digest != old_hash else None

    live = wait_for(f"the injection into deployment/{name}", injected, timeout=90)
    digest = live["spec"]["template"]["metadata"]["annotations"][HASH]
    kubectl("rollout", "status", f"deployment/{name}", "-n", ns, "--timeout=120s")

    def ready_pod() -> str | None:
        pods = get_json(kubectl, "pods", "-n", ns, "-l", f"app={name}")["items"]
        # Only the injected pod is left: a pod from before the injection, even one
        # shutting down, shares the queue and could take a task and store nowhere.
        if len(pods) != 1:
            return None
        (pod,) = pods
        if (pod["metadata"].get("annotations") or {}).get(HASH) != digest:
            return None
        logs = kubectl("logs", pod["metadata"]["name"], "-n", ns, check=False).stdout
        return str(pod["metadata"]["name"]) if " ready." in logs else None

    return wait_for(f"a ready Celery worker of deployment/{name}", ready_pod, timeout=90)


def _client(kubectl: Kubectl, ns: str, pod: str, *args: str) -> dict[str, Any]:
    res = kubectl("exec", pod, "-n", ns, "--", "python", "/app/client.py", *args, check=False)
    if res.returncode != 0:
        logs = kubectl("logs", pod, "-n", ns, check=False).stdout
        raise AssertionError(
            f"client {args} failed:\n{res.stderr[-3000:]}\nworker:\n{logs[-5000:]}"
        )
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


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
    apply(kubectl, worker_deployment(ns, name, worker_image, stack_env["REDIS_URL"]))
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
    pod = _ready_worker(kubectl, ns, name)

    out = _client(kubectl, ns, pod, "contract")
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
    apply(kubectl, worker_deployment(ns, name, worker_image, stack_env["REDIS_URL"]))
    apply(
        kubectl,
        admin_secret(ns, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(ns, "consul", consul_server.url, "consul-mgmt"),
    )
    rb = result_backend(ns, "rotating", "consul", "Delete",
                        workers={"selector": {"matchLabels": {"celery": name}}})  # fmt: skip
    apply(kubectl, rb)
    wait_condition(kubectl, ns, "rotating", "Ready", "True", timeout=120)
    pod = _ready_worker(kubectl, ns, name)
    assert _client(kubectl, ns, pod, "add")["value"] == 5
    old_token = base64.b64decode(
        get_json(kubectl, "secret", "rotating-result-backend", "-n", ns)["data"]["token"]
    ).decode()
    replicasets = len(get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={name}")["items"])
    old_hash = get_json(kubectl, "pod", pod, "-n", ns)["metadata"]["annotations"][HASH]

    trigger = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = {"spec": {"rotation": {"trigger": trigger}}}
    kubectl("patch", "rb", "rotating", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    new_pod = _ready_worker(kubectl, ns, name, old_hash=old_hash)
    assert new_pod != pod
    assert _client(kubectl, ns, new_pod, "add")["value"] == 5

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
