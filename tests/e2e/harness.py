"""Real Celery workers and clients for the e2e tests (no fakes).

The worker image is `.venv-e2e` (`make e2e-venv`): Celery 5.x with its couchdb,
consul and redis extras. Workers and clients get only the environment a pod
would have: the resolved pod-template env (tests/e2e/kubeenv.py), the broker
URL and a queue of their own; nothing from the test runner's environment
(the devstack's CONSUL_HTTP_ADDR, for one, would override the backend URL's
host in python-consul).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, ConsulServer, CouchDBServer, Kubectl
from tests.e2e.kubeenv import base_env, workload_env
from tests.integration.helpers import try_get_json, wait_for

E2E_VENV = ROOT / ".venv-e2e"
E2E_BIN = E2E_VENV / "bin"
APP_DIR = Path(__file__).resolve().parent / "worker"
HASH = "resultstores.io/config-hash"
RESULT_KEY = "celery-task-meta-{}"


def e2e_python() -> Path:
    python = E2E_BIN / "python"
    if not python.is_file():
        pytest.fail(".venv-e2e is missing: run `make e2e-venv`", pytrace=False)
    return python


def worker_deployment(ns: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A Deployment standing for the user's Celery worker (the devstack has no kubelet)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": "python:3.11-slim",
                            "command": ["celery", "-A", "e2e_tasks", "worker"],
                            "env": [
                                {"name": "WORKER_REGION", "value": "eu-1"},
                                {"name": "WORKER_TAG", "value": "$(WORKER_REGION)-e2e"},
                            ],
                        }
                    ]
                },
            },
        },
    }


def injected_env(
    kubectl: Kubectl, ns: str, deployment: str, *, previous_hash: str | None = None
) -> tuple[str, dict[str, str]]:
    """(config hash, resolved env) of the worker container once the operator injected it.

    With `previous_hash`, waits until the template carries a different hash (a rollout).
    """

    def get(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        return try_get_json(kubectl, kind, name, "-n", namespace)

    def probe() -> tuple[str, dict[str, str]] | None:
        live, env = workload_env(get, ns, "deployment", deployment, "worker")
        annotations = live["spec"]["template"]["metadata"].get("annotations") or {}
        digest = annotations.get(HASH)
        if not digest or "CELERY_RESULT_BACKEND" not in env or digest == previous_hash:
            return None
        return digest, env

    return wait_for(f"the injection into deployment/{deployment}", probe, timeout=90)


@dataclass
class Pod:
    """The environment of one 'pod' of the worker Deployment, as Celery processes see it."""

    env: dict[str, str] = field(repr=False)  # it holds credentials: never in a test's output
    broker: str
    queue: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:10]}")
    extra: dict[str, str] = field(default_factory=dict)

    def process_env(self) -> dict[str, str]:
        return {
            **base_env(),
            "PYTHONPATH": str(APP_DIR),
            "CELERY_BROKER_URL": self.broker,
            "E2E_QUEUE": self.queue,
            **self.extra,
            **self.env,
        }


class CeleryWorker:
    """`celery -A e2e_tasks worker --pool=solo` with a pod's environment."""

    def __init__(self, pod: Pod, log_path: Path) -> None:
        self.pod = pod
        self.log_path = log_path
        self.name = f"{pod.queue}-{uuid.uuid4().hex[:4]}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryWorker:
        e2e_python()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(E2E_BIN / "celery"),
                "-A",
                "e2e_tasks",
                "worker",
                "--pool=solo",
                "--loglevel=INFO",
                f"--hostname={self.name}@%h",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
            env=self.pod.process_env(),
            cwd=APP_DIR,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(f"worker {self.name} to be ready", self._ready, timeout=60)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited ({self.proc.returncode}):\n{self.logs}")
        return " ready." in self.logs

    @property
    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


