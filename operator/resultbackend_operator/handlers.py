"""The only module that registers Kopf handlers; each one is a few lines."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException

from . import api, checker, driver, injection, kube, memory, reconcile
from .backends import BackendError
from .settings import SETTINGS
from .status import status_patch
from .watched import WATCHED

RB = (api.GROUP, api.VERSION, api.PLURAL)
log = logging.getLogger(__name__)


class RoutineSuccess(logging.Filter):
    """Drops Kopf's "... succeeded." line for the watch handlers and the index.

    Kopf logs every handler success at INFO. For these handlers that is a line
    per event of every ResultBackend and workload, which says nothing. Their
    failures, and every line of the create/update/delete handlers, stay.
    """

    QUIET = (
        "Handler 'rb_event'",
        "Handler 'deployment_event'",
        "Handler 'statefulset_event'",
        "Indexer 'rb_by_namespace'",
        "Indexer 'deployment_labels'",
        "Indexer 'statefulset_labels'",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (
            record.levelno == logging.INFO
            and isinstance(msg, str)
            and msg.endswith(" succeeded.")
            and msg.startswith(self.QUIET)
        )


_routine_success = RoutineSuccess()


def configure_logging() -> None:
    """Client libraries log request URLs; keep them at WARNING so no userinfo is printed."""
    for name in ("urllib3", "requests", "kubernetes", "consul", "pycouchdb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    objects = logging.getLogger("kopf.objects")
    if _routine_success not in objects.filters:
        objects.addFilter(_routine_success)


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf's diff-base, for create/update handlers this operator does not have.

    On every event of every watched resource Kopf builds the object's
    "essence" (a deep copy of the whole body, Deployments included) and diffs
    it with the stored one, to find the changes its create/update handlers
    would be given. The burst's profile had that at a sixth of the event
    loop's time. driver.py decides from generations instead: nothing to build,
    store or compare.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf has no create/update/delete handlers here (driver.py decides when a
    # ResultBackend is reconciled and puts our finalizer, api.FINALIZER, on it),
    # so it writes none of its bookkeeping; were one added, that would live under
    # our group, in annotations (never status), with a finalizer of its own.
    settings.persistence.finalizer = f"{api.GROUP}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # Kopf's own log lines never become Events (a retry loop would post one per
    # attempt); only the Events reconcile decides on are posted, on transitions.
    settings.posting.level = logging.CRITICAL + 1
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    kube.load_config()
    configure_logging()
    WATCHED.activate()
    memory.start_trimmer(SETTINGS.trim_interval)


def _apply(body: Mapping[str, Any], result: reconcile.Result) -> float | None:
    """Write what a reconcile found; when it must run again (None: not until something changes)."""
    changed = status_patch(body.get("status"), result.status)
    meta = body.get("metadata", {})
    if changed:
        kube.patch_resultbackend_status(meta["namespace"], meta["name"], changed)
    _post(body, result.events)
    where = "/".join(_ident(body))
    if "phase" in changed:
        log.info("%s: %s", where, changed["phase"])
    if result.permanent:
        # Nothing to retry: the spec must change (the condition and Event say why).
        log.warning("%s: %s", where, result.permanent)
        return None
    if result.retry_after is not None:
        log.info("%s: not ready, trying again in %.0f s", where, result.retry_after)
    return result.retry_after


def _delay(attempt: int) -> float:
    return float(min(SETTINGS.backoff * 2 ** min(attempt, 8), SETTINGS.max_backoff))


class NotHeld(Exception):
    """Our finalizer could not be put on (HTTP `status`): nothing was written."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"finalizer not added: HTTP {status}")
        self.status = status


def _finalizer_gate(body: Mapping[str, Any]) -> Callable[[], None] | None:
    """Puts our finalizer on before the reconcile writes anything (None: it is on)."""
    if driver.has_finalizer(body):
        return None

    def gate() -> None:
        try:
            kube.add_finalizer(body)
        except ApiException as exc:
            raise NotHeld(exc.status) from None

    return gate


