"""Real Celery worker pods storing results under the Consul key prefix the operator
provisioned.

The worker's token is the one the operator created (CONSUL_HTTP_TOKEN from the
Secret, resolved by the kubelet); the tests read the store with the management token.
"""

from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import ConsulServer, Kubectl
from tests.e2e.conftest import Backend
from tests.e2e.harness import (
    assert_result_contract,
    client,
    consul_key,
    consul_value,
    injected_hash,
    logs,
    new_queue,
    ready_worker,
    secret_env,
    wait_gone,
    worker_deployment,
)
from tests.integration.helpers import apply, wait_for

pytestmark = pytest.mark.e2e

FIXED = "celery_resultstores.consul.ConsulBackend"
STOCK = "celery.backends.consul.ConsulBackend"


def _prefix(backend: Backend) -> str:
    return str(backend.status["consul"]["keyPrefix"])  # type: ignore[index]


def test_the_kubelet_resolves_the_injected_env_beside_the_users(consul_backend: Backend) -> None:
    env = consul_backend.env
    assert env["CELERY_RESULT_BACKEND"].startswith("consul://")
    assert env["CELERY_RESULT_BACKEND"].endswith(f"/{_prefix(consul_backend)}")
    assert re.fullmatch(r"[0-9a-f-]{36}", env["CONSUL_HTTP_TOKEN"])
    assert env["WORKER_TAG"] == "eu-1-e2e"


def test_celery_result_contract(
    kubectl: Kubectl, consul_backend: Backend, consul_server: ConsulServer
) -> None:
    b = consul_backend
    out = client(kubectl, b.namespace, b.pod, "contract")
    prefix = _prefix(consul_backend)

    # The worker image has contrib/celery-resultstores: its entry point serves consul://.
    assert_result_contract(out, FIXED)

    stored = consul_value(consul_server, prefix, out["add"]["id"])
    assert stored is not None
    assert (stored["status"], stored["result"]) == ("SUCCESS", 5)
    failed = consul_value(consul_server, prefix, out["fail"]["id"])
    assert failed is not None
    assert (failed["status"], failed["result"]["exc_type"]) == ("FAILURE", "ValueError")
    for task_id in out["group"]["ids"]:
        assert consul_value(consul_server, prefix, task_id) is not None

    assert out["forgotten"]["value"] == 42
    assert consul_key(consul_server, prefix, out["forgotten"]["id"]).status_code == 404
    assert out["forgotten"]["state_after"] == "PENDING"


@pytest.mark.parametrize(("task", "first"), [("tracked", "STARTED"), ("retry_once", "RETRY")])
def test_a_result_written_twice_ends_in_its_final_state(
    kubectl: Kubectl, consul_backend: Backend, consul_server: ConsulServer, task: str, first: str
) -> None:
    b = consul_backend
    out = client(kubectl, b.namespace, b.pod, "double-write", task)
    assert out["backend"] == FIXED
    assert not out["timed_out"]
    assert out["state"] == "SUCCESS"
    assert out["value"]["value"] == "final"
    assert out["value"]["seen"] == first  # the first write happened, and was replaced
    stored = consul_value(consul_server, _prefix(consul_backend), out["id"])
    assert stored is not None
    assert stored["status"] == "SUCCESS"


@pytest.mark.parametrize(("task", "first"), [("tracked", "STARTED"), ("retry_once", "RETRY")])
def test_stock_celery_consul_backend_loses_the_final_write(
    kubectl: Kubectl,
    consul_backend: Backend,
    consul_server: ConsulServer,
    worker_image: str,
    broker: str,
    task: str,
    first: str,
) -> None:
    """Documents the bug that celery_resultstores.consul fixes (tests/e2e/CONSUL_FINDINGS.md).

    Celery's own class, chosen explicitly by its class path in the URL, writes each
    state through a new session; the key is still held by the first write's session,
    so Consul refuses the SUCCESS write and the client keeps reading the first state.
    The worker is a Deployment the ResultBackend does not select: it takes the
    Secret's keys itself and prefixes the URL with the class (`$(RESULT_URI)`).
    """
    b = consul_backend
    env = [
        secret_env("RESULT_URI", b.secret, "uri"),
        secret_env("CONSUL_HTTP_TOKEN", b.secret, "token"),
        {"name": "CELERY_RESULT_BACKEND", "value": f"{STOCK}+$(RESULT_URI)"},
    ]
    apply(kubectl, worker_deployment(b.namespace, "stock-worker", worker_image, broker,
                                     new_queue(), env=env))  # fmt: skip
    pod = ready_worker(kubectl, b.namespace, "stock-worker")
    out = client(kubectl, b.namespace, pod, "double-write", task, "8")
    assert out["backend"] == STOCK
    wait_for(
        "the worker to finish the task",
        lambda: f"[{out['id']}] succeeded" in logs(kubectl, b.namespace, pod),
        timeout=60,
    )
    # The task succeeded, yet the store and every client still say `first`.
    assert out["timed_out"]
    assert out["state"] == first
    stored = consul_value(consul_server, _prefix(b), out["id"])
    assert stored is not None
    assert stored["status"] == first
    assert client(kubectl, b.namespace, pod, "state", out["id"])["state"] == first


def test_results_expire_through_their_session_ttl(
    kubectl: Kubectl, consul_backend: Backend, consul_server: ConsulServer
) -> None:
    ttl = 10  # Consul's minimum session TTL; result_expires becomes the session's TTL
    b = consul_backend
    # The user's change of the worker's env rolls it out; the injection stays.
    kubectl("set", "env", f"deployment/{b.deployment}", "-n", b.namespace,
            f"E2E_RESULT_EXPIRES={ttl}")  # fmt: skip
    pod = ready_worker(kubectl, b.namespace, b.deployment)  # `rollout status` waits for it
    assert pod != b.pod
    assert injected_hash(kubectl, b.namespace, b.deployment) == b.config_hash
    prefix = _prefix(b)
    once = client(kubectl, b.namespace, pod, "add")
    twice = client(kubectl, b.namespace, pod, "double-write", "tracked")  # session renewed
    assert once["value"] == 5
    assert twice["state"] == "SUCCESS"

    entry = consul_key(consul_server, prefix, once["id"])
    assert entry.status_code == 200, "the result expired before its TTL"
    session = requests.get(
        f"{consul_server.url}/v1/session/info/{entry.json()[0]['Session']}",
        headers={"X-Consul-Token": consul_server.management_token},
        timeout=10,
    ).json()[0]
    assert (session["TTL"], session["Behavior"]) == (f"{ttl}s", "delete")

    # Consul invalidates a session between TTL and 2 x TTL after its last renewal.
    for task_id in (once["id"], twice["id"]):
        wait_gone(
            f"result {task_id}",
            lambda task_id=task_id: consul_key(consul_server, prefix, task_id).status_code,
            timeout=2 * ttl + 20,
        )
    assert client(kubectl, b.namespace, pod, "state", once["id"])["state"] == "PENDING"
    assert client(kubectl, b.namespace, pod, "state", twice["id"])["state"] == "PENDING"