class Workers:
    """Starts workers for a test and kills every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[CeleryWorker] = []

    def start(self, pod: Pod) -> CeleryWorker:
        worker = CeleryWorker(pod, self.log_dir / f"worker-{len(self.started)}.log")
        self.started.append(worker)
        return worker.start()

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


def client(pod: Pod, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Runs tests/e2e/worker/client.py with the pod's environment; its JSON answer."""
    res = subprocess.run(
        [str(e2e_python()), str(APP_DIR / "client.py"), *args],
        env=pod.process_env(),
        cwd=APP_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise AssertionError(f"client {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


class Stream:
    """`client.py stream` in the background: a task every 50 ms until `stop()`.

    The ids it sent are in `ids`, one "n id" line each, as they are sent.
    """

    def __init__(self, pod: Pod, directory: Path) -> None:
        self.pod = pod
        self.ids = directory / f"stream-{pod.queue}.ids"
        self._stop = directory / f"stream-{pod.queue}.stop"
        self._out = directory / f"stream-{pod.queue}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stream:
        self.ids.touch()
        with self._out.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(e2e_python()),
                    str(APP_DIR / "client.py"),
                    "stream",
                    str(self._stop),
                    str(self.ids),
                ],
                env=self.pod.process_env(),
                cwd=APP_DIR,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def sent(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the client exited ({self.proc.returncode}):\n{self.output}")
        return len(self.ids.read_text().splitlines())

    @property
    def output(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""

    def stop(self) -> int:
        """Stops sending; how many tasks it sent."""
        assert self.proc is not None
        self._stop.touch()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.returncode != 0:
            raise AssertionError(f"the client failed ({self.proc.returncode}):\n{self.output}")
        return int(json.loads(self.output.strip().splitlines()[-1])["sent"])


def finish_rollout(kubectl: Kubectl, ns: str, deployment: str, digest: str) -> None:
    """Plays the kubelet's part at the end of a rollout (the devstack has no node).

    The pod the Deployment made of the template with config hash `digest` is
    reported Ready, as a kubelet would once its container runs: the Deployment
    controller then scales the old ReplicaSet down itself and the Deployment's
    status says the rollout is complete, which is what the operator waits for.
    """

    def new_pod() -> str | None:
        pods = kubectl("get", "pods", "-n", ns, "-l", f"app={deployment}", "-o", "json").stdout
        for pod in json.loads(pods)["items"]:
            if (pod["metadata"].get("annotations") or {}).get(HASH) == digest:
                return str(pod["metadata"]["name"])
        return None

    pod = wait_for(f"the pod of deployment/{deployment}'s new template", new_pod)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {"type": "Ready", "status": "True", "lastTransitionTime": now}
    status = {"status": {"phase": "Running", "conditions": [ready]}}
    kubectl(
        "patch",
        "pod",
        pod,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )

    def complete() -> bool:
        live = try_get_json(kubectl, "deployment", deployment, "-n", ns) or {}
        st, spec = live.get("status") or {}, live.get("spec") or {}
        return st.get("observedGeneration", 0) >= live.get("metadata", {}).get(
            "generation", 1
        ) and st.get("replicas") == st.get("updatedReplicas") == spec.get("replicas", 1)

    wait_for(f"deployment/{deployment}'s rollout to complete", complete)


# --- reading the stores directly, as their admins --------------------------------------


def assert_result_contract(out: dict[str, Any], backend_class: str) -> None:
    """What Celery's result-backend contract promises, as the client ("contract") saw it."""
    assert out["backend"] == backend_class
    assert (out["add"]["value"], out["add"]["state"]) == (5, "SUCCESS")
    assert out["slow"] == {"value": {"late": True}, "state": "SUCCESS"}
    assert out["fail"]["raised"]
    assert out["fail"]["is_value_error"]
    assert out["fail"]["type"] == "builtins.ValueError"
    assert out["fail"]["message"] == "no such order: 42"
    assert out["fail"]["state"] == "FAILURE"
    assert out["group"]["values"] == [0, 2, 4, 6, 8]
    assert out["group"]["states"] == ["SUCCESS"] * 5


def couchdb_doc(server: CouchDBServer, database: str, task_id: str) -> requests.Response:
    return requests.get(
        f"{server.url}/{requests.utils.quote(database, safe='')}/{RESULT_KEY.format(task_id)}",
        auth=(server.admin_user, server.admin_password),
        timeout=10,
    )


def consul_key(server: ConsulServer, prefix: str, task_id: str) -> requests.Response:
    return requests.get(
        f"{server.url}/v1/kv/{prefix}/{RESULT_KEY.format(task_id)}",
        headers={"X-Consul-Token": server.management_token},
        timeout=10,
    )


def consul_value(server: ConsulServer, prefix: str, task_id: str) -> dict[str, Any] | None:
    import base64

    res = consul_key(server, prefix, task_id)
    if res.status_code == 404:
        return None
    res.raise_for_status()
    return dict(json.loads(base64.b64decode(res.json()[0]["Value"])))


def wait_gone(what: str, probe_status: Any, timeout: float) -> None:
    """Waits until probe_status() answers 404; the timeout only bounds a failing test."""
    started = time.monotonic()
    wait_for(what, lambda: probe_status() == 404, timeout=timeout, interval=1.0)
    print(f"{what}: gone after {time.monotonic() - started:.0f}s")
