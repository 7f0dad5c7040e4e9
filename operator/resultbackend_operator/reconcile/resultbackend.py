"""The ResultBackend controller: its triggers, its one reconcile, the state between runs.

Triggers (watch events, on Kopf's loop) only enqueue a ResultBackend's uid,
sometimes with a hint; `run` (a worker thread of the Controller, one run per
uid at a time) reads the newest object from the cache and decides from it:

- the object is gone: drop what this process kept about it;
- `deletionTimestamp` with our finalizer: release the workloads, remove what
  the store holds (deletionPolicy), take the finalizer off;
- nothing known of it yet, a generation this process has not reconciled, our
  finalizer missing, a retry, or a Secret it owns or uses changed (hint
  RESYNC): the full reconcile, observe -> desired -> act -> report;
- only workload hints: bring those workloads alone in line (no Secret read,
  no store call), from the spec and Secret data the last full reconcile left;
- the periodic check (hint CHECK, a RequeueAfter of the last run): the shared
  probe of the store's server and, once in a while, the worker credentials;
  a full reconcile when anything is off or a resync is due.

Status is diffed against the newest status the API server showed (the cache,
which also takes the answers of our own writes), written once per run, and the
Events of the condition changes are posted after that write succeeded: a run
whose status write failed is retried and posts them then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from .. import api, injection, kube, metrics
from ..api import ResultBackend
from ..backends import (
    NOTHING_SUPERSEDED,
    REASON_CONFLICT,
    REASON_UNREACHABLE,
    Store,
    probe,
    store_for,
)
from ..controller import RETRY, Controller, Hints, Outcome
from ..errors import Problem
from ..settings import SETTINGS
from ..status import Observed, desired_status, status_patch
from ..watched import WatchedLabels
from . import rotation
from .credentials import AdminCredentials, Where
from .events import Event, coalesce, for_transitions
from .workers import (
    Listing,
    Seen,
    Workers,
    concerns,
    desired_env,
    ident_of,
    injected_count,
    listing,
    no_workers,
    release_workers,
    sync_workers,
    sync_workload,
)

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
# Post(object metadata, events): how Events reach the API server (handlers.py: Kopf's poster).
Post = Callable[[Mapping[str, Any], list[Event]], None]

# Hints a trigger may give with a uid (the controller adds RETRY to a failed run's).
CHECK = "check"  # the periodic check is due
RESYNC = "resync"  # a new object or generation, or a Secret it owns or uses changed
RESUME = "resume"  # first sight in a watch's listing: nothing is known of what it injected
WORKLOAD = "workload"  # (WORKLOAD, "Kind/name") -> (deleted, newest workload body)
FULL = (RETRY, RESYNC, RESUME)  # hints that need the full reconcile

# Failures a change of the admin Secret can fix; and how often such a Secret is
# asked whether it changed while a ResultBackend waits on it (see poll_admin).
ADMIN_REASONS = frozenset({"SecretNotFound", "SecretKeyMissing", "AdminAuthFailed", "Forbidden"})
ADMIN_POLL = 2.0


@dataclass(frozen=True)
class Known:
    """What the last full reconcile of an object left, for the cheap paths."""

    generation: int
    rb: ResultBackend
    secret_data: Mapping[str, str]
    workers: Mapping[str, Seen]  # selected workloads by Kind/name
    at: float  # time.monotonic() of that reconcile
    pending: bool  # it kept credentials a rotation replaced, to revoke later
    credentials_due: float | None = None  # time.monotonic() when the worker check is due


@dataclass
class Result:
    """What one run found: the status to write, the Events, and how it ended."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    failed: bool = False  # not done: try again
    transient: bool = True  # trying again can help by itself (else: slowly, at max_backoff)
    permanent: str | None = None  # the spec cannot be acted on (the message)
    outcome: metrics.Outcome = "ok"
    known: Known | None = None  # set once provisioned


def has_finalizer(body: Body) -> bool:
    return api.FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def _status(body: Body) -> dict[str, Any]:
    return dict(body.get("status") or {})


