"""Each store's server probe against the real CouchDB-API server and Consul agent."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from resultbackend_operator.backends import store_for

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_running_couchdb_answers_the_probe_without_credentials(couchdb_server: Any) -> None:
    assert store_for("couchdb").ask_server(couchdb_server.url, timeout=5)


def test_a_running_consul_agent_names_a_leader(consul_server: Any) -> None:
    assert store_for("consul").ask_server(consul_server.url, timeout=5)


@pytest.mark.parametrize("store", ["couchdb", "consul"])
def test_nothing_listening_does_not_answer(store: str) -> None:
    assert not store_for(store).ask_server(f"http://127.0.0.1:{_closed_port()}", timeout=2)
