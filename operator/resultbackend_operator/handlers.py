"""The only module that registers Kopf handlers; each one feeds a cache or enqueues.

Kopf does what it is good at here: watching, indexing, peering, start-up and
auth. It runs no create/update/delete handler of ours: the ResultBackend
controller (reconcile/resultbackend.py) and the store controller
(reconcile/store.py), each on its own work queue (controller.py), decide every
run from the newest object and put our finalizer, api.FINALIZER, on themselves.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from . import api, kopfpause, kube, memory
from .reconcile.events import Event
from .reconcile.resultbackend import ResultBackends
from .reconcile.store import ResultStores
from .settings import SETTINGS

log = logging.getLogger(__name__)


class RoutineSuccess(logging.Filter):
    """Drops Kopf's "... succeeded." line for the watch handlers and the indexes.

    Kopf logs every handler success at INFO: here a line per event of every
    ResultBackend, workload and Secret, which says nothing. Their failures stay.
    """

    QUIET = (
        "Handler 'rb_event'",
        "Handler 'store_event'",
        "Handler 'cluster_store_event'",
        "Indexer 'namespace_labels'",
        "Handler 'deployment_event'",
        "Handler 'statefulset_event'",
        "Handler 'secret_event'",
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
    loop's time. The controller decides from generations instead: nothing to
    build, store or compare.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def post(meta: Mapping[str, Any], events: list[Event]) -> None:
    """Post `events` about the ResultBackend of `meta` through Kopf's poster."""
    post_about(api.KIND, meta, events)


def post_store(body: Mapping[str, Any], events: list[Event]) -> None:
    """Post `events` about a store (either kind) through Kopf's poster."""
    post_about(str(body.get("kind")), body.get("metadata") or {}, events)


def post_about(kind: str, meta: Mapping[str, Any], events: list[Event]) -> None:
    ref = {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid") if meta.get(k)},
    }
    for ev in events:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, ref)), type=ev.type, reason=ev.reason, message=ev.message
        )


RESULT_BACKENDS = ResultBackends(post, workers=8)
RESULT_STORES = ResultStores(post_store, RESULT_BACKENDS)
# Kopf's pause for peering must reach our queues: hooked before kopf.run starts.
kopfpause.install()
_background: set[asyncio.Task[None]] = set()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Kopf has no create/update/delete handlers here, so it writes none of its
    # bookkeeping; were one added, that would live under our group, in
    # annotations (never status), with a finalizer of its own.
    settings.persistence.finalizer = f"{api.GROUP}/kopf-finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    # Kopf's own log lines never become Events (a retry loop would post one per
    # attempt); only the Events a run decides on are posted, on transitions.
    settings.posting.level = logging.CRITICAL + 1
    settings.peering.lifetime = max(int(SETTINGS.peering_lifetime), 15)
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Of Secrets the watch lists only the worker Secrets this operator made (by
    # label, on the server): no other Secret's value ever reaches it by the watch.
    settings.watching.label_selectors[("v1", "secrets")] = (
        f"{api.MANAGED_BY_LABEL}={api.MANAGED_BY_VALUE}"
    )
    settings.execution.max_workers = 4  # Kopf's own sync handlers: there are none
    kube.load_config()
    configure_logging()
    RESULT_BACKENDS.watched.activate()
    memory.start_trimmer(SETTINGS.trim_interval)
    for coro in (
        kopfpause.follow([RESULT_BACKENDS.controller, RESULT_STORES.controller]),
        RESULT_STORES.watch_admin(),
    ):
        task = asyncio.create_task(coro)
        _background.add(task)
        task.add_done_callback(_background.discard)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def rb_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Async: it only updates the cache and enqueues (no thread hop per event)."""
    RESULT_BACKENDS.on_event(event.get("type"), body)
    # Started from a handler, in its context, so that runs can post Events through Kopf.
    RESULT_BACKENDS.controller.start(contextvars.copy_context())


@kopf.on.event(api.GROUP, api.VERSION, api.STORE_PLURAL)
async def store_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    RESULT_STORES.on_event(event.get("type"), body)
    RESULT_STORES.controller.start(contextvars.copy_context())


async def cluster_store_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    RESULT_STORES.on_event(event.get("type"), body)
    RESULT_STORES.controller.start(contextvars.copy_context())


async def namespace_labels(name: str, labels: kopf.Labels, **_: Any) -> None:
    """An index, so that every namespace's labels are in before any handler runs (a
    ClusterResultStore's namespaceSelector is decided on them); Kopf also calls it on
    every change of a namespace."""
    RESULT_BACKENDS.on_namespace(name, labels)


# ClusterResultStores are served by an operator of every namespace only (settings).
if SETTINGS.cluster_stores:
    kopf.on.event(api.GROUP, api.VERSION, api.CLUSTER_STORE_PLURAL)(cluster_store_event)
    kopf.index("v1", "namespaces")(namespace_labels)


@kopf.on.event("v1", "secrets")
async def secret_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Worker Secrets we own (the only ones watched): a change enqueues their ResultBackend."""
    RESULT_BACKENDS.on_secret(event.get("type"), body)


# Index functions, not watch handlers, so that Kopf has every existing
# workload's labels in before it runs any other handler (watched.py). They keep
# nothing in Kopf's index (None); deletions reach it through the watch handlers.
@kopf.index("apps", "v1", "deployments")
async def deployment_labels(namespace: str | None, uid: str, labels: kopf.Labels, **_: Any) -> None:
    RESULT_BACKENDS.watched.put(namespace or "", uid, "Deployment", labels)


@kopf.index("apps", "v1", "statefulsets")
async def statefulset_labels(
    namespace: str | None, uid: str, labels: kopf.Labels, **_: Any
) -> None:
    RESULT_BACKENDS.watched.put(namespace or "", uid, "StatefulSet", labels)


@kopf.on.event("apps", "v1", "deployments")
async def deployment_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    RESULT_BACKENDS.on_workload("Deployment", event.get("type"), body)


@kopf.on.event("apps", "v1", "statefulsets")
async def statefulset_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    RESULT_BACKENDS.on_workload("StatefulSet", event.get("type"), body)