def _observed_generation(body: Body) -> int:
    return int(_status(body).get("observedGeneration") or 0)


def _was_true(current: Mapping[str, Any], type_: str) -> bool:
    cond = api.get_condition(current.get("conditions"), type_)
    return cond is not None and cond.get("status") == "True"


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


def _finish(
    current: Mapping[str, Any], obs: Observed, now: dt.datetime, permanent: str | None = None
) -> Result:
    status = desired_status(current, obs, now)
    return Result(status=status, permanent=permanent, events=for_transitions(current, status))


def _next_credentials() -> float:
    """When the worker credentials are next tried: an interval from now, give or take half.

    ResultBackends created in one burst would otherwise all be checked in the
    same second, every interval, against the same store.
    """
    interval = SETTINGS.credential_check_interval
    return time.monotonic() + interval * random.uniform(0.5, 1.5)  # noqa: S311 (not crypto)


def _check_delay() -> float:
    """The next periodic check: one interval, give or take a tenth (no lockstep)."""
    return SETTINGS.check_interval * random.uniform(0.9, 1.1)  # noqa: S311 (not crypto)


def _fingerprint(body: Body) -> tuple[Any, ...]:
    """What of a workload matters to injection: labels, our annotation, the spec generation."""
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
    return (
        meta.get("generation"),
        tuple(sorted((meta.get("labels") or {}).items())),
        annotations.get(api.INJECTED_BY_ANNOTATION),
    )


