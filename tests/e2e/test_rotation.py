"""Rotation end to end: the operator rolls the workers, a restarted worker still
stores results with the new credentials, and the store refuses the old ones."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl
from tests.e2e.conftest import Backend
from tests.e2e.harness import Pod, Workers, client, injected_env
from tests.integration.helpers import get_json, wait_for

pytestmark = pytest.mark.e2e


def _rotate(kubectl: Kubectl, backend: Backend) -> Pod:
    """Moves spec.rotation.trigger to a second ago; the new pod once the Deployment rolled."""
    before = get_json(kubectl, "rb", backend.name, "-n", backend.namespace)["status"]
    trigger = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Never rotated yet: any past trigger rotates (status has no credentialsRotatedAt).
    assert trigger > before.get("credentialsRotatedAt", ""), "rotated too recently to move it"
    kubectl(
        "patch",
        "rb",
        backend.name,
        "-n",
        backend.namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"rotation": {"trigger": trigger}}}),
    )
    digest, env = injected_env(
        kubectl, backend.namespace, backend.deployment, previous_hash=backend.config_hash
    )
    assert digest != backend.config_hash
    wait_for(
        "credentialsRotatedAt to move",
        lambda: (
            get_json(kubectl, "rb", backend.name, "-n", backend.namespace)["status"].get(
                "credentialsRotatedAt", ""
            )
            >= trigger
        ),
    )
    return Pod(env=env, broker=backend.pod.broker)


def _stores_results(workers: Workers, pod: Pod) -> None:
    worker = workers.start(pod)
    out = client(pod, "add")
    assert (out["value"], out["state"]) == (5, "SUCCESS")
    worker.stop()


def test_couchdb_rotation(
    kubectl: Kubectl,
    couchdb_backend: Backend,
    couchdb_server: CouchDBServer,
    workers: Workers,
) -> None:
    old = couchdb_backend.pod
    _stores_results(workers, old)
    new = _rotate(kubectl, couchdb_backend)
    old_uri, new_uri = (
        urlsplit(old.env["CELERY_RESULT_BACKEND"]),
        urlsplit(new.env["CELERY_RESULT_BACKEND"]),
    )
    # The operator changes the same user's password.
    assert new_uri.username == old_uri.username
    assert new_uri.password != old_uri.password
    _stores_results(workers, new)

    db_url = f"{couchdb_server.url}{old_uri.path}"
    refused = requests.get(db_url, auth=(old_uri.username, old_uri.password), timeout=10)
    assert refused.status_code == 401, refused.text
    allowed = requests.get(db_url, auth=(new_uri.username, new_uri.password), timeout=10)
    assert allowed.status_code == 200, allowed.text


def test_consul_rotation(
    kubectl: Kubectl,
    consul_backend: Backend,
    consul_server: ConsulServer,
    workers: Workers,
) -> None:
    old = consul_backend.pod
    _stores_results(workers, old)
    new = _rotate(kubectl, consul_backend)
    assert new.env["CELERY_RESULT_BACKEND"] == old.env["CELERY_RESULT_BACKEND"]
    assert new.env["CONSUL_HTTP_TOKEN"] != old.env["CONSUL_HTTP_TOKEN"]
    _stores_results(workers, new)

    prefix = consul_backend.status["consul"]["keyPrefix"]  # type: ignore[index]
    url = f"{consul_server.url}/v1/kv/{prefix}/probe"

    def old_token_answer() -> tuple[int, str] | None:
        # (status, body), not the Response: a 403 Response is falsy.
        res = requests.get(
            url, headers={"X-Consul-Token": old.env["CONSUL_HTTP_TOKEN"]}, timeout=10
        )
        return (res.status_code, res.text) if res.status_code != 404 else None

    # The old token is revoked once the workers rolled or, since a Deployment here has
    # no node to finish its rollout, when the grace period (10 s in the tests) ends.
    status, text = wait_for("the old token to be revoked", old_token_answer)
    assert status == 403, text
    assert "ACL not found" in text
    allowed = requests.get(
        url, headers={"X-Consul-Token": new.env["CONSUL_HTTP_TOKEN"]}, timeout=10
    )
    assert allowed.status_code == 404, allowed.text  # allowed to look; nothing there
