"""CouchDB backend: the pure parts (URLs, desired documents, ownership, error mapping)."""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from resultbackend_operator import api
from resultbackend_operator.backends import (
    NOTHING_SUPERSEDED,
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    Owner,
    Superseded,
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


# --- two users per ResultBackend: who is active, and rotation -----------------------

PAIR = ("rb_shop_orders", "rb_shop_orders_b")


def test_the_second_user_is_named_after_the_first_and_no_one_elses_first() -> None:
    assert cdb.user_pair("rb_shop_orders") == PAIR
    # An A name has exactly two '_' (Kubernetes names hold none), a B name three.
    assert cdb.user_pair("rb_shop_orders")[1].count("_") == 3


@pytest.mark.parametrize(
    ("secret_user", "password", "rotation", "rotations", "expected"),
    [
        # A fresh ResultBackend, a lost Secret, a Secret naming someone else: A, new password.
        (None, "", None, {}, cdb.UserPlan(PAIR[0], PAIR[1], True, False)),
        ("rb_other", "pw", None, {}, cdb.UserPlan(PAIR[0], PAIR[1], True, False)),
        (PAIR[1], "", None, {}, cdb.UserPlan(PAIR[0], PAIR[1], True, False)),
        # Steady: the Secret's user and password stay.
        (PAIR[0], "pw", None, {}, cdb.UserPlan(PAIR[0], PAIR[1], False, False)),
        (PAIR[1], "pw", None, {}, cdb.UserPlan(PAIR[1], PAIR[0], False, False)),
        # A rotation moves to the other user, whichever is active.
        (PAIR[0], "pw", "T2", {PAIR[0]: "T1"}, cdb.UserPlan(PAIR[1], PAIR[0], True, True)),
        (PAIR[1], "pw", "T2", {PAIR[1]: "T1"}, cdb.UserPlan(PAIR[0], PAIR[1], True, True)),
        # ... unless the Secret's user got its password for this trigger already.
        (PAIR[1], "pw", "T2", {PAIR[1]: "T2"}, cdb.UserPlan(PAIR[1], PAIR[0], False, False)),
        # The idle user's marker says nothing about the Secret: move.
        (PAIR[0], "pw", "T2", {PAIR[1]: "T2"}, cdb.UserPlan(PAIR[1], PAIR[0], True, True)),
    ],
)
def test_plan_users(
    secret_user: str | None,
    password: str,
    rotation: str | None,
    rotations: dict[str, object],
    expected: cdb.UserPlan,
) -> None:
    assert cdb.plan_users(PAIR, secret_user, password, rotation, rotations) == expected


def test_a_revoked_user_doc_holds_a_random_password_and_says_when() -> None:
    one = cdb.revoked_user_doc("rb_u", OWNER, "2026-12-01T00:00:00+00:00")
    two = cdb.revoked_user_doc("rb_u", OWNER, "2026-12-01T00:00:00+00:00")
    assert one["password"] != two["password"]
    assert one[cdb.USER_REVOKED_FIELD] == "2026-12-01T00:00:00+00:00"
    assert one[cdb.USER_OWNER_FIELD] == cdb.owner_marker(OWNER)


class FakeUsers:
    """CouchDB's `_users` database as `CouchDBAdmin.request` sees it, in a dict.

    Passwords are kept in clear (CouchDB hashes them); `verify_password` asks them.
    """

    url = "http://couch:5984"
    timeout = 1.0

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}
        self.writes = 0

    def request(
        self, method: str, path: list[str], *, body: Any = None, params: Any = None
    ) -> cdb.Reply:
        assert path[0] == cdb.USERS_DB
        name = path[1].removeprefix(cdb.USER_ID_PREFIX)
        doc = self.docs.get(name)
        if method == "GET":
            return cdb.Reply(200, dict(doc)) if doc is not None else cdb.Reply(404, None)
        assert method == "PUT"
        if (doc is None) != ("_rev" not in body) or (doc and doc["_rev"] != body["_rev"]):
            return cdb.Reply(409, {"error": "conflict"})
        self.writes += 1
        stored = dict(body)
        if "password" in stored:
            self.passwords[name] = stored.pop("password")
        stored["_rev"] = f"{int(str((doc or {}).get('_rev', '0-')).split('-')[0]) + 1}-x"
        self.docs[name] = stored
        return cdb.Reply(201, {"ok": True})

    def fail(self, reply: cdb.Reply, action: str) -> cdb.BackendError:
        return cdb.error_for_status(reply.status, action, self.url)

    def verify(self, url: str, username: str, password: str, timeout: float = 0) -> bool:
        return self.passwords.get(username) == password

    # What CouchDBStore.provision does with a connection.
    def __enter__(self) -> FakeUsers:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def couch(monkeypatch: pytest.MonkeyPatch) -> FakeUsers:
    fake = FakeUsers()
    monkeypatch.setattr(cdb, "verify_password", fake.verify)
    return fake


