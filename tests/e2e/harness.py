"""Real Celery workers as pods of the devstack node, and reading the stores directly.

Workers are Deployments of the worker image (tests/e2e/worker/Dockerfile: Celery 5
with its couchdb, consul and redis extras and contrib/celery-resultstores). The
operator injects the result backend into their pod template; the kubelet resolves
the env from the Secret when it starts their containers. Clients run in a worker's
pod (`kubectl exec`), with exactly that env. Pods use the node's network: the
devstack's servers answer on its loopback.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.conftest import ConsulServer, CouchDBServer, Kubectl
from tests.integration.helpers import get_json, wait_for

HASH = "resultstores.io/config-hash"
RESULT_KEY = "celery-task-meta-{}"
READY_FILE = "/tmp/celery-ready"  # tests/e2e/worker/e2e_tasks.py makes it


def new_queue() -> str:
    """A queue of a test's own: the devstack's Redis is shared."""
    return f"e2e-{uuid.uuid4().hex[:10]}"


def worker_deployment(
    ns: str,
    name: str,
    image: str,
    broker: str,
    queue: str,
    *,
    labels: dict[str, str] | None = None,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The user's Celery worker: one pod of the worker image, `celery worker`, Ready once
    Celery consumes (the readiness probe tests the file its `worker_ready` makes), so a
    rollout stops the old pod only once the new one takes tasks. Its hostname is the
    pod's name (`$(POD_NAME)`, expanded by the kubelet): on the node's network every
    pod has the node's hostname. `env` comes after the broker and the queue."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"celery": name}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "hostNetwork": True,
                    "terminationGracePeriodSeconds": 20,
                    "containers": [
                        {
                            "name": "worker",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": [
                                "worker",
                                "--pool=solo",
                                "--loglevel=INFO",
                                "--hostname=$(POD_NAME)@%h",
                                "--without-mingle",
                                "--without-gossip",
                                "--without-heartbeat",
                            ],
                            "env": [
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                {"name": "CELERY_BROKER_URL", "value": broker},
                                {"name": "E2E_QUEUE", "value": queue},
                                *(env or []),
                            ],
                            "readinessProbe": {
                                "exec": {"command": ["test", "-e", READY_FILE]},
                                "periodSeconds": 1,
                                "failureThreshold": 1,
                            },
                        }
                    ],
                },
            },
        },
    }


def pod_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True (its readiness probe passes)."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An env entry the kubelet takes from key `key` of Secret `secret`."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def injected_hash(kubectl: Kubectl, ns: str, deployment: str, old: str | None = None) -> str:
    """The config hash the operator put on the Deployment's pod template, once there
    (with `old`: once it is another one)."""

    def probe() -> str | None:
        d = get_json(kubectl, "deployment", deployment, "-n", ns)
        digest = (d["spec"]["template"]["metadata"].get("annotations") or {}).get(HASH)
        return str(digest) if digest and digest != old else None

    return wait_for(f"the injection into deployment/{deployment}", probe, timeout=90)


def ready_worker(kubectl: Kubectl, ns: str, deployment: str, config_hash: str | None = None) -> str:
    """The name of the Deployment's one pod once the rollout is complete, it is Ready
    (Celery consumes) and no other pod of it is left (a terminating one shares the
    queue); with `config_hash`, a pod of the template injected with it."""
    kubectl("rollout", "status", f"deployment/{deployment}", "-n", ns, "--timeout=120s")

    def probe() -> str | None:
        pods = get_json(kubectl, "pods", "-n", ns, "-l", f"app={deployment}")["items"]
        if len(pods) != 1:
            return None
        (pod,) = pods
        meta = pod["metadata"]
        if config_hash and (meta.get("annotations") or {}).get(HASH) != config_hash:
            return None
        if meta.get("deletionTimestamp") or not pod_ready(pod):
            return None
        return str(meta["name"])

    return wait_for(f"a ready Celery worker of deployment/{deployment}", probe, timeout=120)


def pod_env(kubectl: Kubectl, ns: str, pod: str) -> dict[str, str]:
    """The environment of the pod's container as its processes see it (the kubelet
    resolved it). It holds credentials: never print it."""
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    out = kubectl("exec", pod, "-n", ns, "--", "python", "-c", script).stdout
    return dict(json.loads(out))


def logs(kubectl: Kubectl, ns: str, pod: str) -> str:
    return kubectl("logs", pod, "-n", ns, check=False).stdout


def client(
    kubectl: Kubectl, ns: str, pod: str, *args: str, stdin: str | None = None
) -> dict[str, Any]:
    """tests/e2e/worker/client.py run in the pod (its env); its JSON answer."""
    interactive = ["-i"] if stdin is not None else []
    res = kubectl(
        "exec", *interactive, pod, "-n", ns, "--", "python", "/app/client.py", *args,
        check=False, stdin=stdin,
    )  # fmt: skip
    if res.returncode != 0:
        worker = logs(kubectl, ns, pod)[-5000:]
        raise AssertionError(f"client {args} failed:\n{res.stderr[-3000:]}\nworker:\n{worker}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


@dataclass
class LogFollower:
    """`kubectl logs -f` of a pod into a local file, so that its logs outlive it."""

    kubectl: Kubectl
    ns: str
    pod: str
    path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> LogFollower:
        with self.path.open("wb") as out:
            self.proc = self.kubectl.popen("logs", "-f", self.pod, "-n", self.ns, stdout=out)
        return self

    def text(self) -> str:
        return self.path.read_text(errors="replace")

    def stop(self) -> str:
        """The logs, once the container ended (or after 30 s)."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.text()


class Stream:
    """`client.py stream` in a pod of its own: a task every 50 ms until `stop()`.

    The pod has the broker and the queue but no result backend: it only sends. The
    "n id" lines of what it sent are collected here as they are sent.
    """

    STOP = "/tmp/stream-stop"

    def __init__(self, kubectl: Kubectl, ns: str, pod: str, directory: Path) -> None:
        self.kubectl, self.ns, self.pod = kubectl, ns, pod
        self._out = directory / f"stream-{pod}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def manifest(ns: str, name: str, image: str, broker: str, queue: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "hostNetwork": True,
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "client",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"],
                        "env": [
                            {"name": "CELERY_BROKER_URL", "value": broker},
                            {"name": "E2E_QUEUE", "value": queue},
                        ],
                    }
                ],
            },
        }

    def start(self) -> Stream:
        with self._out.open("wb") as out:
            self.proc = self.kubectl.popen(
                "exec", self.pod, "-n", self.ns, "--",
                "python", "/app/client.py", "stream", self.STOP,
                stdout=out,
            )  # fmt: skip
        return self

    @property
    def output(self) -> str:
        return self._out.read_text(errors="replace") if self._out.exists() else ""

    def ids(self) -> str:
        """The "n id" lines of the tasks sent so far."""
        return "".join(line + "\n" for line in self.output.splitlines() if line[:1].isdigit())

    def sent(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the client exited ({self.proc.returncode}):\n{self.output}")
        return len(self.ids().splitlines())

    def stop(self) -> int:
        """Stops sending; how many tasks it sent."""
        assert self.proc is not None
        self.kubectl("exec", self.pod, "-n", self.ns, "--", "touch", self.STOP)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            raise AssertionError(f"the client failed ({self.proc.returncode}):\n{self.output}")
        return int(json.loads(self.output.strip().splitlines()[-1])["sent"])


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
