"""CouchDB backend against a real CouchDB-API server (the devstack's pouchdb-server).

The code is written to CouchDB 3; where pouchdb-server answers differently
(401 where CouchDB 3 says 403, no 400 for illegal database names) the assertion
accepts both and says so.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pytest
from pycouchdb.client import Server

from resultbackend_operator.backends import (
    REASON_ADMIN_AUTH,
    REASON_CONFLICT,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_WORKER_AUTH,
    BackendError,
    Owner,
)
from resultbackend_operator.backends import couchdb as cdb

if TYPE_CHECKING:
    from conftest import CouchDBServer  # tests/ is on sys.path, not a package

pytestmark = pytest.mark.integration

REFUSED = (401, 403)  # CouchDB 3 says 403 to an authenticated non-member, pouchdb-server 401


@dataclass
class Names:
    """Unique names for one test; everything listed is deleted afterwards, ours or not."""

    admin: cdb.CouchDBAdmin
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    dbs: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)

    def db(self, label: str = "db") -> str:
        name = f"rbo-test-{label}-{self.suffix}"
        self.dbs.append(name)
        return name

    def user(self, label: str = "u") -> str:
        name = f"rbo_test_{label}_{self.suffix}"
        self.users.append(name)
        return name

    def cleanup(self) -> None:
        for db in self.dbs:
            self.admin.request("DELETE", [db])
        for user in self.users:
            doc = cdb.get_user(self.admin, user)
            if doc is not None:
                self.admin.request(
                    "DELETE", ["_users", doc["_id"]], params={"rev": str(doc["_rev"])}
                )


@pytest.fixture
def admin(couchdb_server: CouchDBServer) -> Iterator[cdb.CouchDBAdmin]:
    with cdb.CouchDBAdmin(
        couchdb_server.url, couchdb_server.admin_user, couchdb_server.admin_password
    ) as client:
        yield client


@pytest.fixture
def names(admin: cdb.CouchDBAdmin) -> Iterator[Names]:
    n = Names(admin)
    yield n
    n.cleanup()


@pytest.fixture
def owner() -> Owner:
    return Owner(namespace="shop", name="orders", uid=str(uuid.uuid4()))


def _provision(
    admin: cdb.CouchDBAdmin, db: str, user: str, password: str, owner: Owner
) -> tuple[bool, bool, bool]:
    return (
        cdb.ensure_database(admin, db, owner),
        cdb.ensure_user(admin, user, password, owner),
        cdb.ensure_security(admin, db, [user]),
    )


def _get(admin: cdb.CouchDBAdmin, *path: str) -> Any:
    reply = admin.request("GET", list(path))
    assert reply.status == 200, reply
    return reply.body


def _as_celery(worker_uri: str) -> Server:
    """Connect the way Celery's CouchDB backend does: basic auth from the parsed URL."""
    scheme = urlsplit(worker_uri).scheme
    parts = urlsplit("http://" + worker_uri[len(scheme) + 3 :])
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    return Server(f"http://{user}:{password}@{parts.hostname}:{parts.port}", authmethod="basic")


