"""Fixtures of the e2e tests: the images, a ResultBackend per store with its worker
Deployment (real pods of the worker image on the devstack node)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import (
    OPERATOR_NAMESPACE,
    STACK,
    ConsulServer,
    CouchDBServer,
    Kubectl,
    OperatorProcess,
)
from tests.e2e.harness import (
    injected_hash,
    new_queue,
    pod_env,
    ready_worker,
    worker_deployment,
)
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    result_backend,
    unique,
    wait_condition,
)


@pytest.fixture(scope="session")
def images(stack_env: dict[str, str]) -> dict[str, str]:
    """{"operator": reference, "worker": reference}: built when their inputs changed
    (`make images` did it already) and loaded into the node."""
    res = subprocess.run(
        [str(STACK), "images"], capture_output=True, text=True, env={**os.environ, **stack_env}
    )
    if res.returncode != 0:
        pytest.fail(f"devstack/stack images failed:\n{res.stderr}", pytrace=False)
    return dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())


@pytest.fixture(scope="session")
def operator_image(images: dict[str, str]) -> str:
    return images["operator"]


@pytest.fixture(scope="session")
def worker_image(images: dict[str, str]) -> str:
    return images["worker"]


@pytest.fixture(scope="session")
def broker(stack_env: dict[str, str]) -> str:
    url = stack_env.get("REDIS_URL")
    if not url:
        pytest.fail("REDIS_URL is not set by the devstack environment", pytrace=False)
    return url


@dataclass
class Backend:
    """A Ready ResultBackend selecting one worker Deployment, and that worker's pod."""

    namespace: str
    name: str
    deployment: str
    queue: str
    config_hash: str
    pod: str
    env: dict[str, str] = field(repr=False)  # the pod's, resolved by the kubelet: secrets
    status: dict[str, object]

    @property
    def secret(self) -> str:
        return f"{self.name}-result-backend"


WORKER_ENV = [
    {"name": "WORKER_REGION", "value": "eu-1"},
    {"name": "WORKER_TAG", "value": "$(WORKER_REGION)-e2e"},
]


def ready_backend(
    kubectl: Kubectl,
    namespace: str,
    rb: dict[str, Any],
    deployment: str,
    image: str,
    broker: str,
) -> Backend:
    """Applies `rb` and the worker Deployment it selects; once Ready and rolled out."""
    name = str(rb["metadata"]["name"])
    queue = new_queue()
    manifest = worker_deployment(namespace, deployment, image, broker, queue, env=WORKER_ENV)
    apply(kubectl, manifest, rb)
    obj = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=90)
    digest = injected_hash(kubectl, namespace, deployment)
    pod = ready_worker(kubectl, namespace, deployment, digest)
    env = pod_env(kubectl, namespace, pod)
    return Backend(namespace, name, deployment, queue, digest, pod, env, obj["status"])


@pytest.fixture
def couchdb_cluster_store(
    kubectl: Kubectl, couchdb_server: CouchDBServer, operator: OperatorProcess
) -> Iterator[str]:
    """A CouchDB ClusterResultStore, its admin Secret in the operator's cluster resource
    namespace (where the chart would put it); deleted after the test (it waits, InUse,
    until the ResultBackends of the test's namespace are gone)."""
    name = unique("couchdb")
    apply(kubectl, couchdb_admin_secret(OPERATOR_NAMESPACE, name, couchdb_server))
    apply(
        kubectl,
        couchdb_store("", name, couchdb_server.url, name, kind="ClusterResultStore"),
    )
    yield name
    # After the test's namespace went (couchdb_backend sets this up first): the store
    # waits (InUse) for its ResultBackend, whose deletion needs the admin Secret, so
    # the Secret goes only once the store has gone (else both would be stuck).
    gone = kubectl("delete", "crstore", name, "--timeout=120s", check=False).returncode == 0
    if gone:
        kubectl("delete", "secret", name, "-n", OPERATOR_NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def couchdb_backend(
    kubectl: Kubectl,
    couchdb_cluster_store: str,
    namespace: str,
    operator: OperatorProcess,
    worker_image: str,
    broker: str,
) -> Backend:
    """A ResultBackend of a CouchDB ClusterResultStore."""
    rb = result_backend(
        namespace,
        unique("orders"),
        couchdb_cluster_store,
        "Delete",
        kind="ClusterResultStore",
        workers={"selector": {"matchLabels": {"celery": "orders-worker"}}},
    )
    return ready_backend(kubectl, namespace, rb, "orders-worker", worker_image, broker)


@pytest.fixture
def consul_backend(
    kubectl: Kubectl,
    namespace: str,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    worker_image: str,
    broker: str,
) -> Backend:
    """A ResultBackend of a Consul ResultStore of its own namespace."""
    apply(
        kubectl,
        admin_secret(namespace, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(namespace, "consul", consul_server.url, "consul-mgmt"),
    )
    rb = result_backend(
        namespace,
        unique("billing"),
        "consul",
        "Delete",
        workers={"selector": {"matchLabels": {"celery": "billing-worker"}}},
    )
    return ready_backend(kubectl, namespace, rb, "billing-worker", worker_image, broker)
