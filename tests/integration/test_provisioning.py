"""Provisioning end to end through the operator process, against the real stack."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import consul
import pytest
import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl, OperatorProcess
from tests.integration.helpers import (
    admin_secret,
    apply,
    assert_no_secret,
    condition,
    consul_store,
    couchdb_admin_secret,
    couchdb_store,
    events_text,
    get_json,
    result_backend,
    secret_data,
    settled_version,
    store_not_ready,
    try_get_json,
    unique,
    wait_condition,
    wait_for,
    wait_for_runs,
    wait_for_store_checks,
    wait_store_ready,
)

pytestmark = pytest.mark.integration


def _couch_admin(server: CouchDBServer) -> requests.Session:
    s = requests.Session()
    s.auth = (server.admin_user, server.admin_password)
    return s


def _consul_admin(server: ConsulServer) -> Any:
    parts = urllib.parse.urlsplit(server.url)
    c = consul.Consul(host=parts.hostname, port=parts.port or 8500)
    c.token = server.management_token
    return c


# The stores' names: a ResultStore of each type in the test's namespace, whose admin
# Secret (couch-admin, consul-mgmt) is in that namespace too.
COUCH, CONSUL = "couchdb", "consul"


@pytest.fixture
def couch_store(kubectl: Kubectl, namespace: str, couchdb_server: CouchDBServer) -> str:
    apply(
        kubectl,
        couchdb_admin_secret(namespace, "couch-admin", couchdb_server),
        couchdb_store(namespace, COUCH, couchdb_server.url, "couch-admin"),
    )
    return COUCH


@pytest.fixture
def cons_store(kubectl: Kubectl, namespace: str, consul_server: ConsulServer) -> str:
    apply(
        kubectl,
        admin_secret(namespace, "consul-mgmt", {"token": consul_server.management_token}),
        consul_store(namespace, CONSUL, consul_server.url, "consul-mgmt"),
    )
    return CONSUL


@pytest.fixture
def couch_rb(
    kubectl: Kubectl, namespace: str, couch_store: str, operator: OperatorProcess
) -> dict[str, Any]:
    name = unique("orders")
    apply(kubectl, result_backend(namespace, name, couch_store))
    return wait_condition(kubectl, namespace, name, "Ready", "True")


@pytest.fixture
def cons_rb(
    kubectl: Kubectl, namespace: str, cons_store: str, operator: OperatorProcess
) -> dict[str, Any]:
    name = unique("billing")
    apply(kubectl, result_backend(namespace, name, cons_store))
    return wait_condition(kubectl, namespace, name, "Ready", "True")


# --- CouchDB ----------------------------------------------------------------


def test_couchdb_ready_with_secret_as_the_contract_says(
    kubectl: Kubectl, couch_rb: dict[str, Any], couchdb_server: CouchDBServer
) -> None:
    ns, name = couch_rb["metadata"]["namespace"], couch_rb["metadata"]["name"]
    status = couch_rb["status"]
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == couch_rb["metadata"]["generation"]
    assert status["store"] == {"kind": "ResultStore", "name": COUCH, "type": "couchdb"}
    assert status["secretName"] == f"{name}-result-backend"
    data = secret_data(kubectl, ns, status["secretName"])
    assert data["type"] == "couchdb"
    assert data["provider"] == "resultstores.io"
    assert data["database"] == f"{ns}-{name}"
    assert data["username"] == f"rb_{ns}_{name}"
    assert len(data["password"]) >= 32
    host = urllib.parse.urlsplit(couchdb_server.url).hostname
    assert data["uri"] == (
        f"couchdb://{data['username']}:{data['password']}@{host}:{data['port']}/{data['database']}"
    )
    assert data["password"] not in status["url"]
    assert couchdb_server.admin_password not in json.dumps(data)
    secret = get_json(kubectl, "secret", status["secretName"], "-n", ns)
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "resultbackend-operator"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == couch_rb["metadata"]["uid"]
    for type_ in ("Provisioned", "BackendReachable", "WorkersInjected", "Ready"):
        cond = next(c for c in status["conditions"] if c["type"] == type_)
        assert cond["status"] == "True"
        assert cond["observedGeneration"] == couch_rb["metadata"]["generation"]
        assert cond["lastTransitionTime"]
    # The store it uses says what it checked and that this ResultBackend uses it.
    store = wait_store_ready(kubectl, ns, COUCH, backends=1)
    assert store["status"]["type"] == "couchdb"
    assert store["status"]["url"] == couchdb_server.url
    assert store["status"]["serverVersion"]


def test_couchdb_worker_credentials_work_in_own_database_only(
    kubectl: Kubectl, couch_rb: dict[str, Any], couchdb_server: CouchDBServer
) -> None:
    ns = couch_rb["metadata"]["namespace"]
    data = secret_data(kubectl, ns, couch_rb["status"]["secretName"])
    worker = (data["username"], data["password"])
    db = urllib.parse.quote(data["database"], safe="")
    put = requests.put(
        f"{couchdb_server.url}/{db}/celery-task-meta-1",
        json={"value": "result"},
        auth=worker,
        timeout=10,
    )
    assert put.status_code in (201, 202), put.text
    got = requests.get(f"{couchdb_server.url}/{db}/celery-task-meta-1", auth=worker, timeout=10)
    assert got.json()["value"] == "result"
    other = unique("other")
    admin = _couch_admin(couchdb_server)
    assert admin.put(f"{couchdb_server.url}/{other}", timeout=10).status_code in (201, 202)
    try:
        admin.put(
            f"{couchdb_server.url}/{other}/_security",
            json={"members": {"names": ["someone-else"], "roles": []}},
            timeout=10,
        )
        denied = requests.put(
            f"{couchdb_server.url}/{other}/x", json={"v": 1}, auth=worker, timeout=10
        )
        # CouchDB 3 answers 403 to an authenticated non-member; pouchdb-server 401.
        assert denied.status_code in (401, 403)
    finally:
        admin.delete(f"{couchdb_server.url}/{other}", timeout=10)


def _couch_revisions(server: CouchDBServer, data: dict[str, str]) -> tuple[str, str, str]:
    """The revisions of both users (the Secret's is A until a rotation) and `_security`."""
    admin = _couch_admin(server)
    revs = [
        admin.get(f"{server.url}/_users/org.couchdb.user:{user}", timeout=10).json()["_rev"]
        for user in (data["username"], f"{data['username']}_b")
    ]
    security = admin.get(
        f"{server.url}/{urllib.parse.quote(data['database'], safe='')}/_security", timeout=10
    ).text
    return revs[0], revs[1], security


def _store_version(kubectl: Kubectl, ns: str, name: str) -> str:
    """The ResultStore's resourceVersion once it is Ready and counts one ResultBackend."""
    return str(wait_store_ready(kubectl, ns, name, backends=1)["metadata"]["resourceVersion"])


def test_couchdb_steady_state_makes_no_writes(
    kubectl: Kubectl,
    couch_rb: dict[str, Any],
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
) -> None:
    ns, name = couch_rb["metadata"]["namespace"], couch_rb["metadata"]["name"]
    data = secret_data(kubectl, ns, couch_rb["status"]["secretName"])
    before = _couch_revisions(couchdb_server, data)
    rb_rv = settled_version(kubectl, ns, name)
    secret_rv = get_json(kubectl, "secret", couch_rb["status"]["secretName"], "-n", ns)["metadata"][
        "resourceVersion"
    ]
    store_rv = _store_version(kubectl, ns, COUCH)
    wait_for_runs(operator, ns, name, 3)  # every 3 s in the tests
    # ... and as many checks of its store, which change nothing either.
    wait_for_store_checks(operator, ns, COUCH, 2)
    assert _couch_revisions(couchdb_server, data) == before
    assert get_json(kubectl, "rb", name, "-n", ns)["metadata"]["resourceVersion"] == rb_rv
    assert get_json(kubectl, "resultstore", COUCH, "-n", ns)["metadata"]["resourceVersion"] == (
        store_rv
    )
    assert (
        get_json(kubectl, "secret", couch_rb["status"]["secretName"], "-n", ns)["metadata"][
            "resourceVersion"
        ]
        == secret_rv
    )


def test_couchdb_delete_policy_removes_database_and_users(
    kubectl: Kubectl,
    namespace: str,
    couchdb_server: CouchDBServer,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    admin = _couch_admin(couchdb_server)
    kept, gone = unique("keep"), unique("gone")
    apply(kubectl, result_backend(namespace, kept, couch_store, "Retain"))
    apply(kubectl, result_backend(namespace, gone, couch_store, "Delete"))
    wait_condition(kubectl, namespace, kept, "Ready", "True")
    wait_condition(kubectl, namespace, gone, "Ready", "True")
    kubectl("delete", "rb", kept, gone, "-n", namespace, "--timeout=60s")
    assert admin.get(f"{couchdb_server.url}/{namespace}-{kept}", timeout=10).status_code == 200
    assert admin.get(f"{couchdb_server.url}/{namespace}-{gone}", timeout=10).status_code == 404
    for name, status in ((kept, 200), (gone, 404)):
        for user in (f"rb_{namespace}_{name}", f"rb_{namespace}_{name}_b"):
            url = f"{couchdb_server.url}/_users/org.couchdb.user:{user}"
            assert admin.get(url, timeout=10).status_code == status, user
    # The worker Secret goes with its owner (garbage collection by kube-controller-manager).
    wait_for(
        "the worker Secret to be garbage-collected",
        lambda: try_get_json(kubectl, "secret", f"{gone}-result-backend", "-n", namespace) is None,
    )


# --- Consul -----------------------------------------------------------------


def test_consul_ready_and_token_confined_to_its_prefix(
    kubectl: Kubectl, cons_rb: dict[str, Any], consul_server: ConsulServer
) -> None:
    ns, name = cons_rb["metadata"]["namespace"], cons_rb["metadata"]["name"]
    status = cons_rb["status"]
    data = secret_data(kubectl, ns, status["secretName"])
    prefix = f"celery/{ns}/{name}"
    assert data["keyPrefix"] == prefix
    assert data["uri"].startswith("consul://")
    assert data["uri"].endswith(f"/{prefix}")
    assert status["consul"]["keyPrefix"] == prefix
    assert status["consul"]["policyID"]
    assert status["consul"]["tokenAccessorID"]
    assert data["token"] not in json.dumps(status)
    assert consul_server.management_token not in json.dumps(data)

    parts = urllib.parse.urlsplit(consul_server.url)
    worker = consul.Consul(host=parts.hostname, port=parts.port or 8500)
    worker.token = data["token"]
    session = worker.session.create(ttl=30, behavior="delete")
    assert worker.kv.put(f"{prefix}/celery-task-meta-1", "result", acquire=session)
    assert worker.kv.get(f"{prefix}/celery-task-meta-1")[1]["Value"] == b"result"
    with pytest.raises(consul.ACLPermissionDenied):
        worker.kv.put(f"{prefix}x/escape", "no")
    with pytest.raises(consul.ACLPermissionDenied):
        worker.kv.put("elsewhere/key", "no")
    worker.session.destroy(session)


def test_consul_steady_state_makes_no_writes(
    kubectl: Kubectl,
    cons_rb: dict[str, Any],
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    ns, name = cons_rb["metadata"]["namespace"], cons_rb["metadata"]["name"]
    admin = _consul_admin(consul_server)
    ids = cons_rb["status"]["consul"]
    policy = admin.acl.policy.read(ids["policyID"])
    token = admin.acl.token.read(ids["tokenAccessorID"])
    rb_rv = settled_version(kubectl, ns, name)
    store_rv = _store_version(kubectl, ns, CONSUL)
    wait_for_runs(operator, ns, name, 3)
    wait_for_store_checks(operator, ns, CONSUL, 2)
    assert get_json(kubectl, "resultstore", CONSUL, "-n", ns)["metadata"]["resourceVersion"] == (
        store_rv
    )
    assert admin.acl.policy.read(ids["policyID"])["ModifyIndex"] == policy["ModifyIndex"]
    assert admin.acl.token.read(ids["tokenAccessorID"])["ModifyIndex"] == token["ModifyIndex"]
    tokens = admin.acl.token.list(policy=ids["policyID"])
    assert len(tokens) == 1
    assert get_json(kubectl, "rb", name, "-n", ns)["metadata"]["resourceVersion"] == rb_rv


def test_consul_delete_policy_removes_policy_token_and_keys(
    kubectl: Kubectl, cons_rb: dict[str, Any], consul_server: ConsulServer
) -> None:
    ns, name = cons_rb["metadata"]["namespace"], cons_rb["metadata"]["name"]
    admin = _consul_admin(consul_server)
    ids = cons_rb["status"]["consul"]
    prefix = ids["keyPrefix"]
    admin.kv.put(f"{prefix}/celery-task-meta-x", "v")
    kubectl(
        "patch", "rb", name, "-n", ns, "--type=merge", "-p", '{"spec":{"deletionPolicy":"Delete"}}'
    )
    wait_for(
        "the Delete policy to be observed",
        lambda: get_json(kubectl, "rb", name, "-n", ns)["status"]["observedGeneration"] == 2,
    )
    kubectl("delete", "rb", name, "-n", ns, "--timeout=60s")
    assert admin.kv.get(prefix, recurse=True)[1] is None
    names = [p["Name"] for p in admin.acl.policy.list()]
    assert f"resultbackend-{ns}-{name}" not in names
    assert all(t["AccessorID"] != ids["tokenAccessorID"] for t in admin.acl.token.list())


# --- bad input and safety ------------------------------------------------------


def _events(kubectl: Kubectl, ns: str, kind: str, name: str, reason: str) -> list[dict[str, Any]]:
    """The Events of `ns` about the object `kind`/`name` with `reason`."""
    items = json.loads(events_text(kubectl, ns))["items"]
    return [
        e
        for e in items
        if e["involvedObject"].get("kind") == kind
        and e["involvedObject"].get("name") == name
        and e.get("reason") == reason
    ]


def test_missing_admin_secret_is_a_condition_and_an_event(
    kubectl: Kubectl, namespace: str, couchdb_server: CouchDBServer, operator: OperatorProcess
) -> None:
    # The admin Secret is the store's: its Ready says what is wrong with it, and the
    # ResultBackend says it waits for its store, quoting that.
    name, store = unique("nosecret"), unique("couch")
    apply(
        kubectl,
        couchdb_store(namespace, store, couchdb_server.url, "does-not-exist"),
        result_backend(namespace, name, store),
    )
    store_obj = wait_store_ready(kubectl, namespace, store, "False", "SecretNotFound")
    ready = condition(store_obj, "Ready")
    assert ready is not None
    assert "does-not-exist" in ready["message"]
    obj = store_not_ready(kubectl, namespace, name, "SecretNotFound")
    cond = condition(obj, "Provisioned")
    assert cond is not None
    assert (cond["status"], cond["reason"]) == ("False", "StoreNotReady")
    assert f"ResultStore {store} in namespace {namespace}" in cond["message"]
    assert "does-not-exist" in cond["message"]
    # Not the ResultBackend's user's to fix, nor its own failure: it waits, provisioning.
    assert obj["status"]["phase"] == "Provisioning"
    assert obj["status"]["store"] == {"kind": "ResultStore", "name": store}
    wait_for(
        "a SecretNotFound event about the store",
        lambda: _events(kubectl, namespace, "ResultStore", store, "SecretNotFound"),
    )
    wait_for(
        "a StoreNotReady event about the ResultBackend",
        lambda: _events(kubectl, namespace, "ResultBackend", name, "StoreNotReady"),
    )
    # Creating the Secret later heals both without touching either resource.
    generations = (store_obj["metadata"]["generation"], obj["metadata"]["generation"])
    apply(kubectl, couchdb_admin_secret(namespace, "does-not-exist", couchdb_server))
    store_obj = wait_store_ready(kubectl, namespace, store)
    obj = wait_condition(kubectl, namespace, name, "Ready", "True")
    assert (store_obj["metadata"]["generation"], obj["metadata"]["generation"]) == generations
    assert _events(kubectl, namespace, "ResultStore", store, "Ready")


def test_wrong_admin_password_is_reported_without_the_password(
    kubectl: Kubectl, namespace: str, couchdb_server: CouchDBServer, operator: OperatorProcess
) -> None:
    name, store = unique("badpw"), unique("couch")
    wrong = "definitely-wrong-password-0123456789"
    apply(
        kubectl,
        admin_secret(namespace, "couch-admin", {"username": "admin", "password": wrong}),
        couchdb_store(namespace, store, couchdb_server.url, "couch-admin"),
        result_backend(namespace, name, store),
    )
    store_obj = wait_store_ready(kubectl, namespace, store, "False", "AdminAuthFailed")
    obj = store_not_ready(kubectl, namespace, name, "AdminAuthFailed")
    assert_no_secret(
        [json.dumps(store_obj), json.dumps(obj), events_text(kubectl, namespace), operator.logs],
        [wrong],
    )


def test_consul_token_without_acl_write_is_forbidden(
    kubectl: Kubectl, namespace: str, consul_server: ConsulServer, operator: OperatorProcess
) -> None:
    admin = _consul_admin(consul_server)
    pol = admin.acl.policy.create(name=unique("ro"), rules={"acl": "read"})
    tok = admin.acl.token.create(policies_id=[pol["ID"]])
    try:
        name, store = unique("ro"), unique("consul")
        apply(
            kubectl,
            admin_secret(namespace, "consul-ro", {"token": tok["SecretID"]}),
            consul_store(namespace, store, consul_server.url, "consul-ro"),
            result_backend(namespace, name, store),
        )
        store_obj = wait_store_ready(kubectl, namespace, store, "False", "Forbidden")
        ready = condition(store_obj, "Ready")
        assert ready is not None
        assert 'acl = "write"' in ready["message"]
        obj = store_not_ready(kubectl, namespace, name, "Forbidden")
        cond = condition(obj, "Ready")
        assert cond is not None
        assert 'acl = "write"' in cond["message"]
        assert_no_secret(
            [
                json.dumps(store_obj),
                json.dumps(obj),
                events_text(kubectl, namespace),
                operator.logs,
            ],
            [tok["SecretID"]],
        )
    finally:
        admin.acl.token.delete(tok["AccessorID"])
        admin.acl.policy.delete(pol["ID"])


def test_no_secret_value_reaches_logs_events_or_status(
    kubectl: Kubectl,
    couch_rb: dict[str, Any],
    cons_rb: dict[str, Any],
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
    operator: OperatorProcess,
) -> None:
    values = [couchdb_server.admin_password, consul_server.management_token]
    texts = [operator.logs]
    for rb in (couch_rb, cons_rb):
        ns = rb["metadata"]["namespace"]
        data = secret_data(kubectl, ns, rb["status"]["secretName"])
        values.append(data.get("password") or data["token"])
        texts.append(json.dumps(get_json(kubectl, "rb", rb["metadata"]["name"], "-n", ns)))
        store = rb["spec"]["storeRef"]["name"]
        texts.append(json.dumps(get_json(kubectl, "resultstore", store, "-n", ns)))
        texts.append(events_text(kubectl, ns))
    assert_no_secret(texts, values)


def test_deleting_the_namespace_completes_even_when_the_admin_secret_went_first(
    kubectl: Kubectl,
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
) -> None:
    ns, name = f"t-{unique('ns')}", unique("orphan")
    kubectl("create", "namespace", ns)
    # The store, its admin Secret and the ResultBackend all live in the namespace.
    apply(
        kubectl,
        couchdb_admin_secret(ns, "couch-admin", couchdb_server),
        couchdb_store(ns, COUCH, couchdb_server.url, "couch-admin"),
        result_backend(ns, name, COUCH, "Delete"),
    )
    wait_condition(kubectl, ns, name, "Ready", "True")
    kubectl("delete", "secret", "couch-admin", "-n", ns)
    # Outside a namespace deletion the Secret may come back: deletion waits and says why.
    kubectl("delete", "rb", name, "-n", ns, "--wait=false")
    wait_for("a DeleteFailed event", lambda: "DeleteFailed" in events_text(kubectl, ns))
    assert try_get_json(kubectl, "rb", name, "-n", ns) is not None
    # In a terminating namespace it never can: the finalizer lets go, the data stays; the
    # store, deleted with the namespace, waits for it and then goes too.
    kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(
        "the namespace to be deleted",
        lambda: try_get_json(kubectl, "namespace", ns) is None,
        timeout=120,
    )
    admin = _couch_admin(couchdb_server)
    assert admin.get(f"{couchdb_server.url}/{ns}-{name}", timeout=10).status_code == 200
    assert f"{ns}/{name}: namespace {ns} is being deleted" in operator.logs
    admin.delete(f"{couchdb_server.url}/{ns}-{name}", timeout=10)
