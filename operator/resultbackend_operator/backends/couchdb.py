"""CouchDB: the database, its two worker users and the database's `_security`.

Written against the CouchDB 3.x HTTP API through pycouchdb. Every operation says
whether it wrote, so a test can prove that a second reconcile writes nothing:
`ensure_*` reads, compares and writes only what differs; `remove_*` tolerates
"not found" and never touches what is not ours.

Ownership is recorded on the objects themselves: the database carries the local
document `_local/resultstores.io-owner`, the user document a
`resultstores.io/owner` field, both holding the owner's namespace, name and uid.

Two users per ResultBackend, because a CouchDB user has exactly one password
and a rotation must keep the old credentials working until the workers rolled:
A (`rb_<namespace>_<name>`, the name of the one user of old) and B (A's name
plus `_b`). Both are members of `_security`; the active one is the worker
Secret's `username`. A rotation gives the idle user a new password and makes it
the active one; the user it replaced keeps its password until the generic
reconcile says it may go (`Superseded`), then gets a random password nobody
holds and the field `resultstores.io/revoked`, so that later reconciles see it
is done and write nothing. The user a rotation switched to carries
`resultstores.io/rotation`, the trigger it was rotated for: a run that finds
the Secret already on it (the operator stopped between the Secret write and
the status write) does not rotate a second time.

Error mapping (`BackendError.reason`, `transient`):

- connection refused, timeout, DNS, 5xx: `Unreachable`, transient.
- 401 on an admin call: `AdminAuthFailed`, transient=True. Retrying cannot fix
  it, but the fix (a corrected admin Secret, a server admin added) happens outside
  the ResultBackend and is noticed by no event, so the caller keeps retrying with
  a long backoff instead of giving up.
- 403 on an admin call: `Forbidden`, transient=True for the same reason.
- 401/403 as the worker: `WorkerCredentialsRejected`, transient (reconcile fixes it).
- 400 when creating a database: `InvalidName`, not transient.
- 409/412 (a concurrent writer): `Conflict`, transient; the next reconcile re-reads.
- an object that exists and is not ours: `Conflict`, not transient.

Credentials never reach a message: pycouchdb strips them from its base URL, and
every message here is built from names, status codes and the URL without userinfo.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pycouchdb.exceptions
import requests
from pycouchdb.client import Server

from .. import metrics
from ..api import PROVIDER
from ..settings import SETTINGS
from .base import (
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_VERSION,
    REASON_WORKER_AUTH,
    AdminSecretRef,
    BackendError,
    Owner,
    Provisioned,
    Superseded,
    generate_password,
    host_port,
    register,
)

if TYPE_CHECKING:
    from ..api import ResultBackend, ResultStore

DEFAULT_TIMEOUT = 10.0
OWNER_MARKER_ID = "_local/resultstores.io-owner"
USER_OWNER_FIELD = "resultstores.io/owner"
USER_REVOKED_FIELD = "resultstores.io/revoked"  # when its password was made one nobody holds
USER_ROTATION_FIELD = "resultstores.io/rotation"  # the rotation.trigger it got its password for
SECOND_USER_SUFFIX = "_b"
USER_ID_PREFIX = "org.couchdb.user:"
USERS_DB = "_users"
DEFAULT_PORTS = {"http": 5984, "https": 6984}

_MARKER_PATH = OWNER_MARKER_ID.split("/", 1)  # ["_local", "resultstores.io-owner"]


# --- pure helpers -------------------------------------------------------------


def safe_url(url: str) -> str:
    """`url` without userinfo, query or fragment: fit for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def _host_port(server_url: str) -> tuple[str, int]:
    parts = urlsplit(server_url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) base URL: {safe_url(server_url)}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return host, parts.port or DEFAULT_PORTS[parts.scheme]


def worker_uri(server_url: str, username: str, password: str, database: str) -> str:
    """Celery's `result_backend` URL: `couchdb://user:password@host:port/database`.

    Userinfo and database are percent-encoded (Celery's URL parser, kombu's
    `url_to_parts`, decodes them again). The port defaults to 5984 for http and
    6984 for https. Celery's CouchDB backend always speaks plain http and takes
    the path, stripped of '/', as the database name.
    """
    host, port = _host_port(server_url)
    user = quote(username, safe="")
    secret = quote(password, safe="")
    return f"couchdb://{user}:{secret}@{host}:{port}/{quote(database, safe='')}"


