"""The only module that registers Kopf handlers; each one is a few lines."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from . import api, checker, injection, kube, memory, reconcile
from .backends import BackendError
from .settings import SETTINGS
from .status import status_patch

RB = (api.GROUP, api.VERSION, api.PLURAL)


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


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf's own bookkeeping lives under our group, in annotations (never status).
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.GROUP, key="last-handled-configuration"
    )
    # Kopf's own log lines never become Events (a retry loop would post one per
    # attempt); only the Events reconcile decides on are posted, on transitions.
    settings.posting.level = logging.CRITICAL + 1
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = 8
    kube.load_config()
    configure_logging()
    memory.start_trimmer(SETTINGS.trim_interval)


def _apply(body: kopf.Body, result: reconcile.Result) -> None:
    # Written here, not through Kopf's patch: Kopf patches the object (its
    # annotations) first and status second, one round trip after the other,
    # so status (Ready) would show a round trip later.
    changed = status_patch(body.get("status"), result.status)
    if changed:
        meta = body.get("metadata", {})
        kube.patch_resultbackend_status(meta["namespace"], meta["name"], changed)
    _post(body, result.events)
    if result.permanent:
        raise kopf.PermanentError(result.permanent)
    if result.retry_after is not None:
        raise kopf.TemporaryError("will retry", delay=result.retry_after)


@kopf.on.resume(*RB)
@kopf.on.create(*RB)
@kopf.on.update(*RB, field="spec")
def reconcile_rb(body: kopf.Body, reason: str, **_: Any) -> None:
    # On resume (operator start) nothing is known of what was injected before.
    _apply(body, reconcile.reconcile(body, thorough=reason == kopf.Reason.RESUME))


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
        return
    CHECKER.track(body)
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
def rb_by_namespace(namespace: str | None, uid: str, **_: Any) -> dict[str, str]:
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


def on_workload_event(
    kind: str, event: kopf.RawEvent, body: kopf.Body, rb_by_namespace: kopf.Index[str, str]
) -> None:
    """Bring one workload in line with the ResultBackends it concerns.

    Status-only updates (the controllers' own) are filtered out by the
    fingerprint; the rest goes to `reconcile.workload_changed`, which touches
    only this workload and the ResultBackends that select it or injected it.
    """
    uid = body.get("metadata", {}).get("uid", "")
    deleted = event.get("type") == "DELETED"
    if deleted:
        _seen.pop(uid, None)
    else:
        fingerprint = _fingerprint(body)
        first_sight = uid not in _seen
        if _seen.get(uid) == fingerprint:
            return
        _seen[uid] = fingerprint
        if first_sight and event.get("type") is None:
            return  # the initial listing: resume handlers reconcile every ResultBackend anyway
    namespace = body.get("metadata", {}).get("namespace", "")
    workload = injection.with_type_meta(body, kind)
    for rb_uid in set(rb_by_namespace.get(namespace, [])):
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


@kopf.on.event("apps", "v1", "deployments")
def deployment_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    on_workload_event("Deployment", event, body, kwargs["rb_by_namespace"])


@kopf.on.event("apps", "v1", "statefulsets")
def statefulset_event(event: kopf.RawEvent, body: kopf.Body, **kwargs: Any) -> None:
    on_workload_event("StatefulSet", event, body, kwargs["rb_by_namespace"])


@kopf.on.delete(*RB)
def delete_rb(body: kopf.Body, patch: kopf.Patch, retry: int, **_: Any) -> None:
    if (body.get("status") or {}).get("phase") != "Deleting":
        patch.status["phase"] = "Deleting"
    try:
        events = reconcile.delete(body)
    except (BackendError, reconcile.Problem, kube.SecretProblem) as exc:
        kopf.event(body, type="Warning", reason="DeleteFailed", message=exc.message)
        delay = min(SETTINGS.backoff * 2 ** min(retry, 8), SETTINGS.max_backoff)
        raise kopf.TemporaryError(exc.message, delay=delay) from None
    _post(body, events)
