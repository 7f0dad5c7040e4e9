"""Bench 2: a burst of ResultBackends and worker Deployments, against its floor.

RBO_BENCH_BURST (default 200) ResultBackends, half CouchDB and half Consul, each
selecting its own worker Deployment, RBO_BENCH_PER_NAMESPACE (default 10) per
namespace. All 2 x N objects are created at once by RBO_BENCH_APPLY_THREADS
(default 16) concurrent clients; the time runs from the first create until the
bench's watches have seen every ResultBackend Ready with its worker injected
(status.workers.injected >= 1) and every Deployment carrying the injection
(CELERY_RESULT_BACKEND env and the config-hash annotation).

The floor applies the same objects the same way while a plain script with as
many worker threads as the operator reconciles with at once (its controller's workers)
does, per ResultBackend once it and its Deployment exist: the store's create
calls, the Secret create, one server-side apply of the injection onto the
Deployment, one status write. The operator (production settings, all
namespaces) is stopped during the floor. The operator goes first, after one
warm-up ResultBackend.

Target: the operator's throughput >= 0.5x the floor's at the same concurrency.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from common import (
    DEPLOY_PATH_ALL,
    GROUP,
    PHASE_LABEL,
    PLURAL,
    RUN_LABEL,
    VERSION,
    Audit,
    AuditFollower,
    ConsulAdmin,
    CouchAdmin,
    Item,
    LoadMonitor,
    Operator,
    Tracker,
    apply_items,
    bench_session,
    breakdown,
    config_hash_of,
    cpu_seconds,
    delete_namespaces,
    deploy_path,
    deployment_injected,
    env_int,
    floor_store,
    header,
    injection_patch,
    log,
    make_items,
    namespaces_of,
    operator_kubeconfig,
    own_descendants,
    owner_ref,
    percentile,
    prepare_namespaces,
    rb_path,
    rb_ready_injected,
    ready_status,
    reconcile_workers,
    rss_mb,
    run_id,
    secret_path,
    sweep_stores,
    table,
    verdict,
    wait_namespaces_gone,
    worker_secret,
)


def main() -> int:
    n = env_int("RBO_BENCH_BURST", 200)
    per_ns = env_int("RBO_BENCH_PER_NAMESPACE", 10)
    threads = env_int("RBO_BENCH_APPLY_THREADS", 16)
    floor_workers = reconcile_workers() or 8
    with bench_session("burst") as (stores, c, kube):
        rid = run_id()
        prefix = f"rbo-bench-{rid}"
        op = Operator(operator_kubeconfig(kube), "burst")
        audit = AuditFollower(Audit(c.audit_log))
        results: dict[str, dict[str, Any]] = {}
        all_namespaces: list[str] = []
        monitor = LoadMonitor(lambda: own_descendants([op.pid] if op.alive() else [])).start()
        try:
            # --- the operator -----------------------------------------------------
            warm = make_items(1, prefix, "warmup", 1)
            op_items = make_items(n, prefix, "op", per_ns)
            all_namespaces += namespaces_of(warm) + namespaces_of(op_items)
            prepare_namespaces(kube, all_namespaces, stores)
            op.start()
            run_burst(kube, rid, "warmup", warm, threads, None)
            delete_namespaces(kube, namespaces_of(warm), timeout=120)
            log(f"operator: {n} ResultBackends + {n} Deployments at once")
            audit.window()
            cpu0 = cpu_seconds(op.pid)
            results["operator"] = run_burst(kube, rid, "op", op_items, threads, None)
            results["operator"]["cpu"] = cpu_seconds(op.pid) - cpu0
            results["operator"]["hwm"] = rss_mb(op.pid, "VmHWM")
            results["operator"]["api"] = audit.operator_count()
            log("operator: deleting them")
            t0 = time.monotonic()
            delete_namespaces(kube, namespaces_of(op_items))
            results["operator"]["delete_s"] = time.monotonic() - t0
            op.stop()

            # --- the floor --------------------------------------------------------
            fl_items = make_items(n, prefix, "floor", per_ns)
            all_namespaces += namespaces_of(fl_items)
            prepare_namespaces(kube, namespaces_of(fl_items), stores)
            log(f"floor: {n} + {n} at once, {floor_workers} worker threads")
            floor = Floor(kube, stores, floor_workers, n)
            results["floor"] = run_burst(kube, rid, "floor", fl_items, threads, floor)
            floor.join()
            load = monitor.stop()
            header(
                "Bench 2: burst (N ResultBackends + N Deployments at once -> all Ready+injected)",
                kube,
                c,
                stores,
                operator=op,
                notes=[
                    f"N = {n} ResultBackends (half CouchDB, half Consul) + {n} Deployments, "
                    f"{per_ns} per namespace; {threads} concurrent clients create them",
                    f"floor: {floor_workers} worker threads (= the operator's reconcile workers)",
                    *load,
                ],
            )
            report(n, results)
        finally:
            op.stop()
            log("cleaning up")
            if any(kube.get(rb_path(ns)).get("items") for ns in all_namespaces):
                op.start()
                delete_namespaces(kube, all_namespaces, timeout=600)
                op.stop()
            else:
                delete_namespaces(kube, all_namespaces, timeout=10)
            wait_namespaces_gone(kube, all_namespaces)
            sweep_stores(stores, prefix)
    return 0


class Floor:
    """The floor's workers: the minimum calls per ResultBackend, as many at once as the operator."""

    def __init__(self, kube: Any, stores: Any, workers: int, expected: int) -> None:
        import queue

        self.kube, self.stores = kube, stores
        self.q: queue.Queue[tuple[Item, dict[str, Any]] | None] = queue.Queue()
        self.couch, self.consul = CouchAdmin(stores), ConsulAdmin(stores)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self.work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, it: Item, rb: dict[str, Any]) -> None:
        self.q.put((it, rb))

    def work(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            it, rb = job
            try:
                self.one(it, rb)
            except BaseException as exc:
                self.errors.append(exc)

    def one(self, it: Item, rb: dict[str, Any]) -> None:
        made = floor_store(it.store, it.ns, it.name, self.stores, self.couch, self.consul)
        secret = worker_secret(it.ns, it.name, made.secret, owner_ref(rb))
        self.kube.create(secret_path(it.ns), secret)
        patch = injection_patch(it.store, it.ns, it.dep, it.name, config_hash_of(made.secret))
        self.kube.apply(deploy_path(it.ns, it.dep), patch, "rbo-bench-floor")
        fields = {**made.fields, "workers": {"selected": 1, "injected": 1, "names": [it.dep]}}
        self.kube.merge_patch(
            rb_path(it.ns, it.name) + "/status", ready_status(it.store, it.ns, it.name, fields)
        )

    def join(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join()
        if self.errors:
            raise self.errors[0]


def run_burst(
    kube: Any,
    rid: str,
    side: str,
    items: list[Item],
    threads: int,
    floor: Floor | None,
) -> dict[str, Any]:
    selector = f"{RUN_LABEL}={rid},{PHASE_LABEL}={side}"
    rbs = Tracker(kube, f"/apis/{GROUP}/{VERSION}/{PLURAL}", rb_ready_injected, selector).start()
    deps = Tracker(kube, DEPLOY_PATH_ALL, deployment_injected, selector).start()
    labels = {RUN_LABEL: rid, PHASE_LABEL: side}
    t0 = time.monotonic()
    apply_items(kube, items, labels, threads, floor.submit if floor else None)
    applied = time.monotonic() - t0
    timeout = 600 + 3 * len(items)
    rb_t = rbs.wait([it.key for it in items], timeout)
    dep_t = deps.wait([it.dep_key for it in items], timeout)
    rbs.stop()
    deps.stop()
    done = [max(rb_t[it.key], dep_t[it.dep_key]) - t0 for it in items]
    total = max(done)
    return {"total": total, "applied": applied, "latencies": done, "n": len(items)}


def report(n: int, results: dict[str, dict[str, Any]]) -> None:
    rows = []
    for side in ("operator", "floor"):
        r = results[side]
        lat = r["latencies"]
        rows.append(
            [
                side,
                r["n"],
                f"{r['applied']:.1f}",
                f"{r['total']:.1f}",
                f"{r['n'] / r['total']:.1f}",
                f"{percentile(lat, 50):.1f}",
                f"{percentile(lat, 95):.1f}",
            ]
        )
    print()
    print(
        table(
            [
                "side",
                "N",
                "all created s",
                "all Ready+injected s",
                "throughput /s",
                "p50 latency s",
                "p95 latency s",
            ],
            rows,
        )
    )
    op, fl = results["operator"], results["floor"]
    ratio = (op["n"] / op["total"]) / (fl["n"] / fl["total"])
    print()
    print(
        table(
            ["figure", "value", "target", ""],
            [["throughput operator/floor", f"{ratio:.2f}x", ">= 0.5x", verdict(ratio >= 0.5)]],
        )
    )
    api = op["api"]
    print()
    print(
        f"operator during the burst: CPU {op['cpu']:.1f} s, peak RSS {op['hwm']:.0f} MB, "
        f"{api.total} API requests ({api.total / n:.1f} per ResultBackend), "
        f"{api.writes} writes ({api.writes / n:.1f} per ResultBackend); "
        f"deleting all {n} took {op['delete_s']:.1f} s"
    )
    print("  operator API requests by verb and resource during the burst:")
    print(breakdown(api.by, 12))


if __name__ == "__main__":
    sys.exit(main())
