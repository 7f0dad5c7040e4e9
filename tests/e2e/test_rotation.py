"""Rotation without downtime, end to end, one test per store, with real worker pods.

A client pod sends a task every 50 ms to the worker Deployment's queue from before
the trigger until the `Revoked` Event. The worker's rollout is held
(`kubectl rollout pause`) when the rotation starts: the operator injects the new
Secret into the pod template, yet the old pod keeps running with the old
credentials the kubelet gave it, through two periodic checks of the operator,
each a full reconcile that would revoke too early if it were wrong. Then the
rollout resumes: the Deployment controller starts a new pod, the kubelet resolves
the new credentials, and once Celery consumes there (its readiness probe) the old
pod is stopped (warm shutdown: it finishes and stores what it took). Every task
sent is read back through Celery in the new pod: none lost, none failed to store,
some stored by the old pod after the Secret had changed. After the rollout the
old credentials are refused.

The module runs an operator of its own for a namespace of its own, with
RBO_ROTATION_GRACE of an hour: the only thing that can let the old credentials
go during a test is the rollout, so a revocation before it fails the test. The
session's operator is stopped meanwhile (`session_operator_stopped`).
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
from tests.e2e.harness import (
    LogFollower,
    Stream,
    client,
    injected_hash,
    logs,
    pod_env,
    pod_ready,
    ready_worker,
)
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


def _rotate_without_downtime(
    kubectl: Kubectl,
    operator: OperatorProcess,
    backend: Backend,
    image: str,
    broker: str,
    tmp_path: Path,
    old_works: Callable[[dict[str, str]], bool],
) -> tuple[dict[str, str], dict[str, str]]:
    """The rotation under load, as the module docstring tells; (old env, new env)."""
    ns, deployment = backend.namespace, backend.deployment
    old_logs = LogFollower(kubectl, ns, backend.pod, tmp_path / "old-worker.log").start()
    sender = f"sender-{backend.name}"
    apply(kubectl, Stream.manifest(ns, sender, image, broker, backend.queue))
    kubectl("wait", "--for=condition=Ready", f"pod/{sender}", "-n", ns, "--timeout=60s")
    stream = Stream(kubectl, ns, sender, tmp_path).start()
    wait_for("tasks sent before the trigger", lambda: stream.sent() >= 20)

    kubectl("rollout", "pause", f"deployment/{deployment}", "-n", ns)
    trigger = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = json.dumps({"spec": {"rotation": {"trigger": trigger}}})
    kubectl("patch", "rb", backend.name, "-n", ns, "--type=merge", "-p", patch)
    digest = injected_hash(kubectl, ns, deployment, old=backend.config_hash)
    rotated_at = stream.sent()  # tasks from here on may meet the new Secret
    # The new Secret is in the template, the old pod still runs; two periodic checks
    # (each a full reconcile while old credentials are kept) come and go: one that
    # revoked now would cut the old worker off.
    wait_for_runs(operator, ns, backend.name, 2)
    assert old_works(backend.env)
    assert not _events(kubectl, ns, backend.name, "Revoked")
    assert ready_pods(kubectl, ns, deployment) == [backend.pod]

    kubectl("rollout", "resume", f"deployment/{deployment}", "-n", ns)
    new_pod = ready_worker(kubectl, ns, deployment, digest)
    new = pod_env(kubectl, ns, new_pod)
    revoked = wait_for("the Revoked event", lambda: _events(kubectl, ns, backend.name, "Revoked"))
    assert "every injected workload rolled out the new credentials" in revoked[0]
    sent = stream.stop()
    old_worker_logs = old_logs.stop()  # the old pod is gone: its logs end

    results = client(kubectl, ns, new_pod, "collect", stdin=stream.ids())["results"]
    assert len(results) == sent
    wrong = {
        n: r
        for n, r in results.items()
        if r["state"] != "SUCCESS" or not isinstance(r["value"], dict) or r["value"]["n"] != int(n)
    }
    assert not wrong, f"{len(wrong)} of {sent} results lost or wrong: {list(wrong.items())[:5]}"

    def stored_by(pod: str, since: int = 0) -> int:
        return sum(
            1
            for n, r in results.items()
            if int(n) >= since and str(r["value"]["worker"]).startswith(f"{pod}@")
        )

    # The old pod stored results after the Secret had changed: with the old
    # credentials, which the operator kept for it.
    assert stored_by(backend.pod, since=rotated_at) > 0
    assert stored_by(new_pod) > 0
    for text in (old_worker_logs, logs(kubectl, ns, new_pod)):
        assert "ERROR/" not in text, text[-3000:]
    assert "Warm shutdown" in old_worker_logs
    print(
        f"{sent} tasks sent, {sent} stored and read back; the old pod stored "
        f"{stored_by(backend.pod, since=rotated_at)} of them after the rotation"
    )
    return backend.env, new


def ready_pods(kubectl: Kubectl, ns: str, deployment: str) -> list[str]:
    pods = get_json(kubectl, "pods", "-n", ns, "-l", f"app={deployment}")["items"]
    return [str(p["metadata"]["name"]) for p in pods if pod_ready(p)]


# --- CouchDB ---------------------------------------------------------------------------


def _couch_status(server: CouchDBServer, env: dict[str, str]) -> int:
    """What CouchDB answers to a pod's credentials reading its database."""
    uri = urllib.parse.urlsplit(env["CELERY_RESULT_BACKEND"])
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
    worker_image: str,
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
    return ready_backend(kubectl, ns, rb, "orders-worker", worker_image, broker)


