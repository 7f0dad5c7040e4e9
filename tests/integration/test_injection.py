"""Injection into real Deployments and StatefulSets (kube-controller-manager running)."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
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
    events_text,
    get_json,
    result_backend,
    secret_data,
    unique,
    wait_condition,
    wait_for,
    wait_for_runs,
)

pytestmark = pytest.mark.integration

HASH = "resultstores.io/config-hash"
BY = "resultstores.io/injected-by"


def deployment(ns: str, name: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "worker",
        "image": "python:3.11-slim",
        "command": ["celery", "-A", "tasks", "worker"],
        "env": [{"name": "USER_SETTING", "value": "kept"}],
    }
    container.update(extra.pop("container", {}))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": {"mine": "1"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"user/anno": "x"}},
                "spec": {"containers": [container]},
            },
        },
    }


def statefulset(ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    d = deployment(ns, name, labels)
    d["kind"] = "StatefulSet"
    d["spec"]["serviceName"] = name
    return d


def env_of(obj: dict[str, Any], container: str = "worker") -> dict[str, Any]:
    for c in obj["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container:
            return {e["name"]: e for e in c.get("env", [])}
    raise AssertionError(f"no container {container}")


def injected(obj: dict[str, Any]) -> bool:
    return "CELERY_RESULT_BACKEND" in env_of(obj)


@pytest.fixture
def couch_store(kubectl: Kubectl, namespace: str, couchdb_server: CouchDBServer) -> str:
    """A CouchDB ResultStore in the test's namespace (its admin Secret beside it)."""
    apply(
        kubectl,
        couchdb_admin_secret(namespace, "couch-admin", couchdb_server),
        couchdb_store(namespace, "couchdb", couchdb_server.url, "couch-admin"),
    )
    return "couchdb"


def _selecting(ns: str, name: str, store: str, app: str) -> dict[str, Any]:
    return result_backend(ns, name, store, workers={"selector": {"matchLabels": {"tier": app}}})


