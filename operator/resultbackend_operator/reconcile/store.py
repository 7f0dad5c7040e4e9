"""The store controller: ResultStores and ClusterResultStores, on one work queue.

A store names a server and the Secret with its admin credentials; the store
module of its type (backends/) checks both, once per check interval, and that
answer is the store's `Ready` condition. Every ResultBackend on the store
relies on it instead of asking the server itself.

A run (one per store uid at a time) reads the newest object and:

- it is gone: drop what this process kept; the ResultBackends that reference
  it are enqueued (they find it missing);
- `deletionTimestamp` with our finalizer: while ResultBackends reference it
  (asked of the API server, not the cache), `Ready` is False with reason
  `InUse` and an Event says how many; once none does, the finalizer comes off;
- only COUNT hints (a ResultBackend that references it came or went): write
  `status.resultBackends`, nothing else;
- otherwise the check: read the admin Secret (a ClusterResultStore's from the
  cluster resource namespace, a ResultStore's from its own namespace; never one
  of a ResultStore while namespaced stores are off), ask the store module,
  write status. A change of `Ready`, of the URL or of the generation enqueues
  the ResultBackends that reference it.

The admin Secrets are not watched (a watch would see every Secret of their
namespaces): each store's Secret is asked for its resourceVersion every few
seconds (ADMIN_POLL while the store fails for it, READY_POLL while Ready), and a
change runs the check at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from .. import api, kube
from ..api import describe_store
from ..backends import AdminSecretRef, Store, store_for
from ..controller import RETRY, Controller, Hints, Outcome
from ..errors import Problem
from ..settings import SETTINGS
from ..status import status_patch
from .credentials import AdminCredentials, Where
from .events import Event

if TYPE_CHECKING:
    from .resultbackend import ResultBackends

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
Post = Callable[[Body, list[Event]], None]

CHECK = "check"  # the periodic check is due
RESYNC = "resync"  # a new object or generation, or its admin Secret changed
COUNT = "count"  # a ResultBackend that references it came or went

# Failures a change of the admin Secret can fix.
ADMIN_REASONS = frozenset({"SecretNotFound", "SecretKeyMissing", "AdminAuthFailed", "Forbidden"})
ADMIN_POLL = 2.0  # seconds between looks at the Secret of a store that fails for it
READY_POLL = 10.0  # ... of a store that does not
# A store's count of ResultBackends is written this long after one came or went, once
# for all that did meanwhile: a burst of creates makes one status write, not one each,
# and none lands beside a create's own writes.
COUNT_DELAY = 2.0
REASON_IN_USE = "InUse"
REASON_NOT_SERVED = "NamespacedStoresDisabled"


def has_finalizer(body: Body) -> bool:
    return api.FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def store_key(body: Body) -> api.StoreKey:
    meta = body.get("metadata") or {}
    return (str(body.get("kind") or ""), str(meta.get("namespace") or ""), str(meta.get("name")))


def ready_of(body: Body | None) -> Mapping[str, Any] | None:
    """A store's Ready condition, if it is of its current generation."""
    if body is None:
        return None
    status = body.get("status") or {}
    if int(status.get("observedGeneration") or 0) != api.generation(body):
        return None
    return api.get_condition(status.get("conditions"), api.CONDITION_READY)


def admin_secret(module: Store, store: api.ResultStore) -> AdminSecretRef:
    """The store's admin Secret: a ClusterResultStore's is read in the cluster resource
    namespace only, a ResultStore's in its own namespace."""
    return module.admin_secret(store, store.namespace or SETTINGS.cluster_resource_namespace)


def _what_resultbackends_see(body: Body | None) -> tuple[Any, ...]:
    """What of a store's status its ResultBackends act on: a change enqueues them."""
    if body is None:
        return ()
    status = body.get("status") or {}
    ready = api.get_condition(status.get("conditions"), api.CONDITION_READY) or {}
    return (status.get("observedGeneration"), status.get("url"), ready.get("status"))


