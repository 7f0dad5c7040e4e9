"""Bench 5: results stored and fetched per second through each provisioned store.

The operator provisions three ResultBackends, each injected into its own worker
Deployment: CouchDB, Consul with `oneClient: false` (the default) and Consul
with `oneClient: true`. For each, the bench takes the env the operator injected
into the Deployment's container, valued from its Secret (`pod_env`), and starts
a real Celery worker (`celery worker --pool=solo`, from .venv-e2e: the worker
image's Celery 5 and contrib/celery-resultstores) and a client with exactly
that environment plus the devstack's Redis as the broker.

The client sends RBO_BENCH_RESULTS (default 500) `add` tasks at once and waits
for every result (end to end: results stored and read back per second), then
reads all of them again uncached (fetched per second). The worker's own store
rate is N over the spread of the results' `date_done`. A Redis result backend
(not provisioned by the operator) is measured the same way for reference.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from common import (
    BENCH_DIR,
    DEPLOY_PATH_ALL,
    E2E_PYTHON,
    PHASE_LABEL,
    RB_PATH_ALL,
    RUN_LABEL,
    WORKER_LABEL,
    Item,
    Kube,
    LoadMonitor,
    Operator,
    Tracker,
    bench_session,
    delete_namespaces,
    deploy_path,
    deployment,
    deployment_injected,
    env_int,
    header,
    log,
    operator_kubeconfig,
    own_descendants,
    prepare_namespaces,
    rb_path,
    rb_ready_injected,
    resultbackend,
    run_id,
    sweep_stores,
    table,
    wait_namespaces_gone,
)

APP_DIR = Path(__file__).resolve().parent / "dataplane"
REDIS = "redis (reference, not provisioned)"
VARIANTS = (
    ("couchdb", "couchdb", False),
    ("consul (oneClient: false)", "consul", False),
    ("consul (oneClient: true)", "consul", True),
)


def pod_env(kube: Kube, ns: str, dep: str) -> dict[str, str]:
    """The worker container's env: its literal values and the values of its
    `secretKeyRef`s (the operator's injection), the only kinds the bench's
    Deployments carry. The bench measures the stores, not the kubelet: its Celery
    runs as processes of the machine (the e2e tests run worker pods)."""
    live = kube.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{dep}")
    (container,) = live["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    secrets: dict[str, dict[str, str]] = {}
    for entry in container.get("env") or []:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            env[entry["name"]] = entry.get("value", "")
            continue
        if ref["name"] not in secrets:
            secret = kube.get(f"/api/v1/namespaces/{ns}/secrets/{ref['name']}")
            secrets[ref["name"]] = secret.get("data") or {}
        env[entry["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


def process_env(env: dict[str, str], broker: str, queue: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(APP_DIR),
        "CELERY_BROKER_URL": broker,
        "BENCH_QUEUE": queue,
        **env,
    }


def measure(label: str, env: dict[str, str], n: int) -> dict[str, Any]:
    log_path = BENCH_DIR / f"worker-{label.split()[0]}-{uuid.uuid4().hex[:4]}.log"
    with log_path.open("wb") as log_fh:
        worker = subprocess.Popen(
            [
                str(E2E_PYTHON.parent / "celery"),
                "-A",
                "tasks",
                "worker",
                "--pool=solo",
                "--loglevel=WARNING",
                f"--hostname=bench-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
            env=env,
            cwd=APP_DIR,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            res = subprocess.run(
                [str(E2E_PYTHON), str(APP_DIR / "client.py"), str(n)],
                env=env,
                cwd=APP_DIR,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if res.returncode != 0:
                raise SystemExit(f"{label}: client failed:\n{res.stdout}\n{res.stderr}")
            return dict(json.loads(res.stdout.strip().splitlines()[-1]))
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def main() -> int:
    n = env_int("RBO_BENCH_RESULTS", 500)
    repeat = env_int("RBO_BENCH_REPEAT", 3)
    if not E2E_PYTHON.is_file():
        raise SystemExit(".venv-e2e is missing: run `make e2e-venv`")
    with bench_session("data plane") as (stores, c, kube):
        rid = run_id()
        prefix = f"rbo-bench-{rid}"
        ns = f"{prefix}-dp"
        prepare_namespaces(kube, [ns], stores)
        op = Operator(operator_kubeconfig(kube), "data-plane")
        selector = f"{RUN_LABEL}={rid}"
        rbs = Tracker(kube, RB_PATH_ALL, rb_ready_injected, selector).start()
        deps = Tracker(kube, DEPLOY_PATH_ALL, deployment_injected, selector).start()
        labels = {RUN_LABEL: rid, PHASE_LABEL: "dp"}
        items: list[tuple[str, Item]] = []
        monitor = LoadMonitor(lambda: own_descendants([op.pid] if op.alive() else [])).start()
        results: dict[str, list[dict[str, Any]]] = {}
        try:
            op.start()
            for i, (label, store, one_client) in enumerate(VARIANTS):
                it = Item(store, ns, f"{store}-{i}")
                items.append((label, it))
                kube.create(
                    deploy_path(ns), deployment(ns, it.dep, {**labels, WORKER_LABEL: it.name})
                )
                kube.create(
                    rb_path(ns),
                    resultbackend(
                        store,
                        ns,
                        it.name,
                        labels,
                        selector={WORKER_LABEL: it.name},
                        one_client=one_client,
                    ),
                )
            rbs.wait([it.key for _, it in items], 180)
            deps.wait([it.dep_key for _, it in items], 180)
            redis_backend = stores.redis_url.rsplit("/", 1)[0] + "/1"
            envs = {
                label: process_env(pod_env(kube, ns, it.dep), stores.redis_url, "")
                for label, it in items
            }
            envs[REDIS] = process_env(
                {"CELERY_RESULT_BACKEND": redis_backend}, stores.redis_url, ""
            )
            for rep in range(repeat):  # rounds over the stores, so background noise is shared
                for label, env in envs.items():
                    log(f"round {rep + 1}/{repeat}, {label}: {n} tasks")
                    env = {**env, "BENCH_QUEUE": f"bench-{uuid.uuid4().hex[:8]}"}
                    results.setdefault(label, []).append(measure(label, env, n))
            load = monitor.stop()
            header(
                "Bench 5: data plane (a real Celery worker and client per provisioned store)",
                kube,
                c,
                stores,
                operator=op,
                celery=True,
                notes=[
                    f"{n} add() tasks sent at once per store, {repeat} rounds (median, and "
                    "min-max of the end-to-end rate); worker: celery worker --pool=solo "
                    "(one process); broker: the devstack's Redis; env: the injected "
                    "Deployment's, valued from its Secret",
                    *load,
                ],
            )
            report(results)
        finally:
            rbs.stop()
            deps.stop()
            log("cleaning up")
            if not op.alive():
                op.start()
            delete_namespaces(kube, [ns], timeout=120)
            op.stop()
            wait_namespaces_gone(kube, [ns])
            sweep_stores(stores, prefix)
    return 0


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    def rates(runs: list[dict[str, Any]], key: str) -> list[float]:
        return [r["n"] / r[key] for r in runs if r[key] > 0]

    rows = []
    medians: dict[str, dict[str, float]] = {}
    for label, runs in results.items():
        e2e = rates(runs, "end_to_end_s")
        stored = rates(runs, "worker_store_spread_s")
        fetched = rates(runs, "fetch_s")
        medians[label] = {"e2e": statistics.median(e2e), "fetch": statistics.median(fetched)}
        rows.append(
            [
                label,
                f"{runs[0]['n']} x {len(runs)}",
                f"{statistics.median(e2e):.0f} ({min(e2e):.0f}-{max(e2e):.0f})",
                f"{statistics.median(stored):.0f}" if stored else "-",
                f"{statistics.median(fetched):.0f}",
                runs[0]["backend"],
            ]
        )
    print()
    print(
        table(
            [
                "store",
                "tasks x rounds",
                "stored+read back /s, end to end (min-max)",
                "stored /s (worker, date_done)",
                "fetched /s (uncached)",
                "Celery backend class",
            ],
            rows,
        )
    )
    off = medians.get("consul (oneClient: false)")
    on = medians.get("consul (oneClient: true)")
    if off and on:
        print()
        print(
            "consul oneClient true vs false (medians): end to end "
            f"{on['e2e'] / off['e2e']:.2f}x, fetch {on['fetch'] / off['fetch']:.2f}x"
        )


if __name__ == "__main__":
    sys.exit(main())
