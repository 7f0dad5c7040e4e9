"""A ResultBackend that replaces an earlier one of its name (a v1alpha1 object moved to
v1alpha2) takes over its store objects and worker Secret with the annotation
resultstores.io/adopt-uid, and only with it, against the real stack."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl, OperatorProcess
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    get_json,
    result_backend,
    secret_data,
    unique,
    wait_condition,
    wait_for,
)

pytestmark = pytest.mark.integration

ADOPT = "resultstores.io/adopt-uid"


def _store(
    kubectl: Kubectl, ns: str, store: str, couchdb: CouchDBServer, consul: ConsulServer
) -> None:
    if store == "couchdb":
        apply(
            kubectl,
            couchdb_admin_secret(ns, "admin", couchdb),
            couchdb_store(ns, "store", couchdb.url, "admin"),
        )
    else:
        apply(
            kubectl,
            admin_secret(ns, "admin", {"token": consul.management_token}),
            consul_store(ns, "store", consul.url, "admin"),
        )


def _ready(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    obj = get_json(kubectl, "rb", name, "-n", ns)
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond["type"] == "Ready":
            return dict(cond)
    return {}


def _reason(kubectl: Kubectl, ns: str, name: str) -> str | None:
    return _ready(kubectl, ns, name).get("reason")


def _message(kubectl: Kubectl, ns: str, name: str) -> str:
    return str(_ready(kubectl, ns, name).get("message") or "")


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_a_replacing_resultbackend_adopts_the_store_objects_and_secret_only_when_told(
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    store: str,
) -> None:
    _store(kubectl, namespace, store, couchdb_server, consul_server)
    name = unique("orders")
    apply(kubectl, result_backend(namespace, name, "store", "Retain"))
    old = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=60)
    old_uid = old["metadata"]["uid"]
    secret = f"{name}-result-backend"
    credentials = secret_data(kubectl, namespace, secret)

    # As the move from v1alpha1 does it: the object goes, its Secret stays (orphaned).
    kubectl("delete", "rb", name, "-n", namespace, "--cascade=orphan", "--timeout=60s")
    assert get_json(kubectl, "secret", secret, "-n", namespace)["metadata"].get(
        "ownerReferences"
    ) in (None, [])

    # A new one of that name without the annotation: the old one's objects are not its.
    apply(kubectl, result_backend(namespace, name, "store", "Retain"))
    wait_for("a Conflict", lambda: _reason(kubectl, namespace, name) == "Conflict", 60)
    assert secret_data(kubectl, namespace, secret) == credentials  # untouched

    # Told the old uid: it adopts the store objects, and says how to give it the
    # Secret (moving an ownerReference takes `delete` on Secrets, which it lacks).
    patch = {"metadata": {"annotations": {ADOPT: old_uid}}}
    kubectl("patch", "rb", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    told = wait_for(
        "how to hand over the Secret",
        lambda: (
            "patch secret" in _message(kubectl, namespace, name)
            and _message(kubectl, namespace, name)
        ),
        60,
    )
    new_uid = get_json(kubectl, "rb", name, "-n", namespace)["metadata"]["uid"]
    assert new_uid != old_uid
    command = str(told).split(" with kubectl ", 1)[1].split("; or ", 1)[0]
    given = command.split(" -p '", 1)[1].rstrip("'")
    assert json.loads(given)["metadata"]["ownerReferences"][0]["uid"] == new_uid
    assert secret_data(kubectl, namespace, secret) == credentials  # still untouched
    kubectl("-n", namespace, "patch", "secret", secret, "--type=merge", "-p", given)
    new = wait_condition(kubectl, namespace, name, "Ready", "True", timeout=60)
    assert new_uid != old_uid
    assert secret_data(kubectl, namespace, secret) == credentials
    owners = get_json(kubectl, "secret", secret, "-n", namespace)["metadata"]["ownerReferences"]
    assert [o["uid"] for o in owners] == [new_uid]
    assert _markers(store, new, couchdb_server, consul_server) == {new_uid}


def _markers(
    store: str, rb: dict[str, Any], couchdb: CouchDBServer, consul: ConsulServer
) -> set[str]:
    """The uids the store objects' ownership markers name."""
    if store == "couchdb":
        auth = (couchdb.admin_user, couchdb.admin_password)
        db, user = rb["status"]["couchdb"]["database"], rb["status"]["couchdb"]["user"]
        marker = requests.get(
            f"{couchdb.url}/{db}/_local/resultstores.io-owner", auth=auth, timeout=10
        )
        users = [
            requests.get(f"{couchdb.url}/_users/org.couchdb.user:{u}", auth=auth, timeout=10)
            for u in (user.removesuffix("_b"), user.removesuffix("_b") + "_b")
        ]
        return {marker.json()["uid"]} | {u.json()["resultstores.io/owner"]["uid"] for u in users}
    headers = {"X-Consul-Token": consul.management_token}
    status = rb["status"]["consul"]
    policy = requests.get(
        f"{consul.url}/v1/acl/policy/{status['policyID']}", headers=headers, timeout=10
    ).json()
    token = requests.get(
        f"{consul.url}/v1/acl/token/{status['tokenAccessorID']}", headers=headers, timeout=10
    ).json()
    return {d.rsplit("uid=", 1)[1] for d in (policy["Description"], token["Description"])}