def _status_as(url: str, user: str, password: str, method: str, *path: str) -> int:
    with cdb.CouchDBAdmin(url, user, password) as as_user:  # same client, worker credentials
        body = {"value": 1} if method == "PUT" else None
        return as_user.request(method, list(path), body=body).status


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_provisioning_creates_database_user_and_security_with_user_as_only_member(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, user = names.db(), names.user()

    assert _provision(admin, db, user, "pw-one-123", owner) == (True, True, True)

    marker = _get(admin, db, "_local", "resultstores.io-owner")
    assert {k: marker[k] for k in ("namespace", "name", "uid")} == cdb.owner_marker(owner)
    doc = _get(admin, "_users", f"org.couchdb.user:{user}")
    assert (doc["name"], doc["type"], doc["roles"]) == (user, "user", [])
    assert doc["resultstores.io/owner"]["uid"] == owner.uid
    assert "password" not in doc  # the server hashed it
    assert cdb.normalize_security(_get(admin, db, "_security")) == cdb.normalize_security(
        cdb.desired_security([user])
    )
    assert cdb.verify_password(admin.url, user, "pw-one-123")


def test_second_ensure_writes_nothing(admin: cdb.CouchDBAdmin, names: Names, owner: Owner) -> None:
    db, user = names.db(), names.user()
    _provision(admin, db, user, "pw-one-123", owner)
    rev_before = _get(admin, "_users", f"org.couchdb.user:{user}")["_rev"]
    security_before = _get(admin, db, "_security")
    marker_before = _get(admin, db, "_local", "resultstores.io-owner")

    assert _provision(admin, db, user, "pw-one-123", owner) == (False, False, False)

    assert _get(admin, "_users", f"org.couchdb.user:{user}")["_rev"] == rev_before
    assert _get(admin, db, "_security") == security_before
    assert _get(admin, db, "_local", "resultstores.io-owner") == marker_before


def test_security_members_compare_as_a_set(admin: cdb.CouchDBAdmin, names: Names) -> None:
    db = names.db()
    admin.request("PUT", [db])

    assert cdb.ensure_security(admin, db, ["b_user", "a_user"]) is True
    assert cdb.ensure_security(admin, db, ["a_user", "b_user"]) is False
    assert cdb.ensure_security(admin, db, ["b_user"]) is True
    assert _get(admin, db, "_security")["members"]["names"] == ["b_user"]


def test_worker_uri_alone_lets_the_worker_write_and_read_its_database(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner, couchdb_server: CouchDBServer
) -> None:
    db, user = names.db(), names.user()
    _provision(admin, db, user, "pw-worker-123", owner)
    uri = cdb.worker_uri(couchdb_server.url, user, "pw-worker-123", db)
    assert couchdb_server.admin_password not in uri

    worker_db = _as_celery(uri).database(db)
    worker_db.save({"_id": "celery-task-meta-1", "value": {"status": "SUCCESS"}})

    assert worker_db.get("celery-task-meta-1")["value"] == {"status": "SUCCESS"}
    cdb.check_worker(couchdb_server.url, user, "pw-worker-123", db)


def test_worker_is_refused_on_another_database(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner, couchdb_server: CouchDBServer
) -> None:
    db, user = names.db("mine"), names.user("mine")
    other_db, other_user = names.db("theirs"), names.user("theirs")
    other_owner = Owner("shop", "billing", str(uuid.uuid4()))
    _provision(admin, db, user, "pw-mine-123", owner)
    _provision(admin, other_db, other_user, "pw-theirs-123", other_owner)
    url = couchdb_server.url

    assert _status_as(url, user, "pw-mine-123", "GET", other_db) in REFUSED
    assert _status_as(url, user, "pw-mine-123", "PUT", other_db, "intruder") in REFUSED
    with pytest.raises(BackendError) as err:
        cdb.check_worker(url, user, "pw-mine-123", other_db)
    assert err.value.reason == REASON_WORKER_AUTH


def test_check_worker_with_a_wrong_password_reports_worker_credentials_rejected(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, user = names.db(), names.user()
    _provision(admin, db, user, "pw-right-123", owner)

    with pytest.raises(BackendError) as err:
        cdb.check_worker(admin.url, user, "pw-wrong-123", db)

    assert (err.value.reason, err.value.transient) == (REASON_WORKER_AUTH, True)
    assert "pw-wrong-123" not in err.value.message


def test_password_change_rewrites_the_user_and_the_old_password_stops_working(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    user = names.user()
    cdb.ensure_user(admin, user, "pw-old-123", owner)
    rev_before = _get(admin, "_users", f"org.couchdb.user:{user}")["_rev"]

    assert cdb.ensure_user(admin, user, "pw-new-123", owner) is True

    assert _get(admin, "_users", f"org.couchdb.user:{user}")["_rev"] != rev_before
    assert cdb.verify_password(admin.url, user, "pw-old-123") is False
    assert cdb.verify_password(admin.url, user, "pw-new-123") is True


def test_foreign_or_unmarked_user_is_a_conflict_and_is_never_removed(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    foreign, unmarked = names.user("foreign"), names.user("unmarked")
    cdb.ensure_user(admin, foreign, "pw-foreign-123", Owner("other", "rb", str(uuid.uuid4())))
    plain = {"name": unmarked, "type": "user", "roles": [], "password": "pw-plain-123"}
    assert (
        admin.request("PUT", ["_users", f"org.couchdb.user:{unmarked}"], body=plain).status == 201
    )

    for user in (foreign, unmarked):
        with pytest.raises(BackendError) as err:
            cdb.ensure_user(admin, user, "pw-mine-123", owner)
        assert (err.value.reason, err.value.transient) == (REASON_CONFLICT, False)
        assert cdb.remove_user(admin, user, owner) is False
        assert cdb.get_user(admin, user) is not None
    assert cdb.verify_password(admin.url, foreign, "pw-foreign-123")


def test_foreign_database_is_a_conflict_and_is_never_removed(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    marked, with_data = names.db("marked"), names.db("data")
    cdb.ensure_database(admin, marked, Owner("other", "rb", str(uuid.uuid4())))
    admin.request("PUT", [with_data])
    admin.request("PUT", [with_data, "precious"], body={"v": 1})

    for db in (marked, with_data):
        with pytest.raises(BackendError) as err:
            cdb.ensure_database(admin, db, owner)
        assert (err.value.reason, err.value.transient) == (REASON_CONFLICT, False)
        assert cdb.remove_database(admin, db, owner) is False
        assert admin.request("GET", [db]).status == 200


def test_unmarked_database_with_custom_security_is_a_conflict(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db = names.db()
    admin.request("PUT", [db])
    admin.request("PUT", [db, "_security"], body=cdb.desired_security(["someone_else"]))

    with pytest.raises(BackendError) as err:
        cdb.ensure_database(admin, db, owner)
    assert err.value.reason == REASON_CONFLICT


def test_empty_unmarked_database_is_adopted_as_our_crash_leftover(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db = names.db()
    assert admin.request("PUT", [db]).status == 201

    assert cdb.ensure_database(admin, db, owner) is True
    assert _get(admin, db, "_local", "resultstores.io-owner")["uid"] == owner.uid
    assert cdb.ensure_database(admin, db, owner) is False


def test_assume_new_creates_and_then_finds_what_exists_without_writing_again(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, user = names.db(), names.user()

    assert cdb.ensure_user(admin, user, "pw-fresh-123", owner, assume_new=True) is True
    assert cdb.ensure_database(admin, db, owner, assume_new=True) is True
    assert cdb.ensure_security(admin, db, [user], untouched=True) is True
    # A second "new" ResultBackend reconcile (its Secret was lost) falls back to looking.
    assert cdb.ensure_user(admin, user, "pw-fresh-123", owner, assume_new=True) is False
    assert cdb.ensure_database(admin, db, owner, assume_new=True) is False
    assert cdb.ensure_security(admin, db, [user]) is False
    assert cdb.verify_password(admin.url, user, "pw-fresh-123") is True
    cdb.check_worker(admin.url, user, "pw-fresh-123", db)


def test_assume_new_still_refuses_a_database_and_user_of_someone_else(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, user = names.db(), names.user()
    other = Owner("other", "rb", str(uuid.uuid4()))
    cdb.ensure_user(admin, user, "pw-other-123", other)
    cdb.ensure_database(admin, db, other)

    with pytest.raises(BackendError) as on_user:
        cdb.ensure_user(admin, user, "pw-mine-123", owner, assume_new=True)
    with pytest.raises(BackendError) as on_db:
        cdb.ensure_database(admin, db, owner, assume_new=True)

    assert (on_user.value.reason, on_user.value.transient) == (REASON_CONFLICT, False)
    assert (on_db.value.reason, on_db.value.transient) == (REASON_CONFLICT, False)
    assert cdb.verify_password(admin.url, user, "pw-other-123") is True


def test_remove_user_and_database_delete_ours_once_then_find_nothing(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, user = names.db(), names.user()
    _provision(admin, db, user, "pw-gone-123", owner)

    assert cdb.remove_user(admin, user, owner) is True
    assert cdb.remove_user(admin, user, owner) is False
    assert cdb.remove_database(admin, db, owner) is True
    assert cdb.remove_database(admin, db, owner) is False
    assert cdb.get_user(admin, user) is None
    assert admin.request("GET", [db]).status == 404
    assert cdb.verify_password(admin.url, user, "pw-gone-123") is False


def test_illegal_database_name_is_invalid_not_transient(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db = f"Upper-{names.suffix}"
    names.dbs.append(db)
    outcome: BackendError | bool
    try:
        outcome = cdb.ensure_database(admin, db, owner)
    except BackendError as err:
        outcome = err

    if isinstance(outcome, BackendError):
        assert (outcome.reason, outcome.transient) == (REASON_INVALID, False)
    else:
        # pouchdb-server quirk: it accepts any name; CouchDB 3 answers 400.
        assert outcome is True


def test_wrong_admin_password_is_admin_auth_failed_without_the_password(
    couchdb_server: CouchDBServer, names: Names, owner: Owner
) -> None:
    bad = cdb.CouchDBAdmin(couchdb_server.url, couchdb_server.admin_user, "wrong-pw-987")
    with bad, pytest.raises(BackendError) as err:
        cdb.ensure_database(bad, names.db(), owner)
    assert (err.value.reason, err.value.transient) == (REASON_ADMIN_AUTH, True)
    assert "wrong-pw-987" not in err.value.message
    assert "wrong-pw-987" not in str(err.value)


def test_check_worker_on_a_closed_port_is_unreachable_and_transient() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"

    with pytest.raises(BackendError) as err:
        cdb.check_worker(url, "rb_user", "pw-secret-555", "db", timeout=2)

    assert (err.value.reason, err.value.transient) == (REASON_UNREACHABLE, True)
    assert "pw-secret-555" not in err.value.message
    assert err.value.__cause__ is None


# --- two users per ResultBackend ------------------------------------------------------

AT = "2026-12-01T00:00:00+00:00"


def _pair(names: Names) -> tuple[str, str]:
    pair = cdb.user_pair(names.user("pair"))
    names.users.append(pair[1])
    return pair


def _ensure_users(
    admin: cdb.CouchDBAdmin,
    pair: tuple[str, str],
    owner: Owner,
    secret: cdb.Users | None,
    *,
    rotation: str | None = None,
    revoke: bool = True,
) -> cdb.Users:
    return cdb.ensure_users(
        admin,
        pair,
        secret.active if secret else None,
        secret.password if secret else "",
        owner,
        rotation=rotation,
        revoke=revoke,
        at=AT,
        assume_new=secret is None,
    )


def _revs(admin: cdb.CouchDBAdmin, pair: tuple[str, str]) -> list[str]:
    return [_get(admin, "_users", cdb.user_doc_id(user))["_rev"] for user in pair]


def test_a_rotation_keeps_both_users_working_until_the_old_one_is_revoked(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, pair = names.db(), _pair(names)
    first = _ensure_users(admin, pair, owner, None)
    cdb.ensure_database(admin, db, owner)
    cdb.ensure_security(admin, db, list(pair))
    assert first.active == pair[0]
    cdb.check_worker(admin.url, first.active, first.password, db)

    rotated = _ensure_users(admin, pair, owner, first, rotation="2026-12-01T00:00:00", revoke=False)

    assert (rotated.active, rotated.pending) == (pair[1], True)
    # Both work: the Secret's new user, and the old one that pods not rolled yet hold.
    cdb.check_worker(admin.url, rotated.active, rotated.password, db)
    cdb.check_worker(admin.url, first.active, first.password, db)
    revs = _revs(admin, pair)
    kept = _ensure_users(admin, pair, owner, rotated, revoke=False)
    assert (kept.writes, kept.pending) == (0, True)
    assert _revs(admin, pair) == revs

    revoked = _ensure_users(admin, pair, owner, rotated, revoke=True)

    assert (revoked.revoked, revoked.writes, revoked.pending) == (pair[0], 1, False)
    assert _status_as(admin.url, first.active, first.password, "GET", db) == 401
    cdb.check_worker(admin.url, rotated.active, rotated.password, db)
    assert _get(admin, "_users", cdb.user_doc_id(pair[0]))[cdb.USER_REVOKED_FIELD] == AT
    revs = _revs(admin, pair)
    assert _ensure_users(admin, pair, owner, rotated, revoke=True).writes == 0
    assert _revs(admin, pair) == revs


def test_a_user_of_old_gains_its_second_user_and_keeps_its_password(
    admin: cdb.CouchDBAdmin, names: Names, owner: Owner
) -> None:
    db, pair = names.db(), _pair(names)
    _provision(admin, db, pair[0], "pw-of-old-123", owner)  # as one user per ResultBackend did
    rev = _revs(admin, pair[:1])

    made = cdb.ensure_users(
        admin, pair, pair[0], "pw-of-old-123", owner, rotation=None, revoke=True, at=AT
    )

    assert (made.active, made.password, made.writes, made.pending) == (
        pair[0],
        "pw-of-old-123",
        1,
        False,
    )
    assert _revs(admin, pair[:1]) == rev  # A untouched
    assert _get(admin, "_users", cdb.user_doc_id(pair[1]))[cdb.USER_REVOKED_FIELD] == AT
    assert cdb.ensure_security(admin, db, list(pair)) is True
    assert cdb.ensure_security(admin, db, list(pair)) is False
    cdb.check_worker(admin.url, pair[0], "pw-of-old-123", db)