def display_uri(server_url: str, username: str, database: str) -> str:
    """`worker_uri` without the password, for status and logs."""
    host, port = _host_port(server_url)
    return f"couchdb://{quote(username, safe='')}@{host}:{port}/{quote(database, safe='')}"


def user_doc_id(username: str) -> str:
    return f"{USER_ID_PREFIX}{username}"


def owner_marker(owner: Owner) -> dict[str, str]:
    return {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid}


def is_owned_by(marker: object, owner: Owner) -> bool:
    """True if `marker` (a marker document or field) names `owner` (Owner.owns)."""
    return isinstance(marker, Mapping) and owner.owns(
        marker.get("namespace"), marker.get("name"), marker.get("uid")
    )


def describe_marker(marker: object) -> str:
    if isinstance(marker, Mapping) and marker.get("uid"):
        return (
            f"ResultBackend {marker.get('namespace')}/{marker.get('name')} uid={marker.get('uid')}"
        )
    return "nobody we know (no resultstores.io owner marker)"


def desired_user_doc(username: str, password: str, owner: Owner) -> dict[str, Any]:
    """A new `_users` document; CouchDB hashes `password` when it stores it."""
    return {
        "_id": user_doc_id(username),
        "name": username,
        "type": "user",
        "roles": [],
        "password": password,
        USER_OWNER_FIELD: owner_marker(owner),
    }


def user_doc_fixes(doc: Mapping[str, Any], username: str, owner: Owner) -> dict[str, Any]:
    """The fields of an existing user document of ours that differ from what we want."""
    want: dict[str, Any] = {
        "name": username,
        "type": "user",
        "roles": [],
        USER_OWNER_FIELD: owner_marker(owner),
    }
    return {key: value for key, value in want.items() if doc.get(key) != value}


def user_pair(first: str) -> tuple[str, str]:
    """The two users of a ResultBackend whose first user is `first` (`rb_<ns>_<name>`).

    B's name cannot be anyone's A: Kubernetes names hold no `_`, so an A name
    has exactly two.
    """
    return first, f"{first}{SECOND_USER_SUFFIX}"


def other_user(pair: tuple[str, str], username: str) -> str:
    return pair[1] if username == pair[0] else pair[0]


@dataclass(frozen=True)
class UserPlan:
    """The user the worker Secret holds after this reconcile (`active`), the other one,
    and whether `active` gets a new password: the Secret moves to it (`rotated`), or
    the Secret held no password of ours."""

    active: str
    idle: str
    new_password: bool
    rotated: bool


def plan_users(
    pair: tuple[str, str],
    secret_user: str | None,
    secret_password: str,
    rotation: str | None,
    rotations: Mapping[str, object],
) -> UserPlan:
    """Decide from the Secret's `username` and `password` which user is active.

    `rotation`: a rotation is asked for, for this trigger; `rotations`: the
    trigger each user last got its password for. A rotation moves the Secret to
    the idle user, unless the Secret's user got its password for this very
    trigger (that rotation's status write was lost: the workers may be rolling
    to it already, and a second move would take the old password from pods that
    still use it). A Secret that names neither user, or holds no password, is
    started over on A.
    """
    known = secret_user in pair and bool(secret_password)
    holder = secret_user if known and secret_user is not None else pair[0]
    if rotation is not None and rotations.get(holder) != rotation:
        return UserPlan(other_user(pair, holder), holder, new_password=True, rotated=True)
    return UserPlan(holder, other_user(pair, holder), new_password=not known, rotated=False)


def revoked_user_doc(username: str, owner: Owner, at: str) -> dict[str, Any]:
    """A user document whose password is random and dropped at once: nobody holds it."""
    return {
        **desired_user_doc(username, generate_password(), owner),
        USER_REVOKED_FIELD: at,
    }


def desired_security(member_usernames: Iterable[str]) -> dict[str, Any]:
    """Our users are the only members; no database admins (server admins keep access)."""
    return {
        "admins": {"names": [], "roles": []},
        "members": {"names": sorted(set(member_usernames)), "roles": []},
    }


def _names(section: object, key: str) -> list[str]:
    if not isinstance(section, Mapping):
        return []
    values = section.get(key)
    if not isinstance(values, list):
        return []
    return sorted({str(v) for v in values})


