"""Recovery driven by the Secrets' own changes, not by the clock.

- A deleted worker Secret (`<name>-result-backend`) is back within seconds, and the
  credentials in it work; so is one whose keys were removed or changed.
- Fixing a wrong admin credential (CouchDB admin password, Consul management token) in
  a store's admin Secret makes the store Ready, and its ResultBackend Ready, without
  waiting out the retry backoff of either (a ResultStore: this module's operator
  watches one namespace, and such an operator serves no ClusterResultStore;
  test_stores.py covers those with the session's operator).

The module runs one operator of its own, `python -m resultbackend_operator --namespace
NS` for a namespace of its own, as the ServiceAccount of the Helm chart rendered for
that namespace (`isolated.namespaced_identity`), with settings that leave each
behaviour one explanation only:

- RBO_CHECK_INTERVAL, RBO_CREDENTIAL_CHECK_INTERVAL and RBO_RESYNC_INTERVAL of an
  hour: no periodic check and no resync comes during a test, so a worker Secret that
  is back (or repaired) within SECRET_BACK was brought back by the watch of the Secret
  itself.
- RBO_BACKOFF=60, RBO_MAX_BACKOFF=300: the first retry after a failed run (the
  store's check, the ResultBackend's reconcile) comes 45 to 75 s after it (a minute,
  jittered by a quarter), so Ready within FIX_PICKED_UP of the fix is the admin
  Secret's change running the store's check (the operator asks the Secret of a store
  that failed for it for its resourceVersion every 2 s), and the store's Ready
  enqueueing its ResultBackends. The fix is applied as soon as the failure shows.

The waits are bounds, not performance figures: SECRET_BACK and FIX_PICKED_UP are far
below the hour and the minute that are the only other ways back.

Isolation: the session's `operator` fixture (every namespace, 1 s backoff) would fix
both cases itself; this module never requests it and requests
`session_operator_stopped`, which stops it meanwhile when an earlier module started it.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
import uuid
from collections.abc import Iterator
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
from tests.integration.helpers import (
    admin_secret,
    apply,
    consul_store,
    couchdb_store,
    get_json,
    result_backend,
    secret_data,
    settled_version,
    store_not_ready,
    try_get_json,
    unique,
    wait_condition,
    wait_for,
    wait_store_ready,
)
from tests.integration.isolated import own_namespace, running_operator

pytestmark = pytest.mark.integration

STORES = ("couchdb", "consul")
HOUR = "3600"
RECOVERY_ENV = {
    **OPERATOR_TEST_ENV,
    "RBO_CHECK_INTERVAL": HOUR,
    "RBO_CREDENTIAL_CHECK_INTERVAL": HOUR,
    "RBO_RESYNC_INTERVAL": HOUR,
    "RBO_BACKOFF": "60",
    "RBO_MAX_BACKOFF": "300",
}
SECRET_BACK = 30.0
FIX_PICKED_UP = 20.0


@pytest.fixture(scope="module")
def recovery_namespace(kubectl: Kubectl) -> Iterator[str]:
    with own_namespace(kubectl, "t-recovery") as name:
        yield name


@pytest.fixture(scope="module")
def recovery_operator(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    helm: Helm,
    crd: None,
    recovery_namespace: str,
    tmp_path_factory: pytest.TempPathFactory,
    session_operator_stopped: None,
) -> Iterator[OperatorProcess]:
    """The module's operator: RECOVERY_ENV, watching recovery_namespace only."""
    directory = tmp_path_factory.mktemp("recovery")
    with running_operator(
        stack_env, kubectl, helm, recovery_namespace, directory, RECOVERY_ENV
    ) as op:
        yield op


def admin_values(
    store: str, couchdb_server: CouchDBServer, consul_server: ConsulServer, wrong: bool = False
) -> dict[str, str]:
    """The admin Secret's data; `wrong`: a password or token the store refuses."""
    if store == "couchdb":
        password = f"wrong-{uuid.uuid4().hex}" if wrong else couchdb_server.admin_password
        return {"username": couchdb_server.admin_user, "password": password}
    return {"token": str(uuid.uuid4()) if wrong else consul_server.management_token}


def store_object(
    store: str,
    kind: str,
    ns: str,
    name: str,
    secret: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
) -> dict[str, Any]:
    """A store of type `store` and `kind` whose admin Secret is `secret`."""
    if store == "couchdb":
        return couchdb_store(ns, name, couchdb_server.url, secret, kind=kind)
    return consul_store(ns, name, consul_server.url, secret, kind=kind)


def worker_credentials_work(
    store: str, data: dict[str, str], couchdb_server: CouchDBServer, consul_server: ConsulServer
) -> bool:
    """The store accepts the Secret's worker credentials (a read, or a key round trip)."""
    if store == "couchdb":
        db = urllib.parse.quote(data["database"], safe="")
        res = requests.get(
            f"{couchdb_server.url}/{db}", auth=(data["username"], data["password"]), timeout=10
        )
        return res.status_code == 200
    key = f"{consul_server.url}/v1/kv/{data['keyPrefix']}/recovery-probe"
    headers = {"X-Consul-Token": data["token"]}
    put = requests.put(key, data=b"x", headers=headers, timeout=10)
    if put.status_code != 200 or put.text.strip() != "true":
        return False
    return requests.delete(key, headers=headers, timeout=10).status_code == 200


