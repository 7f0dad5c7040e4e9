"""Each store module's server and admin check against the real CouchDB-API server and
Consul agent.

In v1alpha2 the store controller asks each store's server once per check interval,
with the store's admin credentials (`Store.check_admin`), and that answer is the
store's Ready: it replaced the unauthenticated per-server probe (`ask_server`) that
ResultBackends shared. What the probe proved (a running server answers, nothing
listening does not) is proven here of the check, and so are the answers a store's
Ready takes from it: the server's version, and the admin credentials refused.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest

from resultbackend_operator.backends import (
    REASON_ADMIN_AUTH,
    REASON_UNREACHABLE,
    BackendError,
    store_for,
)
from tests.conftest import pinned

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_running_couchdb_says_its_version_to_its_admin(couchdb_server: Any) -> None:
    admin = {"username": couchdb_server.admin_user, "password": couchdb_server.admin_password}
    # pouchdb-server states its own version (CouchDB 3 would state "3.x.y").
    assert store_for("couchdb").check_admin(couchdb_server.url, admin) == pinned(
        "POUCHDB_SERVER_VERSION"
    )


def test_a_running_consul_agent_with_a_leader_says_its_version(consul_server: Any) -> None:
    admin = {"token": consul_server.management_token}
    assert store_for("consul").check_admin(consul_server.url, admin) == pinned(
        "CONSUL_VERSION"
    ).lstrip("v")


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_nothing_listening_is_unreachable(store: str) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    admin = {"username": "admin", "password": secret, "token": secret}
    with pytest.raises(BackendError) as err:
        store_for(store).check_admin(f"http://127.0.0.1:{_closed_port()}", admin)
    assert (err.value.reason, err.value.transient) == (REASON_UNREACHABLE, True)
    assert secret not in str(err.value)


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_admin_credentials_the_server_refuses_are_admin_auth_failed(
    store: str, couchdb_server: Any, consul_server: Any
) -> None:
    wrong = f"wrong-{uuid.uuid4()}"
    if store == "couchdb":
        url, admin = couchdb_server.url, {"username": couchdb_server.admin_user, "password": wrong}
    else:
        url, admin = consul_server.url, {"token": wrong}
    with pytest.raises(BackendError) as err:
        store_for(store).check_admin(url, admin)
    assert (err.value.reason, err.value.transient) == (REASON_ADMIN_AUTH, True)
    assert wrong not in str(err.value)
