"""`make bench`: every bench/bench_*.py in turn, on one devstack instance.

The bench's devstack instance is started (or reused) once here and kept up for
all of them (RBO_BENCH_KEEP_STACK), then stopped if this run started it. Each
bench runs as its own process; a bench that fails does not stop the others,
and the exit status says whether all ran. PASS/MISS beside a figure is a
finding, not a failure: benches measure, tests assert.

Knobs (environment): RBO_BENCH_ONLY=burst,steady (a subset, by name), and the
per-bench ones in bench/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from common import devstack, log, stack_down, table

HERE = Path(__file__).resolve().parent
ORDER = ["single_apply", "burst", "steady_state", "restart", "reconcile_cost", "data_plane"]


def benches() -> list[Path]:
    found = {p.stem.removeprefix("bench_"): p for p in HERE.glob("bench_*.py")}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    only = [s.strip() for s in os.environ.get("RBO_BENCH_ONLY", "").split(",") if s.strip()]
    if only:
        names = [n for n in names if any(o in n for o in only)]
    return [found[n] for n in names]


def main() -> int:
    _, cluster = devstack()
    env = {**os.environ, "RBO_BENCH_KEEP_STACK": "1"}
    rows = []
    failed = 0
    try:
        for path in benches():
            log(f"running {path.name}")
            started = time.monotonic()
            res = subprocess.run([sys.executable, str(path)], env=env, check=False)
            wall = time.monotonic() - started
            failed += res.returncode != 0
            rows.append([path.name, "ok" if res.returncode == 0 else f"exit {res.returncode}"])
            rows[-1].append(f"{wall:.0f} s")
    finally:
        if cluster.started_here:
            log("stopping the bench's devstack instance")
            stack_down()
    print()
    print(table(["bench", "result", "wall time"], rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