def _users(
    couch: FakeUsers,
    secret: tuple[str, str] | None,
    *,
    rotation: str | None = None,
    revoke: bool = True,
    assume_new: bool = False,
) -> cdb.Users:
    user, password = secret or (None, "")
    return cdb.ensure_users(
        couch,  # type: ignore[arg-type]
        PAIR,
        user,
        password,
        OWNER,
        rotation=rotation,
        revoke=revoke,
        at="2026-12-01T00:00:00+00:00",
        assume_new=assume_new,
    )


def test_a_new_resultbackend_gets_an_active_a_and_a_revoked_b_and_a_resync_writes_nothing(
    couch: FakeUsers,
) -> None:
    made = _users(couch, None, assume_new=True)
    assert (made.active, made.writes, made.revoked, made.pending) == (PAIR[0], 2, None, False)
    assert couch.passwords[PAIR[0]] == made.password
    assert cdb.USER_REVOKED_FIELD in couch.docs[PAIR[1]]
    assert couch.passwords[PAIR[1]] != made.password
    for doc in couch.docs.values():
        assert doc[cdb.USER_OWNER_FIELD] == cdb.owner_marker(OWNER)

    again = _users(couch, (made.active, made.password))
    assert (again.active, again.password, again.writes, again.pending) == (
        PAIR[0],
        made.password,
        0,
        False,
    )


def test_an_upgraded_resultbackend_gains_b_and_keeps_its_active_user_and_password(
    couch: FakeUsers,
) -> None:
    assert cdb.ensure_user(couch, PAIR[0], "pw-of-old", OWNER)  # type: ignore[arg-type]

    made = _users(couch, (PAIR[0], "pw-of-old"))

    assert (made.active, made.password, made.writes, made.pending) == (
        PAIR[0],
        "pw-of-old",
        1,
        False,
    )
    assert cdb.USER_REVOKED_FIELD in couch.docs[PAIR[1]]


def test_a_rotation_keeps_the_old_user_until_told_then_revokes_it_once(
    couch: FakeUsers,
) -> None:
    first = _users(couch, None, assume_new=True)

    rotated = _users(couch, (first.active, first.password), rotation="T1", revoke=False)
    assert (rotated.active, rotated.writes, rotated.pending) == (PAIR[1], 1, True)
    assert rotated.password != first.password
    assert couch.passwords[PAIR[1]] == rotated.password
    assert couch.passwords[PAIR[0]] == first.password  # pods still use it
    assert cdb.USER_REVOKED_FIELD not in couch.docs[PAIR[1]]
    assert couch.docs[PAIR[1]][cdb.USER_ROTATION_FIELD] == "T1"

    kept = _users(couch, (rotated.active, rotated.password), revoke=False)
    assert (kept.writes, kept.revoked, kept.pending) == (0, None, True)

    revoked = _users(couch, (rotated.active, rotated.password), revoke=True)
    assert (revoked.writes, revoked.revoked, revoked.pending) == (1, PAIR[0], False)
    assert couch.passwords[PAIR[0]] != first.password
    assert cdb.USER_REVOKED_FIELD in couch.docs[PAIR[0]]

    settled = _users(couch, (rotated.active, rotated.password), revoke=True)
    assert (settled.writes, settled.revoked, settled.pending) == (0, None, False)

    # The next rotation goes back to A, which gets a new password and loses its mark.
    back = _users(couch, (rotated.active, rotated.password), rotation="T2", revoke=False)
    assert (back.active, back.pending) == (PAIR[0], True)
    assert couch.passwords[PAIR[0]] == back.password
    assert cdb.USER_REVOKED_FIELD not in couch.docs[PAIR[0]]
    assert couch.passwords[PAIR[1]] == rotated.password


