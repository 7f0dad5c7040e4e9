"""The pure parts of reconcile: Secret contents and the rotation rule."""

from __future__ import annotations

import datetime as dt

import pytest

from resultbackend_operator import api
from resultbackend_operator.reconcile import (
    consul_secret_data,
    couchdb_secret_data,
    wants_rotation,
)

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def test_couchdb_secret_has_the_service_binding_keys() -> None:
    data = couchdb_secret_data("http://couch.db:5984", "rb_ns_n", "pw", "ns-n")
    assert data == {
        "type": "couchdb",
        "provider": "resultstores.io",
        "uri": "couchdb://rb_ns_n:pw@couch.db:5984/ns-n",
        "host": "couch.db",
        "port": "5984",
        "username": "rb_ns_n",
        "password": "pw",
        "database": "ns-n",
    }


def test_couchdb_default_port_follows_the_scheme() -> None:
    assert couchdb_secret_data("https://couch.db", "u", "p", "d")["port"] == "6984"


@pytest.mark.parametrize(
    ("one_client", "uri"),
    [
        (False, "consul://c.svc:8500/celery/ns/n"),
        (True, "consul://c.svc:8500/celery/ns/n?one_client=1"),
    ],
)
def test_consul_secret_carries_token_and_prefix(one_client: bool, uri: str) -> None:
    data = consul_secret_data("http://c.svc:8500", "celery/ns/n", one_client, "tok")
    assert data["uri"] == uri
    assert data["token"] == "tok"
    assert data["keyPrefix"] == "celery/ns/n"
    assert "username" not in data


def _rb(trigger: str | None) -> api.ResultBackend:
    spec = {
        "type": "consul",
        "consul": {"url": "http://c:8500", "tokenSecretRef": {"name": "t"}},
    }
    if trigger:
        spec["rotation"] = {"trigger": trigger}
    return api.parse({"metadata": {"namespace": "ns", "name": "n", "uid": "u"}, "spec": spec})


@pytest.mark.parametrize(
    ("trigger", "rotated_at", "rotate"),
    [
        (None, None, False),
        ("2026-11-23T09:00:00Z", None, True),
        ("2026-11-23T09:00:00Z", "2026-11-23T09:30:00Z", False),
        ("2026-11-23T09:45:00Z", "2026-11-23T09:30:00Z", True),
        # A future trigger waits for its time instead of rotating at every reconcile.
        ("2026-11-24T00:00:00Z", "2026-11-23T09:30:00Z", False),
    ],
)
def test_rotation_happens_once_per_trigger_move(
    trigger: str | None, rotated_at: str | None, rotate: bool
) -> None:
    status = {"credentialsRotatedAt": rotated_at} if rotated_at else {}
    assert wants_rotation(_rb(trigger), status, NOW) is rotate
