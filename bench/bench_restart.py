"""Bench 6: restarting the operator with many ResultBackends settled.

RBO_BENCH_RESTART (default 1000) ResultBackends, half CouchDB and half Consul,
each selecting its own worker Deployment, RBO_BENCH_PER_NAMESPACE (10) per
namespace, their stores behind counting proxies. Once all are Ready and
injected and the creation's aftermath has drained (RBO_BENCH_SETTLE, as the
steady-state bench), the operator is stopped (SIGTERM) and a new process
started with the same settings. Measured from the new process's start:

- resumed: until every ResultBackend has had its first run in the new process,
  seen on its /metrics: `resultbackend_reconciles_total` (a counter of that
  process, from 0) summed over outcomes reaches the number of ResultBackends
  of each store. The README documents the counter as counting resume runs, it
  is counted when a run ends, and it needs no log format or internal state;
- the operator's API requests (the audit log, by its identity) until resumed,
  and until a settle window closed: RBO_BENCH_QUIET (3) s in which neither its
  API requests nor the stores' requests (the proxies) moved;
- its writes over that whole window: API write verbs, store writes as the
  admin (provisioning); writes with the worker credentials (the credential
  check) are shown apart, as in the other benches;
- rollouts: Deployments whose metadata.generation or pod-template config hash
  differ between before the stop and after the settle window.

The old process's shutdown is a window of its own (requests, writes).

Targets at 1,000: resumed in < 60 s, zero writes, zero rollouts.
"""

from __future__ import annotations

import collections
import sys
import time

from common import (
    DEPLOY_PATH_ALL,
    Audit,
    AuditFollower,
    Kube,
    LoadMonitor,
    Operator,
    bench_session,
    breakdown,
    cpu_seconds,
    env_float,
    env_int,
    fleet,
    header,
    log,
    operator_kubeconfig,
    own_descendants,
    store_count,
    table,
    template_hash,
    verdict,
    wait_quiet,
    wait_settled,
)

RECONCILES = "resultbackend_reconciles_total"