def test_couchdb_rotation_loses_no_result(
    kubectl: Kubectl,
    couchdb_backend: Backend,
    couchdb_server: CouchDBServer,
    rotation_operator: OperatorProcess,
    worker_image: str,
    broker: str,
    tmp_path: Path,
) -> None:
    old, new = _rotate_without_downtime(
        kubectl,
        rotation_operator,
        couchdb_backend,
        worker_image,
        broker,
        tmp_path,
        lambda env: _couch_status(couchdb_server, env) == 200,
    )
    old_uri = urllib.parse.urlsplit(old["CELERY_RESULT_BACKEND"])
    new_uri = urllib.parse.urlsplit(new["CELERY_RESULT_BACKEND"])
    # The Secret moved to the ResultBackend's other user.
    assert new_uri.username == f"{old_uri.username}_b"
    assert _couch_status(couchdb_server, old) == 401
    assert _couch_status(couchdb_server, new) == 200
    status = get_json(kubectl, "rb", couchdb_backend.name, "-n", couchdb_backend.namespace)
    assert status["status"]["couchdb"]["user"] == new_uri.username


# --- Consul ----------------------------------------------------------------------------


def _consul_answer(server: ConsulServer, env: dict[str, str], prefix: str) -> tuple[int, str]:
    """(status, body) of a read under the prefix with a pod's token."""
    res = requests.get(
        f"{server.url}/v1/kv/{prefix}/probe",
        headers={"X-Consul-Token": env["CONSUL_HTTP_TOKEN"]},
        timeout=10,
    )
    return res.status_code, res.text


@pytest.fixture
def consul_backend(
    kubectl: Kubectl,
    rotation_namespace: str,
    consul_server: ConsulServer,
    rotation_operator: OperatorProcess,
    worker_image: str,
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
    return ready_backend(kubectl, ns, rb, "billing-worker", worker_image, broker)


def test_consul_rotation_loses_no_result(
    kubectl: Kubectl,
    consul_backend: Backend,
    consul_server: ConsulServer,
    rotation_operator: OperatorProcess,
    worker_image: str,
    broker: str,
    tmp_path: Path,
) -> None:
    prefix: Any = consul_backend.status["consul"]["keyPrefix"]  # type: ignore[index]
    old, new = _rotate_without_downtime(
        kubectl,
        rotation_operator,
        consul_backend,
        worker_image,
        broker,
        tmp_path,
        # 404: allowed to look, nothing there.
        lambda env: _consul_answer(consul_server, env, prefix)[0] == 404,
    )
    assert new["CELERY_RESULT_BACKEND"] == old["CELERY_RESULT_BACKEND"]
    assert new["CONSUL_HTTP_TOKEN"] != old["CONSUL_HTTP_TOKEN"]
    status, text = _consul_answer(consul_server, old, prefix)
    assert status == 403, text
    assert "ACL not found" in text
    assert _consul_answer(consul_server, new, prefix)[0] == 404