def normalize_security(doc: object) -> dict[str, dict[str, list[str]]]:
    """`_security` reduced to what grants access, in a comparable form."""
    body: Mapping[str, Any] = doc if isinstance(doc, Mapping) else {}
    return {
        part: {"names": _names(body.get(part), "names"), "roles": _names(body.get(part), "roles")}
        for part in ("admins", "members")
    }


def security_is_untouched(doc: object) -> bool:
    """No names and no roles besides `_admin`: a fresh database's `_security`.

    CouchDB 3 gives new databases `{"members": {"roles": ["_admin"]}, "admins":
    {"roles": ["_admin"]}}` (default_security = admin_only); older servers `{}`.
    """
    norm = normalize_security(doc)
    return all(
        not section["names"] and set(section["roles"]) <= {"_admin"} for section in norm.values()
    )


def database_is_empty(info: object) -> bool:
    """No documents, live or deleted (`_local` documents are not counted)."""
    if not isinstance(info, Mapping):
        return False
    return info.get("doc_count") == 0 and info.get("doc_del_count", 0) == 0


def error_for_status(status: int, action: str, url: str, detail: str = "") -> BackendError:
    """The BackendError for an unexpected answer to an admin call."""
    said = f" ({detail})" if detail else ""
    where = safe_url(url)
    if status >= 500:
        return BackendError(
            REASON_UNREACHABLE,
            f"CouchDB at {where} failed to {action}: HTTP {status}{said}",
            transient=True,
        )
    if status == 401:
        return BackendError(
            REASON_ADMIN_AUTH,
            f"CouchDB at {where} refused the admin credentials to {action}: HTTP 401{said}",
            transient=True,
        )
    if status == 403:
        return BackendError(
            REASON_FORBIDDEN,
            f"CouchDB at {where} does not allow the admin user to {action}: HTTP 403{said}; "
            "the admin Secret must name a server admin",
            transient=True,
        )
    if status in (409, 412):
        return BackendError(
            REASON_CONFLICT,
            f"CouchDB at {where}: a concurrent change while trying to {action}: "
            f"HTTP {status}{said}",
            transient=True,
        )
    return BackendError(
        REASON_BACKEND,
        f"CouchDB at {where} answered HTTP {status} to {action}{said}",
        transient=status != 400,
    )


def worker_error_for_status(status: int, database: str, url: str, detail: str = "") -> BackendError:
    """The BackendError for an unexpected answer to the worker's health check."""
    said = f" ({detail})" if detail else ""
    where = safe_url(url)
    if status in (401, 403):
        return BackendError(
            REASON_WORKER_AUTH,
            f"CouchDB at {where} refused the worker credentials for database "
            f"{database!r}: HTTP {status}{said}",
            transient=True,
        )
    if status == 404:
        return BackendError(
            REASON_BACKEND,
            f"database {database!r} does not exist on CouchDB at {where}",
            transient=True,
        )
    if status >= 500:
        return BackendError(
            REASON_UNREACHABLE,
            f"CouchDB at {where} failed to serve database {database!r}: HTTP {status}{said}",
            transient=True,
        )
    return BackendError(
        REASON_BACKEND,
        f"CouchDB at {where} answered HTTP {status} to the worker reading {database!r}{said}",
        transient=True,
    )


# --- talking to the server ----------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A CouchDB answer: the status code and the decoded JSON body (or None)."""

    status: int
    body: Any

    def detail(self) -> str:
        """CouchDB's `error: reason`, short; CouchDB never echoes passwords there."""
        if isinstance(self.body, Mapping):
            error, reason = self.body.get("error"), self.body.get("reason")
            text = ": ".join(str(p) for p in (error, reason) if p)
            return text[:200]
        return ""


def _server(url: str, username: str, password: str) -> Server:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    userinfo = f"{quote(username, safe='')}:{quote(password, safe='')}"
    # pycouchdb takes the credentials out of the URL for basic auth and keeps the
    # rest as its base URL; verify=True because pycouchdb defaults to no TLS checks.
    server = Server(
        f"{parts.scheme}://{userinfo}@{host}{parts.path.rstrip('/')}",
        authmethod="basic",
        verify=True,
    )
    # Basic auth sends nothing on construction; every request from here on is counted.
    metrics.count_requests(server.resource.session, "CouchDB")
    return server


