"""The Celery client of the e2e tests: sends tasks, reads results, prints JSON.

Run with the worker's environment (CELERY_RESULT_BACKEND, CELERY_BROKER_URL,
E2E_QUEUE ...), like any program that imports the user's tasks:

    python client.py contract           add, fail, slow, a group and forget()
    python client.py double-write NAME  `tracked` or `retry_once`: a result written twice
    python client.py add                one add(2, 3)
    python client.py state TASK_ID      the state the backend holds for a task
    python client.py stream STOP        stamp(n) every 50 ms until the file STOP exists;
                                        prints each task's "n id" as it is sent
    python client.py collect            every task of the "n id" lines on stdin read back:
                                        state and value
    python client.py demo               contract and a track_started task, for people

The last line of stdout is one JSON object (except for `demo`, which prints text).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from celery import group
from celery.exceptions import TimeoutError as CeleryTimeout
from e2e_tasks import add, app, fail, retry_once, slow, stamp, tracked

WAIT = 60.0


def backend_name() -> str:
    cls = type(app.backend)
    return f"{cls.__module__}.{cls.__name__}"


def contract() -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend_name()}
    r = add.delay(2, 3)
    out["add"] = {"id": r.id, "value": r.get(timeout=WAIT), "state": r.state}

    f = fail.delay("no such order: 42")
    try:
        f.get(timeout=WAIT)
        out["fail"] = {"raised": False}
    except Exception as exc:  # the re-raised task exception
        out["fail"] = {
            "raised": True,
            "id": f.id,
            "type": f"{type(exc).__module__}.{type(exc).__name__}",
            "is_value_error": isinstance(exc, ValueError),
            "message": str(exc),
            "state": f.state,
        }

    s = slow.delay(0.5, {"late": True})
    out["slow"] = {"value": s.get(timeout=WAIT), "state": s.state}

    g = group(add.s(i, i) for i in range(5)).apply_async()
    out["group"] = {
        "values": g.get(timeout=WAIT),
        "states": [x.state for x in g.results],
        "ids": [x.id for x in g.results],
    }

    k = add.delay(40, 2)
    value = k.get(timeout=WAIT)
    k.forget()
    out["forgotten"] = {"id": k.id, "value": value, "state_after": app.AsyncResult(k.id).state}
    return out


def double_write(name: str, wait: float) -> dict[str, Any]:
    task = {"tracked": tracked, "retry_once": retry_once}[name]
    r = task.delay("final")
    out: dict[str, Any] = {"backend": backend_name(), "id": r.id}
    try:
        out["value"] = r.get(timeout=wait)
        out["timed_out"] = False
    except CeleryTimeout:
        out["timed_out"] = True
    out["state"] = app.AsyncResult(r.id).state
    return out


def stream(stop: Path) -> dict[str, Any]:
    """Send stamp(n) at a steady pace until `stop` exists; never touches the result
    backend (what it sends is read back by `collect`, with whatever credentials)."""
    n = 0
    while not stop.exists():
        r = stamp.delay(n)
        print(f"{n} {r.id}", flush=True)
        n += 1
        time.sleep(0.05)
    return {"sent": n}


def collect(ids: str) -> dict[str, Any]:
    """Each task of the "n id" lines `ids` read back through the result backend
    (waiting for late ones)."""
    results: dict[str, Any] = {}
    for line in ids.splitlines():
        n, task_id = line.split()
        r = app.AsyncResult(task_id)
        try:
            value = r.get(timeout=WAIT, propagate=False)
        except CeleryTimeout:
            value = None
        results[n] = {"id": task_id, "state": r.state, "value": value}
    return {"results": results}


def demo() -> None:
    c = contract()
    t = double_write("tracked", WAIT)
    f = c["fail"]
    rows = [
        ("add.delay(2, 3)", c["add"]["value"], c["add"]["state"]),
        ('fail.delay("no such order: 42")', f"raises {f['type']}: {f['message']}", f["state"]),
        ("slow.delay(0.5, {'late': True})", c["slow"]["value"], c["slow"]["state"]),
        ("group(add.s(i, i) for i in range(5))", c["group"]["values"], "SUCCESS x5"),
        (
            "add.delay(40, 2), .get(), .forget()",
            f"{c['forgotten']['value']}, then forgotten",
            c["forgotten"]["state_after"],
        ),
        (
            "tracked.delay() (track_started)",
            f"stored {t['value']['seen']} while running",
            t["state"],
        ),
    ]
    print(f"  result backend class: {c['backend']}")
    for call, value, state in rows:
        print(f"  {call:<40} -> {value!s:<40} {state}")


def main(argv: list[str]) -> int:
    cmd = argv[1]
    if cmd == "demo":
        demo()
        return 0
    if cmd == "contract":
        out = contract()
    elif cmd == "double-write":
        out = double_write(argv[2], float(argv[3]) if len(argv) > 3 else WAIT)
    elif cmd == "add":
        r = add.delay(2, 3)
        out = {"backend": backend_name(), "id": r.id, "value": r.get(timeout=WAIT)}
        out["state"] = r.state
    elif cmd == "stream":
        out = stream(Path(argv[2]))
    elif cmd == "collect":
        out = collect(sys.stdin.read())
    elif cmd == "state":
        out = {"id": argv[2], "state": app.AsyncResult(argv[2]).state}
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
