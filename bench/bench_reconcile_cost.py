"""Bench 4: what one reconcile costs in requests, per store.

One ResultBackend selecting one worker Deployment, its store reached through a
counting reverse proxy (the ResultBackend's url points at the proxy), the API
server's requests read from the audit log by the operator's identity. Four
windows, each closed once nothing has moved for RBO_BENCH_QUIET seconds
(default 3):

- create: from the create to Ready with the worker injected;
- no-op resync: one full periodic reconcile with nothing changed (target: zero
  writes). RBO_CHECK_INTERVAL is 30 s here, so the bench does not wait a minute per
  store, and RBO_RESYNC_INTERVAL 1 s, so that tick is the full reconcile a resync
  makes (hourly by default) rather than the cheap server probe of other ticks;
- rotation: spec.rotation.trigger set to now, until credentialsRotatedAt moved
  and the Deployment's config hash changed;
- delete (deletionPolicy Delete): until the ResultBackend is gone.

Store writes are split by who made them: as the admin (provisioning) or with the
worker credentials (the credential check exercising them: for Consul a TTL
session, a key written, read and deleted, the session destroyed).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from common import (
    DEPLOY_PATH_ALL,
    PHASE_LABEL,
    RB_PATH_ALL,
    RUN_LABEL,
    ApiCount,
    Audit,
    AuditFollower,
    CountingProxy,
    Item,
    LoadMonitor,
    Operator,
    StoreCount,
    Tracker,
    bench_session,
    breakdown,
    delete_namespaces,
    deploy_path,
    env_float,
    header,
    item_objects,
    log,
    now_rfc3339,
    operator_kubeconfig,
    own_descendants,
    prepare_namespaces,
    rb_path,
    rb_ready_injected,
    run_id,
    store_count,
    store_proxies,
    sweep_stores,
    table,
    template_hash,
    verdict,
    wait_namespaces_gone,
    wait_quiet,
)

CHECK_INTERVAL = "30"
RESYNC_INTERVAL = "1"


def main() -> int:
    quiet = env_float("RBO_BENCH_QUIET", 3)
    with bench_session("reconcile cost") as (stores, c, kube):
        rid = run_id()
        prefix = f"rbo-bench-{rid}"
        proxies = store_proxies(stores)
        urls = {k: p.url for k, p in proxies.items()}
        op = Operator(
            operator_kubeconfig(kube),
            "reconcile-cost",
            {"RBO_CHECK_INTERVAL": CHECK_INTERVAL, "RBO_RESYNC_INTERVAL": RESYNC_INTERVAL},
        )
        audit = AuditFollower(Audit(c.audit_log))
        # a namespace each: workload events reconcile every ResultBackend of a namespace
        items = [Item(s, f"{prefix}-{s}", "orders") for s in ("couchdb", "consul")]
        namespaces = [it.ns for it in items]
        prepare_namespaces(kube, namespaces, stores, urls)
        selector = f"{RUN_LABEL}={rid}"
        rbs = Tracker(kube, RB_PATH_ALL, rb_ready_injected, selector).start()
        deps = Tracker(kube, DEPLOY_PATH_ALL, lambda o: True, selector).start()
        monitor = LoadMonitor(lambda: own_descendants([op.pid] if op.alive() else [])).start()
        rows: dict[str, list[tuple[str, ApiCount, StoreCount]]] = {}
        try:
            op.start()
            for it in items:
                run = Phases(kube, audit, proxies[it.store], rbs, deps, quiet)
                rb_body, dep_body = item_objects(it, {RUN_LABEL: rid, PHASE_LABEL: "cost"})
                rows[it.store] = run.all(it, rb_body, dep_body)
            load = monitor.stop()
            header(
                "Bench 4: cost per reconcile (requests per phase, one ResultBackend + 1 worker)",
                kube,
                c,
                stores,
                operator=op,
                notes=[
                    "API requests: the audit log, by the operator's identity; CouchDB/Consul: "
                    "a counting reverse proxy the ResultBackend's url points at",
                    f"RBO_CHECK_INTERVAL={CHECK_INTERVAL}, RBO_RESYNC_INTERVAL={RESYNC_INTERVAL} "
                    "(so the tick comes sooner and is a full resync); a "
                    f"window closes {quiet:.0f} s after the last request",
                    *load,
                ],
            )
            report(rows)
        finally:
            rbs.stop()
            deps.stop()
            log("cleaning up")
            if not op.alive():
                op.start()
            delete_namespaces(kube, namespaces, timeout=120)
            op.stop()
            wait_namespaces_gone(kube, namespaces)
            for p in proxies.values():
                p.stop()
            sweep_stores(stores, prefix)
    return 0


class Phases:
    """The four windows for one ResultBackend."""

    def __init__(
        self,
        kube: Any,
        audit: AuditFollower,
        proxy: CountingProxy,
        rbs: Tracker,
        deps: Tracker,
        quiet: float,
    ) -> None:
        self.kube, self.audit, self.proxy = kube, audit, proxy
        self.rbs, self.deps, self.quiet = rbs, deps, quiet
        self.rows: list[tuple[str, ApiCount, StoreCount]] = []

    def settle(self, done: Callable[[], bool], timeout: float = 180) -> None:
        """Until done() holds and neither the operator's requests nor the proxy moved."""
        if not wait_quiet(self.audit, self.proxy.total, done, self.quiet, timeout):
            raise TimeoutError(f"{self.proxy.kind}: did not settle in {timeout:.0f}s")

    def measure(
        self, store: str, phase: str, act: Callable[[], object], done: Callable[[], bool]
    ) -> None:
        self.audit.window()
        before = self.proxy.snapshot()
        act()
        self.settle(done)
        api = self.audit.operator_count()
        st = store_count(store, before, self.proxy.snapshot())
        self.rows.append((phase, api, st))
        log(f"{store} {phase}: {api.total} API, {st.total} store requests")

    def all(
        self, it: Item, rb_body: dict[str, Any], dep_body: dict[str, Any]
    ) -> list[tuple[str, ApiCount, StoreCount]]:
        kube, rbs, deps = self.kube, self.rbs, self.deps
        kube.create(deploy_path(it.ns), dep_body)
        time.sleep(self.quiet)
        self.measure(
            it.store,
            "create",
            lambda: kube.create(rb_path(it.ns), rb_body),
            lambda: it.key in rbs.first,
        )
        # The first periodic tick comes CHECK_INTERVAL after the object was first seen.
        tick_from = self.proxy.total()
        log(f"{it.store}: waiting for one periodic check (<= {CHECK_INTERVAL} s)")
        self.measure(
            it.store, "no-op resync (full)", lambda: None, lambda: self.proxy.total() > tick_from
        )
        hash0 = template_hash(deps.latest.get(it.dep_key))
        trigger = now_rfc3339()
        time.sleep(1.1)  # the operator rotates once its clock has passed the trigger

        def rotated() -> bool:
            obj = rbs.latest.get(it.key) or {}
            status = obj.get("status") or {}
            return (
                str(status.get("credentialsRotatedAt", "")) >= trigger
                and rb_ready_injected(obj)
                and template_hash(deps.latest.get(it.dep_key)) != hash0
            )

        self.measure(
            it.store,
            "rotation",
            lambda: kube.merge_patch(
                rb_path(it.ns, it.name), {"spec": {"rotation": {"trigger": trigger}}}
            ),
            rotated,
        )
        self.measure(
            it.store,
            "delete",
            lambda: kube.delete(rb_path(it.ns, it.name)),
            lambda: it.key in rbs.deleted,
        )
        return self.rows


