"""contrib/celery-resultstores' own tests, run in the worker image (.venv-e2e)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT, ConsulServer, CouchDBServer
from tests.e2e.harness import e2e_python
from tests.e2e.kubeenv import base_env

pytestmark = pytest.mark.e2e


def test_celery_resultstores_tests_pass(
    consul_server: ConsulServer, couchdb_server: CouchDBServer
) -> None:
    res = subprocess.run(
        [str(e2e_python()), "-m", "unittest", "discover", "-v", "-s", "tests"],
        cwd=ROOT / "contrib" / "celery-resultstores",
        env={
            **base_env(),
            "CONSUL_HTTP_ADDR": consul_server.url,
            "CONSUL_HTTP_TOKEN": consul_server.management_token,
            "COUCHDB_URL": couchdb_server.url,
            "COUCHDB_ADMIN_USER": couchdb_server.admin_user,
            "COUCHDB_ADMIN_PASSWORD": couchdb_server.admin_password,
        },
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "FAILED" not in res.stderr
    assert "skipped" not in res.stderr