def reconciles(op: Operator) -> collections.Counter[tuple[str, str]]:
    """The new process's reconciles by (store, outcome)."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for labels, value in op.metric(RECONCILES).items():
        d = dict(labels)
        out[(d.get("store", "?"), d.get("outcome", "?"))] += int(value)
    return out


def wait_resumed(
    op: Operator, expected: collections.Counter[str], timeout: float
) -> tuple[bool, collections.Counter[tuple[str, str]]]:
    """Until the reconciles of each store reach its number of ResultBackends."""
    deadline = time.monotonic() + timeout
    while True:
        counts = reconciles(op)
        per_store: collections.Counter[str] = collections.Counter()
        for (store, _), v in counts.items():
            per_store[store] += v
        if all(per_store[s] >= n for s, n in expected.items()):
            return True, counts
        if time.monotonic() > deadline or not op.alive():
            return False, counts
        time.sleep(0.25)


def deployments(kube: Kube, selector: str) -> dict[tuple[str, str], tuple[int, str]]:
    """(generation, pod-template config hash) of every Deployment of the run."""
    items = kube.get(DEPLOY_PATH_ALL, labelSelector=selector).get("items", [])
    return {
        (d["metadata"]["namespace"], d["metadata"]["name"]): (
            int(d["metadata"].get("generation", 0)),
            template_hash(d),
        )
        for d in items
    }


def main() -> int:
    n = env_int("RBO_BENCH_RESTART", 1000)
    per_ns = env_int("RBO_BENCH_PER_NAMESPACE", 10)
    threads = env_int("RBO_BENCH_APPLY_THREADS", 16)
    settle = env_int("RBO_BENCH_SETTLE", 120)
    settle_max = env_int("RBO_BENCH_SETTLE_MAX", 1800)
    quiet = env_float("RBO_BENCH_QUIET", 3)
    with bench_session("restart") as (stores, c, kube):
        op = Operator(operator_kubeconfig(kube), "restart", metrics=True)
        audit = AuditFollower(Audit(c.audit_log))
        with fleet(kube, stores, op, "restart", n, per_ns) as f:
            op.start()
            created_s = f.create("restart", threads)
            log(f"all Ready and injected after {created_s:.0f} s; settling >= {settle} s")
            settled_s, settle_log = wait_settled(audit, settle, settle_max)
            before = deployments(kube, f.selector)
            expected = collections.Counter(it.store for it in f.items)

            monitor = LoadMonitor(lambda: own_descendants([op.pid] if op.alive() else [])).start()
            log("stopping the operator (SIGTERM)")
            audit.window()
            t_stop = time.monotonic()
            op.stop()
            stop_s = time.monotonic() - t_stop
            time.sleep(1)  # the audit log's last lines of the old process
            shutdown = audit.operator_count()

            log("starting it again")
            audit.window()
            stores0 = {k: p.snapshot() for k, p in f.proxies.items()}
            t0 = time.monotonic()
            op.start()
            healthy_s = time.monotonic() - t0
            resumed, counts = wait_resumed(op, expected, 600 + n)
            resumed_s = time.monotonic() - t0
            cpu_resumed = cpu_seconds(op.pid)
            api_resumed = audit.operator_count()
            log(f"resumed: {resumed} after {resumed_s:.1f} s; settling ({quiet:.0f} s quiet)")
            proxies = list(f.proxies.values())
            quieted = wait_quiet(
                audit, lambda: [p.total() for p in proxies], lambda: True, quiet, 600
            )
            window_s = time.monotonic() - t0
            api = audit.operator_count()
            st = {k: store_count(k, stores0[k], p.snapshot()) for k, p in f.proxies.items()}
            after = deployments(kube, f.selector)
            load = monitor.stop()

            rolled = [k for k, v in before.items() if after.get(k) != v]
            api_writes = shutdown.writes + api.writes
            store_writes = sum(s.provisioning_writes for s in st.values())
            header(
                f"Bench 6: restart ({n} ResultBackends + {n} Deployments settled)",
                kube,
                c,
                stores,
                operator=op,
                notes=[
                    f"{n} ResultBackends ({expected['couchdb']} CouchDB, {expected['consul']} "
                    f"Consul) + {n} Deployments in {len(f.namespaces)} namespaces, stores "
                    "behind counting proxies; the operator serves /metrics (RBO_METRICS_PORT)",
                    f"settled before the restart: {settled_s:.0f} s after all were Ready (at "
                    f"least {settle} s, then until two consecutive minutes had no operator API "
                    f"write and request counts within 15%; cap {settle_max} s)",
                    f"resumed: sum of {RECONCILES} on the new process's /metrics >= the "
                    "ResultBackends of each store; then the window closes once neither the "
                    f"operator's API requests nor the store requests moved for {quiet:.0f} s"
                    + ("" if quieted else " (NOT reached: closed at the 600 s cap)"),
                    *load,
                ],
            )
            resumed_txt = f"{resumed_s:.1f} s" if resumed else f"not all after {resumed_s:.0f} s"
            rows = [
                ["created -> all Ready+injected", f"{created_s:.0f} s", ""],
                ["old process stopped (SIGTERM -> exit)", f"{stop_s:.1f} s", ""],
                [
                    "  its API requests / writes while stopping",
                    f"{shutdown.total} / {shutdown.writes}",
                    "",
                ],
                ["new process start -> healthz answers", f"{healthy_s:.1f} s", ""],
                ["new process start -> all resumed", resumed_txt, f"{n / resumed_s:.1f}/s"],
                ["  operator CPU until resumed", f"{cpu_resumed:.1f} s", ""],
                [
                    "  API requests until resumed",
                    f"{api_resumed.total}",
                    f"{api_resumed.total / n:.2f} per ResultBackend",
                ],
                [
                    "  of which watch (re)connections",
                    f"{api_resumed.watches}",
                    "",
                ],
                [f"window: start -> quiet for {quiet:.0f} s", f"{window_s:.1f} s", ""],
                ["  API requests in the window", f"{api.total}", f"{api.writes} writes"],
            ]
            for k, s in st.items():
                rows.append(
                    [
                        f"  {k} requests in the window",
                        f"{s.total}",
                        f"{s.provisioning_writes} writes as admin, {s.check_writes} with "
                        "worker credentials (the check)",
                    ]
                )
            rows.append(["Deployments rolled (generation or hash changed)", str(len(rolled)), ""])
            print()
            print(table(["figure", "value", ""], rows))
            print()
            targets: list[list[object]] = [
                [
                    f"restart -> all {n} resumed",
                    resumed_txt,
                    "< 60 s",
                    verdict(resumed and resumed_s < 60),
                ],
                ["API writes (stop + window)", api_writes, "0", verdict(api_writes == 0)],
                ["store writes as admin (window)", store_writes, "0", verdict(store_writes == 0)],
                ["rollouts", len(rolled), "0", verdict(not rolled)],
            ]
            print(table(["figure", "value", "target", ""], targets))
            print(f"\n{RECONCILES} of the new process when all were resumed (store, outcome):")
            print(breakdown({f"{s} {o}": v for (s, o), v in counts.items() if v}))
            print("\noperator API requests by verb and resource, start -> resumed:")
            print(breakdown(api_resumed.by))
            print("operator API requests by verb and resource, whole window:")
            print(breakdown(api.by))
            for k, s in st.items():
                print(f"{k} requests in the window:")
                print(breakdown(s.by))
            if rolled:
                print("Deployments rolled (generation, config hash) before -> after, first 10:")
                for key in rolled[:10]:
                    print(f"    {key[0]}/{key[1]}: {before[key]} -> {after.get(key)}")
            print("\nthe operator's API requests per minute while settling (requests, writes):")
            print("    " + ", ".join(settle_log) if settle_log else "    -")
    return 0


if __name__ == "__main__":
    sys.exit(main())