def report(rows: dict[str, list[tuple[str, ApiCount, StoreCount]]]) -> None:
    out = []
    for store, phases in rows.items():
        for phase, api, st in phases:
            out.append(
                [
                    store,
                    phase,
                    api.total - api.watches,
                    api.writes,
                    st.total,
                    st.provisioning_writes,
                    st.check_writes,
                ]
            )
    print()
    print(
        table(
            [
                "store",
                "phase",
                "API requests*",
                "API writes",
                "store requests",
                "store writes (admin)",
                "store writes (worker check)",
            ],
            out,
        )
    )
    print("* watch (re)connections left out: kopf's long-lived streams, not reconcile work")
    print()
    targets = []
    for store, phases in rows.items():
        for phase, api, st in phases:
            if phase.startswith("no-op"):
                writes = api.writes + st.provisioning_writes
                targets.append(
                    [
                        store,
                        "writes on a no-op resync (API + store provisioning)",
                        writes,
                        "0",
                        verdict(writes == 0),
                    ]
                )
    print(table(["store", "figure", "value", "target", ""], targets))
    for store, phases in rows.items():
        for phase, api, st in phases:
            print(f"\n{store} / {phase}: API requests by verb and resource")
            print(breakdown(api.by))
            print(f"{store} / {phase}: store requests")
            print(breakdown(st.by))


if __name__ == "__main__":
    sys.exit(main())
