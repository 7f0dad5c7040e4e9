"""Fixtures of the e2e tests: a ResultBackend per store with its worker Deployment."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    OPERATOR_NAMESPACE,
    ConsulServer,
    CouchDBServer,
    Kubectl,
    OperatorProcess,
)
from tests.e2e.harness import Pod, Workers, e2e_python, injected_env, worker_deployment
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


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Every worker a test starts is stopped (SIGTERM, then SIGKILL) when it ends."""
    ws = Workers(tmp_path)
    yield ws
    ws.stop_all()


@pytest.fixture(scope="session")
def broker(stack_env: dict[str, str]) -> str:
    url = stack_env.get("REDIS_URL")
    if not url:
        pytest.fail("REDIS_URL is not set by the devstack environment", pytrace=False)
    e2e_python()
    return url


@dataclass
class Backend:
    """A Ready ResultBackend selecting one worker Deployment, and that worker's env."""

    namespace: str
    name: str
    deployment: str
    config_hash: str
    pod: Pod
    status: dict[str, object]

    @property
    def secret(self) -> str:
        return f"{self.name}-result-backend"


def ready_backend(
    kubectl: Kubectl, namespace: str, rb: dict[str, object], deployment: str, broker: str
) -> Backend:
    name = str(rb["metadata"]["name"])  # type: ignore[index]
    apply(kubectl, worker_deployment(namespace, deployment, {"celery": deployment}), rb)
    obj = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=90)
    digest, env = injected_env(kubectl, namespace, deployment)
    return Backend(namespace, name, deployment, digest, Pod(env=env, broker=broker), obj["status"])


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
    # waits (InUse) for its ResultBackend, whose deletion needs the admin Secret.
    kubectl("delete", "crstore", name, "--timeout=120s", check=False)
    kubectl("delete", "secret", name, "-n", OPERATOR_NAMESPACE, "--wait=false", check=False)


@pytest.fixture
def couchdb_backend(
    kubectl: Kubectl,
    couchdb_cluster_store: str,
    namespace: str,
    operator: OperatorProcess,
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
    return ready_backend(kubectl, namespace, rb, "orders-worker", broker)


@pytest.fixture
def consul_backend(
    kubectl: Kubectl,
    namespace: str,
    consul_server: ConsulServer,
    operator: OperatorProcess,
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
    return ready_backend(kubectl, namespace, rb, "billing-worker", broker)
