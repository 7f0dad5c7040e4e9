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
- the periodic check (hint CHECK, a RequeueAfter of the last run): its store's
  Ready (the store controller checks the server, reconcile/store.py) and, once
  in a while, the worker credentials; a full reconcile when anything is off or
  a resync is due.

A full reconcile first resolves `spec.storeRef` to a store this ResultBackend
may use (StoreNotFound, StoreNotAllowed, StoreNotReady, StoreTypeMismatch
otherwise: what it provisioned and its Secret stay as they are), then reads
that store's admin Secret.

Status is diffed against the newest status the API server showed (the cache,
which also takes the answers of our own writes), written once per run, and the
Events of the condition changes are posted after that write succeeded: a run
whose status write failed is retried and posts them then.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from .. import api, injection, kube, metrics
from ..api import ResultBackend, describe_store
from ..backends import (
    NOTHING_SUPERSEDED,
    REASON_CONFLICT,
    REASON_UNREACHABLE,
    AdminSecretRef,
    Store,
    store_for,
)
from ..controller import RETRY, Controller, Hints, Outcome
from ..errors import Problem
from ..settings import SETTINGS
from ..status import Observed, desired_status, status_patch
from ..watched import WatchedLabels
from . import rotation
from .credentials import AdminCredentials
from .events import Event, coalesce, for_transitions
from .store import ADMIN_REASONS, admin_secret, ready_of
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

if TYPE_CHECKING:
    from .store import ResultStores

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