class NotHeld(Exception):
    """Our finalizer could not be put on (HTTP `status`): nothing was written."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"finalizer not added: HTTP {status}")
        self.status = status


class ResultBackends:
    """The controller of the ResultBackend kind and the state its runs keep, by uid."""

    def __init__(self, post: Post, *, workers: int = 8) -> None:
        self.post = post
        self.controller = Controller(
            "resultbackend",
            self.run,
            self.forget,
            workers=workers,
            backoff=SETTINGS.backoff,
            max_backoff=SETTINGS.max_backoff,
            quick=self.quick,
        )
        self.cache = self.controller.cache
        # Threads for the side-by-side steps of a run (each waits only for its own).
        self.io = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="rbo-io")
        self.admin = AdminCredentials()
        self.watched = WatchedLabels()
        # State between runs, by uid; each entry is written by the runs of its uid only.
        self.known: dict[str, Known] = {}
        self._started: dict[str, int] = {}  # generation the newest run of the uid began with
        self._secret_hashes: dict[str, str] = {}  # config hash of the worker Secret we wrote
        # uid -> the admin Secret whose content failed its last run (see poll_admin)
        self._admin_failing: dict[str, Where] = {}
        self._workloads: dict[str, tuple[Any, ...]] = {}  # workload uid -> fingerprint

    def forget(self, uid: str) -> None:
        """Drop the state of `uid` (no run of it is under way)."""
        self.known.pop(uid, None)
        self._started.pop(uid, None)
        self._secret_hashes.pop(uid, None)
        self._admin_failing.pop(uid, None)
        metrics.forget(uid)

    # --- triggers: on Kopf's loop, cheap, they only enqueue ----------------------------

    def on_event(self, event_type: str | None, body: Body) -> None:
        """A watch event of a ResultBackend."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        if not uid:
            return
        if event_type == "DELETED":
            self.cache.remove(uid)
            self.controller.enqueue(uid)  # its run finds it gone and drops its state
            return
        old = self.cache.put(body)
        newest = self.cache.get(uid) or body
        hint = self.wants(newest, first_sight=old is None, listing=event_type is None)
        if hint is not None:
            self.controller.enqueue(uid, {hint: True})

    def wants(self, body: Body, *, first_sight: bool, listing: bool) -> str | None:
        """Whether (and with which hint) an event of `body` needs a run.

        Our own status and finalizer writes make events too; they need none.
        """
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if meta.get("deletionTimestamp"):
            return RESYNC if has_finalizer(body) else None
        if first_sight:
            return RESUME if listing else RESYNC
        covered = max(_observed_generation(body), self._started.get(uid, 0))
        if api.generation(body) > covered:
            return RESYNC
        if not has_finalizer(body) and not self.controller.busy(uid):
            return RESYNC  # someone took our finalizer off: put it back
        return None

    def on_workload(self, kind: str, event_type: str | None, body: Body) -> None:
        """A watch event of a Deployment or StatefulSet: enqueue the ResultBackends it concerns.

        Status-only updates (the controllers' own) are filtered out by the
        fingerprint, and so is the initial listing (the first runs look at
        every workload anyway).
        """
        meta = body.get("metadata", {})
        uid = str(meta.get("uid", ""))
        namespace = str(meta.get("namespace", ""))
        deleted = event_type == "DELETED"
        if deleted:
            self._workloads.pop(uid, None)
            self.watched.drop(namespace, uid)
        else:
            fingerprint = _fingerprint(body)
            first_sight = uid not in self._workloads
            if self._workloads.get(uid) == fingerprint:
                return
            self._workloads[uid] = fingerprint
            if first_sight and event_type is None:
                return
        rb_uids = self.cache.in_namespace(namespace)
        if not rb_uids:
            return
        workload = injection.with_type_meta(body, kind)
        hint: Hints = {(WORKLOAD, ident_of(workload)): (deleted, workload)}
        for rb_uid in rb_uids:
            known = self.known.get(rb_uid)
            if known is None:
                # No full reconcile has finished: one that is coming lists the
                # workloads itself, and may have listed before this one existed.
                if self.controller.busy(rb_uid):
                    self.controller.enqueue(rb_uid, hint)
            elif concerns(known.rb, known.workers, workload):
                self.controller.enqueue(rb_uid, hint)

    def on_secret(self, event_type: str | None, body: Body) -> None:
        """A watch event of a worker Secret (the watch lists only ours, by label):
        deleted, or changed by someone, it is written again at once."""
        if event_type is None:
            return  # the listing at start: every first run reads its Secret anyway
        meta = body.get("metadata") or {}
        for ref in meta.get("ownerReferences") or ():
            uid = str(ref.get("uid") or "")
            if ref.get("kind") != api.KIND or self.cache.get(uid) is None:
                continue
            if event_type == "DELETED" or self._secret_hashes.get(uid) != injection.config_hash(
                body.get("data") or {}
            ):
                self.controller.enqueue(uid, {RESYNC: True})

    # --- the run: one per uid at a time, in a worker thread ---------------------------

    def quick(self, uid: str, body: Body | None, hints: Hints) -> Outcome | None:
        """A periodic check that needs nothing but what is known (on the loop, no I/O):
        Ready, nothing due, the worker credentials checked recently and the server's
        recent answer yes. None: `run` decides (in a thread)."""
        if body is None or list(hints) != [CHECK] or not has_finalizer(body):
            return None
        known = self.known.get(uid)
        if known is None or known.generation != api.generation(body):
            return None
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        if not self._check_suffices(known, _status(body)) or not self._credentials_recent(known):
            return None
        store = store_for(known.rb.spec.type)
        url = store.server_url(known.rb)
        if probe.recent_answer(store, url, SETTINGS.check_interval / 4) is not True:
            return None
        log.debug("%s: periodic check", "/".join(_ident(body)))
        return Outcome(requeue_after=_check_delay(), hint=CHECK)

    def run(self, uid: str, body: Body | None, hints: Hints) -> Outcome:
        if body is None:
            self.forget(uid)
            return Outcome()
        where = "/".join(_ident(body))
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            if not has_finalizer(body):
                return Outcome()
            log.debug("%s: deletion", where)
            return self._delete(body)
        generation = api.generation(body)
        self._started[uid] = generation
        known = self.known.get(uid)
        full = (
            known is None
            or known.generation != generation
            or not has_finalizer(body)
            or any(h in hints for h in FULL)
        )
        try:
            if full:
                log.debug("%s: full reconcile", where)
                return self._report(body, self._full(body, thorough=RESUME in hints))
            assert known is not None
            workloads = {h[1]: v for h, v in hints.items() if isinstance(h, tuple)}
            if workloads:
                log.debug("%s: workload sync", where)
                result = self._workloads_changed(body, known, workloads)
                if result is not None:
                    self._report(body, result)
            if CHECK in hints:
                log.debug("%s: periodic check", where)
                return self._periodic(body)
            # The retry or periodic check pending stays as it is.
            return Outcome(partial=True)
        except NotHeld as exc:
            if exc.status == 404:
                return Outcome()  # gone before we began
            if exc.status in (409, 422):
                # Changed meanwhile: its newer event brings the body to go on with.
                return Outcome(requeue_after=1.0, hint=RETRY)
            log.warning("%s: cannot add the finalizer (HTTP %s)", where, exc.status)
            return Outcome(failed=True)
        except ApiException as exc:
            # The API server failed a read or write: every step is idempotent, so
            # do it all again later.
            log.warning("%s: API server answered %s; trying again", where, exc.status)
            return Outcome(failed=True)

    def _report(self, body: Body, result: Result) -> Outcome:
        """Write the status that differs from the API server's, post the Events; what next."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        changed = status_patch(body.get("status"), result.status)
        if changed:
            patched = kube.patch_resultbackend_status(meta["namespace"], meta["name"], changed)
            self.cache.put(patched)
        self.post(meta, result.events)
        where = "/".join(_ident(body))
        if "phase" in changed:
            log.info("%s: %s", where, changed["phase"])
        metrics.set_workloads_injected(uid, metrics.store_of(body), injected_count(result.status))
        if result.permanent:
            # Nothing to retry: the spec must change (the condition and Event say why).
            log.warning("%s: %s", where, result.permanent)
            return Outcome(permanent=True)
        if result.failed and result.transient:
            log.info("%s: not ready, trying again after a backoff", where)
            return Outcome(failed=True)
        if result.failed:
            # Trying again cannot help by itself (a conflict, a name the store
            # refused): the fix is someone's change; look again now and then.
            return Outcome(requeue_after=SETTINGS.max_backoff, hint=RETRY, reset=True)
        # Done: the periodic check replaces any retry still pending.
        return Outcome(requeue_after=_check_delay(), hint=CHECK, reset=True)

    # --- the full reconcile --------------------------------------------------------

    def _full(self, body: Body, *, thorough: bool) -> Result:
        uid = str((body.get("metadata") or {}).get("uid") or "")
        with metrics.reconcile_timer(metrics.store_of(body)) as timing:
            result = self._reconcile(body, dt.datetime.now(dt.UTC), thorough)
            timing.outcome = result.outcome
        if result.known is not None:
            self.known[uid] = result.known
        else:
            self.known.pop(uid, None)
        return result

    def _gate(self, body: Body) -> Callable[[], None] | None:
        """Puts our finalizer on before the reconcile writes anything (None: it is on)."""
        if has_finalizer(body):
            return None

        def gate() -> None:
            try:
                self.cache.put(kube.add_finalizer(body))
            except ApiException as exc:
                raise NotHeld(exc.status) from None

        return gate

    def poll_admin(self) -> list[str]:
        """The uids whose admin Secret changed since it failed them (a GET per Secret).

        The operator does not watch Secrets it does not own (RBAC cannot narrow
        a watch to them, and it would see every Secret of the cluster): while a
        ResultBackend fails for its admin Secret, that Secret is asked for its
        resourceVersion every ADMIN_POLL seconds instead, so a fixed Secret is
        used at once rather than after the backoff.
        """
        failing = dict(self._admin_failing)
        due: list[str] = []
        for where in set(failing.values()):
            try:
                if self.admin.changed(where):
                    due += [uid for uid, w in failing.items() if w == where]
            except ApiException as exc:
                log.warning("cannot read Secret %s/%s: HTTP %s", *where, exc.status)
        return due

    async def watch_admin(self) -> None:
        """`poll_admin` every ADMIN_POLL seconds while some ResultBackend waits on one."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(ADMIN_POLL)
            if self.controller.paused or not self._admin_failing:
                continue
            for uid in await loop.run_in_executor(self.io, self.poll_admin):
                self.controller.enqueue(uid, {RESYNC: True})

    def _reconcile(self, body: Body, now: dt.datetime, thorough: bool) -> Result:
        current = _status(body)
        uid = str((body.get("metadata") or {}).get("uid") or "")
        obs = Observed(generation=api.generation(body))
        try:
            rb = api.parse(body)
            store = store_for(rb.spec.type)
            env = desired_env(rb, store.extra_env)
        except KeyError:
            message = f"spec.type {body.get('spec', {}).get('type')!r}: no store of that type"
            return self._invalid(current, obs, now, message)
        except api.InvalidSpec as exc:
            return self._invalid(current, obs, now, str(exc))
        obs.fields["secretName"] = rb.secret_name
        admin_ref = store.admin_secret(rb)
        rotate = rotation.wants_rotation(rb, current, now)
        known = self.known.get(uid)
        seen = known.workers if known is not None else {}
        workloads: Listing | None = None
        # What does not depend on each other runs side by side: the two Secret
        # reads and the finalizer; then the worker check, the Secret write and
        # the workload listing.
        existing_f = self.io.submit(kube.read_secret, rb.namespace, rb.secret_name)
        admin_f = self.io.submit(self.admin.read, admin_ref, reuse=True)
        gate = self._gate(body)
        if gate is not None:
            try:
                gate()
            finally:
                pending: list[concurrent.futures.Future[Any]] = [existing_f, admin_f]
                concurrent.futures.wait(pending)
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
            admin = admin_f.result()
            superseded = NOTHING_SUPERSEDED
            if store.keeps_superseded and current.get("credentialsRotatedAt"):
                workloads = Listing(self.io, rb.namespace, "")
                superseded = rotation.superseded(
                    rb, current, existing_data, workloads.result_or_none(), now
                )
            made = store.provision(
                rb, admin, existing_data, rotate=rotate, superseded=superseded, io=self.io
            )
            check = self.io.submit(self._check, store, rb, made.secret_data)
            if workloads is None:
                # Nothing known here of what it injected, and status says it did.
                unknown = known is None and bool((current.get("workers") or {}).get("names"))
                workloads = listing(self.io, rb, seen, self.watched, everything=thorough or unknown)
            self._secret_hashes[uid] = injection.config_hash(
                injection.encode_secret_data(made.secret_data)
            )
            kube.ensure_secret(
                rb.namespace, rb.secret_name, made.secret_data, rb.owner_reference, existing
            )
        except Problem as exc:
            self.admin.forget(admin_ref)  # the retry reads the Secret anew
            if exc.reason in ADMIN_REASONS:
                self._admin_failing[uid] = (admin_ref.namespace, admin_ref.name)
            else:
                self._admin_failing.pop(uid, None)
            return self._failed(current, obs, now, exc)
        self._admin_failing.pop(uid, None)

        obs.fields.update(made.fields)
        message = "store and credentials exist as specified"
        if made.warnings:
            message += "; " + "; ".join(made.warnings)
        obs.provisioned = (True, "Provisioned", message)
        if rotate:
            obs.fields["credentialsRotatedAt"] = api.now_rfc3339(now)
        outcome: metrics.Outcome = "ok"
        events: list[Event] = []
        if made.revoked:
            events.append(Event("Normal", "Revoked", made.revoked))
        try:
            workers = sync_workers(rb, env, made.secret_data, workloads.result())
        except ApiException as exc:
            obs.injected = (False, "ApiError", f"could not update workloads: HTTP {exc.status}")
            obs.fields["workers"] = current.get("workers") or no_workers()
            outcome = "degraded"
            workers = Workers(seen=dict(seen))
        else:
            events.extend(workers.events)
            obs.injected = workers.condition()
            obs.fields["workers"] = workers.status()
            if workers.conflicts:
                outcome = "conflict"
        try:
            check.result()
            obs.reachable = (True, "CredentialsWork", "the worker credentials can use the store")
            checked = True
        except Problem as exc:
            checked = False
            obs.reachable = (False, exc.reason, exc.message)
            if outcome == "ok":  # a workload conflict needs the user more
                outcome = "degraded"
        result = _finish(current, obs, now)
        result.events = coalesce(events + result.events)
        result.outcome = outcome
        result.failed = not checked
        result.known = Known(
            generation=rb.generation,
            rb=rb,
            secret_data=made.secret_data,
            workers=workers.seen,
            at=time.monotonic(),
            pending=made.pending,
            credentials_due=_next_credentials() if checked else None,
        )
        if rotate:
            result.events.append(Event("Normal", "Rotated", "worker credentials rotated"))
        return result

    def _invalid(
        self, current: Mapping[str, Any], obs: Observed, now: dt.datetime, message: str
    ) -> Result:
        obs.provisioned = (False, "InvalidSpec", message)
        result = _finish(current, obs, now, permanent=message)
        result.outcome = "invalid"
        return result

    def _failed(
        self, current: Mapping[str, Any], obs: Observed, now: dt.datetime, exc: Problem
    ) -> Result:
        reason, message = exc.reason, exc.message
        if reason == REASON_UNREACHABLE:
            # An outage says nothing about what exists: keep Provisioned as it
            # was and report the store unreachable.
            obs.reachable = (False, reason, message)
            if not _was_true(current, api.CONDITION_PROVISIONED):
                obs.provisioned = (False, reason, message)
        else:
            obs.provisioned = (False, reason, message)
        result = _finish(current, obs, now)
        result.failed = True
        result.transient = exc.transient
        result.outcome = "conflict" if reason == REASON_CONFLICT else "error"
        return result

    def _check(self, store: Store, rb: ResultBackend, secret_data: Mapping[str, str]) -> None:
        with metrics.backend_check(store.type):
            store.check_worker(rb, secret_data, self.io)

    # --- the cheap paths -----------------------------------------------------------

    def _periodic(self, body: Body) -> Outcome:
        """The periodic check: check the store, and reconcile fully when due.

        While a ResultBackend is Ready and nothing is pending, a check costs at
        most the shared probe of its server (one request per server and
        interval, see `backends.probe`), plus the worker check itself once per
        `SETTINGS.credential_check_interval`; nothing is read from the API
        server or checked as admin. A full reconcile runs instead when it is not
        Ready, a rotation is due or its old credentials await revocation, the
        server does not answer and the worker check fails, or
        `SETTINGS.resync_interval` has passed (drift in the store or the Secret
        is found then). Workloads and Secrets are watched, so their drift never
        waits for this.
        """
        uid = str(body["metadata"].get("uid") or "")
        known = self.known[uid]
        current = _status(body)
        if self._check_suffices(known, current):
            store = store_for(known.rb.spec.type)
            if self._credentials_recent(known) and self._server_answers(store, known.rb):
                return Outcome(requeue_after=_check_delay(), hint=CHECK)
            try:
                self._check(store, known.rb, known.secret_data)
            except Problem:
                pass  # something changed: look at everything, below
            else:
                self.known[uid] = dataclasses.replace(known, credentials_due=_next_credentials())
                return Outcome(requeue_after=_check_delay(), hint=CHECK)
        return self._report(body, self._full(body, thorough=True))

    @staticmethod
    def _credentials_recent(known: Known) -> bool:
        return known.credentials_due is not None and time.monotonic() < known.credentials_due

    @staticmethod
    def _server_answers(store: Store, rb: ResultBackend) -> bool:
        # A quarter of the interval: an outage that starts just after a probe still
        # shows at the next check of every ResultBackend on the server.
        return probe.server_answers(
            store, store.server_url(rb), SETTINGS.check_interval / 4, SETTINGS.backend_timeout
        )

    @staticmethod
    def _check_suffices(known: Known, current: Mapping[str, Any]) -> bool:
        if time.monotonic() - known.at >= SETTINGS.resync_interval:
            return False
        if not _was_true(current, api.CONDITION_READY):
            return False
        now = dt.datetime.now(dt.UTC)
        return not known.pending and not rotation.wants_rotation(known.rb, current, now)

    def _workloads_changed(
        self, body: Body, known: Known, workloads: Mapping[str, tuple[bool, Body]]
    ) -> Result | None:
        """Watched workloads changed: bring them alone in line and update status.workers.

        With the spec and Secret data of the last full reconcile: no Secret is
        read, no store is called and nothing is listed. None: nothing to write.
        """
        uid = str(body["metadata"].get("uid") or "")
        rb = known.rb
        env = desired_env(rb, store_for(rb.spec.type).extra_env)
        current = _status(body)
        out = Workers(seen=dict(known.workers))
        obs = _observed_as_is(current)
        try:
            for ident, (deleted, workload) in workloads.items():
                ours = known.workers.get(ident)
                if deleted:
                    out.seen.pop(ident, None)
                elif ours is not None and api.generation(workload) < ours.generation:
                    continue  # an event from before our own apply: that apply overtook it
                elif concerns(rb, known.workers, workload):
                    sync_workload(rb, env, known.secret_data, workload, out)
        except ApiException as exc:
            obs.injected = (False, "ApiError", f"could not update workloads: HTTP {exc.status}")
        else:
            if out.seen == known.workers and not out.writes:
                return None
            obs.injected = out.condition()
            obs.fields["workers"] = out.status()
        result = _finish(current, obs, dt.datetime.now(dt.UTC))
        result.events = out.events + result.events
        self.known[uid] = dataclasses.replace(known, workers=out.seen)
        return result

    # --- deletion ------------------------------------------------------------------

    def _delete(self, body: Body) -> Outcome:
        """Release what the ResultBackend made, then let it go (our finalizer off)."""
        uid = str(body["metadata"].get("uid") or "")
        try:
            events = self._release(body)
        except Problem as exc:
            if _status(body).get("phase") != "Deleting":
                patched = kube.patch_resultbackend_status(*_ident(body), {"phase": "Deleting"})
                self.cache.put(patched)
            self.post(body["metadata"], [Event("Warning", "DeleteFailed", exc.message)])
            log.warning("%s/%s: cannot delete yet, trying again: %s", *_ident(body), exc.message)
            return Outcome(failed=True)
        except ApiException as exc:
            log.warning("%s/%s: API server answered %s; trying again", *_ident(body), exc.status)
            return Outcome(failed=True)
        self.post(body["metadata"], events)
        try:
            after = kube.remove_finalizer(body)
        except ApiException as exc:
            if exc.status == 422:
                # Its finalizers changed meanwhile: go again with the newer body.
                return Outcome(requeue_after=1.0, hint=RETRY)
            return Outcome(failed=True)
        if after is not None:
            self.cache.put(after)
        self.forget(uid)
        return Outcome()

    def _release(self, body: Body) -> list[Event]:
        try:
            rb = api.parse(body)
            store = store_for(rb.spec.type)
        except (api.InvalidSpec, KeyError):
            return [Event("Normal", "Deleted", "invalid spec: nothing was provisioned")]
        events = release_workers(rb)
        if rb.spec.deletion_policy == "Retain":
            events.append(
                Event("Normal", "Retained", f"deletionPolicy Retain: kept {store.describe(rb)}")
            )
            return events
        try:
            admin = self.admin.read(store.admin_secret(rb))
            events.append(Event("Normal", "Deleted", store.remove(rb, admin)))
        except Problem as exc:
            if exc.reason not in kube.SECRET_REASONS or not kube.namespace_terminating(
                rb.namespace
            ):
                raise
            # The namespace is going away and took the admin Secret with it:
            # it can never come back, so waiting would hold the namespace in
            # Terminating forever. Keep what is in the store and say so.
            message = (
                f"namespace {rb.namespace} is being deleted and {exc.message}: kept "
                f"{store.describe(rb)} in the store; remove them with the store's admin "
                "credentials"
            )
            log.warning("%s/%s: %s", rb.namespace, rb.name, message)
            events.append(Event("Warning", "Orphaned", message))
        return events


def _ident(body: Body) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("namespace")), str(meta.get("name"))
