"""Bench 1: one ResultBackend, from the API create to Ready, against its floor.

For each store, RBO_BENCH_RUNS (default 30) times: create one ResultBackend
(deletionPolicy Delete, no workers selected) through the API and take the time
until the bench's watch sees the Ready condition True at the current generation;
then delete it and wait until it is gone (untimed) before the next run.

The floor is a plain script making the fewest calls the same work needs, in the
same run and seen through the same watch: the ResultBackend create, the store's
create calls (CouchDB: PUT /{db}, PUT /_users/org.couchdb.user:{user} for both users,
PUT /{db}/_security; Consul: PUT /v1/acl/policy, PUT /v1/acl/token), the Secret
create and one status write, over keep-alive connections.

Operator and floor runs alternate in RBO_BENCH_BLOCKS blocks (default 3) so
both see the same background load; the operator (production settings, all
namespaces) is stopped during the floor blocks, since it would otherwise
reconcile the floor's objects. Each operator block starts with one discarded
warm-up run per store.

Targets: p50 <= 2x the floor's p50; p95 < 2 s.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from common import (
    GROUP,
    PHASE_LABEL,
    PLURAL,
    RUN_LABEL,
    VERSION,
    ConsulAdmin,
    CouchAdmin,
    LoadMonitor,
    Operator,
    Stores,
    Tracker,
    admin_secrets,
    bench_session,
    create_namespace,
    delete_namespaces,
    env_int,
    floor_store,
    header,
    log,
    operator_kubeconfig,
    own_descendants,
    owner_ref,
    percentile,
    rb_path,
    rb_ready,
    ready_status,
    resultbackend,
    run_id,
    secret_path,
    sweep_stores,
    table,
    verdict,
    wait_namespaces_gone,
    worker_secret,
)

STORE_KINDS = ("couchdb", "consul")


def main() -> int:
    runs = env_int("RBO_BENCH_RUNS", 30)
    blocks = max(1, min(env_int("RBO_BENCH_BLOCKS", 3), runs))
    per_block = math.ceil(runs / blocks)
    with bench_session("single apply") as (stores, c, kube):
        rid = run_id()
        prefix = f"rbo-bench-{rid}"
        ns_op, ns_floor = f"{prefix}-op", f"{prefix}-floor"
        for ns in (ns_op, ns_floor):
            create_namespace(kube, ns)
            admin_secrets(kube, ns, stores)
        op = Operator(operator_kubeconfig(kube), "single-apply")
        tracker = Tracker(
            kube, f"/apis/{GROUP}/{VERSION}/{PLURAL}", rb_ready, f"{RUN_LABEL}={rid}"
        ).start()
        couch, consul = CouchAdmin(stores), ConsulAdmin(stores)
        times: dict[tuple[str, str], list[float]] = {
            (side, s): [] for side in ("operator", "floor") for s in STORE_KINDS
        }
        counter = [0]

        def body(store: str, ns: str, side: str) -> dict[str, Any]:
            counter[0] += 1
            name = f"{store[:5]}-{counter[0]}"
            labels = {RUN_LABEL: rid, PHASE_LABEL: side}
            return resultbackend(store, ns, name, labels)

        def operator_run(store: str) -> float:
            rb = body(store, ns_op, "operator")
            key = (ns_op, rb["metadata"]["name"])
            t0 = time.monotonic()
            kube.create(rb_path(ns_op), rb)
            ready = tracker.wait([key], 120)[key]
            kube.delete(rb_path(ns_op, key[1]))
            tracker.wait_deleted(key, 120)
            return ready - t0

        def floor_run(store: str, stores: Stores = stores) -> float:
            rb = body(store, ns_floor, "floor")
            name = rb["metadata"]["name"]
            key = (ns_floor, name)
            t0 = time.monotonic()
            created = kube.create(rb_path(ns_floor), rb)
            made = floor_store(store, ns_floor, name, stores, couch, consul)
            kube.create(
                secret_path(ns_floor),
                worker_secret(ns_floor, name, made.secret, owner_ref(created)),
            )
            kube.merge_patch(
                rb_path(ns_floor, name) + "/status",
                ready_status(store, ns_floor, name, made.fields),
            )
            ready = tracker.wait([key], 120)[key]
            kube.delete(rb_path(ns_floor, name))
            tracker.wait_deleted(key, 120)
            return ready - t0

        monitor = LoadMonitor(lambda: own_descendants([op.pid] if op.alive() else [])).start()
        try:
            for block in range(blocks):
                n = min(per_block, runs - block * per_block)
                if n <= 0:
                    break
                log(f"block {block + 1}/{blocks}: operator, {n} runs per store")
                op.start()
                for store in STORE_KINDS:
                    operator_run(store)  # warm-up, discarded
                for _ in range(n):
                    for store in STORE_KINDS:
                        times[("operator", store)].append(operator_run(store))
                op.stop()
                log(f"block {block + 1}/{blocks}: floor, {n} runs per store")
                for _ in range(n):
                    for store in STORE_KINDS:
                        times[("floor", store)].append(floor_run(store))
            load = monitor.stop()
            header(
                "Bench 1: single apply (API create -> Ready)",
                kube,
                c,
                stores,
                operator=op,
                notes=[
                    f"runs: {runs} per store and side, in {blocks} alternating blocks; "
                    "1 warm-up per store per operator block, discarded",
                    "time: from the create request to the bench's watch seeing Ready=True",
                    *load,
                ],
            )
            report(times)
        finally:
            op.stop()
            tracker.stop()
            log("cleaning up")
            op.start()  # finalizers of any ResultBackend an error left behind
            delete_namespaces(kube, [ns_op, ns_floor], timeout=120)
            op.stop()
            wait_namespaces_gone(kube, [ns_op, ns_floor])
            sweep_stores(stores, prefix)
    return 0


def report(times: dict[tuple[str, str], list[float]]) -> None:
    rows = []
    for store in STORE_KINDS:
        for side in ("operator", "floor"):
            xs = [t * 1000 for t in times[(side, store)]]
            rows.append(
                [
                    store,
                    side,
                    len(xs),
                    f"{percentile(xs, 50):.0f}",
                    f"{percentile(xs, 95):.0f}",
                    f"{min(xs):.0f}",
                    f"{max(xs):.0f}",
                ]
            )
    print()
    print(table(["store", "side", "runs", "p50 ms", "p95 ms", "min ms", "max ms"], rows))
    print()
    targets = []
    for store in STORE_KINDS:
        op_ms = [t * 1000 for t in times[("operator", store)]]
        fl_ms = [t * 1000 for t in times[("floor", store)]]
        ratio50 = percentile(op_ms, 50) / percentile(fl_ms, 50)
        ratio95 = percentile(op_ms, 95) / percentile(fl_ms, 95)
        p95 = percentile(op_ms, 95)
        targets.append(
            [store, "p50 operator/floor", f"{ratio50:.2f}x", "<= 2x", verdict(ratio50 <= 2)]
        )
        targets.append([store, "p95 operator/floor", f"{ratio95:.2f}x", "(info)", ""])
        targets.append([store, "p95 operator", f"{p95:.0f} ms", "< 2000 ms", verdict(p95 < 2000)])
    print(table(["store", "figure", "value", "target", ""], targets))


if __name__ == "__main__":
    sys.exit(main())
