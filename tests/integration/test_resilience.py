"""Outages and crashes: the operator reports, recovers and converges by itself."""

from __future__ import annotations

import datetime as dt
import json
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
    condition,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    events_text,
    get_json,
    result_backend,
    secret_data,
    unique,
    wait_condition,
    wait_for,
    wait_store_ready,
)
from tests.integration.test_injection import deployment

pytestmark = pytest.mark.integration

HASH = "resultstores.io/config-hash"


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
        store_obj = couchdb_store(namespace, store, couchdb_server.url, "admin")
    else:
        secret = admin_secret(namespace, "admin", {"token": consul_server.management_token})
        store_obj = consul_store(namespace, store, consul_server.url, "admin")
    apply(kubectl, secret, store_obj, result_backend(namespace, name, store))
    wait_condition(kubectl, namespace, name, "Ready", "True")

    outage.append(store)
    _stack("stop", store)
    # The store's own check finds the server gone ...
    wait_store_ready(kubectl, namespace, store, "False", "Unreachable", timeout=30)
    # ... and its ResultBackend reports the outage: its own worker check may see it
    # first (Unreachable), its store's Ready says it in the end (StoreNotReady, quoted).
    obj = wait_condition(kubectl, namespace, name, "BackendReachable", "False", timeout=30)
    assert obj["status"]["phase"] == "Degraded"
    obj = wait_condition(
        kubectl, namespace, name, "BackendReachable", "False", timeout=30, reason="StoreNotReady"
    )
    assert obj["status"]["phase"] == "Degraded"
    cond = condition(obj, "BackendReachable")
    assert cond is not None
    assert "is not ready: Unreachable: " in cond["message"]
    # What it provisioned is still there: an outage says nothing about it.
    provisioned = condition(obj, "Provisioned")
    assert provisioned is not None
    assert provisioned["status"] == "True"

    _stack("start", store)
    outage.remove(store)
    wait_store_ready(kubectl, namespace, store, timeout=60)
    obj = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=60)
    assert obj["status"]["phase"] == "Ready"
    events = events_text(kubectl, namespace)
    assert '"reason": "Degraded"' in events
    assert '"reason": "Recovered"' in events
    assert '"reason": "Unreachable"' in events  # the store's, on its Ready's change


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
        couchdb_store(namespace, "couchdb", couchdb_server.url, "couch"),
        consul_store(namespace, "consul", consul_server.url, "mgmt"),
        result_backend(namespace, couch, "couchdb"),
        result_backend(namespace, cons, "consul"),
    )
    time.sleep(kill_after)
    operator.restart(kill=True)
    wait_condition(kubectl, namespace, couch, "Ready", "True")
    wait_condition(kubectl, namespace, cons, "Ready", "True")
    # The stores, whose first check the kill may have cut short too, are Ready and
    # count their one ResultBackend each.
    for store in ("couchdb", "consul"):
        wait_store_ready(kubectl, namespace, store, backends=1)

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


def _template_hashes(kubectl: Kubectl, ns: str, app: str) -> set[str]:
    """The config hashes of the Deployment's ReplicaSets (one per template; "": the one
    from before the injection)."""
    items = get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={app}")["items"]
    return {rs["spec"]["template"]["metadata"].get("annotations", {}).get(HASH, "") for rs in items}


def _couch_users(server: CouchDBServer, prefix: str) -> dict[str, dict[str, Any]]:
    """Every user document whose name starts with `prefix`, by name."""
    start = f"org.couchdb.user:{prefix}"
    res = requests.get(
        f"{server.url}/_users/_all_docs",
        params={
            "startkey": json.dumps(start),
            "endkey": json.dumps(start + "\ufff0"),
            "include_docs": "true",
        },
        auth=(server.admin_user, server.admin_password),
        timeout=10,
    )
    res.raise_for_status()
    return {row["doc"]["name"]: row["doc"] for row in res.json()["rows"]}


@pytest.mark.parametrize("kill_after", [0.05, 0.3, 0.8])
def test_killed_mid_rotation_the_operator_converges_to_two_couchdb_users_one_active(
    kill_after: float,
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
) -> None:
    name = unique("kr")
    # Scaled to zero: the rollout completes as soon as the Deployment controller saw it.
    wl = deployment(namespace, "kw", {"tier": "kr"})
    wl["spec"]["replicas"] = 0
    selector = {"selector": {"matchLabels": {"tier": "kr"}}}
    apply(
        kubectl,
        wl,
        couchdb_admin_secret(namespace, "couch", couchdb_server),
        couchdb_store(namespace, "couchdb", couchdb_server.url, "couch"),
        result_backend(namespace, name, "couchdb", workers=selector),
    )
    wait_condition(kubectl, namespace, name, "Ready", "True")
    injected = wait_for(
        "the injection",
        lambda: (
            get_json(kubectl, "deployment", "kw", "-n", namespace)["spec"]["template"]["metadata"]
            .get("annotations", {})
            .get(HASH)
        ),
    )
    wait_for("its ReplicaSet", lambda: _template_hashes(kubectl, namespace, "kw") >= {injected})
    secret = f"{name}-result-backend"
    old = secret_data(kubectl, namespace, secret)
    pair = (f"rb_{namespace}_{name}", f"rb_{namespace}_{name}_b")
    assert old["username"] == pair[0]

    trigger = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)  # the trigger must be in the past, at second resolution
    patch = json.dumps({"spec": {"rotation": {"trigger": trigger}}})
    kubectl("patch", "rb", name, "-n", namespace, "--type=merge", "-p", patch)
    time.sleep(kill_after)
    operator.restart(kill=True)

    wait_for(
        "the rotation to be recorded",
        lambda: (
            get_json(kubectl, "rb", name, "-n", namespace)["status"].get("credentialsRotatedAt", "")
            >= trigger
        ),
    )
    users = wait_for(
        "the old user to be revoked",
        lambda: (
            (found := _couch_users(couchdb_server, pair[0]))
            and "resultstores.io/revoked" in found.get(pair[0], {})
            and found
        ),
    )
    assert sorted(users) == list(pair)  # exactly two users
    assert "resultstores.io/revoked" not in users[pair[1]]
    # Rotated exactly once, whatever the kill interrupted: from A to B.
    data = secret_data(kubectl, namespace, secret)
    assert data["username"] == pair[1]
    status = wait_condition(kubectl, namespace, name, "Ready", "True")["status"]
    assert status["couchdb"]["user"] == pair[1]
    db = urllib.parse.quote(data["database"], safe="")
    put = requests.put(
        f"{couchdb_server.url}/{db}/probe",
        json={"v": 1},
        auth=(data["username"], data["password"]),
        timeout=10,
    )
    assert put.status_code in (201, 202), put.text
    refused = requests.get(
        f"{couchdb_server.url}/{db}", auth=(old["username"], old["password"]), timeout=10
    )
    assert refused.status_code == 401
    # One rotation, one rollout: the template changed once more, not twice.
    assert len(_template_hashes(kubectl, namespace, "kw") - {"", injected}) == 1
