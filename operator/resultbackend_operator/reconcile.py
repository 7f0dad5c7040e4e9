"""One idempotent reconcile: observe -> compute desired -> act -> report.

The same function serves create, spec update, resume and the periodic check.
It returns what to write to status and which Events to post; handlers.py does
the posting. Errors are mapped on purpose: anything a retry can fix becomes a
retry with backoff, a spec the operator cannot act on becomes a permanent error,
and both leave a condition that says why.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from . import api, injection, kube, metrics
from .api import ResultBackend
from .backends import (
    REASON_CONFLICT,
    REASON_UNREACHABLE,
    BackendError,
    Owner,
    generate_password,
    probe,
)
from .backends import consul as consul_backend
from .backends import couchdb as couchdb_backend
from .settings import SETTINGS
from .status import Observed, desired_status, transitions
from .watched import WATCHED

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(uid: str) -> threading.Lock:
    """Handlers and the timer may run at once for one object; they take turns."""
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


# The status this process last computed per object. Handlers, the timer and
# workload events each hold a body read at some moment; a body read before the
# previous reconcile's status write would otherwise make decisions (rotate,
# post an Event) a second time. One active operator is the only status writer,
# so its own last result is the freshest view there is.
_last_status: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class _Provisioned:
    """What the last full reconcile of an object left for the periodic check
    and for workload events."""

    generation: int
    check: Callable[[], None]  # the worker-credentials check, credentials in its closure
    at: float  # time.monotonic() of that reconcile
    pending: bool  # it kept credentials a rotation replaced, to revoke later
    rb: ResultBackend | None = None
    secret_data: Mapping[str, str] = field(default_factory=dict)
    workers: Mapping[str, Seen] = field(default_factory=dict)  # selected workloads by ident
    credentials_due: float | None = None  # time.monotonic() when the worker check is next due


_provisioned: dict[str, _Provisioned] = {}


def last_status(uid: str) -> dict[str, Any] | None:
    """The status this process last computed for the object (None: not yet)."""
    return _last_status.get(uid)


def forget(uid: str) -> None:
    with _locks_guard:
        _locks.pop(uid, None)
        _last_status.pop(uid, None)
        _provisioned.pop(uid, None)
    metrics.forget(uid)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    subject: str = ""  # the workload (Kind/name) an injection Event is about


def coalesce(events: list[Event]) -> list[Event]:
    """One Event where a reconcile both provisioned and injected.

    A first reconcile usually does both; posted apart they were two API writes
    for one thing done. The injections then ride on the Provisioned Event's
    message ("...; injected into Deployment/w"). Injections on their own (a
    workload arriving later) keep their own Events.
    """
    provisioned = [e for e in events if e.type == "Normal" and e.reason == "Provisioned"]
    injected = [e for e in events if e.reason == "Injected" and e.subject]
    if len(provisioned) != 1 or not injected:
        return events
    into = ", ".join(e.subject for e in injected)
    merged = dataclasses.replace(
        provisioned[0], message=f"{provisioned[0].message}; injected into {into}"
    )
    return [merged if e is provisioned[0] else e for e in events if e not in injected]


@dataclass
class Result:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    retry_after: float | None = None  # transient failure: try again after this delay
    permanent: str | None = None  # the spec cannot be acted on
    writes: int = 0  # writes made to stores and the API server (for tests and metrics)
    outcome: metrics.Outcome = "ok"  # what the reconcile came to, for metrics
    check: Callable[[], None] | None = None  # the worker check, once provisioned
    pending: bool = False  # credentials a rotation replaced are kept for now
    rb: ResultBackend | None = None  # the parsed spec, once provisioned
    secret_data: Mapping[str, str] = field(default_factory=dict)
    workers: Mapping[str, Seen] = field(default_factory=dict)
    previous: Mapping[str, Any] | None = None  # the status this one replaces (workload events)
    checked: bool = False  # the worker check ran and passed


@dataclass
class StoreState:
    secret_data: dict[str, str]
    fields: dict[str, Any]
    check: Callable[[], None]
    writes: int
    warnings: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    pending: bool = False  # credentials a rotation replaced are kept for now


class Problem(Exception):
    """A failure with a condition reason; `message` never carries a secret value."""

    def __init__(self, reason: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


# --- pure desired state -----------------------------------------------------


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return host, parts.port or default_port


def couchdb_secret_data(url: str, user: str, password: str, database: str) -> dict[str, str]:
    host, port = host_port(url, 6984 if url.startswith("https") else 5984)
    return {
        "type": "couchdb",
        "provider": api.PROVIDER,
        "uri": couchdb_backend.worker_uri(url, user, password, database),
        "host": host,
        "port": str(port),
        "username": user,
        "password": password,
        "database": database,
    }


def consul_secret_data(url: str, key_prefix: str, one_client: bool, token: str) -> dict[str, str]:
    host, port = host_port(url, 8500)
    return {
        "type": "consul",
        "provider": api.PROVIDER,
        "uri": consul_backend.worker_uri(url, key_prefix, one_client),
        "host": host,
        "port": str(port),
        "keyPrefix": key_prefix,
        "token": token,
    }


def wants_rotation(rb: ResultBackend, status: Mapping[str, Any], now: dt.datetime) -> bool:
    """Rotate when the trigger moved past the last rotation and its time has come.

    A trigger in the future schedules the rotation for the first reconcile after
    it; rotating at every reconcile until then would restart workers in a loop.
    """
    trigger = rb.spec.rotation.trigger
    if trigger is None:
        return False
    if trigger.tzinfo is None:
        trigger = trigger.replace(tzinfo=dt.UTC)
    if trigger > now:
        return False
    rotated = status.get("credentialsRotatedAt")
    if not rotated:
        return True
    return trigger > dt.datetime.fromisoformat(str(rotated).replace("Z", "+00:00"))


# --- stores -----------------------------------------------------------------


def _owner(rb: ResultBackend) -> Owner:
    return Owner(namespace=rb.namespace, name=rb.name, uid=rb.uid)


# How long admin credentials read from a Secret are used again without reading
# it anew. The ResultBackends of a namespace usually share one admin Secret: when
# many are applied at once, one read serves them all. Any failure of a reconcile
# drops what it used, so a corrected Secret is read on the retry; deletion always
# reads afresh.
ADMIN_SECRET_REUSE = 5.0

_admin_reads: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[float, dict[str, str]]] = {}
_admin_reads_guard = threading.Lock()


def _admin_secret_key(rb: ResultBackend) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if rb.spec.couchdb is not None:
        ref = rb.spec.couchdb.admin_secret_ref
        keys = {"username": ref.username_key, "password": ref.password_key}
        return rb.namespace, ref.name, tuple(sorted(keys.items()))
    assert rb.spec.consul is not None
    token_ref = rb.spec.consul.token_secret_ref
    return rb.namespace, token_ref.name, (("token", token_ref.key),)


def admin_credentials(rb: ResultBackend, *, reuse: bool = False) -> dict[str, str]:
    """The store admin's credentials from the Secret the spec names (SecretProblem if not).

    `reuse`: a read of the same Secret and keys less than ADMIN_SECRET_REUSE
    seconds old will do."""
    key = _admin_secret_key(rb)
    now = time.monotonic()
    if reuse:
        with _admin_reads_guard:
            hit = _admin_reads.get(key)
        if hit is not None and now - hit[0] < ADMIN_SECRET_REUSE:
            return dict(hit[1])
    namespace, name, keys = key
    values = kube.read_secret_keys(namespace, name, dict(keys))
    with _admin_reads_guard:
        for stale in [k for k, (at, _) in _admin_reads.items() if now - at >= ADMIN_SECRET_REUSE]:
            del _admin_reads[stale]
        _admin_reads[key] = (now, dict(values))
    return values


def forget_admin_credentials(rb: ResultBackend) -> None:
    with _admin_reads_guard:
        _admin_reads.pop(_admin_secret_key(rb), None)


def provision_couchdb(
    rb: ResultBackend,
    existing: Mapping[str, str] | None,
    rotate: bool,
    creds: Mapping[str, str],
) -> StoreState:
    """Database, user and `_security`. With no worker Secret yet (`existing`
    None) nothing is expected in the store: create first, look only on conflict."""
    spec = rb.spec.couchdb
    assert spec is not None
    admin = couchdb_backend.CouchDBAdmin(
        spec.url, creds["username"], creds["password"], timeout=SETTINGS.backend_timeout
    )
    user, database, owner = rb.couchdb_user, rb.couchdb_database, _owner(rb)
    fresh = existing is None
    password = (existing or {}).get("password", "")
    if rotate or not password or (existing or {}).get("username") != user:
        password = generate_password()

    def make_user() -> bool:
        # Its own connection, beside the database's steps (independent of them).
        with couchdb_backend.CouchDBAdmin(
            spec.url, creds["username"], creds["password"], timeout=SETTINGS.backend_timeout
        ) as own:
            return couchdb_backend.ensure_user(own, user, password, owner, assume_new=fresh)

    user_made = _IO.submit(make_user)
    try:
        made_db = couchdb_backend.ensure_database(admin, database, owner, assume_new=fresh)
        secured = couchdb_backend.ensure_security(admin, database, [user], untouched=made_db)
    except BackendError:
        concurrent.futures.wait([user_made])
        raise
    finally:
        admin.close()
    writes = int(user_made.result()) + int(made_db) + int(secured)
    warnings = []
    if spec.url.startswith("https://"):
        warnings.append(
            "Celery's CouchDB backend always connects with http: the workers will use "
            f"http://{host_port(spec.url, 6984)[0]}:{host_port(spec.url, 6984)[1]} without TLS"
        )

    def check() -> None:
        couchdb_backend.check_worker(
            spec.url, user, password, database, timeout=SETTINGS.backend_timeout
        )

    return StoreState(
        secret_data=couchdb_secret_data(spec.url, user, password, database),
        fields={
            "url": couchdb_backend.display_uri(spec.url, user, database),
            "couchdb": {"database": database, "user": user},
        },
        check=check,
        writes=writes,
        warnings=warnings,
    )


def provision_consul(
    rb: ResultBackend,
    existing: Mapping[str, str] | None,
    rotate: bool,
    superseded: tuple[bool, str],
    creds: Mapping[str, str],
) -> StoreState:
    """Policy and token; `superseded` says whether tokens replaced by a rotation
    must be kept for now (pods may still use them) and, if not, why they may go.

    With no worker Secret yet (`existing` None) nothing is expected in Consul:
    the policy is created without looking first and, when that succeeds, the
    token too (a policy made this instant has no tokens to look for).
    """
    spec = rb.spec.consul
    assert spec is not None
    admin = consul_backend.ConsulAdmin(spec.url, creds["token"], timeout=SETTINGS.backend_timeout)
    owner, prefix = _owner(rb), rb.consul_key_prefix
    events: list[Event] = []
    policy_id = None
    if existing is None and not rotate:
        policy_id = consul_backend.create_policy(admin, rb.consul_policy_name, prefix, owner)
    if policy_id is not None:
        accessor, token = consul_backend.create_token(admin, policy_id, owner)
        writes = 2
    else:
        consul_backend.check_management(admin)
        policy_id, wrote = consul_backend.ensure_policy(admin, rb.consul_policy_name, prefix, owner)
        writes = int(wrote)
        known = (existing or {}).get("token") or None
        if rotate:
            # The old token stays valid until the workers run with the new one.
            accessor, token = consul_backend.create_token(admin, policy_id, owner)
            writes += 1
        else:
            keep, why = superseded
            accessor, token, wrote = consul_backend.ensure_token(
                admin, policy_id, owner, known, keep_others=keep
            )
            writes += int(wrote)
            if wrote and token == known:
                events.append(
                    Event("Normal", "Revoked", f"revoked superseded worker token(s): {why}")
                )

    def check() -> None:
        # The session's destroy need not hold up Ready: it goes to the pool.
        consul_backend.check_worker(
            spec.url, token, prefix, timeout=SETTINGS.backend_timeout, cleanup=_IO.submit
        )

    return StoreState(
        secret_data=consul_secret_data(spec.url, prefix, spec.one_client, token),
        fields={
            "url": consul_backend.worker_uri(spec.url, prefix, spec.one_client),
            "consul": {"keyPrefix": prefix, "policyID": policy_id, "tokenAccessorID": accessor},
        },
        check=check,
        writes=writes,
        events=events,
        pending=rotate or superseded[0],
    )


def superseded_credentials(
    rb: ResultBackend,
    status: Mapping[str, Any],
    secret_data: Mapping[str, str] | None,
    workloads: list[dict[str, Any]] | None,
    now: dt.datetime,
) -> tuple[bool, str]:
    """(keep, why not): may credentials a rotation replaced be revoked now?

    They are kept while a rotation is recent and some injected workload still
    runs pods of the previous template; after `SETTINGS.rotation_grace` seconds
    they go whatever the rollout says. Outside that window, a token that is not
    the Secret's is a crash leftover no pod ever saw.
    """
    rotated = status.get("credentialsRotatedAt")
    if not rotated:
        return False, "no rotation is in progress"
    since = (now - dt.datetime.fromisoformat(str(rotated).replace("Z", "+00:00"))).total_seconds()
    if since >= SETTINGS.rotation_grace:
        return False, f"{SETTINGS.rotation_grace:.0f}s passed since the rotation"
    if workloads is None:
        return True, ""
    chash = injection.config_hash(injection.encode_secret_data(secret_data or {}))
    if injection.workers_settled(workloads, rb.name, chash):
        return False, "every injected workload rolled out the new credentials"
    return True, ""


# --- workers ----------------------------------------------------------------


def _no_workers() -> dict[str, Any]:
    return {"selected": 0, "injected": 0, "names": []}


@dataclass(frozen=True)
class Seen:
    """One selected workload as the last look at it left it."""

    name: str
    injected: bool
    conflicts: tuple[str, ...] = ()
    # metadata.generation after our last apply to it (0: not applied by us): a
    # watch event of an older generation was overtaken by that apply.
    generation: int = 0


@dataclass
class Workers:
    seen: dict[str, Seen] = field(default_factory=dict)  # selected workloads by Kind/name
    events: list[Event] = field(default_factory=list)
    writes: int = 0

    @property
    def injected(self) -> list[str]:
        return [self.seen[i].name for i in sorted(self.seen) if self.seen[i].injected]

    @property
    def conflicts(self) -> list[str]:
        return [c for i in sorted(self.seen) for c in self.seen[i].conflicts]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "selected": len(self.seen),
            "injected": len(self.injected),
            "names": sorted(self.injected),
        }
        if self.conflicts:
            out["conflicts"] = self.conflicts
        return out

    def condition(self) -> tuple[bool, str, str]:
        if self.conflicts:
            return False, "Conflict", "; ".join(self.conflicts)
        if not self.seen:
            return True, "NoWorkersSelected", "no Deployment or StatefulSet is selected"
        return True, "Injected", f"{len(self.injected)} workload(s) carry the current injection"


def ident_of(workload: Mapping[str, Any]) -> str:
    return f"{workload.get('kind')}/{workload.get('metadata', {}).get('name')}"


def sync_workers(
    rb: ResultBackend, secret_data: Mapping[str, str], workloads: list[dict[str, Any]]
) -> Workers:
    """Inject into every selected workload of `workloads` (what `_listing` found),
    release the ones of it that stopped matching."""
    out = Workers()
    for wl in workloads:
        sync_workload(rb, secret_data, wl, out)
    return out


def sync_workload(
    rb: ResultBackend, secret_data: Mapping[str, str], wl: Mapping[str, Any], out: Workers
) -> None:
    """Bring one workload in line with `rb`; record it in `out.seen` if selected."""
    env = injection.desired_env(rb.spec.type, rb.secret_name, rb.spec.workers.url_env_name)
    chash = injection.config_hash(injection.encode_secret_data(secret_data))
    containers = rb.spec.workers.containers
    selector = rb.spec.workers.selector
    meta = wl.get("metadata", {})
    ident = ident_of(wl)
    name = str(meta.get("name"))
    out.seen.pop(ident, None)
    if selector is not None and selector.matches(meta.get("labels")):
        state = injection.workload_status(wl, rb.name, env, containers, chash)
        if state.action == "conflict":
            out.seen[ident] = Seen(name, False, state.reasons)
            return
        if state.action == "apply":
            was = injection.is_injected_by(wl, rb.name)
            applied = kube.apply_workload(
                injection.apply_patch(wl, rb.name, env, containers, chash)
            )
            out.writes += 1
            out.events.append(
                Event("Normal", "Rolled", f"{ident}: the result backend changed, rolling")
                if was
                else Event("Normal", "Injected", f"{ident}: injected the result backend", ident)
            )
            out.seen[ident] = Seen(name, True, generation=api.generation(applied))
        elif state.action == "release":
            applied = kube.apply_workload(injection.release_patch(wl))
            out.writes += 1
            out.events.append(Event("Normal", "Released", f"{ident}: released"))
            out.seen[ident] = Seen(name, False, generation=api.generation(applied))
        else:
            out.seen[ident] = Seen(name, state.injected)
    elif injection.is_injected_by(wl, rb.name):
        kube.apply_workload(injection.release_patch(wl))
        out.writes += 1
        out.events.append(Event("Normal", "Released", f"{ident}: no longer selected, released"))


def concerns(known: _Provisioned, workload: Mapping[str, Any]) -> bool:
    """Whether a workload event may matter to this ResultBackend at all."""
    rb = known.rb
    if rb is None:
        return False
    meta = workload.get("metadata", {})
    selector = rb.spec.workers.selector
    return (
        ident_of(workload) in known.workers
        or injection.is_injected_by(workload, rb.name)
        or (selector is not None and selector.matches(meta.get("labels")))
    )


def release_workers(rb: ResultBackend) -> list[Event]:
    events = []
    for wl in kube.list_workloads(rb.namespace):
        if injection.is_injected_by(wl, rb.name):
            kube.apply_workload(injection.release_patch(wl))
            ident = f"{wl['kind']}/{wl['metadata']['name']}"
            events.append(Event("Normal", "Released", f"{ident}: released"))
    return events


# --- the reconcile ----------------------------------------------------------


def reconcile(
    body: Mapping[str, Any],
    now: dt.datetime | None = None,
    *,
    thorough: bool = False,
    gate: Callable[[], None] | None = None,
) -> Result:
    """The full reconcile. `thorough` lists every workload of the namespace to
    find any this ResultBackend injected (operator start, periodic resync);
    otherwise only the selected ones and those this process saw it inject.

    `gate` runs while the Secrets are being read, before anything is written
    anywhere (the driver puts the finalizer on there); if it raises, the
    reconcile stops with that exception and changes nothing."""
    now = now or dt.datetime.now(dt.UTC)
    meta = body.get("metadata", {})
    uid = str(meta.get("uid", ""))
    store = metrics.store_of(body)
    with _lock_for(uid):
        known = _last_status.get(uid)
        if known is not None and known.get("observedGeneration", 0) >= _status_generation(body):
            body = {**body, "status": known}
        with metrics.reconcile_timer(store) as timing:
            result = _reconcile(body, now, thorough, gate)
            timing.outcome = result.outcome
        _last_status[uid] = result.status
        generation = int(meta.get("generation", 0))
        if result.check is not None:
            _provisioned[uid] = _Provisioned(
                generation,
                result.check,
                time.monotonic(),
                result.pending,
                result.rb,
                result.secret_data,
                result.workers,
                _next_credentials() if result.checked else None,
            )
        else:
            _provisioned.pop(uid, None)
        metrics.set_workloads_injected(uid, store, injected_count(result.status))
        return result


def periodic(body: Mapping[str, Any], now: dt.datetime | None = None) -> Result:
    """The periodic check (checker.py): check the store, and reconcile fully when due.

    While a ResultBackend is Ready and nothing is pending, a tick costs at most
    the shared probe of its server (one request per server and interval, see
    `backends.probe`), plus the worker check itself (CouchDB: a read as the
    worker; Consul: the session/key round trip) once per
    `SETTINGS.credential_check_interval`; nothing is read from the API server
    or checked as admin. A full reconcile runs instead when this process has
    not reconciled the object yet, its generation moved, it is not Ready, a
    rotation is due or its old credentials await revocation, the server does
    not answer and the worker check fails, or `SETTINGS.resync_interval` has
    passed (drift in the store or the Secret is found then). Workloads are
    watched, so their drift never waits for this.
    """
    now = now or dt.datetime.now(dt.UTC)
    meta = body.get("metadata", {})
    uid = str(meta.get("uid", ""))
    with _lock_for(uid):
        known = _provisioned.get(uid)
        current = _last_status.get(uid)
        if known is not None and current is not None and _check_suffices(body, known, current, now):
            if _credentials_recent(known) and _server_answers(known):
                return Result(status=current)
            try:
                with metrics.backend_check(metrics.store_of(body)):
                    known.check()
            except BackendError:
                pass  # something changed: look at everything, below
            else:
                _provisioned[uid] = dataclasses.replace(known, credentials_due=_next_credentials())
                return Result(status=current)
    return reconcile(body, now, thorough=True)


def _credentials_recent(known: _Provisioned) -> bool:
    return known.credentials_due is not None and time.monotonic() < known.credentials_due


def _next_credentials() -> float:
    """When the worker credentials are next tried: an interval from now, give or take half.

    ResultBackends created in one burst would otherwise all be checked in the
    same second, every interval, against the same store.
    """
    interval = SETTINGS.credential_check_interval
    return time.monotonic() + interval * random.uniform(0.5, 1.5)  # noqa: S311 (not crypto)


def _server_answers(known: _Provisioned) -> bool:
    rb = known.rb
    if rb is None:
        return False
    spec = rb.spec.couchdb if rb.spec.type == "couchdb" else rb.spec.consul
    if spec is None:
        return False
    # A quarter of the interval: an outage that starts just after a probe still
    # shows at the next tick of every ResultBackend on the server.
    return probe.server_answers(
        rb.spec.type, spec.url, SETTINGS.check_interval / 4, SETTINGS.backend_timeout
    )


def _check_suffices(
    body: Mapping[str, Any], known: _Provisioned, current: Mapping[str, Any], now: dt.datetime
) -> bool:
    if known.generation != int(body.get("metadata", {}).get("generation", 0)):
        return False
    if time.monotonic() - known.at >= SETTINGS.resync_interval:
        return False
    if not _was_true(current, api.CONDITION_READY):
        return False
    rb = known.rb  # parsed by that reconcile, of this generation
    if rb is None:
        try:
            rb = api.parse(body)
        except api.InvalidSpec:
            return False
    return not known.pending and not wants_rotation(rb, current, now)


def workload_changed(
    uid: str, workload: Mapping[str, Any], deleted: bool = False, now: dt.datetime | None = None
) -> Result | None:
    """A watched workload changed: bring it alone in line and update status.workers.

    Only the ResultBackend `uid` is looked at, with the spec and Secret data of
    its last full reconcile: no Secret is read, no store is called and nothing
    is listed. None means there is nothing to write: the workload does not
    concern it, already is as it should be, or no full reconcile has finished
    yet (that one lists the namespace's workloads itself).
    """
    known = _provisioned.get(uid)
    if known is not None and not concerns(known, workload):
        return None
    now = now or dt.datetime.now(dt.UTC)
    # Not known yet may mean a first reconcile is running; it may have listed the
    # namespace before this workload existed, so wait for it and look again.
    with _lock_for(uid):
        known = _provisioned.get(uid)
        current = _last_status.get(uid)
        if known is None or known.rb is None or current is None:
            return None
        if not concerns(known, workload):
            return None
        ident = ident_of(workload)
        ours = known.workers.get(ident)
        if not deleted and ours is not None and api.generation(workload) < ours.generation:
            return None  # an event from before our own apply: that apply overtook it
        out = Workers(seen=dict(known.workers))
        obs = _observed_as_is(current)
        try:
            if deleted:
                out.seen.pop(ident, None)
            else:
                sync_workload(known.rb, known.secret_data, workload, out)
        except ApiException as exc:
            obs.injected = (False, "ApiError", f"could not update workloads: HTTP {exc.status}")
        else:
            if out.seen == known.workers and not out.writes:
                return None
            obs.injected = out.condition()
            obs.fields["workers"] = out.status()
        result = _finish(current, obs, now)
        result.events = out.events + result.events
        result.writes = out.writes
        result.rb = known.rb
        result.previous = current
        _last_status[uid] = result.status
        _provisioned[uid] = dataclasses.replace(known, workers=out.seen)
        metrics.set_workloads_injected(uid, known.rb.spec.type, injected_count(result.status))
        return result


def _observed_as_is(current: Mapping[str, Any]) -> Observed:
    """The conditions of `current` as an Observed, to change one of them."""

    def cond(type_: str) -> tuple[bool, str, str] | None:
        c = api.get_condition(current.get("conditions"), type_)
        if c is None or c.get("status") not in ("True", "False"):
            return None
        return c.get("status") == "True", str(c.get("reason", "")), str(c.get("message", ""))

    return Observed(
        generation=int(current.get("observedGeneration", 0)),
        provisioned=cond(api.CONDITION_PROVISIONED),
        reachable=cond(api.CONDITION_REACHABLE),
        injected=cond(api.CONDITION_INJECTED),
    )


def injected_count(status: Mapping[str, Any]) -> int:
    """How many workloads carry the current injection, as status says."""
    workers = status.get("workers")
    count = workers.get("injected") if isinstance(workers, Mapping) else None
    return count if isinstance(count, int) else 0


def _status_generation(body: Mapping[str, Any]) -> int:
    return int((body.get("status") or {}).get("observedGeneration", 0))


def _reconcile(
    body: Mapping[str, Any], now: dt.datetime, thorough: bool, gate: Callable[[], None] | None
) -> Result:
    current = dict(body.get("status") or {})
    generation = int(body.get("metadata", {}).get("generation", 0))
    obs = Observed(generation=generation)
    try:
        rb = api.parse(body)
    except api.InvalidSpec as exc:
        obs.provisioned = (False, "InvalidSpec", str(exc))
        result = _finish(current, obs, now, permanent=str(exc))
        result.outcome = "invalid"
        return result

    obs.fields["secretName"] = rb.secret_name
    rotate = wants_rotation(rb, current, now)
    writes = 0
    workloads: _Listing | None = None
    # What does not depend on each other runs side by side: the two Secret
    # reads; then the worker check, the Secret write and the workload listing.
    existing_f = _IO.submit(kube.read_secret, rb.namespace, rb.secret_name)
    creds_f = _IO.submit(admin_credentials, rb, reuse=True)
    if gate is not None:
        gate()
    try:
        existing = existing_f.result()
        if existing is not None and rb.uid not in existing.owner_uids:
            raise Problem(
                "Conflict",
                f"Secret {rb.namespace}/{rb.secret_name} exists and is not owned by this "
                "ResultBackend",
                transient=True,
            )
        existing_data = existing.data if existing else None
        creds = creds_f.result()
        if rb.spec.type == "couchdb":
            state = provision_couchdb(rb, existing_data, rotate, creds)
        else:
            superseded: tuple[bool, str] = (False, "no rotation is in progress")
            if current.get("credentialsRotatedAt"):
                workloads = _Listing(rb.namespace, "")
                listed = _listed(workloads)
                superseded = superseded_credentials(rb, current, existing_data, listed, now)
            state = provision_consul(rb, existing_data, rotate, superseded, creds)
        check = _IO.submit(_check, rb.spec.type, state.check)
        if workloads is None:
            workloads = _listing(rb, current, thorough)
        writes += state.writes
        writes += int(
            kube.ensure_secret(
                rb.namespace, rb.secret_name, state.secret_data, rb.owner_reference, existing
            )
        )
    except (BackendError, Problem, kube.SecretProblem) as exc:
        forget_admin_credentials(rb)  # the retry reads the Secret anew
        reason, message = exc.reason, exc.message
        transient = getattr(exc, "transient", True)
        if reason == REASON_UNREACHABLE:
            # An outage says nothing about what exists: keep Provisioned as it
            # was and report the store unreachable.
            obs.reachable = (False, reason, message)
            if not _was_true(current, api.CONDITION_PROVISIONED):
                obs.provisioned = (False, reason, message)
        else:
            obs.provisioned = (False, reason, message)
        result = _finish(current, obs, now)
        result.retry_after = _backoff(current) if transient else SETTINGS.max_backoff
        result.writes = writes
        result.outcome = "conflict" if reason == REASON_CONFLICT else "error"
        return result

    obs.fields.update(state.fields)
    message = "store and credentials exist as specified"
    if state.warnings:
        message += "; " + "; ".join(state.warnings)
    obs.provisioned = (True, "Provisioned", message)
    if rotate:
        obs.fields["credentialsRotatedAt"] = api.now_rfc3339(now)
    outcome: metrics.Outcome = "ok"
    events: list[Event] = list(state.events)
    seen: dict[str, Seen] = {}
    try:
        workers = sync_workers(rb, state.secret_data, workloads.result())
    except ApiException as exc:
        obs.injected = (False, "ApiError", f"could not update workloads: HTTP {exc.status}")
        obs.fields["workers"] = current.get("workers") or _no_workers()
        outcome = "degraded"
    else:
        writes += workers.writes
        events.extend(workers.events)
        seen = workers.seen
        obs.injected = workers.condition()
        obs.fields["workers"] = workers.status()
        if workers.conflicts:
            outcome = "conflict"
    try:
        check.result()
        obs.reachable = (True, "CredentialsWork", "the worker credentials can use the store")
        checked = True
    except BackendError as exc:
        checked = False
        obs.reachable = (False, exc.reason, exc.message)
        if outcome == "ok":  # a workload conflict needs the user more
            outcome = "degraded"
    result = _finish(current, obs, now)
    result.events = coalesce(events + result.events)
    result.writes = writes
    result.outcome = outcome
    result.check = state.check
    result.pending = state.pending
    result.rb = rb
    result.secret_data = state.secret_data
    result.workers = seen
    result.checked = checked
    if rotate:
        result.events.append(Event("Normal", "Rotated", "worker credentials rotated"))
    if obs.reachable and not obs.reachable[0]:
        result.retry_after = _backoff(current)
    return result


# Threads for the side-by-side steps of a reconcile (each one waits only for
# its own); a few per Kopf handler thread.
_IO = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rbo-io")


def _check(store: str, check: Callable[[], None]) -> None:
    with metrics.backend_check(store):
        check()


class _Listing:
    """Deployments and StatefulSets of a namespace, the two lists side by side.

    `selector` is a label-selector query ("" for every workload, None for no
    list at all). `expect` names workloads (Kind/name) that must be in the
    result, the ones this ResultBackend injected: if the selector no longer
    finds one, the whole namespace is listed so that it can be released.
    """

    def __init__(
        self,
        namespace: str,
        selector: str | None,
        expect: Collection[str] = (),
        kinds: Collection[str] | None = None,
    ) -> None:
        self._namespace = namespace
        self._expect = set(expect)
        if selector is None and self._expect:
            selector, kinds = "", None
        self._kinds = (
            []
            if selector is None
            else [
                _IO.submit(kube.list_workloads_of, namespace, kind, selector)
                for kind in kube.WORKLOAD_PLURALS
                if kinds is None or kind in kinds
            ]
        )
        self._everything = selector == "" and kinds is None

    def result(self) -> list[dict[str, Any]]:
        found = [wl for kind in self._kinds for wl in kind.result()]
        if self._everything or self._expect <= {ident_of(wl) for wl in found}:
            return found
        return kube.list_workloads(self._namespace)


def _listing(rb: ResultBackend, current: Mapping[str, Any], thorough: bool) -> _Listing:
    """What a reconcile needs to list: the workloads the selector selects and
    those this process saw this ResultBackend inject, or everything when it
    does not know what was injected (another process did it)."""
    known = _provisioned.get(rb.uid)
    names = (current.get("workers") or {}).get("names")
    if thorough or (known is None and names):
        return _Listing(rb.namespace, "")
    injected = [i for i, seen in known.workers.items() if seen.injected] if known else []
    selector = rb.spec.workers.selector
    if selector is None:
        return _Listing(rb.namespace, None, injected)
    # Only the kinds the watches saw a selected workload of, and those injected.
    kinds = WATCHED.kinds_selected(rb.namespace, selector.matches)
    if kinds is not None:
        kinds |= {ident.split("/", 1)[0] for ident in injected}
    return _Listing(rb.namespace, selector.to_query(), injected, kinds)


def _listed(workloads: _Listing) -> list[dict[str, Any]] | None:
    """The namespace's workloads, or None when they cannot be listed now."""
    try:
        return workloads.result()
    except ApiException:
        return None


def _was_true(current: Mapping[str, Any], type_: str) -> bool:
    cond = api.get_condition(current.get("conditions"), type_)
    return cond is not None and cond.get("status") == "True"


def _backoff(current: Mapping[str, Any]) -> float:
    return SETTINGS.backoff


def _finish(
    current: Mapping[str, Any], obs: Observed, now: dt.datetime, permanent: str | None = None
) -> Result:
    status = desired_status(current, obs, now)
    result = Result(status=status, permanent=permanent)
    result.events.extend(_events_for(current, status))
    return result


def _events_for(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[Event]:
    """Events on transitions only: a steady state posts nothing."""
    changed = transitions(current.get("conditions"), desired["conditions"])
    conds = {c["type"]: c for c in desired["conditions"]}
    events: list[Event] = []
    prov = changed.get(api.CONDITION_PROVISIONED)
    if prov and prov[1] == "True":
        events.append(Event("Normal", "Provisioned", conds[api.CONDITION_PROVISIONED]["message"]))
    elif prov and prov[1] == "False":
        c = conds[api.CONDITION_PROVISIONED]
        events.append(Event("Warning", c["reason"], c["message"]))
    reach = changed.get(api.CONDITION_REACHABLE)
    if reach and reach[1] == "False":
        c = conds[api.CONDITION_REACHABLE]
        events.append(Event("Warning", "Degraded", f"{c['reason']}: {c['message']}"))
    elif reach and reach[1] == "True" and reach[0] == "False":
        events.append(Event("Normal", "Recovered", "the worker credentials work again"))
    return events


# --- deletion ---------------------------------------------------------------


def delete(body: Mapping[str, Any]) -> list[Event]:
    """Release what the ResultBackend made; raises Problem/BackendError to retry."""
    try:
        rb = api.parse(body)
    except api.InvalidSpec:
        return [Event("Normal", "Deleted", "invalid spec: nothing was provisioned")]
    owner = _owner(rb)
    with _lock_for(rb.uid):
        events = release_workers(rb)
        if rb.spec.deletion_policy == "Retain":
            events.append(_retained(rb))
        else:
            try:
                if rb.spec.type == "couchdb":
                    events.extend(_delete_couchdb(rb, owner))
                else:
                    events.extend(_delete_consul(rb, owner))
            except kube.SecretProblem as exc:
                if not kube.namespace_terminating(rb.namespace):
                    raise
                # The namespace is going away and took the admin Secret with it:
                # it can never come back, so waiting would hold the namespace in
                # Terminating forever. Keep what is in the store and say so.
                events.append(_orphaned(rb, exc.message))
    forget(rb.uid)
    return events


def _orphaned(rb: ResultBackend, why: str) -> Event:
    what = _provisioned_objects(rb)
    message = (
        f"namespace {rb.namespace} is being deleted and {why}: kept {what} in the store; "
        "remove them with the store's admin credentials"
    )
    log.warning("%s/%s: %s", rb.namespace, rb.name, message)
    return Event("Warning", "Orphaned", message)


def _provisioned_objects(rb: ResultBackend) -> str:
    if rb.spec.type == "couchdb":
        return f"database {rb.couchdb_database} and user {rb.couchdb_user}"
    return f"keys under {rb.consul_key_prefix}/, policy {rb.consul_policy_name} and its token"


def _retained(rb: ResultBackend) -> Event:
    return Event("Normal", "Retained", f"deletionPolicy Retain: kept {_provisioned_objects(rb)}")


def _delete_couchdb(rb: ResultBackend, owner: Owner) -> list[Event]:
    spec = rb.spec.couchdb
    assert spec is not None
    creds = admin_credentials(rb)
    admin = couchdb_backend.CouchDBAdmin(
        spec.url, creds["username"], creds["password"], timeout=SETTINGS.backend_timeout
    )
    couchdb_backend.remove_database(admin, rb.couchdb_database, owner)
    couchdb_backend.remove_user(admin, rb.couchdb_user, owner)
    return [
        Event(
            "Normal",
            "Deleted",
            f"deleted database {rb.couchdb_database} and user {rb.couchdb_user}",
        )
    ]


def _delete_consul(rb: ResultBackend, owner: Owner) -> list[Event]:
    spec = rb.spec.consul
    assert spec is not None
    creds = admin_credentials(rb)
    admin = consul_backend.ConsulAdmin(spec.url, creds["token"], timeout=SETTINGS.backend_timeout)
    # remove_policy also revokes our tokens linked to it (a token whose policy is
    # gone would otherwise linger, linked to nothing).
    consul_backend.remove_policy(admin, rb.consul_policy_name, owner)
    consul_backend.remove_keys(admin, rb.consul_key_prefix)
    return [
        Event(
            "Normal",
            "Deleted",
            f"deleted keys under {rb.consul_key_prefix}/, policy {rb.consul_policy_name} "
            "and its token",
        )
    ]
