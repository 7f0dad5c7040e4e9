"""The operator as users run it: the Dockerfile's image, installed with `helm install`.

The image is built locally from the project's Dockerfile (`devstack/stack images`)
and loaded into the devstack node's containerd; the chart runs it as a pod. Its
API server and stores answer on the node's loopback, so the pod uses the node's
network (`hostNetwork`) and is told the API server's address there.

These tests run in a pytest session of their own (`make e2e`): no operator process
may run beside the pod, or two operators would handle the same ResultBackends.
"""

from __future__ import annotations

import base64
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CouchDBServer, Kubectl
from tests.e2e.harness import HASH, pod_ready
from tests.e2e.pod.conftest import OperatorPod
from tests.integration.helpers import (
    apply,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    wait_condition,
    wait_for,
)

BUSYBOX = "localhost/rbo/busybox:1"


def test_the_operator_pod_becomes_ready_through_its_probes(
    kubectl: Kubectl, operator_pod: OperatorPod
) -> None:
    (pod,) = operator_pod.pods(kubectl)
    assert pod["status"]["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    (container,) = pod["status"]["containerStatuses"]
    assert container["restartCount"] == 0
    assert container["image"].endswith(operator_pod.image.removeprefix("localhost/"))
    spec = pod["spec"]["containers"][0]
    assert spec["readinessProbe"]["httpGet"]["port"] == "health"
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    # The uid the image and the chart agree on, from inside the running container.
    out = kubectl("exec", pod["metadata"]["name"], "-n", operator_pod.namespace, "--",
                  "python", "-c", "import os; print(os.getuid(), os.getgid())")  # fmt: skip
    assert out.stdout.split() == ["10001", "10001"]


def test_the_operator_pod_reconciles_a_resultbackend_to_ready(
    kubectl: Kubectl, operator_pod: OperatorPod, couchdb_server: CouchDBServer
) -> None:
    ns = operator_pod.watched
    apply(
        kubectl,
        couchdb_admin_secret(ns, "couch-admin", couchdb_server),
        couchdb_store(ns, "couchdb", couchdb_server.url, "couch-admin"),
    )
    apply(kubectl, result_backend(ns, "orders", "couchdb", "Delete"))
    obj = wait_condition(kubectl, ns, "orders", "Ready", "True", timeout=120)
    assert obj["status"]["url"].startswith("couchdb://")
    secret = wait_for(
        "the worker Secret",
        lambda: (
            kubectl("get", "secret", "orders-result-backend", "-n", ns, check=False).returncode == 0
        ),
        timeout=30,
    )
    assert secret
    (pod,) = operator_pod.pods(kubectl)
    logs = kubectl("logs", pod["metadata"]["name"], "-n", operator_pod.namespace).stdout
    assert "orders" in logs
    assert couchdb_server.admin_password not in logs


def _worker(ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A worker Deployment with real pods (busybox standing for Celery here)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {"name": "worker", "image": BUSYBOX, "command": ["sleep", "3600"]}
                    ],
                },
            },
        },
    }


def _metric(port: int, name: str, **labels: str) -> float:
    """A sample of the operator pod's Prometheus metrics (0 when absent)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _replicasets(kubectl: Kubectl, ns: str, app: str) -> int:
    return len(get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={app}")["items"])


def test_a_worker_gets_the_env_from_the_kubelet_and_a_new_operator_pod_rolls_nothing(
    kubectl: Kubectl, operator_pod: OperatorPod, couchdb_server: CouchDBServer
) -> None:
    ns = operator_pod.watched
    apply(
        kubectl,
        couchdb_admin_secret(ns, "couch-admin", couchdb_server),
        couchdb_store(ns, "couchdb", couchdb_server.url, "couch-admin"),
    )
    apply(kubectl, _worker(ns, "invoices-worker", {"celery": "invoices"}))
    apply(
        kubectl,
        result_backend(
            ns,
            "invoices",
            "couchdb",
            "Delete",
            workers={"selector": {"matchLabels": {"celery": "invoices"}}},
        ),
    )
    wait_condition(kubectl, ns, "invoices", "Ready", "True", timeout=120)
    wait_for(
        "the injection",
        lambda: (
            HASH
            in (
                get_json(kubectl, "deployment", "invoices-worker", "-n", ns)["spec"]["template"][
                    "metadata"
                ].get("annotations")
                or {}
            )
        ),
        timeout=60,
    )
    kubectl("rollout", "status", "deployment/invoices-worker", "-n", ns, "--timeout=120s")
    # The kubelet resolved the secretKeyRef: the running worker has the URL (read inside
    # the pod and compared there; the value, a credential, is never printed).
    secret = get_json(kubectl, "secret", "invoices-result-backend", "-n", ns)
    expected = base64.b64decode(secret["data"]["uri"]).decode()
    check = kubectl(
        "exec", "deployment/invoices-worker", "-n", ns, "--", "sh", "-c",
        'test "$CELERY_RESULT_BACKEND" = "$0" && echo same', expected,
    )  # fmt: skip
    assert check.stdout.strip() == "same"
    generation = get_json(kubectl, "deployment", "invoices-worker", "-n", ns)["metadata"][
        "generation"
    ]
    replicasets = _replicasets(kubectl, ns, "invoices-worker")

    (old,) = operator_pod.pods(kubectl)
    kubectl("delete", "pod", old["metadata"]["name"], "-n", operator_pod.namespace)

    def replacement_ready() -> bool:
        pods = [
            p
            for p in operator_pod.pods(kubectl)
            if p["metadata"]["name"] != old["metadata"]["name"]
        ]
        return any(pod_ready(p) for p in pods)

    wait_for("a Ready replacement operator pod", replacement_ready, timeout=120)
    # The replacement has reconciled the ResultBackends it found (resume) and checked
    # their store since: it converged.
    wait_for(
        "the replacement's reconciles and a worker-credentials check",
        lambda: (
            _metric(
                operator_pod.metrics_port,
                "resultbackend_reconciles_total",
                store="couchdb",
                outcome="ok",
            )
            >= 1
            and _metric(
                operator_pod.metrics_port,
                "resultbackend_backend_checks_total",
                store="couchdb",
                result="ok",
            )
            >= 1
        ),
        timeout=120,
    )
    live = get_json(kubectl, "deployment", "invoices-worker", "-n", ns)
    assert live["metadata"]["generation"] == generation
    assert _replicasets(kubectl, ns, "invoices-worker") == replicasets