def _request(
    server: Server,
    url: str,
    method: str,
    path: list[str],
    *,
    body: Any = None,
    params: Mapping[str, str] | None = None,
    timeout: float,
) -> Reply:
    """One request through pycouchdb's resource; path segments are percent-encoded.

    pycouchdb raises for error answers without saying the status, so a response
    hook records it; its exceptions become plain Replies.
    """
    statuses: list[int] = []

    def remember(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        statuses.append(response.status_code)

    data = json.dumps(body).encode() if body is not None else None
    target = "/".join(quote(segment, safe="") for segment in path)
    try:
        response, result = server.resource.request(
            method,
            target or None,
            params=dict(params) if params else None,
            data=data,
            timeout=timeout,
            hooks={"response": remember},
        )
    except pycouchdb.exceptions.Error as exc:
        if not statuses:
            raise BackendError(
                REASON_BACKEND,
                f"CouchDB client failed on {method} at {safe_url(url)}: {type(exc).__name__}",
                transient=True,
            ) from None
        payload = exc.args[0] if exc.args else None
        if not isinstance(payload, Mapping):
            payload = {"reason": str(payload)} if payload else None
        return Reply(statuses[-1], payload)
    except requests.RequestException as exc:
        # `from None`: requests' own text names the full request URL.
        raise BackendError(
            REASON_UNREACHABLE,
            f"cannot reach CouchDB at {safe_url(url)}: {type(exc).__name__}",
            transient=True,
        ) from None
    return Reply(response.status_code, result)


def _close(server: Server) -> None:
    server.resource.session.close()


class CouchDBAdmin:
    """A CouchDB server as its server admin sees it (basic auth on every request)."""

    def __init__(
        self,
        url: str,
        admin_username: str,
        admin_password: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = safe_url(url)
        self.timeout = timeout
        self._server = _server(url, admin_username, admin_password)

    def __repr__(self) -> str:
        return f"CouchDBAdmin(url={self.url!r})"

    def close(self) -> None:
        _close(self._server)

    def __enter__(self) -> CouchDBAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: list[str],
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Reply:
        return _request(
            self._server,
            self.url,
            method,
            path,
            body=body,
            params=params,
            timeout=self.timeout,
        )

    def fail(self, reply: Reply, action: str) -> BackendError:
        return error_for_status(reply.status, action, self.url, reply.detail())


# --- the database -------------------------------------------------------------


def get_database_owner(admin: CouchDBAdmin, db: str) -> dict[str, Any] | None:
    """The database's owner marker, or None if the database or the marker is absent."""
    reply = admin.request("GET", [db, *_MARKER_PATH])
    if reply.status == 200 and isinstance(reply.body, dict):
        return reply.body
    if reply.status == 404:
        return None
    raise admin.fail(reply, f"read the owner marker of database {db!r}")


def _write_marker(admin: CouchDBAdmin, db: str, owner: Owner, rev: object = None) -> None:
    """Write the owner marker (`rev`: of the marker it replaces)."""
    body: dict[str, Any] = {**owner_marker(owner), **({"_rev": rev} if rev else {})}
    reply = admin.request("PUT", [db, *_MARKER_PATH], body=body)
    if reply.status not in (200, 201, 202):
        raise admin.fail(reply, f"write the owner marker of database {db!r}")


def ensure_database(
    admin: CouchDBAdmin, db: str, owner: Owner, *, assume_new: bool = False
) -> bool:
    """Create database `db` for `owner` unless it exists and is ours; True if it made it
    ours from nothing (created, or a crash leftover marked).

    An existing database is ours if its owner marker names our uid (or the one
    we adopt: the marker is rewritten to name ours), or, with no
    marker, if it looks like our own leftover from a crash between creating it
    and marking it: no documents and an untouched `_security`. Anything else is a
    non-transient Conflict. True therefore also says that `_security` is untouched.

    `assume_new` (nothing of the ResultBackend is known to exist yet) creates
    first and looks only if the database turns out to exist (412).
    """
    info = Reply(404, None) if assume_new else admin.request("GET", [db])
    if info.status == 404:
        created = admin.request("PUT", [db])
        if created.status in (201, 202):
            _write_marker(admin, db, owner)
            return True
        if created.status == 400:
            raise BackendError(
                REASON_INVALID,
                f"CouchDB at {admin.url} refused the database name {db!r}: {created.detail()}",
                transient=False,
            )
        if created.status != 412:  # 412: created meanwhile by someone; check whose
            raise admin.fail(created, f"create database {db!r}")
        info = admin.request("GET", [db])
    if info.status != 200:
        raise admin.fail(info, f"read database {db!r}")

    marker = get_database_owner(admin, db)
    if marker is not None:
        if is_owned_by(marker, owner):
            if marker.get("uid") == owner.uid:
                return False
            _write_marker(admin, db, owner, marker.get("_rev"))  # adopted: its owner's now
            return False  # only the marker: _security is not untouched
        raise BackendError(
            REASON_CONFLICT,
            f"database {db!r} on {admin.url} already exists and belongs to "
            f"{describe_marker(marker)}",
            transient=False,
        )
    security = admin.request("GET", [db, "_security"])
    if security.status != 200:
        raise admin.fail(security, f"read the _security of database {db!r}")
    if database_is_empty(info.body) and security_is_untouched(security.body):
        _write_marker(admin, db, owner)
        return True
    raise BackendError(
        REASON_CONFLICT,
        f"database {db!r} on {admin.url} already exists, holds data or access rules "
        "and is not managed by resultbackend-operator; choose another spec.couchdb.database",
        transient=False,
    )


def remove_database(admin: CouchDBAdmin, db: str, owner: Owner) -> bool:
    """Delete database `db` if its marker names `owner`; True if it deleted.

    A missing database, or one that is not ours (no marker, another uid), is
    left alone and gives False.
    """
    marker = get_database_owner(admin, db)
    if not is_owned_by(marker, owner):
        return False
    reply = admin.request("DELETE", [db])
    if reply.status in (200, 202):
        return True
    if reply.status == 404:
        return False
    raise admin.fail(reply, f"delete database {db!r}")


# --- the database's _security ---------------------------------------------------


def ensure_security(
    admin: CouchDBAdmin, db: str, member_usernames: list[str], *, untouched: bool = False
) -> bool:
    """Make `member_usernames` the only members of `db`, no db admins; True if it wrote.

    `untouched`: the caller just created (or adopted) the database, so its
    `_security` is the server's default and is written without reading it.
    """
    desired = desired_security(member_usernames)
    if not untouched:
        current = admin.request("GET", [db, "_security"])
        if current.status != 200:
            raise admin.fail(current, f"read the _security of database {db!r}")
        if normalize_security(current.body) == normalize_security(desired):
            return False
    reply = admin.request("PUT", [db, "_security"], body=desired)
    if reply.status not in (200, 201):
        raise admin.fail(reply, f"write the _security of database {db!r}")
    return True


# --- the worker user ----------------------------------------------------------


def get_user(admin: CouchDBAdmin, username: str) -> dict[str, Any] | None:
    """The `_users` document of `username`, or None."""
    reply = admin.request("GET", [USERS_DB, user_doc_id(username)])
    if reply.status == 200 and isinstance(reply.body, dict):
        return reply.body
    if reply.status == 404:
        return None
    raise admin.fail(reply, f"read user {username!r}")


def _check_user_owner(admin: CouchDBAdmin, doc: Mapping[str, Any], owner: Owner) -> None:
    marker = doc.get(USER_OWNER_FIELD)
    if not is_owned_by(marker, owner):
        raise BackendError(
            REASON_CONFLICT,
            f"CouchDB user {doc.get('name')!r} on {admin.url} already exists and belongs to "
            f"{describe_marker(marker)}",
            transient=False,
        )


def _create_user(
    admin: CouchDBAdmin, username: str, body: Mapping[str, Any]
) -> dict[str, Any] | None:
    """PUT a new user document (no `_rev`): None once created, the existing document
    of that name if there is one (409: the caller goes on from what it finds)."""
    reply = admin.request("PUT", [USERS_DB, user_doc_id(username)], body=body)
    if reply.status in (201, 202):
        return None
    if reply.status == 409:
        doc = get_user(admin, username)
        if doc is not None:
            return doc
    # Also a 409 whose document is gone again: the next reconcile creates it.
    raise admin.fail(reply, f"create user {username!r}")


def _update_user(admin: CouchDBAdmin, username: str, body: Mapping[str, Any]) -> None:
    reply = admin.request("PUT", [USERS_DB, user_doc_id(username)], body=body)
    if reply.status not in (201, 202):
        raise admin.fail(reply, f"update user {username!r}")


def ensure_active_user(
    admin: CouchDBAdmin,
    username: str,
    password: str,
    owner: Owner,
    doc: dict[str, Any] | None,
    *,
    new_password: bool = False,
    rotation: str | None = None,
) -> bool:
    """The user the worker Secret holds: ours, with `password`; True if it wrote.

    `doc` is its document as just read (None: there is none, it is created).
    CouchDB keeps only a hash of the password, so whether the password is
    current is asked of the server (`verify_password`), unless `new_password`
    says it is not. `rotation` (the trigger it gets the password for) is written
    beside it; a `resultstores.io/revoked` field is dropped.
    """
    extra = {USER_ROTATION_FIELD: rotation} if rotation is not None else {}
    if doc is None:
        doc = _create_user(
            admin, username, {**desired_user_doc(username, password, owner), **extra}
        )
        if doc is None:
            return True
    _check_user_owner(admin, doc, owner)
    updated = {**doc, **user_doc_fixes(doc, username, owner), **extra}
    updated.pop(USER_REVOKED_FIELD, None)
    if new_password or not verify_password(admin.url, username, password, admin.timeout):
        updated["password"] = password
    if updated == doc:
        return False
    _update_user(admin, username, updated)
    return True


@dataclass(frozen=True)
class Idle:
    """What `ensure_idle_user` did and found."""

    wrote: bool
    revoked_now: bool  # its password was replaced by one nobody holds just now
    revoked: bool  # nobody holds its password (now or since before)


def ensure_idle_user(
    admin: CouchDBAdmin,
    username: str,
    owner: Owner,
    doc: dict[str, Any] | None,
    *,
    revoke: bool,
    at: str,
) -> Idle:
    """The user the Secret does not hold: ours, its password left as it is unless
    `revoke`, which replaces a password that is not revoked yet with a random one
    nobody holds and records that (`at`).

    A user created here is created revoked: nobody ever held its password.
    """
    if doc is None:
        doc = _create_user(admin, username, revoked_user_doc(username, owner, at))
        if doc is None:
            return Idle(wrote=True, revoked_now=False, revoked=True)
    _check_user_owner(admin, doc, owner)
    updated = {**doc, **user_doc_fixes(doc, username, owner)}
    revoke_now = revoke and USER_REVOKED_FIELD not in doc
    if revoke_now:
        updated.update(password=generate_password(), **{USER_REVOKED_FIELD: at})
    revoked = USER_REVOKED_FIELD in updated
    if updated == doc:
        return Idle(wrote=False, revoked_now=False, revoked=revoked)
    _update_user(admin, username, updated)
    return Idle(wrote=True, revoked_now=revoke_now, revoked=revoked)


def ensure_user(
    admin: CouchDBAdmin, username: str, password: str, owner: Owner, *, assume_new: bool = False
) -> bool:
    """`ensure_active_user` after reading the user (`assume_new`: create first, read
    only if it exists already); True if it wrote."""
    doc = None if assume_new else get_user(admin, username)
    return ensure_active_user(admin, username, password, owner, doc)


@dataclass(frozen=True)
class Users:
    """What `ensure_users` made sure of."""

    active: str  # the user the worker Secret holds
    password: str  # its password
    writes: int
    revoked: str | None  # the idle user whose password was replaced just now
    pending: bool  # the idle user still has a password someone may hold


def ensure_users(
    admin: CouchDBAdmin,
    pair: tuple[str, str],
    secret_user: str | None,
    secret_password: str,
    owner: Owner,
    *,
    rotation: str | None,
    revoke: bool,
    at: str,
    assume_new: bool = False,
) -> Users:
    """Both users of a ResultBackend, as `plan_users` decides from the Secret.

    `revoke`: the idle user's password may be taken away now (nothing is
    rotating and no pod still uses it). `assume_new` creates both first and
    reads a user only if it exists already.
    """
    if assume_new:
        docs: dict[str, dict[str, Any] | None] = dict.fromkeys(pair)
    else:
        docs = {user: get_user(admin, user) for user in pair}
        for doc in docs.values():
            if doc is not None:
                _check_user_owner(admin, doc, owner)
    rotations = {user: (doc or {}).get(USER_ROTATION_FIELD) for user, doc in docs.items()}
    plan = plan_users(pair, secret_user, secret_password, rotation, rotations)
    password = generate_password() if plan.new_password else secret_password
    wrote_active = ensure_active_user(
        admin,
        plan.active,
        password,
        owner,
        docs[plan.active],
        new_password=plan.new_password,
        rotation=rotation if plan.rotated else None,
    )
    idle = ensure_idle_user(admin, plan.idle, owner, docs[plan.idle], revoke=revoke, at=at)
    return Users(
        active=plan.active,
        password=password,
        writes=int(wrote_active) + int(idle.wrote),
        revoked=plan.idle if idle.revoked_now else None,
        pending=not idle.revoked,
    )


def remove_user(admin: CouchDBAdmin, username: str, owner: Owner) -> bool:
    """Delete user `username` if its document names `owner`; True if it deleted."""
    doc = get_user(admin, username)
    if doc is None or not is_owned_by(doc.get(USER_OWNER_FIELD), owner):
        return False
    reply = admin.request(
        "DELETE", [USERS_DB, user_doc_id(username)], params={"rev": str(doc["_rev"])}
    )
    if reply.status in (200, 202):
        return True
    if reply.status == 404:
        return False
    raise admin.fail(reply, f"delete user {username!r}")


def verify_password(
    url: str, username: str, password: str, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """True if `username`/`password` authenticate at `url` (GET /_session, basic auth)."""
    server = _server(url, username, password)
    try:
        reply = _request(server, url, "GET", ["_session"], timeout=timeout)
    finally:
        _close(server)
    if reply.status == 401:
        return False
    if reply.status == 200 and isinstance(reply.body, Mapping):
        ctx = reply.body.get("userCtx")
        return isinstance(ctx, Mapping) and ctx.get("name") == username
    raise error_for_status(reply.status, f"authenticate user {username!r}", url, reply.detail())


def server_version(body: object) -> str:
    """The version `GET /` states; UnsupportedVersion for an Apache CouchDB before 3.0.

    CouchDB 2.x made new databases public unless `_security` says otherwise;
    what the operator writes there was designed for 3.x. Servers that speak
    the API but are not Apache CouchDB (pouchdb-server) state their own version.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("version"), str):
        raise BackendError(
            REASON_BACKEND,
            "GET / did not answer like a CouchDB server (no version)",
            transient=True,
        )
    version = str(body["version"])
    if "couchdb" in body:
        major = version.split(".", 1)[0]
        if not major.isdigit() or int(major) < 3:
            raise BackendError(
                REASON_VERSION,
                f"CouchDB {version} is older than 3.0, whose security defaults the operator "
                "relies on",
                transient=False,
            )
    return version


def check_admin(url: str, username: str, password: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The server's version, once `GET /_session` showed the credentials are a server admin's."""
    with CouchDBAdmin(url, username, password, timeout=timeout) as admin:
        root = admin.request("GET", [])
        if root.status != 200:
            raise admin.fail(root, "say its version (GET /)")
        version = server_version(root.body)
        session = admin.request("GET", ["_session"])
        if session.status != 200:
            raise admin.fail(session, "authenticate the admin user (GET /_session)")
        ctx = session.body.get("userCtx") if isinstance(session.body, Mapping) else None
        if not isinstance(ctx, Mapping) or ctx.get("name") != username:
            raise BackendError(
                REASON_ADMIN_AUTH,
                f"CouchDB at {admin.url} did not authenticate the admin user {username!r}",
                transient=True,
            )
        if "_admin" not in (ctx.get("roles") or ()):
            raise BackendError(
                REASON_FORBIDDEN,
                f"CouchDB at {admin.url}: user {username!r} is not a server admin; the admin "
                "Secret must name one",
                transient=True,
            )
    return version


def check_worker(
    url: str, username: str, password: str, db: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """The health check as the worker: authenticate and read database `db`."""
    server = _server(url, username, password)
    try:
        reply = _request(server, url, "GET", [db], timeout=timeout)
    finally:
        _close(server)
    if reply.status != 200:
        raise worker_error_for_status(reply.status, db, url, reply.detail())


# --- the store ----------------------------------------------------------------------


def secret_data(url: str, user: str, password: str, database: str) -> dict[str, str]:
    """The worker Secret's data (Service Binding keys plus Celery's URL)."""
    host, port = host_port(url, DEFAULT_PORTS["https" if url.startswith("https") else "http"])
    return {
        "type": "couchdb",
        "provider": PROVIDER,
        "uri": worker_uri(url, user, password, database),
        "host": host,
        "port": str(port),
        "username": user,
        "password": password,
        "database": database,
    }


class CouchDBStore:
    """A CouchDB 3.x server: a database, its two member users (one active), `_security`."""

    type = "couchdb"
    api_kind = "CouchDB"
    # A rotation moves the Secret to the other user; the one it left keeps its
    # password until the workers rolled (or the grace passed).
    keeps_superseded = True
    extra_env: Mapping[str, str] = {}

    def admin_secret(self, store: ResultStore, namespace: str) -> AdminSecretRef:
        assert store.spec.couchdb is not None
        ref = store.spec.couchdb.admin_secret_ref
        keys = {"username": ref.username_key, "password": ref.password_key}
        return AdminSecretRef(namespace, ref.name, keys)

    def check_admin(self, url: str, admin: Mapping[str, str]) -> str:
        return check_admin(url, admin["username"], admin["password"], SETTINGS.backend_timeout)

    def provision(
        self,
        rb: ResultBackend,
        admin: Mapping[str, str],
        existing: Mapping[str, str] | None,
        *,
        rotate: bool,
        superseded: Superseded,
        io: concurrent.futures.Executor,
    ) -> Provisioned:
        """Database, both users and `_security`; `superseded` says whether the user a
        rotation left must keep its password for now and, if not, why it may go.

        With no worker Secret yet (`existing` None) nothing is expected in the
        store: create first, look only on conflict."""
        url = rb.url
        pair, database, owner = user_pair(rb.couchdb_user), rb.couchdb_database, Owner.of(rb)
        fresh = existing is None
        trigger = rb.spec.rotation.trigger
        rotation = trigger.isoformat() if rotate and trigger is not None else None
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

        def connect() -> CouchDBAdmin:
            return CouchDBAdmin(
                url, admin["username"], admin["password"], timeout=SETTINGS.backend_timeout
            )

        def make_users() -> Users:
            # Its own connection, beside the database's steps (independent of them).
            with connect() as own:
                return ensure_users(
                    own,
                    pair,
                    (existing or {}).get("username"),
                    (existing or {}).get("password", ""),
                    owner,
                    rotation=rotation,
                    revoke=not rotate and not superseded.keep,
                    at=at,
                    assume_new=fresh,
                )

        users_made = io.submit(make_users)
        try:
            with connect() as conn:
                made_db = ensure_database(conn, database, owner, assume_new=fresh)
                secured = ensure_security(conn, database, list(pair), untouched=made_db)
        except BackendError:
            concurrent.futures.wait([users_made])
            raise
        users = users_made.result()
        warnings = []
        if url.startswith("https://"):
            host, port = host_port(url, DEFAULT_PORTS["https"])
            warnings.append(
                "Celery's CouchDB backend always connects with http: the workers will use "
                f"http://{host}:{port} without TLS"
            )
        revoked = None
        if users.revoked is not None:
            revoked = (
                f"revoked superseded CouchDB user {users.revoked} (its password replaced by "
                f"one nobody holds): {superseded.why}"
            )
        return Provisioned(
            secret_data=secret_data(url, users.active, users.password, database),
            fields={
                "url": display_uri(url, users.active, database),
                "couchdb": {"database": database, "user": users.active},
            },
            writes=users.writes + int(made_db) + int(secured),
            warnings=warnings,
            revoked=revoked,
            pending=users.pending,
        )

    def check_worker(
        self, rb: ResultBackend, secret_data: Mapping[str, str], io: concurrent.futures.Executor
    ) -> None:
        check_worker(
            rb.url,
            secret_data.get("username", ""),
            secret_data.get("password", ""),
            secret_data.get("database", ""),
            timeout=SETTINGS.backend_timeout,
        )

    def remove(self, rb: ResultBackend, admin: Mapping[str, str]) -> str:
        owner = Owner.of(rb)
        with CouchDBAdmin(
            rb.url,
            admin["username"],
            admin["password"],
            timeout=SETTINGS.backend_timeout,
        ) as conn:
            remove_database(conn, rb.couchdb_database, owner)
            for user in user_pair(rb.couchdb_user):
                remove_user(conn, user, owner)
        return f"deleted {self.describe(rb)}"

    def describe(self, rb: ResultBackend) -> str:
        first, second = user_pair(rb.couchdb_user)
        return f"database {rb.couchdb_database} and users {first} and {second}"


STORE = register(CouchDBStore())
