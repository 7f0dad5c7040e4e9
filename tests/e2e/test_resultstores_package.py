"""contrib/celery-resultstores' own tests, run in a pod of the worker image."""

from __future__ import annotations

import pytest

from tests.conftest import ConsulServer, CouchDBServer, Kubectl
from tests.e2e.harness import secret_env
from tests.integration.helpers import admin_secret, apply, get_json, wait_for

pytestmark = pytest.mark.e2e


def test_celery_resultstores_tests_pass_in_the_worker_image(
    kubectl: Kubectl,
    namespace: str,
    worker_image: str,
    consul_server: ConsulServer,
    couchdb_server: CouchDBServer,
) -> None:
    admins = {
        "consul-token": consul_server.management_token,
        "couchdb-user": couchdb_server.admin_user,
        "couchdb-password": couchdb_server.admin_password,
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "resultstores-tests", "namespace": namespace},
        "spec": {
            "hostNetwork": True,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "tests",
                    "image": worker_image,
                    "imagePullPolicy": "Never",
                    # The package's sources, as the image installed them.
                    "workingDir": "/tmp/celery-resultstores",
                    "command": ["python", "-m", "unittest", "discover", "-v", "-s", "tests"],
                    "env": [
                        {"name": "CONSUL_HTTP_ADDR", "value": consul_server.url},
                        secret_env("CONSUL_HTTP_TOKEN", "admins", "consul-token"),
                        {"name": "COUCHDB_URL", "value": couchdb_server.url},
                        secret_env("COUCHDB_ADMIN_USER", "admins", "couchdb-user"),
                        secret_env("COUCHDB_ADMIN_PASSWORD", "admins", "couchdb-password"),
                    ],
                }
            ],
        },
    }
    apply(kubectl, admin_secret(namespace, "admins", admins), pod)

    def finished() -> str | None:
        phase = get_json(kubectl, "pod", "resultstores-tests", "-n", namespace)["status"]
        return phase.get("phase") if phase.get("phase") in ("Succeeded", "Failed") else None

    phase = wait_for("the tests to finish", finished, timeout=240, interval=1.0)
    out = kubectl("logs", "resultstores-tests", "-n", namespace).stdout
    assert phase == "Succeeded", out[-5000:]
    assert "FAILED" not in out
    assert "skipped" not in out
    assert "OK" in out.splitlines()[-1]
