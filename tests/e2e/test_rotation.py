"""Rotation without downtime, end to end, one test per store.

A client sends a task every 50 ms to a real Celery worker from before the
trigger until the `Revoked` Event. The test plays the kubelet through the
rollout: the old worker keeps running while a new one starts from the env the
operator injected anew (same queue), then the old one stops (warm shutdown:
it finishes and stores what it took), and only then is the new pod reported
Ready (`finish_rollout`), so that the Deployment controller completes the
rollout. Every task sent is read back through Celery with the new credentials:
none lost, none failed to store, some stored by the old worker after the
Secret had changed. Both workers run through two periodic checks of the
operator, each a full reconcile that would revoke too early if it were wrong.
After the rollout the old credentials are refused.

The module runs an operator of its own for a namespace of its own, with
RBO_ROTATION_GRACE of an hour: the only thing that can let the old credentials
go during a test is the rollout, so a revocation before it fails the test (the
session operator's 10 s grace would race the workers' start). The session's
operator is stopped meanwhile (`session_operator_stopped`).
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import (
    OPERATOR_TEST_ENV,
    ConsulServer,
    CouchDBServer,
    Helm,
    Kubectl,
    OperatorProcess,
)
from tests.e2e.conftest import Backend, ready_backend
from tests.e2e.harness import Pod, Stream, Workers, client, finish_rollout, injected_env
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    unique,
    wait_for,
    wait_for_runs,
)
from tests.integration.isolated import own_namespace, running_operator

pytestmark = pytest.mark.e2e

ROTATION_ENV = {**OPERATOR_TEST_ENV, "RBO_ROTATION_GRACE": "3600"}


@pytest.fixture(scope="module")
def rotation_namespace(kubectl: Kubectl) -> Iterator[str]:
    with own_namespace(kubectl, "t-rotation") as name:
        yield name


@pytest.fixture(scope="module")
def rotation_operator(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    helm: Helm,
    crd: None,
    rotation_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    session_operator_stopped: None,
) -> Iterator[OperatorProcess]:
    """ROTATION_ENV, watching rotation_namespace only, as the namespaced chart's identity."""
    directory = tmp_path_factory.mktemp("rotation")
    with running_operator(
        stack_env, kubectl, helm, rotation_namespace, directory, ROTATION_ENV
    ) as op:
        yield op


