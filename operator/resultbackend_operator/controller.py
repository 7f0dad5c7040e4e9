"""One work queue per kind and the workers that drain it, as controller-runtime has them.

Every trigger (a watch event of the kind itself, of a Secret it owns or uses,
of a workload it selects, a periodic RequeueAfter, a retry) only *enqueues a
key*, optionally with hints ("workload Deployment/w changed", "check"). A
worker takes a key, reads the newest object from `Cache` (fed by the watch),
and runs the kind's one reconcile in a thread with it:

- a key is queued at most once; hints given while it waits are merged;
- one run per key at a time: a key enqueued during its run goes back to the
  queue once, when that run is done (client-go's dirty/processing sets);
- a run's `Outcome` decides what follows: success forgets the key's backoff and
  may ask to come back after a while (the periodic check); failure requeues it
  after a per-key exponential backoff with jitter (`backoff` doubling up to
  `max_backoff`); a permanent failure waits for the next trigger;
- while `pause()`d (Kopf pauses for a peer of higher priority) no key is
  handed out and no delayed key comes due: the queue is emptied, the cache and
  the reconciler's state of every key not running now are dropped, and runs
  under way finish. `resume()` requeues every cached key; Kopf's watches list
  every object again, so each comes back as at start.

Everything here but `Cache` and the reconcile itself runs on Kopf's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import logging
import random
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .api import ADOPT_ANNOTATION

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
Key = str
# Hints of one key, merged while it waits: hint -> its newest value.
Hints = dict[Hashable, Any]

RETRY = "retry"  # the hint a failed run comes back with


@dataclass(frozen=True)
class Outcome:
    """What one run came to.

    `requeue_after`: it succeeded and wants to run again after that many
    seconds (with `hint`), e.g. the periodic check; None: only when triggered.
    A delayed add of the key already pending stays if it is earlier, unless `reset`.
    `partial`: the run did part of the work only; the key's backoff and the delayed
    add pending (a retry, the periodic check) stay as they are.
    `failed`: retry after the key's backoff. `permanent`: nothing to retry
    until the object changes (a condition says why).
    """

    requeue_after: float | None = None
    hint: Hashable = RETRY
    # With requeue_after: replace a delayed add already pending (else the earlier wins).
    reset: bool = False
    failed: bool = False
    permanent: bool = False
    # A run that settled nothing (e.g. one workload synced): the key's backoff stays.
    partial: bool = False


# reconcile(key, newest body or None when the object is gone, hints) -> Outcome
Reconcile = Callable[[Key, "Body | None", Hints], Outcome]
# quick(key, newest body, hints) -> Outcome, or None when the run needs `reconcile`.
# Called on the event loop: it must not block (no request, no lock held long).
Quick = Callable[[Key, "Body | None", Hints], "Outcome | None"]


def backoff_delay(failures: int, base: float, cap: float, rand: float) -> float:
    """`base` doubled per earlier failure, capped at `cap`, then jittered by up to
    a quarter either way (never above `cap`): keys that failed together spread out."""
    delay = min(base * 2.0 ** min(failures, 32), cap)
    return float(min(delay * (0.75 + rand / 2), cap))


class WorkQueue:
    """client-go's rate-limited, delaying work queue on one asyncio loop."""

    def __init__(
        self,
        backoff: float,
        max_backoff: float,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._rand = rand
        self._queue: collections.deque[Key] = collections.deque()
        self._dirty: dict[Key, Hints] = {}
        self._processing: set[Key] = set()
        self._delayed: dict[Key, tuple[float, asyncio.TimerHandle, Hints]] = {}
        self._failures: dict[Key, int] = {}
        # Workers waiting in get(), each woken alone when a key is there for it.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: Key, hints: Mapping[Hashable, Any] | None = None) -> None:
        queued = self._dirty.get(key)
        if queued is not None:
            queued.update(hints or {})
            return
        self._dirty[key] = dict(hints or {})
        if key not in self._processing:
            self._append(key)

    def _append(self, key: Key) -> None:
        self._queue.append(key)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def add_after(
        self, key: Key, delay: float, hints: Mapping[Hashable, Any], *, reset: bool = False
    ) -> None:
        """Add `key` in `delay` seconds; one timer per key, the earliest wins
        (`reset`: this one replaces the pending one)."""
        if reset:
            self.drop_delayed(key)
        if delay <= 0:
            self.add(key, hints)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        merged = dict(hints)
        pending = self._delayed.get(key)
        if pending is not None:
            merged = {**pending[2], **merged}
            if pending[0] <= when:
                self._delayed[key] = (pending[0], pending[1], merged)
                return
            pending[1].cancel()
        handle = loop.call_at(when, self._due, key)
        self._delayed[key] = (when, handle, merged)

    def _due(self, key: Key) -> None:
        pending = self._delayed.pop(key, None)
        if pending is not None:
            self.add(key, pending[2])

    def add_rate_limited(self, key: Key, hints: Mapping[Hashable, Any]) -> float:
        """Add `key` after its backoff, which doubles with each failure; the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = backoff_delay(failures, self.backoff, self.max_backoff, self._rand())
        self.add_after(key, delay, hints)
        return delay

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: Key) -> None:
        """The key succeeded: its next failure starts from `backoff` again."""
        self._failures.pop(key, None)

    def delayed(self, key: Key) -> float | None:
        """Seconds until `key`'s delayed add (None: none pending)."""
        pending = self._delayed.get(key)
        if pending is None:
            return None
        return pending[0] - asyncio.get_running_loop().time()

    async def get(self) -> tuple[Key, Hints]:
        """The next key and its hints; it is `processing` until `done`."""
        while not self._queue:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken for a key, but gone: pass it on
                raise
        key = self._queue.popleft()
        self._processing.add(key)
        return key, self._dirty.pop(key)

    def done(self, key: Key) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._append(key)

    def processing(self, key: Key) -> bool:
        return key in self._processing

    def queued(self, key: Key) -> bool:
        return key in self._dirty

    def drop_delayed(self, key: Key) -> None:
        pending = self._delayed.pop(key, None)
        if pending is not None:
            pending[1].cancel()

    def drop(self, key: Key) -> None:
        """Forget everything of `key` but a run under way (the object is gone)."""
        self._failures.pop(key, None)
        self.drop_delayed(key)

    def clear(self) -> None:
        """Drop every queued and delayed key and all backoff; runs under way go on."""
        for _, handle, _ in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        self._failures.clear()
        self._queue.clear()
        self._dirty.clear()


def _resource_version(body: Body) -> int | None:
    value = (body.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(value))
    except ValueError:
        return None


def trimmed(body: Body) -> dict[str, Any]:
    """What a reconcile reads of an object: identity, spec, status, finalizers.

    managedFields and annotations (kubectl's last-applied-configuration holds a
    copy of the whole object) are most of its size and are never read, but for
    the one a reconcile reads (api.ADOPT_ANNOTATION).
    """
    meta = body.get("metadata") or {}
    adopt = (meta.get("annotations") or {}).get(ADOPT_ANNOTATION)
    keep = (
        "name",
        "namespace",
        "uid",
        "generation",
        "resourceVersion",
        "deletionTimestamp",
        "finalizers",
    )
    kept = {k: meta[k] for k in keep if k in meta}
    if adopt is not None:
        kept["annotations"] = {ADOPT_ANNOTATION: adopt}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": kept,
        "spec": body.get("spec"),
        "status": body.get("status"),
    }


