"""The data-plane bench's Celery client: `python client.py N` prints one JSON line.

Runs with the worker's environment. Sends N `add` tasks at once, waits until
every result is stored and read back (the end-to-end rate), then reads all N
stored results again with fresh, uncached reads (the fetch rate). The worker's
own store rate comes from the results' `date_done` timestamps.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

from celery.result import ResultSet
from tasks import add, app


def main(argv: list[str]) -> int:
    n = int(argv[1])
    add.delay(0, 0).get(timeout=120, interval=0.01)  # warm: connections, the worker's first task
    t0 = time.perf_counter()
    results = [add.delay(i, i) for i in range(n)]
    sent = time.perf_counter()
    values = ResultSet(results).join(timeout=900, interval=0.01)
    done = time.perf_counter()
    if values != [2 * i for i in range(n)]:
        raise SystemExit("wrong results")
    ids = [r.id for r in results]
    f0 = time.perf_counter()
    metas: list[dict[str, Any]] = [app.backend.get_task_meta(i, cache=False) for i in ids]
    fetched = time.perf_counter()
    if any(m.get("status") != "SUCCESS" for m in metas):
        raise SystemExit("a result did not read back as SUCCESS")
    stamps = sorted(
        dt.datetime.fromisoformat(str(m["date_done"])).timestamp()
        for m in metas
        if m.get("date_done")
    )
    spread = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    out = {
        "backend": f"{type(app.backend).__module__}.{type(app.backend).__name__}",
        "n": n,
        "send_s": sent - t0,
        "end_to_end_s": done - t0,
        "fetch_s": fetched - f0,
        "worker_store_spread_s": spread,
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