def test_a_rotation_whose_status_write_was_lost_is_not_done_twice(couch: FakeUsers) -> None:
    first = _users(couch, None, assume_new=True)
    rotated = _users(couch, (first.active, first.password), rotation="T1", revoke=False)

    # The Secret moved to B; the operator stopped before it recorded the rotation.
    again = _users(couch, (rotated.active, rotated.password), rotation="T1", revoke=False)

    assert (again.active, again.password, again.writes) == (PAIR[1], rotated.password, 0)
    assert couch.passwords[PAIR[0]] == first.password  # the old pods' password stays


def test_a_rotation_whose_secret_write_was_lost_moves_again_to_the_same_user(
    couch: FakeUsers,
) -> None:
    first = _users(couch, None, assume_new=True)
    lost = _users(couch, (first.active, first.password), rotation="T1", revoke=False)

    # The Secret still holds A: B's password never reached a pod.
    again = _users(couch, (first.active, first.password), rotation="T1", revoke=False)

    assert again.active == PAIR[1]
    assert again.password != lost.password
    assert couch.passwords[PAIR[1]] == again.password
    assert couch.passwords[PAIR[0]] == first.password


def test_the_active_user_drifted_gets_the_secrets_password_back_and_loses_a_revoked_mark(
    couch: FakeUsers,
) -> None:
    first = _users(couch, None, assume_new=True)
    couch.passwords[PAIR[0]] = "changed-behind-our-back"
    couch.docs[PAIR[0]][cdb.USER_REVOKED_FIELD] = "someone"

    again = _users(couch, (first.active, first.password))

    assert (again.active, again.password, again.writes) == (PAIR[0], first.password, 1)
    assert couch.passwords[PAIR[0]] == first.password
    assert cdb.USER_REVOKED_FIELD not in couch.docs[PAIR[0]]


def test_a_second_user_of_someone_else_is_a_conflict_and_nothing_is_written(
    couch: FakeUsers,
) -> None:
    other = Owner("shop", "orders", "uid-2")
    couch.docs[PAIR[1]] = {**cdb.desired_user_doc(PAIR[1], "x", other), "_rev": "1-x"}
    del couch.docs[PAIR[1]]["password"]
    assert cdb.ensure_user(couch, PAIR[0], "pw", OWNER)  # type: ignore[arg-type]
    writes = couch.writes

    with pytest.raises(cdb.BackendError) as err:
        _users(couch, (PAIR[0], "pw"))

    assert (err.value.reason, err.value.transient) == (REASON_CONFLICT, False)
    assert couch.writes == writes


# --- the store: what the generic reconcile asks, and what it is told -----------------


def _couch_rb(trigger: str | None = None) -> api.ResultBackend:
    """A ResultBackend bound to a CouchDB ClusterResultStore."""
    spec: dict[str, Any] = {"storeRef": {"kind": "ClusterResultStore", "name": "couch"}}
    if trigger:
        spec["rotation"] = {"trigger": trigger}
    meta = {"namespace": "shop", "name": "orders", "uid": "uid-1"}
    store = api.parse_store(
        {
            "kind": "ClusterResultStore",
            "metadata": {"name": "couch"},
            "spec": {"couchdb": {"url": "http://couch:5984", "adminSecretRef": {"name": "a"}}},
        }
    )
    return api.parse({"metadata": meta, "spec": spec}).bind(store)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, couch: FakeUsers) -> Iterator[cdb.CouchDBStore]:
    """The CouchDB store on FakeUsers; the database and `_security` exist already."""
    monkeypatch.setattr(cdb, "CouchDBAdmin", lambda *args, **kwargs: couch)
    monkeypatch.setattr(cdb, "ensure_database", lambda *args, **kwargs: False)
    monkeypatch.setattr(cdb, "ensure_security", lambda *args, **kwargs: False)
    with concurrent.futures.ThreadPoolExecutor(2) as io:
        s = cdb.CouchDBStore()
        s.provision = functools.partial(s.provision, io=io)  # type: ignore[method-assign]
        yield s


ADMIN = {"username": "admin", "password": "admin-pw"}
ROLLED = Superseded(False, "every injected workload rolled out the new credentials")


def test_the_store_keeps_superseded_credentials_and_removes_both_users() -> None:
    store = cdb.CouchDBStore()
    assert store.keeps_superseded
    assert store.describe(_couch_rb()) == (
        "database shop-orders and users rb_shop_orders and rb_shop_orders_b"
    )