class Cache:
    """The newest known version of each object of a kind, by uid.

    Fed by the watch and by the answers to our own writes (a status patch's
    answer is newer than the watch event still on its way). An older version
    never replaces a newer one. Thread-safe: runs read it from their threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._by_namespace: dict[str, set[Key]] = {}

    def put(self, body: Body) -> dict[str, Any] | None:
        """Keep `body` (trimmed) unless a newer version is known, or it is deleted (a
        deletionTimestamp and no finalizer left: it is removed); the one it replaced."""
        meta = body.get("metadata") or {}
        key = str(meta.get("uid") or "")
        if not key:
            return None
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            # Gone from the API server: the answer of the write that took the last
            # finalizer off can come after the watch's DELETED event, and must not
            # bring the object back.
            with self._lock:
                old = self._objects.get(key)
            self.remove(key)
            return old
        new = trimmed(body)
        with self._lock:
            old = self._objects.get(key)
            if old is not None:
                old_rv, new_rv = _resource_version(old), _resource_version(new)
                if old_rv is not None and new_rv is not None and new_rv < old_rv:
                    return old
            self._objects[key] = new
            self._by_namespace.setdefault(str(meta.get("namespace") or ""), set()).add(key)
            return old

    def get(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get(key)

    def remove(self, key: Key) -> None:
        with self._lock:
            body = self._objects.pop(key, None)
            if body is None:
                return
            namespace = str(body["metadata"].get("namespace") or "")
            keys = self._by_namespace.get(namespace)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_namespace[namespace]

    def in_namespace(self, namespace: str) -> list[Key]:
        with self._lock:
            return list(self._by_namespace.get(namespace, ()))

    def all_keys(self) -> list[Key]:
        with self._lock:
            return list(self._objects)

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._by_namespace.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


@dataclass
class Controller:
    """The queue, the cache and the workers of one kind."""

    name: str
    reconcile: Reconcile
    # Drops the reconciler's state of a key (object gone, or paused); called
    # only while no run of that key is under way.
    forget: Callable[[Key], None]
    workers: int = 8
    backoff: float = 5.0
    max_backoff: float = 300.0
    cache: Cache = field(default_factory=Cache)
    # Runs whose outcome is known without any I/O (most periodic checks) end on the
    # loop: a thread hop each, at a check interval per object, was most of the idle CPU.
    quick: Quick | None = None

    def __post_init__(self) -> None:
        self._queue: WorkQueue | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix=self.name
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._active: asyncio.Event | None = None
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- triggers ------------------------------------------------------------------

    @property
    def queue(self) -> WorkQueue:
        if self._queue is None:
            self._queue = WorkQueue(self.backoff, self.max_backoff)
            self._active = asyncio.Event()
            if not self._paused:
                self._active.set()
        return self._queue

    def enqueue(self, key: Key, hints: Mapping[Hashable, Any] | None = None) -> None:
        """Queue `key` for a run (on the loop); nothing while paused."""
        if self._paused:
            return
        self.queue.add(key, hints)

    def enqueue_all(self, keys: Iterable[Key], hints: Mapping[Hashable, Any]) -> None:
        for key in keys:
            self.enqueue(key, hints)

    def enqueue_soon(self, keys: Iterable[Key], hints: Mapping[Hashable, Any]) -> None:
        """`enqueue_all` from any thread (a run of another kind): on the loop, soon."""
        keys = list(keys)
        if keys and self._loop is not None:
            self._loop.call_soon_threadsafe(self.enqueue_all, keys, dict(hints))

    def busy(self, key: Key) -> bool:
        """A run of `key` is under way or queued."""
        return self._queue is not None and (self._queue.processing(key) or self._queue.queued(key))

    # --- running -------------------------------------------------------------------

    def start(self, context: contextvars.Context | None = None) -> None:
        """Start the workers once, in `context` (Kopf's, so that runs can post Events)."""
        if self._tasks:
            return
        ctx = context or contextvars.copy_context()
        loop = asyncio.get_running_loop()
        self._loop = loop
        _ = self.queue
        for i in range(self.workers):
            task = loop.create_task(self._worker(), name=f"{self.name}-{i}", context=ctx)
            self._tasks.append(task)

    async def _worker(self) -> None:
        assert self._active is not None
        while True:
            await self._active.wait()
            key, hints = await self.queue.get()
            try:
                if self._paused:
                    continue  # handed out as the pause began: a run of it would be one too many
                await self._run(key, hints)
            finally:
                self.queue.done(key)
                if self._paused and not self.queue.processing(key):
                    self.forget(key)

    async def _run(self, key: Key, hints: Hints) -> None:
        body = self.cache.get(key)
        try:
            outcome = self.quick(key, body, hints) if self.quick is not None else None
            if outcome is None:
                # A copy of the worker's context (Kopf's), so that the run can post Events.
                ctx = contextvars.copy_context()
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._pool, ctx.run, self.reconcile, key, body, hints
                )
        except Exception:  # a bug: runs report their failures as an Outcome
            log.exception("%s: run of %s failed", self.name, key)
            outcome = Outcome(failed=True)
        queue = self.queue
        if self.cache.get(key) is None:
            # Gone: no retry, no periodic check. Its DELETED event queued one more
            # run, which sees it gone and drops its state.
            queue.drop(key)
            return
        if outcome.failed:
            queue.add_rate_limited(key, {RETRY: True})
            return
        if outcome.partial:
            return
        queue.forget(key)
        if outcome.requeue_after is not None:
            queue.add_after(key, outcome.requeue_after, {outcome.hint: True}, reset=outcome.reset)

    # --- peering -------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Another replica is active: hand out nothing, keep nothing a run could act on."""
        if self._paused:
            return
        self._paused = True
        if self._active is not None:
            self._active.clear()
        if self._queue is not None:
            self._queue.clear()
        for key in self.cache.all_keys():
            if self._queue is None or not self._queue.processing(key):
                self.forget(key)
        self.cache.clear()

    def resume(self) -> None:
        """Active again: every key runs anew (the watches list every object again)."""
        if not self._paused:
            return
        self._paused = False
        if self._active is not None:
            self._active.set()
        self.enqueue_all(self.cache.all_keys(), {RETRY: True})

    def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._queue is not None:
            self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