# Why a ResultBackend cannot use its store; what it provisioned stays as it is.
STORE_NOT_FOUND = "StoreNotFound"
STORE_NOT_ALLOWED = "StoreNotAllowed"
STORE_NOT_READY = "StoreNotReady"
STORE_TYPE_MISMATCH = "StoreTypeMismatch"
STORE_REASONS = frozenset(
    {STORE_NOT_FOUND, STORE_NOT_ALLOWED, STORE_NOT_READY, STORE_TYPE_MISMATCH}
)


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
        # The store controller (reconcile/store.py), which sets itself here.
        self.stores: ResultStores | None = None
        # Namespace labels (namespaceSelector), fed by Kopf's index of namespaces.
        self.namespaces: dict[str, dict[str, str]] = {}
        # State between runs, by uid; each entry is written by the runs of its uid only.
        self.known: dict[str, Known] = {}
        self._started: dict[str, int] = {}  # generation the newest run of the uid began with
        self._secret_hashes: dict[str, str] = {}  # config hash of the worker Secret we wrote
        self._workloads: dict[str, tuple[Any, ...]] = {}  # workload uid -> fingerprint

    def forget(self, uid: str) -> None:
        """Drop the state of `uid` (no run of it is under way)."""
        self.known.pop(uid, None)
        self._started.pop(uid, None)
        self._secret_hashes.pop(uid, None)
        metrics.forget(uid)

    # --- triggers: on Kopf's loop, cheap, they only enqueue ----------------------------

    def on_event(self, event_type: str | None, body: Body) -> None:
        """A watch event of a ResultBackend."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        if not uid:
            return
        if event_type == "DELETED":
            self._count_changed(self.cache.get(uid) or body)
            self.cache.remove(uid)
            self.controller.enqueue(uid)  # its run finds it gone and drops its state
            return
        old = self.cache.put(body)
        if old is None:
            self._count_changed(body)
        newest = self.cache.get(uid) or body
        hint = self.wants(newest, first_sight=old is None, listing=event_type is None)
        if hint is None and old is not None and _adopts(old) != _adopts(newest):
            hint = RESYNC  # told to adopt (metadata only: no new generation)
        if hint is not None:
            self.controller.enqueue(uid, {hint: True})

    def _count_changed(self, body: Body) -> None:
        key = _store_key(body)
        if key is not None and self.stores is not None:
            self.stores.count_changed(key)

    def referencing(self, key: api.StoreKey) -> list[str]:
        """The uids of the known ResultBackends that reference the store `key`."""
        kind, namespace, _ = key
        uids = (
            self.cache.in_namespace(namespace) if kind == api.STORE_KIND else self.cache.all_keys()
        )
        out = []
        for uid in uids:
            body = self.cache.get(uid)
            if body is not None and _store_key(body) == key:
                out.append(uid)
        return out

    def enqueue_referencing(self, key: api.StoreKey, *, soon: bool = False) -> None:
        """Run the ResultBackends that reference `key` (`soon`: from a thread)."""
        uids = self.referencing(key)
        if soon:
            self.controller.enqueue_soon(uids, {RESYNC: True})
        else:
            self.controller.enqueue_all(uids, {RESYNC: True})

    def on_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        """A namespace's labels, as Kopf indexes them (before any handler runs, and on
        every change): a change runs its ResultBackends on ClusterResultStores."""
        new = dict(labels)
        old = self.namespaces.get(name)
        self.namespaces[name] = new
        if old is None or old == new:
            return
        for uid in self.cache.in_namespace(name):
            body = self.cache.get(uid)
            key = _store_key(body) if body is not None else None
            if key is not None and key[0] == api.CLUSTER_STORE_KIND:
                self.controller.enqueue(uid, {RESYNC: True})

    def _store_label(self, body: Body) -> str:
        """The metrics' `store` label of a ResultBackend: its store's type, if known."""
        key = _store_key(body)
        store = self.stores.lookup(key) if key is not None and self.stores is not None else None
        if store is not None:
            # Its type as the store controller wrote it; no parse on the hot path.
            return metrics.store_label((store.get("status") or {}).get("type"))
        return metrics.store_of(body)

    def _namespace_labels(self, name: str) -> dict[str, str]:
        labels = self.namespaces.get(name)
        if labels is None:
            # Its index entry is still on the way (another watch): ask.
            labels = kube.namespace_labels(name) or {}
        return labels

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
        if not self._store_ready(known.rb):
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
        metrics.set_workloads_injected(uid, self._store_label(body), injected_count(result.status))
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
        with metrics.reconcile_timer(self._store_label(body)) as timing:
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

    def resolve(
        self, rb: ResultBackend, *, deleting: bool = False
    ) -> tuple[ResultBackend, Store, AdminSecretRef]:
        """The store `rb` references, if it may use it: `rb` bound to it, the store
        module and the admin Secret. Problem (a Store* reason) when it cannot.

        `deleting`: its deletion needs only the store and its Secret (neither the
        namespaceSelector nor the store's Ready matters: the admin call says).
        """
        ref = rb.spec.store_ref
        key = ref.key(rb.namespace)
        if ref.kind == api.CLUSTER_STORE_KIND and not SETTINGS.cluster_stores:
            raise Problem(
                STORE_NOT_FOUND,
                f"{describe_store(key)}: this operator watches only some namespaces and serves no "
                "ClusterResultStore (an operator of every namespace does); use a ResultStore",
                transient=True,
            )
        body = self.stores.lookup(key) if self.stores is not None else None
        if body is None:
            raise Problem(STORE_NOT_FOUND, f"{describe_store(key)} does not exist", transient=True)
        try:
            store = api.parse_store(body)
            module = store_for(store.type)
        except (api.InvalidSpec, KeyError):
            raise Problem(
                STORE_NOT_READY, f"{describe_store(key)} has no valid spec", transient=True
            ) from None
        if store.kind == api.STORE_KIND and not SETTINGS.namespaced_stores:
            raise Problem(
                STORE_NOT_READY,
                f"{describe_store(key)}: this operator serves no namespaced ResultStore",
                transient=True,
            )
        if not deleting:
            selective = store.spec.namespace_selector is not None
            if selective and not store.allows(self._namespace_labels(rb.namespace)):
                raise Problem(
                    STORE_NOT_ALLOWED,
                    f"the namespaceSelector of {describe_store(key)} does not select namespace "
                    f"{rb.namespace}",
                    transient=True,
                )
            ready = ready_of(body)
            if ready is None or ready.get("status") != "True":
                said = (
                    f"{ready.get('reason')}: {ready.get('message')}"
                    if ready is not None
                    else "not checked yet"
                )
                raise Problem(
                    STORE_NOT_READY,
                    f"{describe_store(key)} is not ready: {said}",
                    transient=True,
                )
        try:
            bound = rb.bind(store)
        except api.StoreMismatch as exc:
            raise Problem(STORE_TYPE_MISMATCH, str(exc), transient=True) from None
        return bound, module, admin_secret(module, store)

    def _reconcile(self, body: Body, now: dt.datetime, thorough: bool) -> Result:
        current = _status(body)
        uid = str((body.get("metadata") or {}).get("uid") or "")
        obs = Observed(generation=api.generation(body))
        try:
            rb = api.parse(body)
        except api.InvalidSpec as exc:
            return self._invalid(current, obs, now, str(exc))
        obs.fields["secretName"] = rb.secret_name
        obs.fields["store"] = {"kind": rb.spec.store_ref.kind, "name": rb.spec.store_ref.name}
        try:
            rb, store, admin_ref = self.resolve(rb)
        except api.InvalidSpec as exc:
            return self._invalid(current, obs, now, str(exc))
        except Problem as exc:
            return self._failed(current, obs, now, exc)
        obs.fields["store"]["type"] = store.type
        env = desired_env(rb, store.extra_env)
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
            if existing is not None and existing.adoptable_by(rb.uid, rb.adopts):
                raise Problem(
                    "Conflict",
                    f"Secret {rb.namespace}/{rb.secret_name} was left by the ResultBackend "
                    "this one adopts: to keep its credentials (no worker rolls), make it "
                    f"this one's with kubectl -n {rb.namespace} patch secret "
                    f"{rb.secret_name} --type=merge -p '{_owner_patch(rb)}'; or "
                    "delete it to get new credentials",
                    transient=True,
                )
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
            # A failure its admin Secret can fix: the store checks it again (and
            # then polls that Secret until it changes).
            if exc.reason in ADMIN_REASONS and self.stores is not None and rb.store is not None:
                # The store's check says so in its status, and sees the Secret's fix.
                self.stores.recheck(rb.spec.store_ref.key(rb.namespace))
            return self._failed(current, obs, now, exc)

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
        if reason == REASON_UNREACHABLE or reason in STORE_REASONS:
            # An outage, or a store that cannot be used now, says nothing about
            # what exists: keep Provisioned as it was and report the store.
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
        """The periodic check: look at the store's Ready, and reconcile fully when due.

        While a ResultBackend is Ready and nothing is pending, a check costs
        nothing but the worker check itself once per
        `SETTINGS.credential_check_interval` (the store controller asks the
        server once per store and interval); nothing is read from the API
        server or checked as admin. A full reconcile runs instead when it is not
        Ready, a rotation is due or its old credentials await revocation, the
        store is not Ready or the worker check fails, or
        `SETTINGS.resync_interval` has passed (drift in the store or the Secret
        is found then). Workloads and Secrets are watched, so their drift never
        waits for this.
        """
        uid = str(body["metadata"].get("uid") or "")
        known = self.known[uid]
        current = _status(body)
        if self._check_suffices(known, current) and self._store_ready(known.rb):
            store = store_for(known.rb.store.type if known.rb.store else "")
            if self._credentials_recent(known):
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

    def _store_ready(self, rb: ResultBackend) -> bool:
        """Its store is Ready as it was at the last full reconcile (same URL), by the
        store controller's last check: no request is made here."""
        if self.stores is None or rb.store is None:
            return False
        body = self.stores.lookup(rb.spec.store_ref.key(rb.namespace))
        ready = ready_of(body)
        return (
            body is not None
            and ready is not None
            and ready.get("status") == "True"
            and (body.get("status") or {}).get("url") == rb.store.url
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
        env = desired_env(rb, store_for(rb.store.type if rb.store else "").extra_env)
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
        except api.InvalidSpec:
            return [Event("Normal", "Deleted", "invalid spec: nothing was provisioned")]
        events = release_workers(rb)
        try:
            rb, store, admin_ref = self.resolve(rb, deleting=True)
        except api.InvalidSpec:
            return [*events, Event("Normal", "Deleted", "invalid spec: nothing was provisioned")]
        except Problem as exc:
            # The store is gone (its finalizer was forced off) or not served: what
            # was provisioned cannot be reached; waiting would hold it for ever.
            if rb.spec.deletion_policy == "Retain" or not _was_true(
                _status(body), api.CONDITION_PROVISIONED
            ):
                return events
            message = f"{exc.message}: kept what it provisioned in the store"
            log.warning("%s/%s: %s", rb.namespace, rb.name, message)
            return [*events, Event("Warning", "Orphaned", message)]
        if rb.spec.deletion_policy == "Retain":
            events.append(
                Event("Normal", "Retained", f"deletionPolicy Retain: kept {store.describe(rb)}")
            )
            return events
        try:
            admin = self.admin.read(admin_ref)
            events.append(Event("Normal", "Deleted", store.remove(rb, admin)))
        except Problem as exc:
            if exc.reason not in kube.SECRET_REASONS or not kube.namespace_terminating(
                admin_ref.namespace
            ):
                raise
            # The namespace is going away and took the admin Secret with it:
            # it can never come back, so waiting would hold the namespace in
            # Terminating forever. Keep what is in the store and say so.
            message = (
                f"namespace {admin_ref.namespace} is being deleted and {exc.message}: kept "
                f"{store.describe(rb)} in the store; remove them with the store's admin "
                "credentials"
            )
            log.warning("%s/%s: %s", rb.namespace, rb.name, message)
            events.append(Event("Warning", "Orphaned", message))
        return events


def _owner_patch(rb: ResultBackend) -> str:
    """A merge patch that makes a Secret `rb`'s (its ownerReference, as the operator
    would have set it)."""
    ref = {k: rb.owner_reference[k] for k in ("apiVersion", "kind", "name", "uid")}
    return json.dumps({"metadata": {"ownerReferences": [ref]}}, separators=(",", ":"))


def _adopts(body: Body) -> object:
    return ((body.get("metadata") or {}).get("annotations") or {}).get(api.ADOPT_ANNOTATION)


def _store_key(body: Body) -> api.StoreKey | None:
    """The store a ResultBackend body references, parsed or not."""
    ref = (body.get("spec") or {}).get("storeRef")
    if not isinstance(ref, Mapping) or not ref.get("name"):
        return None
    kind = str(ref.get("kind") or api.STORE_KIND)
    namespace = str((body.get("metadata") or {}).get("namespace") or "")
    return (kind, namespace if kind == api.STORE_KIND else "", str(ref["name"]))


def _ident(body: Body) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("namespace")), str(meta.get("name"))
