"""Real Celery workers storing results under the Consul key prefix the operator provisioned.

The worker's token is the one the operator created (CONSUL_HTTP_TOKEN from the
Secret); the tests read the store with the management token.
"""

from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import ConsulServer
from tests.e2e.conftest import Backend
from tests.e2e.harness import (
    Pod,
    Workers,
    assert_result_contract,
    client,
    consul_key,
    consul_value,
    wait_gone,
)
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.e2e

FIXED = "celery_resultstores.consul.ConsulBackend"
STOCK = "celery.backends.consul.ConsulBackend"


def _prefix(backend: Backend) -> str:
    return str(backend.status["consul"]["keyPrefix"])  # type: ignore[index]


def test_injected_env_is_what_the_worker_needs(consul_backend: Backend) -> None:
    env = consul_backend.pod.env
    assert env["CELERY_RESULT_BACKEND"].startswith("consul://")
    assert env["CELERY_RESULT_BACKEND"].endswith(f"/{_prefix(consul_backend)}")
    assert re.fullmatch(r"[0-9a-f-]{36}", env["CONSUL_HTTP_TOKEN"])
    assert env["WORKER_TAG"] == "eu-1-e2e"


def test_celery_result_contract(
    consul_backend: Backend, consul_server: ConsulServer, workers: Workers
) -> None:
    workers.start(consul_backend.pod)
    out = client(consul_backend.pod, "contract")
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
    consul_backend: Backend, consul_server: ConsulServer, workers: Workers, task: str, first: str
) -> None:
    workers.start(consul_backend.pod)
    out = client(consul_backend.pod, "double-write", task)
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
    consul_backend: Backend, consul_server: ConsulServer, workers: Workers, task: str, first: str
) -> None:
    """Documents the bug that celery_resultstores.consul fixes (tests/e2e/CONSUL_FINDINGS.md).

    Celery's own class, chosen explicitly by its class path in the URL, writes each
    state through a new session; the key is still held by the first write's session,
    so Consul refuses the SUCCESS write and the client keeps reading the first state.
    """
    uri = consul_backend.pod.env["CELERY_RESULT_BACKEND"]
    stock = Pod(
        env={**consul_backend.pod.env, "CELERY_RESULT_BACKEND": f"{STOCK}+{uri}"},
        broker=consul_backend.pod.broker,
    )
    worker = workers.start(stock)
    out = client(stock, "double-write", task, "8")
    assert out["backend"] == STOCK
    wait_for(
        "the worker to finish the task",
        lambda: f"[{out['id']}] succeeded" in worker.logs,
        timeout=60,
    )
    # The task succeeded, yet the store and every client still say `first`.
    assert out["timed_out"]
    assert out["state"] == first
    stored = consul_value(consul_server, _prefix(consul_backend), out["id"])
    assert stored is not None
    assert stored["status"] == first
    assert client(stock, "state", out["id"])["state"] == first


def test_results_expire_through_their_session_ttl(
    consul_backend: Backend, consul_server: ConsulServer, workers: Workers
) -> None:
    ttl = 10  # Consul's minimum session TTL; result_expires becomes the session's TTL
    pod = Pod(env=consul_backend.pod.env, broker=consul_backend.pod.broker)
    pod.extra["E2E_RESULT_EXPIRES"] = str(ttl)
    workers.start(pod)
    prefix = _prefix(consul_backend)
    once = client(pod, "add")
    twice = client(pod, "double-write", "tracked")  # its session was renewed by the rewrite
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
    assert client(pod, "state", once["id"])["state"] == "PENDING"
    assert client(pod, "state", twice["id"])["state"] == "PENDING"
