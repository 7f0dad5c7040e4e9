"""The only module that registers Kopf handlers; each one is a few lines."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from . import api, kube, reconcile
from .backends import BackendError
from .settings import SETTINGS
from .status import status_patch

RB = (api.GROUP, api.VERSION, api.PLURAL)


def configure_logging() -> None:
    """Client libraries log request URLs; keep them at WARNING so no userinfo is printed."""
    for name in ("urllib3", "requests", "kubernetes", "consul", "pycouchdb"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def _apply(body: kopf.Body, patch: kopf.Patch, result: reconcile.Result) -> None:
    changed = status_patch(body.get("status"), result.status)
    for key, value in changed.items():
        patch.status[key] = value
    for ev in result.events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
    if result.permanent:
        raise kopf.PermanentError(result.permanent)
    if result.retry_after is not None:
        raise kopf.TemporaryError("will retry", delay=result.retry_after)


@kopf.on.resume(*RB)
@kopf.on.create(*RB)
@kopf.on.update(*RB, field="spec")
def reconcile_rb(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _apply(body, patch, reconcile.reconcile(body))


@kopf.timer(*RB, interval=SETTINGS.check_interval, initial_delay=SETTINGS.check_interval)
def check_rb(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    result = reconcile.reconcile(body)
    # A periodic check never raises: it reports, and the next tick tries again.
    result.permanent = None
    result.retry_after = None
    _apply(body, patch, result)


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
    for ev in events:
        kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)