def run(body: Mapping[str, Any], reason: str, attempt: int) -> float | None:
    """One run of a ResultBackend, as driver.Driver decided; seconds until the next."""
    if body.get("metadata", {}).get("deletionTimestamp"):
        return delete(body, attempt) if driver.has_finalizer(body) else None
    try:
        # The finalizer patch goes out beside the reconcile's Secret reads.
        result = reconcile.reconcile(
            body, thorough=reason == driver.RESUME, gate=_finalizer_gate(body)
        )
        return _apply(body, result)
    except NotHeld as exc:
        if exc.status == 404:
            return None  # gone before we began
        if exc.status in (409, 422):
            return 1.0  # changed meanwhile: its newer event brings the body to go on with
        log.warning("%s/%s: cannot add the finalizer (HTTP %s)", *_ident(body), exc.status)
        return _delay(attempt)
    except ApiException as exc:
        # The API server failed a read or write: the reconcile is idempotent, so
        # do it all again later.
        log.warning("%s/%s: API server answered %s; trying again", *_ident(body), exc.status)
        return _delay(attempt)


def _ident(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("namespace")), str(meta.get("name"))


DRIVER = driver.Driver(run, workers=8)


def periodic_check(body: Mapping[str, Any]) -> None:
    """One ResultBackend's periodic check, from the checker's pool (not a Kopf timer)."""
    meta = body.get("metadata", {})
    if meta.get("deletionTimestamp"):
        return
    before = reconcile.last_status(str(meta.get("uid", ""))) or body.get("status")
    result = reconcile.periodic(body)
    # A periodic check never raises: it reports, and the next tick tries again.
    changed = status_patch(before, result.status)
    if changed:
        kube.patch_resultbackend_status(meta["namespace"], meta["name"], changed)
    _post(body, result.events)


CHECKER = checker.Checker(SETTINGS.check_interval, periodic_check, workers=4)


@kopf.on.event(*RB)
async def rb_event(event: kopf.RawEvent, body: kopf.Body, uid: str, **_: Any) -> None:
    """Keep the checker's copy of each ResultBackend current.

    Async because it never blocks: Kopf runs it before the create/update
    handlers of the same event, and a sync handler would cost a thread hop there.
    """
    if event.get("type") == "DELETED":
        CHECKER.forget(uid)
        DRIVER.forget(uid)
        return
    CHECKER.track(body)
    known = reconcile.last_status(uid) or body.get("status") or {}
    DRIVER.observe(body, event.get("type"), int(known.get("observedGeneration") or 0))
    # Started from a handler so that its threads can post Events through Kopf.
    CHECKER.start(contextvars.copy_context())


def _post(body: Mapping[str, Any], events: list[reconcile.Event]) -> None:
    meta = body.get("metadata", {})
    ref = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": "ResultBackend",
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
    }
    for ev in events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, ref)), type=ev.type, reason=ev.reason, message=ev.message
        )


# --- workloads: watch, don't poll -----------------------------------------------


@kopf.index(*RB)
async def rb_by_namespace(namespace: str | None, uid: str, **_: Any) -> dict[str, str]:
    # Async: a sync indexer costs a thread hop on every ResultBackend event.
    return {namespace or "": uid}


_seen: dict[str, tuple[Any, ...]] = {}


def _fingerprint(body: kopf.Body) -> tuple[Any, ...]:
    """What of a workload matters to injection: labels, our annotation, the spec generation."""
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
    return (
        meta.get("generation"),
        tuple(sorted((meta.get("labels") or {}).items())),
        annotations.get(api.INJECTED_BY_ANNOTATION),
    )