def _events(kubectl: Kubectl, ns: str, name: str, reason: str) -> list[str]:
    """The messages of the Events `reason` about ResultBackend `name`."""
    items = json.loads(kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
    return [
        str(e.get("message"))
        for e in items
        if e.get("reason") == reason
        and e["involvedObject"].get("kind") == "ResultBackend"
        and e["involvedObject"].get("name") == name
    ]


def _rotate(kubectl: Kubectl, backend: Backend) -> tuple[str, Pod]:
    """Moves spec.rotation.trigger to a second ago: (new config hash, the new pod's env),
    once the operator injected the new Secret into the Deployment."""
    trigger = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = json.dumps({"spec": {"rotation": {"trigger": trigger}}})
    kubectl("patch", "rb", backend.name, "-n", backend.namespace, "--type=merge", "-p", patch)
    digest, env = injected_env(
        kubectl, backend.namespace, backend.deployment, previous_hash=backend.config_hash
    )
    # The new pod takes tasks from the same queue as the old one.
    return digest, Pod(env=env, broker=backend.pod.broker, queue=backend.pod.queue)


def _rotate_without_downtime(
    kubectl: Kubectl,
    operator: OperatorProcess,
    backend: Backend,
    workers: Workers,
    tmp_path: Path,
    old_works: Callable[[Pod], bool],
) -> tuple[Pod, Pod]:
    """The rotation under load, as the module docstring tells; (old pod, new pod)."""
    old = backend.pod
    old_worker = workers.start(old)
    stream = Stream(old, tmp_path).start()
    wait_for("tasks sent before the trigger", lambda: stream.sent() >= 20)

    digest, new = _rotate(kubectl, backend)
    rotated_at = stream.sent()  # tasks from here on may meet the new Secret
    new_worker = workers.start(new)
    # Both run; two periodic checks (each a full reconcile while old credentials are
    # kept) come and go: one that revoked now would cut the old worker off.
    wait_for_runs(operator, backend.namespace, backend.name, 2)
    old_worker.stop()
    # The rollout is not complete: the old credentials still work.
    assert old_works(old)
    assert not _events(kubectl, backend.namespace, backend.name, "Revoked")
    finish_rollout(kubectl, backend.namespace, backend.deployment, digest)
    revoked = wait_for(
        "the Revoked event",
        lambda: _events(kubectl, backend.namespace, backend.name, "Revoked"),
    )
    assert "every injected workload rolled out the new credentials" in revoked[0]
    sent = stream.stop()

    results = client(new, "collect", str(stream.ids))["results"]
    assert len(results) == sent
    wrong = {
        n: r
        for n, r in results.items()
        if r["state"] != "SUCCESS" or not isinstance(r["value"], dict) or r["value"]["n"] != int(n)
    }
    assert not wrong, f"{len(wrong)} of {sent} results lost or wrong: {list(wrong.items())[:5]}"

    def stored_by(worker: str, since: int = 0) -> int:
        return sum(
            1
            for n, r in results.items()
            if int(n) >= since and str(r["value"]["worker"]).startswith(f"{worker}@")
        )

    # The old worker stored results after the Secret had changed: with the old
    # credentials, which the operator kept for it.
    assert stored_by(old_worker.name, since=rotated_at) > 0
    assert stored_by(new_worker.name) > 0
    for worker in (old_worker, new_worker):
        assert "ERROR/" not in worker.logs, worker.logs[-3000:]
    print(
        f"{sent} tasks sent, {sent} stored and read back; the old worker stored "
        f"{stored_by(old_worker.name, since=rotated_at)} of them after the rotation"
    )
    return old, new


# --- CouchDB ---------------------------------------------------------------------------


def _couch_status(server: CouchDBServer, pod: Pod) -> int:
    """What CouchDB answers to the pod's credentials reading its database."""
    uri = urllib.parse.urlsplit(pod.env["CELERY_RESULT_BACKEND"])
    user = urllib.parse.unquote(uri.username or "")
    password = urllib.parse.unquote(uri.password or "")
    res = requests.get(f"{server.url}{uri.path}", auth=(user, password), timeout=10)
    return res.status_code


@pytest.fixture
def couchdb_backend(
    kubectl: Kubectl,
    rotation_namespace: str,
    couchdb_server: CouchDBServer,
    rotation_operator: OperatorProcess,
    broker: str,
) -> Backend:
    ns = rotation_namespace
    apply(
        kubectl,
        couchdb_admin_secret(ns, "couch-admin", couchdb_server),
        couchdb_store(ns, "couchdb", couchdb_server.url, "couch-admin"),
    )
    rb = result_backend(
        ns,
        unique("orders"),
        "couchdb",
        "Delete",
        workers={"selector": {"matchLabels": {"celery": "orders-worker"}}},
    )
    return ready_backend(kubectl, ns, rb, "orders-worker", broker)


def test_couchdb_rotation_loses_no_result(
    kubectl: Kubectl,
    couchdb_backend: Backend,
    couchdb_server: CouchDBServer,
    rotation_operator: OperatorProcess,
    workers: Workers,
    tmp_path: Path,
) -> None:
    old, new = _rotate_without_downtime(
        kubectl,
        rotation_operator,
        couchdb_backend,
        workers,
        tmp_path,
        lambda pod: _couch_status(couchdb_server, pod) == 200,
    )
    old_uri = urllib.parse.urlsplit(old.env["CELERY_RESULT_BACKEND"])
    new_uri = urllib.parse.urlsplit(new.env["CELERY_RESULT_BACKEND"])
    # The Secret moved to the ResultBackend's other user.
    assert new_uri.username == f"{old_uri.username}_b"
    assert _couch_status(couchdb_server, old) == 401
    assert _couch_status(couchdb_server, new) == 200
    status = get_json(kubectl, "rb", couchdb_backend.name, "-n", couchdb_backend.namespace)
    assert status["status"]["couchdb"]["user"] == new_uri.username


# --- Consul ----------------------------------------------------------------------------


def _consul_answer(server: ConsulServer, pod: Pod, prefix: str) -> tuple[int, str]:
    """(status, body) of a read under the prefix with the pod's token."""
    res = requests.get(
        f"{server.url}/v1/kv/{prefix}/probe",
        headers={"X-Consul-Token": pod.env["CONSUL_HTTP_TOKEN"]},
        timeout=10,
    )
    return res.status_code, res.text


@pytest.fixture
def consul_backend(
    kubectl: Kubectl,
    rotation_namespace: str,
    consul_server: ConsulServer,
    rotation_operator: OperatorProcess,
    broker: str,
) -> Backend:
    ns = rotation_namespace
    apply(
        kubectl,
        admin_secret(ns, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(ns, "consul", consul_server.url, "consul-mgmt"),
    )
    rb = result_backend(
        ns,
        unique("billing"),
        "consul",
        "Delete",
        workers={"selector": {"matchLabels": {"celery": "billing-worker"}}},
    )
    return ready_backend(kubectl, ns, rb, "billing-worker", broker)


def test_consul_rotation_loses_no_result(
    kubectl: Kubectl,
    consul_backend: Backend,
    consul_server: ConsulServer,
    rotation_operator: OperatorProcess,
    workers: Workers,
    tmp_path: Path,
) -> None:
    prefix: Any = consul_backend.status["consul"]["keyPrefix"]  # type: ignore[index]
    old, new = _rotate_without_downtime(
        kubectl,
        rotation_operator,
        consul_backend,
        workers,
        tmp_path,
        # 404: allowed to look, nothing there.
        lambda pod: _consul_answer(consul_server, pod, prefix)[0] == 404,
    )
    assert new.env["CELERY_RESULT_BACKEND"] == old.env["CELERY_RESULT_BACKEND"]
    assert new.env["CONSUL_HTTP_TOKEN"] != old.env["CONSUL_HTTP_TOKEN"]
    status, text = _consul_answer(consul_server, old, prefix)
    assert status == 403, text
    assert "ACL not found" in text
    assert _consul_answer(consul_server, new, prefix)[0] == 404