def test_matching_workloads_get_env_and_hash_and_others_are_untouched(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    sel = {"tier": "orders"}
    apply(
        kubectl,
        deployment(namespace, "w1", sel),
        deployment(namespace, "w2", sel),
        statefulset(namespace, "w3", sel),
        deployment(namespace, "other", {"tier": "web"}),
    )
    name = unique("orders")
    apply(kubectl, _selecting(namespace, name, couch_store, "orders"))
    obj = wait_condition(kubectl, namespace, name, "Ready", "True")
    assert obj["status"]["workers"] == {"selected": 3, "injected": 3, "names": ["w1", "w2", "w3"]}
    secret = f"{name}-result-backend"
    data = secret_data(kubectl, namespace, secret)
    for kind, wl in (("deployment", "w1"), ("deployment", "w2"), ("statefulset", "w3")):
        live = get_json(kubectl, kind, wl, "-n", namespace)
        env = env_of(live)
        assert env["CELERY_RESULT_BACKEND"]["valueFrom"]["secretKeyRef"] == {
            "name": secret,
            "key": "uri",
        }
        assert env["USER_SETTING"] == {"name": "USER_SETTING", "value": "kept"}
        assert live["metadata"]["annotations"][BY] == name
        assert live["spec"]["template"]["metadata"]["annotations"][HASH]
        assert data["password"] not in json.dumps(live)
    other = get_json(kubectl, "deployment", "other", "-n", namespace)
    assert not injected(other)
    assert BY not in other["metadata"].get("annotations", {})


def _replicasets(kubectl: Kubectl, ns: str, app: str) -> int:
    return len(get_json(kubectl, "replicasets", "-n", ns, "-l", f"app={app}")["items"])


@pytest.mark.parametrize(("store", "key"), [("consul", "token"), ("couchdb", "password")])
def test_rotation_rolls_once_and_a_restart_rolls_nothing(
    kubectl: Kubectl,
    namespace: str,
    consul_server: ConsulServer,
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
    store: str,
    key: str,
) -> None:
    apply(kubectl, deployment(namespace, "bw", {"tier": "billing"}))
    name = unique("billing")
    selector = {"selector": {"matchLabels": {"tier": "billing"}}}
    if store == "consul":
        apply(
            kubectl,
            admin_secret(namespace, "mgmt", {"token": consul_server.management_token}),
            consul_store(namespace, store, consul_server.url, "mgmt"),
        )
    else:
        apply(
            kubectl,
            couchdb_admin_secret(namespace, "mgmt", couchdb_server),
            couchdb_store(namespace, store, couchdb_server.url, "mgmt"),
        )
    apply(kubectl, result_backend(namespace, name, store, workers=selector))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    live = wait_for(
        "the injection",
        lambda: (d := get_json(kubectl, "deployment", "bw", "-n", namespace)) and injected(d) and d,
    )
    if store == "consul":
        assert "CONSUL_HTTP_TOKEN" in env_of(live)
    wait_for("the first ReplicaSet", lambda: _replicasets(kubectl, namespace, "bw") >= 1)
    rs_before = _replicasets(kubectl, namespace, "bw")
    generation = live["metadata"]["generation"]

    operator.restart()
    wait_for_runs(operator, namespace, name, 1, "full reconcile")  # the resume
    wait_for_runs(operator, namespace, name, 2)
    operator.assert_running()
    assert get_json(kubectl, "deployment", "bw", "-n", namespace)["metadata"]["generation"] == (
        generation
    )
    assert _replicasets(kubectl, namespace, "bw") == rs_before

    old = secret_data(kubectl, namespace, f"{name}-result-backend")[key]
    trigger = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.5)
    kubectl(
        "patch",
        "rb",
        name,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"rotation": {"trigger": trigger}}}),
    )
    wait_for(
        "the rotation",
        lambda: secret_data(kubectl, namespace, f"{name}-result-backend")[key] != old,
    )
    wait_for(
        "one new ReplicaSet",
        lambda: _replicasets(kubectl, namespace, "bw") == rs_before + 1,
    )
    wait_for_runs(operator, namespace, name, 2)
    assert _replicasets(kubectl, namespace, "bw") == rs_before + 1
    obj = get_json(kubectl, "rb", name, "-n", namespace)
    assert obj["status"]["credentialsRotatedAt"] >= trigger