def workload_news(kind: str, event: kopf.RawEvent, body: kopf.Body) -> bool:
    """Whether a workload event may matter to injection (cheap; on Kopf's loop).

    Status-only updates (the controllers' own) are filtered out by the
    fingerprint, and so is the initial listing (the resume runs look at every
    workload anyway).
    """
    meta = body.get("metadata", {})
    uid = meta.get("uid", "")
    if event.get("type") == "DELETED":
        _seen.pop(uid, None)
        WATCHED.drop(meta.get("namespace", ""), uid)
        return True
    fingerprint = _fingerprint(body)
    first_sight = uid not in _seen
    if _seen.get(uid) == fingerprint:
        return False
    _seen[uid] = fingerprint
    return not (first_sight and event.get("type") is None)


def on_workload_event(kind: str, deleted: bool, body: Mapping[str, Any], rb_uids: set[str]) -> None:
    """Bring one workload in line with the ResultBackends of its namespace.

    `reconcile.workload_changed` touches only this workload and the
    ResultBackends that select it or injected it.
    """
    workload = injection.with_type_meta(body, kind)
    for rb_uid in rb_uids:
        result = reconcile.workload_changed(rb_uid, workload, deleted=deleted)
        if result is None or result.rb is None:
            continue
        rb = result.rb
        changed = status_patch(result.previous, result.status)
        if changed:
            kube.patch_resultbackend_status(rb.namespace, rb.name, changed)
        _post(
            {"metadata": {"name": rb.name, "namespace": rb.namespace, "uid": rb.uid}},
            result.events,
        )


# Workload events that need work do it here, off Kopf's loop; the rest (most
# of them: the controllers' status updates) never leave the loop.
_WORKLOAD_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="workload")


async def _workload_event(
    kind: str, event: kopf.RawEvent, body: kopf.Body, index: kopf.Index[str, str]
) -> None:
    if not workload_news(kind, event, body):
        return
    rb_uids = set(index.get(body.get("metadata", {}).get("namespace", ""), []))
    if not rb_uids:
        return
    ctx = contextvars.copy_context()  # Kopf's, so that the thread can post Events
    deleted = event.get("type") == "DELETED"
    await asyncio.get_running_loop().run_in_executor(
        _WORKLOAD_POOL, ctx.run, on_workload_event, kind, deleted, body, rb_uids
    )


# Index functions, not watch handlers, so that Kopf has every existing
# workload's labels in before it runs any other handler (watched.py). They keep
# nothing in Kopf's index (None); deletions reach WATCHED through the watch handlers.
@kopf.index("apps", "v1", "deployments")
async def deployment_labels(namespace: str | None, uid: str, labels: kopf.Labels, **_: Any) -> None:
    WATCHED.put(namespace or "", uid, "Deployment", labels)


@kopf.index("apps", "v1", "statefulsets")
async def statefulset_labels(
    namespace: str | None, uid: str, labels: kopf.Labels, **_: Any
) -> None:
    WATCHED.put(namespace or "", uid, "StatefulSet", labels)


@kopf.on.event("apps", "v1", "deployments")
async def deployment_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    await _workload_event("Deployment", event, body, kwargs["rb_by_namespace"])


@kopf.on.event("apps", "v1", "statefulsets")
async def statefulset_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    await _workload_event("StatefulSet", event, body, kwargs["rb_by_namespace"])


def delete(body: Mapping[str, Any], attempt: int) -> float | None:
    """Release what the ResultBackend made, then let it go (our finalizer off)."""
    try:
        events = reconcile.delete(body)
    except (BackendError, reconcile.Problem, kube.SecretProblem) as exc:
        if (body.get("status") or {}).get("phase") != "Deleting":
            kube.patch_resultbackend_status(*_ident(body), {"phase": "Deleting"})
        _post(body, [reconcile.Event("Warning", "DeleteFailed", exc.message)])
        delay = _delay(attempt)
        log.warning(
            "%s/%s: cannot delete yet, trying again in %.0f s: %s",
            *_ident(body),
            delay,
            exc.message,
        )
        return delay
    _post(body, events)
    try:
        kube.remove_finalizer(body)
    except ApiException as exc:
        if exc.status == 422:
            return 1.0  # its finalizers changed meanwhile: go again with the newer body
        raise
    return None
