"""The Celery app of the data-plane bench (runs in .venv-e2e, the worker image).

Broker and result backend come from the environment only, as in a pod:
CELERY_BROKER_URL, and CELERY_RESULT_BACKEND (+ CONSUL_HTTP_TOKEN) that the
operator injected. BENCH_QUEUE keeps the bench's tasks apart on a shared Redis.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench_tasks")
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=16,
)


@app.task  # type: ignore[untyped-decorator]  # celery ships no types; the bench venv lacks it
def add(x: int, y: int) -> int:
    return x + y
