"""When each ResultBackend is reconciled, decided from its watch events.

Kopf's create/update/resume/delete handlers would decide this with a cycle of
their own per object: a patch that adds the finalizer, then a wait for that
patch's watch event before the create handler runs, then another patch that
records the handled spec (the diff-base annotation) for the next update. That is
two writes and a watch round trip per create that Kubernetes' own bookkeeping
makes unnecessary. Here, as a controller-runtime reconciler does:

- a spec change is `metadata.generation` moving past `status.observedGeneration`
  (the API server moves the one, every reconcile writes the other);
- the finalizer is added by the run that first needs it, which goes on with the
  object the patch returned;
- a transient failure runs again after its delay, with the newest body;
- `deletionTimestamp` with our finalizer runs the cleanup, which then removes it.

At most one run per ResultBackend at a time; an event that asks for one during a
run makes exactly one more. `wants` is the pure decision; `Driver` the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Mapping
from typing import Any

from . import api

log = logging.getLogger(__name__)

Body = Mapping[str, Any]

# Why a run happens. RESUME is the first sight of an object at operator start
# (Kopf's initial listing): nothing is known of what was injected before, so that
# run looks at every workload of the namespace.
CREATE = "create"
UPDATE = "update"
RESUME = "resume"
RETRY = "retry"
DELETE = "delete"

# Which of two queued reasons a single run keeps.
_RANK = {RETRY: 0, UPDATE: 1, CREATE: 2, RESUME: 3, DELETE: 4}

# Run(body, reason, attempt) -> seconds until it must run again, or None.
Run = Callable[[Body, str, int], "float | None"]


def has_finalizer(body: Body) -> bool:
    return api.FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def wants(
    body: Body, *, event_type: str | None, first_sight: bool, busy: bool, covered: int
) -> str | None:
    """Why this event needs a run, or None.

    `covered` is the newest generation already reconciled or being reconciled
    (from status and from this process's own runs); `busy` says a run is going
    on now, which adds the finalizer itself if its body lacks it.
    """
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return DELETE if has_finalizer(body) else None
    if first_sight:
        return RESUME if event_type is None else CREATE
    if api.generation(body) > covered:
        return UPDATE
    if not has_finalizer(body) and not busy:
        return UPDATE  # someone took our finalizer off: put it back
    return None


def stronger(a: str | None, b: str) -> str:
    return b if a is None or _RANK[b] >= _RANK[a] else a


class Driver:
    """The per-ResultBackend queue; every method but `run`'s body runs on Kopf's loop."""

    def __init__(self, run: Run, workers: int = 8, error_delay: float = 60.0) -> None:
        self._run = run
        self._error_delay = error_delay  # after a run raised (a bug: runs report failures)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="reconcile"
        )
        self._seen: set[str] = set()
        # The newest body, kept only while a run is queued, going on or due again.
        self._latest: dict[str, Body] = {}
        self._queued: dict[str, str] = {}
        self._busy: set[str] = set()
        self._covered: dict[str, int] = {}
        self._attempts: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def observe(self, body: Body, event_type: str | None, status_generation: int = 0) -> str | None:
        """One watch event of a ResultBackend (not DELETED); queues a run if it needs one."""
        uid = str((body.get("metadata") or {}).get("uid", ""))
        if not uid:
            return None
        first_sight = uid not in self._seen
        self._seen.add(uid)
        if uid in self._latest:
            self._latest[uid] = body
        covered = max(status_generation, self._covered.get(uid, 0))
        reason = wants(
            body,
            event_type=event_type,
            first_sight=first_sight,
            busy=uid in self._busy,
            covered=covered,
        )
        if reason is not None:
            self._latest[uid] = body
            self.enqueue(uid, reason)
        return reason

    def enqueue(self, uid: str, reason: str) -> None:
        if uid not in self._latest:
            return  # forgotten meanwhile (a retry timer of a deleted object)
        timer = self._timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        self._queued[uid] = stronger(self._queued.get(uid), reason)
        if uid not in self._busy:
            self._busy.add(uid)
            task = asyncio.get_running_loop().create_task(self._drain(uid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, uid: str) -> None:
        """The object is gone (DELETED): drop everything, cancel its retry."""
        self._seen.discard(uid)
        self._latest.pop(uid, None)
        self._queued.pop(uid, None)
        self._covered.pop(uid, None)
        self._attempts.pop(uid, None)
        timer = self._timers.pop(uid, None)
        if timer is not None:
            timer.cancel()

    def busy(self, uid: str) -> bool:
        return uid in self._busy

    async def _drain(self, uid: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while uid in self._queued and uid in self._latest:
                reason = self._queued.pop(uid)
                body = self._latest[uid]
                attempt = self._attempts.get(uid, 0)
                self._covered[uid] = max(self._covered.get(uid, 0), api.generation(body))
                # The task was created in Kopf's handler context: a copy of it
                # lets the run post Events through Kopf from its thread.
                ctx = contextvars.copy_context()
                try:
                    delay = await loop.run_in_executor(
                        self._pool, ctx.run, self._run, body, reason, attempt
                    )
                except Exception:
                    log.exception("run of a ResultBackend (%s) failed", reason)
                    delay = self._error_delay
                if uid not in self._latest:
                    break
                if delay is None:
                    self._attempts.pop(uid, None)
                    continue
                self._attempts[uid] = attempt + 1
                if uid not in self._queued:
                    self._timers[uid] = loop.call_later(delay, self.enqueue, uid, RETRY)
        finally:
            self._busy.discard(uid)
            if uid not in self._timers and uid not in self._queued:
                self._latest.pop(uid, None)

    def shutdown(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
