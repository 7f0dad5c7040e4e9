"""Real Celery worker pods storing results in the CouchDB database the operator provisioned."""

from __future__ import annotations

import json

import pytest

from tests.conftest import CouchDBServer, Kubectl
from tests.e2e.conftest import Backend
from tests.e2e.harness import assert_result_contract, client, couchdb_doc

pytestmark = pytest.mark.e2e


def test_the_kubelet_resolves_the_injected_env_beside_the_users(couchdb_backend: Backend) -> None:
    env = couchdb_backend.env
    db = couchdb_backend.status["couchdb"]["database"]  # type: ignore[index]
    assert env["CELERY_RESULT_BACKEND"].startswith("couchdb://")
    assert env["CELERY_RESULT_BACKEND"].endswith(f"/{db}")
    # The user's own variables stay as they were, $(VAR) references expanded.
    assert env["WORKER_TAG"] == "eu-1-e2e"
    assert "CONSUL_HTTP_TOKEN" not in env


def test_celery_result_contract(
    kubectl: Kubectl, couchdb_backend: Backend, couchdb_server: CouchDBServer
) -> None:
    b = couchdb_backend
    out = client(kubectl, b.namespace, b.pod, "contract")
    db = str(b.status["couchdb"]["database"])  # type: ignore[index]

    # Celery picked the backend from CELERY_RESULT_BACKEND alone; the worker image
    # has contrib/celery-resultstores, whose entry point serves couchdb:// URLs.
    assert_result_contract(out, "celery_resultstores.couchdb.CouchBackend")

    # The results really are documents of the provisioned database.
    doc = couchdb_doc(couchdb_server, db, out["add"]["id"])
    assert doc.status_code == 200, doc.text
    meta = json.loads(doc.json()["value"])
    assert (meta["status"], meta["result"]) == ("SUCCESS", 5)
    failed = json.loads(couchdb_doc(couchdb_server, db, out["fail"]["id"]).json()["value"])
    assert failed["status"] == "FAILURE"
    assert failed["result"]["exc_type"] == "ValueError"
    for task_id in out["group"]["ids"]:
        assert couchdb_doc(couchdb_server, db, task_id).status_code == 200

    # forget() deleted the document.
    assert out["forgotten"]["value"] == 42
    gone = couchdb_doc(couchdb_server, db, out["forgotten"]["id"])
    assert gone.status_code == 404, gone.text
    assert out["forgotten"]["state_after"] == "PENDING"


@pytest.mark.parametrize("task", ["tracked", "retry_once"])
def test_a_result_written_twice_ends_in_its_final_state(
    kubectl: Kubectl, couchdb_backend: Backend, task: str
) -> None:
    b = couchdb_backend
    out = client(kubectl, b.namespace, b.pod, "double-write", task)
    assert not out["timed_out"]
    assert out["state"] == "SUCCESS"
    assert out["value"]["value"] == "final"
    assert out["value"]["seen"] == ("STARTED" if task == "tracked" else "RETRY")
