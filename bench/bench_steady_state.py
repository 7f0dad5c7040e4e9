"""Bench 3: the operator at rest with many ResultBackends.

RBO_BENCH_STEADY (default 1000) ResultBackends, half CouchDB and half Consul,
each selecting its own worker Deployment (so as many Deployments),
RBO_BENCH_PER_NAMESPACE (default 10) per namespace, created by
RBO_BENCH_APPLY_THREADS (16) clients. Once all are Ready and injected, the bench
waits RBO_BENCH_SETTLE seconds (default 120: the creation's aftermath and the
first round of periodic checks) and then measures for RBO_BENCH_IDLE seconds
(default 300) with nothing changing:

- the operator's RSS (/proc/<pid>/status VmRSS, sampled every 5 s) and its
  CPU (utime + stime from /proc/<pid>/stat) over the window, as % of one core;
- its API requests and writes per minute (the audit log, by its identity);
- its CouchDB and Consul requests per minute, through counting proxies
  (RBO_BENCH_PROXY=0 points the ResultBackends at the stores directly).

The operator runs with production settings (RBO_CHECK_INTERVAL 60 s ...).
Scale knob for development: RBO_BENCH_STEADY=100 RBO_BENCH_IDLE=60.

Targets at 1,000 ResultBackends: RSS < 150 MB; idle CPU < 2% of a core; zero
API writes per minute.
"""

from __future__ import annotations

import sys
import time

from common import (
    Audit,
    AuditFollower,
    LoadMonitor,
    Operator,
    bench_session,
    breakdown,
    cpu_seconds,
    env_int,
    fleet,
    header,
    log,
    operator_kubeconfig,
    own_descendants,
    rss_mb,
    store_count,
    table,
    verdict,
    wait_settled,
)


def main() -> int:
    n = env_int("RBO_BENCH_STEADY", 1000)
    per_ns = env_int("RBO_BENCH_PER_NAMESPACE", 10)
    threads = env_int("RBO_BENCH_APPLY_THREADS", 16)
    settle = env_int("RBO_BENCH_SETTLE", 120)
    settle_max = env_int("RBO_BENCH_SETTLE_MAX", 1800)
    idle = env_int("RBO_BENCH_IDLE", 300)
    use_proxy = env_int("RBO_BENCH_PROXY", 1) == 1
    with bench_session("steady state") as (stores, c, kube):
        op = Operator(operator_kubeconfig(kube), "steady-state")
        audit = AuditFollower(Audit(c.audit_log))
        with fleet(kube, stores, op, "steady", n, per_ns, use_proxy) as f:
            proxies, namespaces = f.proxies, f.namespaces
            op.start()
            time.sleep(5)
            rss_start = rss_mb(op.pid)
            created_s = f.create("steady", threads)
            rss_ready = rss_mb(op.pid)
            log(f"all Ready and injected after {created_s:.0f} s; settling >= {settle} s")
            settled_s, settle_log = wait_settled(audit, settle, settle_max)

            log(f"measuring {idle} s of idle")
            monitor = LoadMonitor(lambda: own_descendants([op.pid])).start()
            audit.window()
            before = {k: p.snapshot() for k, p in proxies.items()}
            cpu0, w0 = cpu_seconds(op.pid), time.monotonic()
            rss_samples = [rss_mb(op.pid)]
            while time.monotonic() - w0 < idle:
                time.sleep(min(5, idle - (time.monotonic() - w0)))
                rss_samples.append(rss_mb(op.pid))
            cpu1, w1 = cpu_seconds(op.pid), time.monotonic()
            time.sleep(1)  # the audit log's last lines
            api = audit.operator_count()
            st = {k: store_count(k, before[k], p.snapshot()) for k, p in proxies.items()}
            load = monitor.stop()
            minutes = (w1 - w0) / 60
            cpu_pct = (cpu1 - cpu0) / (w1 - w0) * 100
            rss_max = max(rss_samples)
            header(
                f"Bench 3: steady state ({n} ResultBackends + {n} Deployments, idle)",
                kube,
                c,
                stores,
                operator=op,
                notes=[
                    f"{n} ResultBackends (half CouchDB, half Consul) + {n} Deployments in "
                    f"{len(namespaces)} namespaces; then {idle} s measured",
                    f"settled: {settled_s:.0f} s after all were Ready (at least {settle} s, then "
                    "until two consecutive minutes had no operator API write and request "
                    f"counts within 15%; cap {settle_max} s)",
                    "stores reached through counting proxies"
                    if use_proxy
                    else "stores reached directly (no proxy: store requests not counted)",
                    *load,
                ],
            )
            rows = [
                ["created -> all Ready+injected", f"{created_s:.0f} s", f"{n / created_s:.1f}/s"],
                ["operator RSS at start (0 objects)", f"{rss_start:.0f} MB", ""],
                ["operator RSS when all Ready", f"{rss_ready:.0f} MB", ""],
                ["operator RSS idle (max of samples)", f"{rss_max:.0f} MB", ""],
                ["operator CPU idle", f"{cpu_pct:.1f}% of a core", f"{cpu1 - cpu0:.1f} s CPU"],
                ["API requests / min", f"{api.total / minutes:.0f}", f"{api.total} total"],
                [
                    "  of which watch (re)connections / min",
                    f"{api.watches / minutes:.1f}",
                    "",
                ],
                ["API writes / min", f"{api.writes / minutes:.1f}", f"{api.writes} total"],
            ]
            for k, s in st.items():
                rows.append([f"{k} requests / min", f"{s.total / minutes:.0f}", f"{s.total} total"])
                rows.append(
                    [
                        f"{k} writes / min as admin (provisioning)",
                        f"{s.provisioning_writes / minutes:.1f}",
                        "",
                    ]
                )
                rows.append(
                    [
                        f"{k} writes / min with worker credentials (the check)",
                        f"{s.check_writes / minutes:.1f}",
                        "",
                    ]
                )
            print()
            print(table(["figure", "value", ""], rows))
            print()
            targets = [
                [f"RSS at {n}", f"{rss_max:.0f} MB", "< 150 MB", verdict(rss_max < 150)],
                [
                    f"idle CPU at {n}",
                    f"{cpu_pct:.1f}% of a core",
                    "< 2%",
                    verdict(cpu_pct < 2),
                ],
                [
                    "API writes / min idle",
                    f"{api.writes / minutes:.1f}",
                    "0",
                    verdict(api.writes == 0),
                ],
            ]
            print(table(["figure", "value", "target", ""], targets))
            print("\nthe operator's API requests per minute while settling (requests, writes):")
            print("    " + ", ".join(settle_log) if settle_log else "    -")
            print("\noperator API requests by verb and resource during the idle window:")
            print(breakdown(api.by))
            for k, s in st.items():
                print(f"{k} requests during the idle window:")
                print(breakdown(s.by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
