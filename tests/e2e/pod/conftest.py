"""Fixtures of the tests that run the operator as a pod (see test_operator_pod.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import CHART, Helm, Kubectl, free_port
from tests.integration.helpers import get_json


@dataclass(frozen=True)
class OperatorPod:
    release: str
    namespace: str  # the operator's
    watched: str  # the one namespace it watches
    image: str
    health_port: int
    metrics_port: int

    def pods(self, kubectl: Kubectl) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/instance={self.release}"
        items = get_json(kubectl, "pods", "-n", self.namespace, "-l", selector)["items"]
        return list(items)


@pytest.fixture(scope="session")
def operator_pod(
    kubectl: Kubectl,
    helm: Helm,
    crd: None,
    operator_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorPod]:
    suffix = uuid.uuid4().hex[:6]
    pod = OperatorPod(
        release=f"rbo-pod-{suffix}",
        namespace=f"rbo-pod-{suffix}",
        watched=f"t-pod-{suffix}",
        image=operator_image,
        health_port=int(free_port()),
        metrics_port=int(free_port()),
    )
    kubectl("create", "namespace", pod.watched)
    repository, _, tag = operator_image.rpartition(":")
    server = json.loads(kubectl("config", "view", "-o", "json").stdout)["clusters"][0]
    host, _, port = server["cluster"]["server"].removeprefix("https://").rpartition(":")
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "watch": {"scope": "namespaces", "namespaces": [pod.watched]},
        "hostNetwork": True,
        "healthPort": pod.health_port,
        "metrics": {"enabled": True, "port": pod.metrics_port},
        "checkInterval": 3,
        "credentialCheckInterval": 6,
        "verbose": True,
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": host},
            {"name": "KUBERNETES_SERVICE_PORT", "value": port},
            {"name": "RBO_BACKOFF", "value": "1"},
            {"name": "RBO_MAX_BACKOFF", "value": "5"},
        ],
    }
    values_file = tmp_path_factory.mktemp("operator-pod") / "values.json"
    values_file.write_text(json.dumps(values))
    try:
        helm(
            "install",
            pod.release,
            str(CHART),
            "--namespace",
            pod.namespace,
            "--create-namespace",
            "--skip-crds",
            "--wait",
            "--timeout=180s",
            "--values",
            str(values_file),
        )
        yield pod
    finally:
        # The ResultBackends first: their finalizer needs the operator.
        kubectl("delete", "rb", "--all", "-n", pod.watched, "--timeout=90s", check=False)
        # Then the stores (their finalizer too).
        kubectl("delete", "rstore", "--all", "-n", pod.watched, "--timeout=60s", check=False)
        helm("uninstall", pod.release, "--namespace", pod.namespace, "--wait", check=False)
        kubectl("delete", "namespace", pod.watched, pod.namespace, "--wait=false", check=False)