class ResultStores:
    """The controller of both store kinds, and what its runs keep, by uid."""

    def __init__(
        self,
        post: Post,
        backends: ResultBackends,
        admin: AdminCredentials | None = None,
        *,
        workers: int = 2,
    ) -> None:
        self.post = post
        self.backends = backends
        self.admin = admin if admin is not None else backends.admin
        self.controller = Controller(
            "resultstore",
            self.run,
            self.forget,
            workers=workers,
            backoff=SETTINGS.backoff,
            max_backoff=SETTINGS.max_backoff,
        )
        self.cache = self.controller.cache
        self._uids: dict[api.StoreKey, str] = {}
        # uid -> (its admin Secret, whether the last check failed for it)
        self._secrets: dict[str, tuple[Where, bool]] = {}
        self._count_due: set[str] = set()  # stores whose count is written soon
        backends.stores = self

    def forget(self, uid: str) -> None:
        self._secrets.pop(uid, None)

    def lookup(self, key: api.StoreKey) -> dict[str, Any] | None:
        """The newest known store of (kind, namespace, name), if any."""
        uid = self._uids.get(key)
        return self.cache.get(uid) if uid is not None else None

    # --- triggers ----------------------------------------------------------------------

    def on_event(self, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        if not uid:
            return
        key = store_key(body)
        if event_type == "DELETED":
            self.cache.remove(uid)
            if self._uids.get(key) == uid:
                del self._uids[key]
            self.controller.enqueue(uid)
            self.backends.enqueue_referencing(key)
            return
        old = self.cache.put(body)
        self._uids[key] = uid
        newest = self.cache.get(uid) or body
        status = newest.get("status") or {}
        if (
            old is None
            or meta.get("deletionTimestamp")
            or api.generation(newest) > int(status.get("observedGeneration") or 0)
            or (not has_finalizer(newest) and not self.controller.busy(uid))
        ):
            self.controller.enqueue(uid, {RESYNC: True})

    def count_changed(self, key: api.StoreKey) -> None:
        """A ResultBackend that references `key` came or went (on the loop): its count
        is written COUNT_DELAY seconds later."""
        uid = self._uids.get(key)
        if uid is None or uid in self._count_due:
            return
        self._count_due.add(uid)
        asyncio.get_running_loop().call_later(COUNT_DELAY, self._count, uid)

    def _count(self, uid: str) -> None:
        self._count_due.discard(uid)
        self.controller.enqueue(uid, {COUNT: True})

    def recheck(self, key: api.StoreKey) -> None:
        """A ResultBackend's run found the admin credentials failing (any thread)."""
        uid = self._uids.get(key)
        if uid is not None:
            self.controller.enqueue_soon([uid], {RESYNC: True})

    def poll_admin(self, tick: int) -> list[str]:
        """The stores whose admin Secret changed since their last check (a GET per Secret).

        Every tick for stores that fail for their Secret, every READY_POLL/ADMIN_POLL
        ticks for the others."""
        every = max(1, round(READY_POLL / ADMIN_POLL))
        due: list[str] = []
        secrets: dict[Where, list[str]] = {}
        for uid, (where, failing) in list(self._secrets.items()):
            if failing or tick % every == 0:
                secrets.setdefault(where, []).append(uid)
        for where, uids in secrets.items():
            try:
                if self.admin.changed(where):
                    due += uids
            except ApiException as exc:
                log.warning("cannot read Secret %s/%s: HTTP %s", *where, exc.status)
            except Exception as exc:  # the API server unreachable, say: the next tick
                log.warning("cannot read Secret %s/%s: %s", *where, type(exc).__name__)
        return due

    async def watch_admin(self) -> None:
        """`poll_admin` every ADMIN_POLL seconds while any store is served."""
        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            await asyncio.sleep(ADMIN_POLL)
            tick += 1
            if self.controller.paused or not self._secrets:
                continue
            for uid in await loop.run_in_executor(self.backends.io, self.poll_admin, tick):
                self.controller.enqueue(uid, {RESYNC: True})

    # --- the run -----------------------------------------------------------------------

    def run(self, uid: str, body: Body | None, hints: Hints) -> Outcome:
        if body is None:
            self.forget(uid)
            return Outcome()
        key = store_key(body)
        try:
            if (body.get("metadata") or {}).get("deletionTimestamp"):
                if not has_finalizer(body):
                    return Outcome()
                log.debug("%s: deletion", describe_store(key))
                return self._delete(body, key)
            if set(hints) == {COUNT} and ready_of(body) is not None and has_finalizer(body):
                self._write(body, {"resultBackends": len(self.backends.referencing(key))}, [])
                return Outcome(partial=True)
            log.debug("%s: check", describe_store(key))
            return self._check(uid, body, key)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                # Gone, or changed meanwhile: its newer event brings the body to go on with.
                return Outcome(requeue_after=1.0, hint=RETRY)
            log.warning("%s: API server answered %s; trying again", describe_store(key), exc.status)
            return Outcome(failed=True)

    def _check(self, uid: str, body: Body, key: api.StoreKey) -> Outcome:
        current = dict(body.get("status") or {})
        gen = api.generation(body)
        if not has_finalizer(body):
            body = kube.add_finalizer(body)
            self.cache.put(body)
        # serverVersion None: not known now, so no old one is shown (merge patch: removed).
        fields: dict[str, Any] = {
            "resultBackends": len(self.backends.referencing(key)),
            "serverVersion": None,
        }
        failed: Problem | None = None
        try:
            store = api.parse_store(body)
            module = store_for(store.type)
        except (api.InvalidSpec, KeyError) as exc:
            message = str(exc) if isinstance(exc, api.InvalidSpec) else "no store of this type"
            failed = Problem("InvalidSpec", message, transient=False)
        else:
            fields.update(type=store.type, url=store.url)
            if store.kind == api.STORE_KIND and not SETTINGS.namespaced_stores:
                failed = Problem(
                    REASON_NOT_SERVED,
                    "this operator serves no namespaced ResultStore (the chart's "
                    "namespacedStores is false): use a ClusterResultStore",
                    transient=False,
                )
                self._secrets.pop(uid, None)
            else:
                ref = admin_secret(module, store)
                try:
                    admin = self.admin.read(ref)
                    fields["serverVersion"] = module.check_admin(store.url, admin)
                except Problem as exc:
                    self.admin.forget(ref)
                    failed = exc
                self._secrets[uid] = (
                    (ref.namespace, ref.name),
                    failed is not None and failed.reason in ADMIN_REASONS,
                )
        if failed is None:
            ready = api.condition(
                api.CONDITION_READY,
                True,
                "Ready",
                f"{fields['type']} {fields['serverVersion']} at {fields['url']} answers and the "
                "admin credentials can do their job",
                gen,
            )
        else:
            ready = api.condition(api.CONDITION_READY, False, failed.reason, failed.message, gen)
        events = _transition(current, ready)
        self._write(body, {**fields, "observedGeneration": gen}, [ready], events)
        if failed is None:
            return Outcome(requeue_after=SETTINGS.check_interval, hint=CHECK, reset=True)
        if not failed.transient:
            return Outcome(permanent=True)
        log.info("%s: %s; trying again after a backoff", describe_store(key), failed.reason)
        return Outcome(failed=True)

    def _write(
        self,
        body: Body,
        fields: Mapping[str, Any],
        conditions: list[dict[str, Any]],
        events: list[Event] | None = None,
    ) -> None:
        """Write the status that differs from the API server's, post the Events, and
        enqueue the ResultBackends when what they act on changed."""
        current = dict(body.get("status") or {})
        desired = {**current, **fields}
        if conditions:
            desired["conditions"] = api.merge_conditions(
                current.get("conditions"), conditions, dt.datetime.now(dt.UTC)
            )
        changed = status_patch(current, desired)
        if not changed:
            if events:
                self.post(body, events)
            return
        meta = body["metadata"]
        before = _what_resultbackends_see(body)
        patched = kube.patch_status(
            str(body.get("kind")), str(meta.get("namespace") or ""), meta["name"], changed
        )
        self.cache.put(patched)
        if events:
            self.post(body, events)
        if _what_resultbackends_see(patched) != before:
            self.backends.enqueue_referencing(store_key(body), soon=True)

    def _delete(self, body: Body, key: api.StoreKey) -> Outcome:
        """Take the finalizer off once no ResultBackend references the store."""
        users = kube.list_resultbackends_of(key)
        if users:
            message = (
                f"{len(users)} ResultBackend(s) reference this store ("
                + ", ".join(sorted(users)[:5])
                + (", ..." if len(users) > 5 else "")
                + "): it is deleted once they are gone"
            )
            gen = api.generation(body)
            ready = api.condition(api.CONDITION_READY, False, REASON_IN_USE, message, gen)
            was = api.get_condition((body.get("status") or {}).get("conditions"), "Ready") or {}
            events = [] if was.get("message") == message else [Event("Warning", "InUse", message)]
            fields = {"resultBackends": len(users), "observedGeneration": gen}
            self._write(body, fields, [ready], events)
            # Their deletions enqueue the store too; this is the safety net.
            return Outcome(requeue_after=SETTINGS.check_interval, hint=CHECK)
        after = kube.remove_finalizer(body)
        if after is not None:
            self.cache.put(after)
        self.forget(str(body["metadata"].get("uid")))
        return Outcome()


def _transition(current: Mapping[str, Any], ready: Mapping[str, Any]) -> list[Event]:
    """The Event of a change of Ready (status or reason)."""
    was = api.get_condition(current.get("conditions"), api.CONDITION_READY) or {}
    if was.get("status") == ready["status"] and was.get("reason") == ready["reason"]:
        return []
    if ready["status"] == "True":
        return [Event("Normal", "Ready", ready["message"])]
    return [Event("Warning", ready["reason"], ready["message"])]
