"""The Celery app of the e2e tests: what a user's worker image would contain.

It configures neither the broker nor the result backend: Celery 5 reads
CELERY_BROKER_URL and CELERY_RESULT_BACKEND from the environment natively, and
the environment variable wins over app configuration (celery.app.utils.Settings),
so the URL the operator injects is used as it is. Nothing like
`config_from_envvar` is needed.

Test-only knobs, also from the environment: E2E_QUEUE (a queue of its own per
test, since the devstack's Redis is shared) and E2E_RESULT_EXPIRES (seconds;
Celery's Consul backend turns result_expires into its session TTL).

Readiness: the worker creates READY_FILE once it consumes (Celery's `worker_ready`
signal) and removes it when it starts shutting down; the pod's readiness probe
tests for it, so a rollout replaces a worker only once its successor takes tasks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready, worker_shutting_down

app = Celery("e2e_tasks")
app.conf.update(
    task_default_queue=os.environ.get("E2E_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("E2E_RESULT_EXPIRES"):
    app.conf.result_expires = int(os.environ["E2E_RESULT_EXPIRES"])

READY_FILE = Path("/tmp/celery-ready")


@worker_ready.connect
def _ready(**_: Any) -> None:
    READY_FILE.touch()


@worker_shutting_down.connect
def _not_ready(**_: Any) -> None:
    READY_FILE.unlink(missing_ok=True)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def slow(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@app.task(bind=True, track_started=True)
def tracked(self: Task, value: Any) -> dict[str, Any]:
    # Celery stored STARTED before running this body: reading it back proves the
    # result key is written twice (STARTED, then SUCCESS).
    return {"value": value, "seen": self.AsyncResult(self.request.id).state}


@app.task(bind=True)
def retry_once(self: Task, value: Any) -> dict[str, Any]:
    if self.request.retries == 0:
        raise self.retry(countdown=1, exc=RuntimeError("the first attempt fails"))
    # The worker stored RETRY for the first attempt; SUCCESS must replace it.
    return {
        "value": value,
        "retries": self.request.retries,
        "seen": self.AsyncResult(self.request.id).state,
    }


@app.task(bind=True)
def stamp(self: Task, n: int) -> dict[str, Any]:
    # Which worker stored it: the rotation test counts what the old one stored late.
    return {"n": n, "worker": self.request.hostname}