def test_late_workload_is_injected_and_relabelling_releases_it_exactly(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    name = unique("late")
    apply(kubectl, _selecting(namespace, name, couch_store, "late"))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    apply(kubectl, deployment(namespace, "latecomer", {"tier": "other"}))
    original = get_json(kubectl, "deployment", "latecomer", "-n", namespace)
    kubectl("label", "deployment", "latecomer", "-n", namespace, "tier=late", "--overwrite")
    wait_for(
        "the late workload to be injected",
        lambda: injected(get_json(kubectl, "deployment", "latecomer", "-n", namespace)),
    )
    kubectl("label", "deployment", "latecomer", "-n", namespace, "tier=other", "--overwrite")
    released = wait_for(
        "the release",
        lambda: (
            (d := get_json(kubectl, "deployment", "latecomer", "-n", namespace))
            and not injected(d)
            and d
        ),
    )
    assert (
        released["spec"]["template"]["spec"]["containers"]
        == (original["spec"]["template"]["spec"]["containers"])
    )

    def user_annotations(obj: dict[str, Any]) -> dict[str, str]:
        # The Deployment controller's own revision counter moves with every rollout.
        annotations = dict(obj["metadata"]["annotations"])
        annotations.pop("deployment.kubernetes.io/revision", None)
        return annotations

    assert user_annotations(released) == user_annotations(original)
    assert released["spec"]["template"]["metadata"]["annotations"] == {"user/anno": "x"}


def test_changing_the_selector_releases_what_it_no_longer_selects_and_injects_the_rest(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    # The reconcile lists only what the new selector selects; the workload the
    # old one selected is found because this ResultBackend injected it.
    name = unique("moving")
    apply(
        kubectl,
        deployment(namespace, "blue", {"tier": "blue"}),
        statefulset(namespace, "green", {"tier": "green"}),
        _selecting(namespace, name, couch_store, "blue"),
    )
    wait_for(
        "blue to be injected",
        lambda: injected(get_json(kubectl, "deployment", "blue", "-n", namespace)),
    )

    apply(kubectl, _selecting(namespace, name, couch_store, "green"))

    wait_for(
        "green to be injected",
        lambda: injected(get_json(kubectl, "statefulset", "green", "-n", namespace)),
    )
    wait_for(
        "blue to be released",
        lambda: not injected(get_json(kubectl, "deployment", "blue", "-n", namespace)),
    )
    status = wait_for(
        "status to count green alone",
        lambda: (
            (rb := get_json(kubectl, "rb", name, "-n", namespace))["status"]["workers"]["names"]
            == ["green"]
            and rb["status"]
        ),
    )
    assert status["workers"]["selected"] == 1


def test_deleted_env_var_is_restored(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    apply(kubectl, deployment(namespace, "drift", {"tier": "drift"}))
    name = unique("drift")
    apply(kubectl, _selecting(namespace, name, couch_store, "drift"))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    live = wait_for(
        "injection",
        lambda: (
            (d := get_json(kubectl, "deployment", "drift", "-n", namespace)) and injected(d) and d
        ),
    )
    env = live["spec"]["template"]["spec"]["containers"][0]["env"]
    index = [e["name"] for e in env].index("CELERY_RESULT_BACKEND")
    kubectl(
        "patch",
        "deployment",
        "drift",
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": f"/spec/template/spec/containers/0/env/{index}"}]),
    )
    wait_for(
        "the env var to come back",
        lambda: injected(get_json(kubectl, "deployment", "drift", "-n", namespace)),
    )


def test_deleting_the_resultbackend_releases_every_workload(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    apply(
        kubectl,
        deployment(namespace, "d1", {"tier": "gone"}),
        statefulset(namespace, "s1", {"tier": "gone"}),
    )
    name = unique("gone")
    apply(kubectl, _selecting(namespace, name, couch_store, "gone"))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    kubectl("delete", "rb", name, "-n", namespace, "--timeout=60s")
    for kind, wl in (("deployment", "d1"), ("statefulset", "s1")):
        live = get_json(kubectl, kind, wl, "-n", namespace)
        assert not injected(live)
        assert BY not in live["metadata"].get("annotations", {})
        assert HASH not in live["spec"]["template"]["metadata"].get("annotations", {})


def test_conflicts_are_reported_and_never_fought(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    operator: OperatorProcess,
) -> None:
    apply(kubectl, deployment(namespace, "shared", {"tier": "shared"}))
    apply(
        kubectl,
        deployment(
            namespace,
            "literal",
            {"tier": "shared2"},
            container={"env": [{"name": "CELERY_RESULT_BACKEND", "value": "redis://elsewhere"}]},
        ),
    )
    first, second = unique("first"), unique("second")
    apply(kubectl, _selecting(namespace, first, couch_store, "shared"))
    wait_condition(kubectl, namespace, first, "Ready", "True")
    apply(kubectl, _selecting(namespace, second, couch_store, "shared"))
    obj = wait_condition(kubectl, namespace, second, "WorkersInjected", "False")
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "WorkersInjected")
    assert cond["reason"] == "Conflict"
    assert "shared" in cond["message"]
    third = unique("third")
    apply(kubectl, _selecting(namespace, third, couch_store, "shared2"))
    obj = wait_condition(kubectl, namespace, third, "WorkersInjected", "False")
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "WorkersInjected")
    assert "CELERY_RESULT_BACKEND" in cond["message"]
    assert "redis://elsewhere" not in cond["message"]

    shared_rv = get_json(kubectl, "deployment", "shared", "-n", namespace)["metadata"][
        "resourceVersion"
    ]
    literal_rv = get_json(kubectl, "deployment", "literal", "-n", namespace)["metadata"][
        "resourceVersion"
    ]
    for rb in (first, second, third):  # several periodic checks of all three
        wait_for_runs(operator, namespace, rb, 2)
    shared = get_json(kubectl, "deployment", "shared", "-n", namespace)
    assert shared["metadata"]["resourceVersion"] == shared_rv
    assert shared["metadata"]["annotations"][BY] == first
    literal = get_json(kubectl, "deployment", "literal", "-n", namespace)
    assert literal["metadata"]["resourceVersion"] == literal_rv
    assert env_of(literal)["CELERY_RESULT_BACKEND"]["value"] == "redis://elsewhere"


def _rotate(kubectl: Kubectl, ns: str, name: str, key: str) -> dict[str, str]:
    """Move rotation.trigger to now; returns the worker Secret's data it replaces."""
    old = secret_data(kubectl, ns, f"{name}-result-backend")
    trigger = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    time.sleep(1.1)  # the trigger must be in the past, at second resolution
    patch = json.dumps({"spec": {"rotation": {"trigger": trigger}}})
    kubectl("patch", "rb", name, "-n", ns, "--type=merge", "-p", patch)
    wait_for(
        "the rotation",
        lambda: secret_data(kubectl, ns, f"{name}-result-backend")[key] != old[key],
    )
    return old


def _token_works(consul_server: ConsulServer, token: str) -> bool:
    res = requests.get(
        f"{consul_server.url}/v1/acl/token/self", headers={"X-Consul-Token": token}, timeout=10
    )
    return res.status_code == 200


def _couch_status(server: CouchDBServer, data: dict[str, str]) -> int:
    """What CouchDB answers to the Secret data's user reading its database."""
    db = urllib.parse.quote(data["database"], safe="")
    res = requests.get(f"{server.url}/{db}", auth=(data["username"], data["password"]), timeout=10)
    return res.status_code


ROLLOUTS = [
    # Scaled to zero: the controller finishes the rollout at once.
    (0, "every injected workload rolled out the new credentials"),
    # One replica: with no nodes its new pod never starts, the old one stays, so
    # only the grace period (RBO_ROTATION_GRACE, 10 s in the tests) ends it.
    (1, "since the rotation"),
]


@pytest.mark.parametrize(("replicas", "why"), ROLLOUTS)
def test_rotation_revokes_the_old_consul_token_only_after_the_workers_rolled(
    kubectl: Kubectl,
    namespace: str,
    consul_server: ConsulServer,
    operator: OperatorProcess,
    replicas: int,
    why: str,
) -> None:
    apply(
        kubectl,
        admin_secret(namespace, "mgmt", {"token": consul_server.management_token}),
        consul_store(namespace, "consul", consul_server.url, "mgmt"),
    )
    wl = deployment(namespace, "bw", {"tier": "billing"})
    wl["spec"]["replicas"] = replicas
    name = unique("billing")
    selector = {"selector": {"matchLabels": {"tier": "billing"}}}
    apply(kubectl, wl, result_backend(namespace, name, "consul", workers=selector))
    wait_condition(kubectl, namespace, name, "Ready", "True")

    old_token = _rotate(kubectl, namespace, name, "token")["token"]
    if replicas:
        # The Secret has the new token and the rollout is under way: pods with the
        # old one still run, so it still works.
        assert _token_works(consul_server, old_token)
    wait_for("the old token to be revoked", lambda: not _token_works(consul_server, old_token))
    new_token = secret_data(kubectl, namespace, f"{name}-result-backend")["token"]
    assert _token_works(consul_server, new_token)
    wait_for("a Revoked event", lambda: "Revoked" in events_text(kubectl, namespace))
    assert why in events_text(kubectl, namespace)


@pytest.mark.parametrize(("replicas", "why"), ROLLOUTS)
def test_rotation_revokes_the_old_couchdb_user_only_after_the_workers_rolled(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
    replicas: int,
    why: str,
) -> None:
    wl = deployment(namespace, "ow", {"tier": "orders"})
    wl["spec"]["replicas"] = replicas
    name = unique("orders")
    apply(kubectl, wl, _selecting(namespace, name, couch_store, "orders"))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    pair = (f"rb_{namespace}_{name}", f"rb_{namespace}_{name}_b")

    old = _rotate(kubectl, namespace, name, "password")
    new = secret_data(kubectl, namespace, f"{name}-result-backend")
    # The Secret moved to the other user; the old one keeps its password for now.
    assert (old["username"], new["username"]) == pair
    if replicas:
        assert _couch_status(couchdb_server, old) == 200
    wait_for("the old user to be revoked", lambda: _couch_status(couchdb_server, old) == 401)
    assert _couch_status(couchdb_server, new) == 200
    wait_for("a Revoked event", lambda: "Revoked" in events_text(kubectl, namespace))
    text = events_text(kubectl, namespace)
    assert why in text
    assert f"revoked superseded CouchDB user {pair[0]}" in text
    obj = get_json(kubectl, "rb", name, "-n", namespace)
    assert obj["status"]["couchdb"]["user"] == pair[1]
    assert obj["status"]["url"].startswith(f"couchdb://{pair[1]}@")


def test_a_couchdb_resultbackend_of_one_user_gains_its_second_and_no_worker_rolls(
    kubectl: Kubectl,
    namespace: str,
    couch_store: str,
    couchdb_server: CouchDBServer,
    operator: OperatorProcess,
) -> None:
    apply(kubectl, deployment(namespace, "uw", {"tier": "upgrade"}))
    name = unique("upgrade")
    apply(kubectl, _selecting(namespace, name, couch_store, "upgrade"))
    wait_condition(kubectl, namespace, name, "Ready", "True")
    live = wait_for(
        "the injection",
        lambda: (d := get_json(kubectl, "deployment", "uw", "-n", namespace)) and injected(d) and d,
    )
    digest = live["spec"]["template"]["metadata"]["annotations"][HASH]
    wait_for(
        "the ReplicaSet of the injected template",
        lambda: any(
            rs["spec"]["template"]["metadata"]["annotations"].get(HASH) == digest
            for rs in get_json(kubectl, "replicasets", "-n", namespace, "-l", "app=uw")["items"]
        ),
    )
    rs_before = _replicasets(kubectl, namespace, "uw")
    secret = get_json(kubectl, "secret", f"{name}-result-backend", "-n", namespace)
    data = secret_data(kubectl, namespace, f"{name}-result-backend")
    first, second = f"rb_{namespace}_{name}", f"rb_{namespace}_{name}_b"
    # What an operator with one user per ResultBackend left: no B, A alone in _security.
    admin = requests.Session()
    admin.auth = (couchdb_server.admin_user, couchdb_server.admin_password)
    users = f"{couchdb_server.url}/_users/org.couchdb.user:"
    rev = admin.get(f"{users}{second}", timeout=10).json()["_rev"]
    assert admin.delete(f"{users}{second}", params={"rev": rev}, timeout=10).ok
    security = f"{couchdb_server.url}/{urllib.parse.quote(data['database'], safe='')}/_security"
    one = {"admins": {"names": [], "roles": []}, "members": {"names": [first], "roles": []}}
    assert admin.put(security, json=one, timeout=10).ok

    operator.restart()  # the upgrade

    wait_for(
        "the second user",
        lambda: "resultstores.io/revoked" in admin.get(f"{users}{second}", timeout=10).json(),
    )
    wait_for(
        "both users in _security",
        lambda: admin.get(security, timeout=10).json()["members"]["names"] == [first, second],
    )
    wait_for_runs(operator, namespace, name, 2)
    after = get_json(kubectl, "deployment", "uw", "-n", namespace)
    assert after["metadata"]["generation"] == live["metadata"]["generation"]
    assert _replicasets(kubectl, namespace, "uw") == rs_before
    assert (
        get_json(kubectl, "secret", f"{name}-result-backend", "-n", namespace)["metadata"][
            "resourceVersion"
        ]
        == secret["metadata"]["resourceVersion"]
    )
    assert _couch_status(couchdb_server, data) == 200
