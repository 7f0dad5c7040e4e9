"""CouchDB backend: the pure parts (URLs, desired documents, ownership, error mapping)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from resultbackend_operator.backends import (
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    Owner,
)
from resultbackend_operator.backends import couchdb as cdb

OWNER = Owner(namespace="shop", name="orders", uid="uid-1")
OTHER = Owner(namespace="shop", name="orders", uid="uid-2")


def _kombu_parts(url: str) -> tuple[str | None, int | None, str, str, str]:
    """What Celery's CouchDB backend takes from the URL (kombu's url_to_parts + strip)."""
    scheme = urlsplit(url).scheme
    parts = urlsplit("http://" + url[len(scheme) + 3 :])
    return (
        parts.hostname,
        parts.port,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
        unquote(parts.path).strip("/"),
    )


@pytest.mark.parametrize(
    ("server_url", "expected"),
    [
        ("http://couchdb.db.svc", "couchdb://u:p@couchdb.db.svc:5984/shop-orders"),
        ("https://couchdb.db.svc", "couchdb://u:p@couchdb.db.svc:6984/shop-orders"),
        ("http://couchdb.db.svc:15984/", "couchdb://u:p@couchdb.db.svc:15984/shop-orders"),
        ("http://[::1]:5984", "couchdb://u:p@[::1]:5984/shop-orders"),
    ],
)
def test_worker_uri_fills_the_default_port_per_scheme(server_url: str, expected: str) -> None:
    assert cdb.worker_uri(server_url, "u", "p", "shop-orders") == expected


def test_worker_uri_percent_encodes_slash_in_database_and_celery_decodes_it_back() -> None:
    uri = cdb.worker_uri("http://h:5984", "rb_user", "pa:ss@w/rd", "shop/orders$(x)+y")
    assert uri.endswith("/shop%2Forders%24%28x%29%2By")
    assert _kombu_parts(uri) == ("h", 5984, "rb_user", "pa:ss@w/rd", "shop/orders$(x)+y")


def test_display_uri_has_the_user_but_never_the_password() -> None:
    password = "s3cret-value-xyz"
    shown = cdb.display_uri("http://couchdb.db.svc:5984", "rb_shop_orders", "shop-orders")
    assert shown == "couchdb://rb_shop_orders@couchdb.db.svc:5984/shop-orders"
    assert password not in shown


def test_worker_uri_rejects_a_non_http_url() -> None:
    with pytest.raises(ValueError, match="http"):
        cdb.worker_uri("ftp://h", "u", "p", "db")


def test_safe_url_drops_userinfo() -> None:
    assert cdb.safe_url("http://admin:pw@h:5984/") == "http://h:5984"


def test_admin_repr_holds_no_credentials() -> None:
    admin = cdb.CouchDBAdmin("http://h:5984", "admin", "very-secret-pw")
    try:
        assert "very-secret-pw" not in repr(admin)
        assert "admin" not in admin.url
        assert "very-secret-pw" not in repr(admin._server)
    finally:
        admin.close()


def test_desired_security_makes_the_sorted_unique_users_the_only_members() -> None:
    assert cdb.desired_security(["b", "a", "b"]) == {
        "admins": {"names": [], "roles": []},
        "members": {"names": ["a", "b"], "roles": []},
    }


def test_normalize_security_ignores_order_and_missing_keys() -> None:
    current = {"members": {"names": ["b", "a"]}, "admins": {}}
    assert cdb.normalize_security(current) == cdb.normalize_security(
        cdb.desired_security(["a", "b"])
    )
    assert cdb.normalize_security({}) != cdb.normalize_security(cdb.desired_security(["a"]))


@pytest.mark.parametrize(
    ("security", "untouched"),
    [
        ({}, True),
        # CouchDB 3's default_security = admin_only for a new database
        ({"members": {"roles": ["_admin"]}, "admins": {"roles": ["_admin"]}}, True),
        ({"members": {"names": ["someone"], "roles": []}}, False),
        ({"members": {"names": [], "roles": ["readers"]}}, False),
        ({"admins": {"names": ["boss"]}}, False),
    ],
)
def test_security_is_untouched_only_without_names_or_custom_roles(
    security: dict[str, Any], untouched: bool
) -> None:
    assert cdb.security_is_untouched(security) is untouched


@pytest.mark.parametrize(
    ("info", "empty"),
    [
        ({"doc_count": 0, "doc_del_count": 0}, True),
        ({"doc_count": 0}, True),  # pouchdb-server has no doc_del_count
        ({"doc_count": 1, "doc_del_count": 0}, False),
        ({"doc_count": 0, "doc_del_count": 3}, False),
        (None, False),
    ],
)
def test_database_is_empty_counts_live_and_deleted_docs(info: Any, empty: bool) -> None:
    assert cdb.database_is_empty(info) is empty


@pytest.mark.parametrize(
    ("marker", "ours"),
    [
        ({"namespace": "shop", "name": "orders", "uid": "uid-1"}, True),
        ({"namespace": "shop", "name": "orders", "uid": "uid-2"}, False),
        ({"namespace": "shop", "name": "orders"}, False),
        (None, False),
        ("uid-1", False),
    ],
)
def test_ownership_is_decided_by_uid(marker: Any, ours: bool) -> None:
    assert cdb.is_owned_by(marker, OWNER) is ours


def test_owner_with_empty_uid_owns_nothing() -> None:
    assert not cdb.is_owned_by({"uid": ""}, Owner("a", "b", ""))


def test_desired_user_doc_is_a_plain_user_marked_with_its_owner() -> None:
    doc = cdb.desired_user_doc("rb_u", "pw", OWNER)
    assert doc == {
        "_id": "org.couchdb.user:rb_u",
        "name": "rb_u",
        "type": "user",
        "roles": [],
        "password": "pw",
        "resultstores.io/owner": {"namespace": "shop", "name": "orders", "uid": "uid-1"},
    }


def test_user_doc_fixes_is_empty_for_our_unchanged_user_and_names_drifted_fields() -> None:
    stored = {
        **cdb.desired_user_doc("rb_u", "pw", OWNER),
        "_rev": "1-x",
        "derived_key": "k",
        "salt": "s",
    }
    del stored["password"]
    assert cdb.user_doc_fixes(stored, "rb_u", OWNER) == {}
    assert cdb.user_doc_fixes({**stored, "roles": ["_admin"]}, "rb_u", OWNER) == {"roles": []}


def test_describe_marker_names_the_foreign_owner() -> None:
    assert "shop/orders uid=uid-2" in cdb.describe_marker(
        {"namespace": "shop", "name": "orders", "uid": "uid-2"}
    )
    assert "no resultstores.io owner marker" in cdb.describe_marker(None)


@pytest.mark.parametrize(
    ("status", "reason", "transient"),
    [
        (500, REASON_UNREACHABLE, True),
        (502, REASON_UNREACHABLE, True),
        (503, REASON_UNREACHABLE, True),
        (401, REASON_ADMIN_AUTH, True),
        (403, REASON_FORBIDDEN, True),
        (409, REASON_CONFLICT, True),
        (412, REASON_CONFLICT, True),
        (400, REASON_BACKEND, False),
        (404, REASON_BACKEND, True),
        (415, REASON_BACKEND, True),
    ],
)
def test_admin_call_status_maps_to_reason(status: int, reason: str, transient: bool) -> None:
    err = cdb.error_for_status(status, "create database 'x'", "http://admin:pw123@h:5984")
    assert (err.reason, err.transient) == (reason, transient)
    assert str(status) in err.message
    assert "pw123" not in err.message


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (401, REASON_WORKER_AUTH),
        (403, REASON_WORKER_AUTH),
        (404, REASON_BACKEND),
        (500, REASON_UNREACHABLE),
        (503, REASON_UNREACHABLE),
        (418, REASON_BACKEND),
    ],
)
def test_worker_check_status_maps_to_reason(status: int, reason: str) -> None:
    err = cdb.worker_error_for_status(status, "shop-orders", "http://h:5984")
    assert err.reason == reason
    assert err.transient
    assert "shop-orders" in err.message


def test_reply_detail_is_couchdb_error_and_reason_truncated() -> None:
    assert cdb.Reply(401, {"error": "unauthorized", "reason": "bad"}).detail() == (
        "unauthorized: bad"
    )
    assert len(cdb.Reply(500, {"error": "x", "reason": "y" * 1000}).detail()) == 200
    assert cdb.Reply(502, None).detail() == ""