def test_the_store_rotates_keeps_and_revokes_as_the_generic_reconcile_says(
    store: cdb.CouchDBStore, couch: FakeUsers
) -> None:
    made = store.provision(_couch_rb(), ADMIN, None, rotate=False, superseded=NOTHING_SUPERSEDED)
    assert (made.secret_data["username"], made.pending, made.revoked) == (PAIR[0], False, None)
    assert made.fields["couchdb"] == {"database": "shop-orders", "user": PAIR[0]}

    rb = _couch_rb("2026-12-01T00:00:00Z")
    rotated = store.provision(
        rb, ADMIN, made.secret_data, rotate=True, superseded=Superseded(True, "")
    )
    assert (rotated.secret_data["username"], rotated.pending, rotated.revoked) == (
        PAIR[1],
        True,
        None,
    )
    assert rotated.fields["couchdb"]["user"] == PAIR[1]
    assert rotated.fields["url"].startswith(f"couchdb://{PAIR[1]}@")
    assert couch.docs[PAIR[1]][cdb.USER_ROTATION_FIELD] == rb.spec.rotation.trigger.isoformat()

    kept = store.provision(
        rb, ADMIN, rotated.secret_data, rotate=False, superseded=Superseded(True, "")
    )
    assert (kept.writes, kept.pending, kept.revoked) == (0, True, None)
    assert couch.passwords[PAIR[0]] == made.secret_data["password"]

    revoked = store.provision(rb, ADMIN, rotated.secret_data, rotate=False, superseded=ROLLED)
    assert (revoked.writes, revoked.pending) == (1, False)
    assert revoked.revoked is not None
    assert PAIR[0] in revoked.revoked
    assert ROLLED.why in revoked.revoked
    for password in (made.secret_data["password"], rotated.secret_data["password"]):
        assert password not in revoked.revoked
    assert revoked.secret_data == rotated.secret_data

    again = store.provision(rb, ADMIN, rotated.secret_data, rotate=False, superseded=ROLLED)
    assert (again.writes, again.pending, again.revoked) == (0, False, None)


# --- adoption: a ResultBackend that replaces another of its name (api.ADOPT_ANNOTATION) ---


@pytest.mark.parametrize(
    ("marker", "adopts", "owned"),
    [
        ({"namespace": "shop", "name": "orders", "uid": "new"}, "", True),
        ({"namespace": "shop", "name": "orders", "uid": "old"}, "", False),
        ({"namespace": "shop", "name": "orders", "uid": "old"}, "old", True),
        ({"namespace": "shop", "name": "other", "uid": "old"}, "old", False),
        ({"namespace": "else", "name": "orders", "uid": "old"}, "old", False),
        ({"namespace": "shop", "name": "orders", "uid": "third"}, "old", False),
        (None, "old", False),
    ],
)
def test_a_marker_is_ours_by_uid_or_by_the_uid_we_adopt_of_our_own_name(
    marker: dict[str, str] | None, adopts: str, owned: bool
) -> None:
    owner = Owner("shop", "orders", "new", adopts=adopts)
    assert cdb.is_owned_by(marker, owner) is owned


def test_an_adopted_users_marker_is_rewritten_to_its_new_owner() -> None:
    owner = Owner("shop", "orders", "new", adopts="old")
    doc = {
        "name": "rb_shop_orders",
        "type": "user",
        "roles": [],
        cdb.USER_OWNER_FIELD: {"namespace": "shop", "name": "orders", "uid": "old"},
    }
    assert cdb.user_doc_fixes(doc, "rb_shop_orders", owner) == {
        cdb.USER_OWNER_FIELD: {"namespace": "shop", "name": "orders", "uid": "new"}
    }


def test_the_adopt_annotation_reaches_the_owner_through_the_cache() -> None:
    from resultbackend_operator.controller import trimmed

    body = {
        "metadata": {
            "namespace": "shop",
            "name": "orders",
            "uid": "new",
            "annotations": {api.ADOPT_ANNOTATION: "old", "kubectl.kubernetes.io/x": "big"},
        },
        "spec": {"storeRef": {"name": "couchdb"}},
    }
    kept = trimmed(body)
    assert kept["metadata"]["annotations"] == {api.ADOPT_ANNOTATION: "old"}
    assert Owner.of(api.parse(kept)) == Owner("shop", "orders", "new")
    assert Owner.of(api.parse(kept)).adopts == "old"