def _settled(
    kubectl: Kubectl,
    store: str,
    ns: str,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
) -> str:
    """A new ResultBackend of `store`, on a ResultStore of its own name with a working
    admin Secret, once settled; its name."""
    name = unique(store)
    apply(
        kubectl,
        admin_secret(ns, f"{name}-admin", admin_values(store, couchdb_server, consul_server)),
        store_object(
            store, "ResultStore", ns, name, f"{name}-admin", couchdb_server, consul_server
        ),
        result_backend(ns, name, name, "Delete"),
    )
    settled_version(kubectl, ns, name)
    return name


@pytest.mark.parametrize("store", STORES)
def test_a_deleted_worker_secret_is_back_within_seconds_with_working_credentials(
    store: str,
    kubectl: Kubectl,
    recovery_namespace: str,
    recovery_operator: OperatorProcess,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
) -> None:
    ns = recovery_namespace
    name = _settled(kubectl, store, ns, couchdb_server, consul_server)
    rb_uid = get_json(kubectl, "resultbackend", name, "-n", ns)["metadata"]["uid"]
    secret_name = f"{name}-result-backend"
    old_uid = get_json(kubectl, "secret", secret_name, "-n", ns)["metadata"]["uid"]

    kubectl("delete", "secret", secret_name, "-n", ns)

    def back() -> dict[str, Any] | None:
        obj = try_get_json(kubectl, "secret", secret_name, "-n", ns)
        return obj if obj is not None and obj["metadata"]["uid"] != old_uid else None

    secret = wait_for(f"the worker Secret {ns}/{secret_name} to be back", back, SECRET_BACK)
    recovery_operator.assert_running()
    assert [o["uid"] for o in secret["metadata"].get("ownerReferences", [])] == [rb_uid]
    wait_for(
        f"the credentials in {ns}/{secret_name} to work with {store}",
        lambda: worker_credentials_work(
            store, secret_data(kubectl, ns, secret_name), couchdb_server, consul_server
        ),
        SECRET_BACK,
    )
    settled_version(kubectl, ns, name)


@pytest.mark.parametrize("store", STORES)
def test_fixing_a_wrong_admin_credential_makes_it_ready_without_waiting_out_the_backoff(
    store: str,
    kubectl: Kubectl,
    recovery_namespace: str,
    recovery_operator: OperatorProcess,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
) -> None:
    ns, name = recovery_namespace, unique(store)
    admin = f"{name}-admin"
    kind = "ResultStore"
    apply(
        kubectl,
        admin_secret(ns, admin, admin_values(store, couchdb_server, consul_server, wrong=True)),
        store_object(store, kind, ns, name, admin, couchdb_server, consul_server),
        result_backend(ns, name, name, "Delete", kind=kind),
    )
    # The store says what is wrong; its ResultBackend waits for it and quotes it.
    wait_store_ready(kubectl, ns, name, "False", "AdminAuthFailed", kind=kind)
    store_not_ready(kubectl, ns, name, "AdminAuthFailed")

    # The retries both failures scheduled are RBO_BACKOFF (60 s, jittered: at least
    # 45 s) away: only the admin Secret's change can bring Ready within FIX_PICKED_UP.
    apply(kubectl, admin_secret(ns, admin, admin_values(store, couchdb_server, consul_server)))
    wait_condition(kubectl, ns, name, "Ready", "True", timeout=FIX_PICKED_UP)
    wait_store_ready(kubectl, ns, name, kind=kind, backends=1, timeout=FIX_PICKED_UP)
    recovery_operator.assert_running()


@pytest.mark.parametrize("store", STORES)
def test_a_tampered_worker_secret_is_repaired_within_seconds(
    store: str,
    kubectl: Kubectl,
    recovery_namespace: str,
    recovery_operator: OperatorProcess,
    couchdb_server: CouchDBServer,
    consul_server: ConsulServer,
) -> None:
    ns = recovery_namespace
    name = _settled(kubectl, store, ns, couchdb_server, consul_server)
    secret_name = f"{name}-result-backend"
    original = secret_data(kubectl, ns, secret_name)
    # Not the credential: the Secret is the record of it (a CouchDB password found
    # there is the one the user gets), so a changed one is a new credential, not damage.
    patch = [
        {"op": "remove", "path": "/data/uri"},
        {"op": "replace", "path": "/data/host", "value": base64.b64encode(b"x.invalid").decode()},
    ]
    kubectl("patch", "secret", secret_name, "-n", ns, "--type=json", "-p", json.dumps(patch))

    wait_for(
        f"the worker Secret {ns}/{secret_name} to be repaired",
        lambda: secret_data(kubectl, ns, secret_name) == original,
        SECRET_BACK,
    )
    assert worker_credentials_work(store, original, couchdb_server, consul_server)
    recovery_operator.assert_running()
    settled_version(kubectl, ns, name)
