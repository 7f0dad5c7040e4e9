"""The periodic check of every ResultBackend, from one scheduler thread.

Kopf's timers would do the same with an asyncio task, a handler context and a
live copy of the body per ResultBackend, which the steady-state bench found to
be about a third of the operator's per-object memory. Here one thread keeps a
due time and a trimmed body per ResultBackend and hands due ones to a small
pool; a ResultBackend is never checked twice at once, and its first check comes
one interval after the operator first sees it (as Kopf's `initial_delay`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

Body = Mapping[str, Any]


def trimmed(body: Body) -> dict[str, Any]:
    """What a reconcile reads of a ResultBackend: identity, spec, status.

    managedFields and annotations (kubectl's last-applied-configuration holds a
    copy of the whole object) are most of its size and are never read by the check.
    """
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "generation", "deletionTimestamp")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": body.get("spec"),
        "status": body.get("status"),
    }


class Checker:
    """Runs `check(body)` for every tracked ResultBackend every `interval` seconds."""

    def __init__(
        self,
        interval: float,
        check: Callable[[Body], None],
        workers: int = 4,
        tick: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._check = check
        self._workers = workers
        self._tick = min(tick, interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._bodies: dict[str, dict[str, Any]] = {}
        self._due: dict[str, float] = {}
        self._running: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- what the handlers tell it -------------------------------------------------

    def track(self, body: Body) -> None:
        """The newest version of a ResultBackend (from its watch event)."""
        uid = str((body.get("metadata") or {}).get("uid", ""))
        if not uid:
            return
        with self._lock:
            self._bodies[uid] = trimmed(body)
            self._due.setdefault(uid, self._clock() + self.interval)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._bodies.pop(uid, None)
            self._due.pop(uid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._bodies)

    # --- running -------------------------------------------------------------------

    def due(self) -> list[dict[str, Any]]:
        """Bodies whose time has come and that are not being checked now; marks them."""
        now = self._clock()
        out = []
        with self._lock:
            for uid, at in self._due.items():
                if at <= now and uid not in self._running:
                    self._running.add(uid)
                    self._due[uid] = now + self.interval
                    out.append(self._bodies[uid])
        return out

    def run_one(self, body: dict[str, Any]) -> None:
        uid = str(body["metadata"].get("uid", ""))
        try:
            self._check(body)
        except Exception:  # a check never stops the others; the next tick tries again
            log.exception(
                "periodic check of %s/%s failed",
                body["metadata"].get("namespace"),
                body["metadata"].get("name"),
            )
        finally:
            with self._lock:
                self._running.discard(uid)

    def start(self, context: contextvars.Context | None = None) -> None:
        """Start the scheduler thread once; `context` carries Kopf's event posting."""
        with self._lock:
            if self._thread is not None:
                return
            ctx = context or contextvars.copy_context()
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._workers, thread_name_prefix="check"
            )
            self._thread = threading.Thread(
                target=ctx.run, args=(self._loop, ctx), name="checker", daemon=True
            )
            self._thread.start()

    def _loop(self, ctx: contextvars.Context) -> None:
        assert self._pool is not None
        while not self._stop.wait(self._tick):
            for body in self.due():
                self._pool.submit(ctx.copy().run, self.run_one, body)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
