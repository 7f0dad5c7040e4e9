"""Outages and crashes: the operator reports, recovers and converges by itself."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import consul
import pytest
import requests

from tests.conftest import STACK, ConsulServer, CouchDBServer, Kubectl, OperatorProcess
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_rb,
    couchdb_admin_secret,
    couchdb_rb,
    secret_data,
    unique,
    wait_condition,
)

pytestmark = pytest.mark.integration


def _stack(*args: str) -> None:
    subprocess.run([str(STACK), *args], check=True, capture_output=True, env=dict(os.environ))


@pytest.fixture
def outage() -> Iterator[list[str]]:
    """Services the test stops; they are started again whatever happens."""
    stopped: list[str] = []
    yield stopped
    for service in stopped:
        _stack("start", service)


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_store_outage_degrades_and_recovers_without_help(
    store: str,
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    outage: list[str],
) -> None:
    name = unique(store)
    if store == "couchdb":
        secret = couchdb_admin_secret(namespace, "admin", couchdb_server)
        rb = couchdb_rb(namespace, name, couchdb_server.url, "admin")
    else:
        secret = admin_secret(namespace, "admin", {"token": consul_server.management_token})
        rb = consul_rb(namespace, name, consul_server.url, "admin")
    apply(kubectl, secret, rb)
    wait_condition(kubectl, namespace, name, "Ready", "True")

    outage.append(store)
    _stack("stop", store)
    obj = wait_condition(kubectl, namespace, name, "BackendReachable", "False", timeout=30)
    assert obj["status"]["phase"] == "Degraded"
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "BackendReachable")
    assert cond["reason"] == "Unreachable"

    _stack("start", store)
    outage.remove(store)
    obj = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=60)
    assert obj["status"]["phase"] == "Ready"
    events = kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert '"reason": "Degraded"' in events
    assert '"reason": "Recovered"' in events


def _consul_admin(server: ConsulServer) -> Any:
    parts = urllib.parse.urlsplit(server.url)
    c = consul.Consul(host=parts.hostname, port=parts.port or 8500)
    c.token = server.management_token
    return c


@pytest.mark.parametrize("kill_after", [0.2, 0.6, 1.2])
def test_killed_mid_provisioning_the_operator_converges_to_one_of_each(
    kill_after: float,
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    couch, cons = unique("kc"), unique("kk")
    apply(
        kubectl,
        couchdb_admin_secret(namespace, "couch", couchdb_server),
        admin_secret(namespace, "mgmt", {"token": consul_server.management_token}),
        couchdb_rb(namespace, couch, couchdb_server.url, "couch"),
        consul_rb(namespace, cons, consul_server.url, "mgmt"),
    )
    time.sleep(kill_after)
    operator.restart(kill=True)
    wait_condition(kubectl, namespace, couch, "Ready", "True")
    wait_condition(kubectl, namespace, cons, "Ready", "True")

    data = secret_data(kubectl, namespace, f"{couch}-result-backend")
    db = urllib.parse.quote(data["database"], safe="")
    put = requests.put(
        f"{couchdb_server.url}/{db}/probe",
        json={"v": 1},
        auth=(data["username"], data["password"]),
        timeout=10,
    )
    assert put.status_code in (201, 202)

    admin = _consul_admin(consul_server)
    policies = [
        p for p in admin.acl.policy.list() if p["Name"] == f"resultbackend-{namespace}-{cons}"
    ]
    assert len(policies) == 1
    tokens = admin.acl.token.list(policy=policies[0]["ID"])
    assert len(tokens) == 1
    token = secret_data(kubectl, namespace, f"{cons}-result-backend")["token"]
    assert tokens[0]["SecretID"] == token
