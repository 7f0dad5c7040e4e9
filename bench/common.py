"""Shared machinery of the benches (not a bench itself; `make bench` runs bench_*.py).

What every bench gets from here:

- a devstack. By default the bench's own instance of it: `devstack/stack up`
  with RBO_DEVSTACK_DIR=.devstack/bench-stack and every port moved (etcd 2479,
  kube-apiserver 6543, Consul 8600, CouchDB 5985, Redis 6380 ...), reused while
  it runs and stopped by whoever started it. The shared devstack on the default
  ports is used by other people's tests at the same time: their operators watch
  all namespaces (they would reconcile the bench's objects, and the bench's
  operator theirs) and their outage tests stop Consul and CouchDB. Only the CPU
  is shared; the bench says how busy the machine was. RBO_BENCH_STACK=shared
  uses the shared devstack instead, with the operator limited to the bench's
  namespaces (`-n 'rbo-bench-*'`).
- the operator as a user runs it, `python -m resultbackend_operator`, under a
  ServiceAccount of its own, so its requests are told apart in the audit log by
  identity (the bench itself is `devstack-admin` with user agent `rbo-bench`);
- a minimal Kubernetes client (requests), watches that record when an object
  first satisfies a condition, an audit-log reader, a counting reverse proxy
  for CouchDB and Consul, store admin calls for the floors and the clean-up,
  and the machine's load while a bench runs.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import http.client
import http.server
import importlib.metadata
import json
import os
import platform
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from resultbackend_operator.memory import RUNTIME_ENV

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "devstack" / "stack"
BENCH_DIR = Path(os.environ.get("RBO_BENCH_DIR", ROOT / ".devstack" / "bench"))
OWN_STACK_DIR = Path(os.environ.get("RBO_BENCH_STACK_DIR", ROOT / ".devstack" / "bench-stack"))
OWN_PORTS = {
    "RBO_ETCD_PORT": "2479",
    "RBO_ETCD_PEER_PORT": "2480",
    "RBO_APISERVER_PORT": "6543",
    "RBO_KCM_PORT": "10357",
    "RBO_CONSUL_PORT": "8600",
    "RBO_CONSUL_SERVER_PORT": "8400",
    "RBO_CONSUL_SERF_PORT": "8401",
    "RBO_COUCHDB_PORT": "5985",
    "RBO_REDIS_PORT": "6380",
}
E2E_PYTHON = ROOT / ".venv-e2e" / "bin" / "python"
GROUP, VERSION, PLURAL = "resultstores.io", "v1alpha2", "resultbackends"
RUN_LABEL = "bench.resultstores.io/run"
PHASE_LABEL = "bench.resultstores.io/phase"
CONFIG_HASH = "resultstores.io/config-hash"
INJECTED_BY = "resultstores.io/injected-by"
SYSTEM_NS = "rbo-benchsys"
OPERATOR_SA = "operator"
OPERATOR_USER = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}"
USER_AGENT = "rbo-bench/0.1"
CONSUL_CHECK_KEY = ".resultbackend-operator-check"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


def log(msg: str) -> None:
    """Progress lines go to stderr; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def run_id() -> str:
    return uuid.uuid4().hex[:6]


# --- the devstack -------------------------------------------------------------------


def _parse_exports(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            parts = shlex.split(value)
            env[key] = os.path.expandvars(parts[0]) if parts else ""
    return env


@dataclass(frozen=True)
class Stores:
    couchdb_url: str
    couchdb_user: str
    couchdb_password: str
    consul_url: str
    consul_token: str
    redis_url: str


@dataclass
class Cluster:
    mode: str  # own | shared
    kubeconfig: Path
    audit_log: Path
    etcd_url: str
    path: str  # PATH with the devstack's kubectl first
    started_here: bool = False

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        res = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": self.path},
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout


def stack_mode() -> str:
    return os.environ.get("RBO_BENCH_STACK", "own")


def stack_env() -> dict[str, str]:
    """The environment `devstack/stack` runs with: the bench's instance, or as given."""
    if stack_mode() == "shared":
        return dict(os.environ)
    # No node: the benches measure the operator against the control plane, and a
    # kubelet would start (or try to pull) a pod for each of their Deployments.
    own = {"RBO_DEVSTACK_DIR": str(OWN_STACK_DIR), "RBO_NODE": "0", **OWN_PORTS}
    return {**os.environ, **own}


def _stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK), *args], env=stack_env(), capture_output=True, text=True, check=False
    )


def stack_running() -> bool:
    lines = [ln for ln in _stack("status").stdout.splitlines() if ln.strip()]
    return bool(lines) and all("running" in ln for ln in lines)


def stack_down() -> None:
    _stack("down")


def devstack() -> tuple[Stores, Cluster]:
    """`devstack/stack up` (reusing what runs) and the servers it names."""
    started = not stack_running()
    up = _stack("up")
    if up.returncode != 0:
        raise SystemExit(f"devstack/stack up failed:\n{up.stdout}\n{up.stderr}")
    env = _parse_exports(_stack("env").stdout)
    state = Path(env["RBO_DEVSTACK_DIR"])
    stores = Stores(
        couchdb_url=env["COUCHDB_URL"],
        couchdb_user=env["COUCHDB_ADMIN_USER"],
        couchdb_password=env["COUCHDB_ADMIN_PASSWORD"],
        consul_url=env["CONSUL_HTTP_ADDR"],
        consul_token=env["CONSUL_MANAGEMENT_TOKEN"],
        redis_url=env["REDIS_URL"],
    )
    etcd_port = stack_env().get("RBO_ETCD_PORT", "2379")
    c = Cluster(
        stack_mode(),
        Path(env["KUBECONFIG"]),
        state / "logs" / "audit.log",
        f"http://127.0.0.1:{etcd_port}",
        env.get("PATH", os.environ.get("PATH", "")),
        started_here=started and stack_mode() == "own",
    )
    return stores, c


def install_crd(c: Cluster) -> None:
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    c.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/resultbackends.resultstores.io"
    )


# --- a minimal Kubernetes client ----------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class Kube:
    """Bearer-token client over requests; one keep-alive session per thread."""

    def __init__(self, kubeconfig: Path, user_agent: str = USER_AGENT) -> None:
        cfg = json.loads(kubeconfig.read_text())
        self.server = cfg["clusters"][0]["cluster"]["server"]
        self.ca = cfg["clusters"][0]["cluster"]["certificate-authority"]
        self.token = cfg["users"][0]["user"]["token"]
        self.user_agent = user_agent
        self._local = threading.local()

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "s", None)
        if s is None:
            s = requests.Session()
            s.headers["Authorization"] = f"Bearer {self.token}"
            s.headers["User-Agent"] = self.user_agent
            s.verify = self.ca
            s.trust_env = False  # REQUESTS_CA_BUNDLE from the environment would win
            self._local.s = s
        return s

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        ok: Iterable[int] = (200, 201, 202),
    ) -> dict[str, Any]:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        for _ in range(60):
            resp = self.session().request(
                method, self.server + path, data=data, params=params, headers=headers, timeout=120
            )
            if resp.status_code != 429:  # e.g. "storage is (re)initializing" after a new CRD
                break
            time.sleep(float(resp.headers.get("Retry-After") or 1))
        if resp.status_code not in tuple(ok):
            raise ApiError(resp.status_code, resp.text)
        return dict(resp.json()) if resp.content else {}

    def get(self, path: str, **params: str) -> dict[str, Any]:
        return self.request("GET", path, params=params or None)

    def try_get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def ensure(self, path: str, body: Mapping[str, Any]) -> None:
        """Create, tolerating AlreadyExists."""
        self.request("POST", path, body, ok=(200, 201, 202, 409))

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def apply(self, path: str, body: Mapping[str, Any], manager: str) -> dict[str, Any]:
        return self.request(
            "PATCH",
            path,
            body,
            params={"fieldManager": manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    def delete(self, path: str) -> None:
        self.request("DELETE", path, ok=(200, 202, 404))

    def version(self) -> str:
        return str(self.get("/version").get("gitVersion", "?"))


def rb_path(ns: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    return f"{base}/{name}" if name else base


DEPLOY_PATH_ALL = "/apis/apps/v1/deployments"
RB_PATH_ALL = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


def deploy_path(ns: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{ns}/deployments"
    return f"{base}/{name}" if name else base


def secret_path(ns: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{ns}/secrets"
    return f"{base}/{name}" if name else base


def create_namespace(kube: Kube, name: str, labels: Mapping[str, str] | None = None) -> None:
    kube.ensure(
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}},
    )


def admin_secrets(
    kube: Kube, ns: str, stores: Stores, urls: Mapping[str, str] | None = None
) -> None:
    """The admin Secrets and a ResultStore per store type ("couchdb", "consul") in `ns`,
    naming the servers at `urls` (default: the stores' own; a bench's proxies)."""
    urls = urls or {"couchdb": stores.couchdb_url, "consul": stores.consul_url}
    for name, data in (
        ("couch-admin", {"username": stores.couchdb_user, "password": stores.couchdb_password}),
        ("consul-mgmt", {"token": stores.consul_token}),
    ):
        kube.ensure(
            secret_path(ns),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": ns},
                "stringData": data,
            },
        )
    for kind, spec in (
        (
            "couchdb",
            {"couchdb": {"url": urls["couchdb"], "adminSecretRef": {"name": "couch-admin"}}},
        ),
        (
            "consul",
            {"consul": {"url": urls["consul"], "tokenSecretRef": {"name": "consul-mgmt"}}},
        ),
    ):
        kube.ensure(
            f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/resultstores",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ResultStore",
                "metadata": {"name": kind, "namespace": ns},
                "spec": spec,
            },
        )


def resultbackend(
    store: str,
    ns: str,
    name: str,
    labels: Mapping[str, str],
    *,
    selector: Mapping[str, str] | None = None,
    one_client: bool = False,
    deletion: str = "Delete",
) -> dict[str, Any]:
    """A ResultBackend of the namespace's ResultStore of type `store` (admin_secrets)."""
    spec: dict[str, Any] = {"storeRef": {"name": store}, "deletionPolicy": deletion}
    if store == "consul":
        spec["consul"] = {"oneClient": one_client}
    if selector is not None:
        spec["workers"] = {"selector": {"matchLabels": dict(selector)}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ResultBackend",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
        "spec": spec,
    }


def deployment(ns: str, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """A worker Deployment (the devstack has no scheduler or kubelet: pods stay Pending)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels)},
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
                            "command": ["celery", "-A", "tasks", "worker"],
                        }
                    ]
                },
            },
        },
    }


def delete_namespaces(kube: Kube, namespaces: Sequence[str], timeout: float = 1800) -> None:
    """ResultBackends first (their finalizer needs the store and its admin Secret), then
    the ResultStores (theirs waits for the ResultBackends), then the namespaces; each
    kind's finalizer is the running operator's, forced off after `timeout`."""
    for plural in (PLURAL, "resultstores"):
        _delete_all(kube, namespaces, plural, timeout)
    for ns in namespaces:
        kube.delete(f"/api/v1/namespaces/{ns}")


def _delete_all(kube: Kube, namespaces: Sequence[str], plural: str, timeout: float) -> None:
    def path(ns: str, name: str = "") -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    for ns in namespaces:
        with contextlib.suppress(ApiError):
            kube.request("DELETE", path(ns), ok=(200, 202, 404))
    deadline = time.monotonic() + timeout
    pending = list(namespaces)
    while pending and time.monotonic() < deadline:
        pending = [ns for ns in pending if kube.get(path(ns)).get("items")]
        if pending:
            time.sleep(1)
    if pending:
        log(f"{plural} left after {timeout:.0f}s in {len(pending)} namespaces; forcing")
        for ns in pending:
            for item in kube.get(path(ns)).get("items", []):
                with contextlib.suppress(ApiError):
                    kube.merge_patch(
                        path(ns, item["metadata"]["name"]), {"metadata": {"finalizers": None}}
                    )


def wait_namespaces_gone(kube: Kube, namespaces: Sequence[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    pending = list(namespaces)
    while pending and time.monotonic() < deadline:
        pending = [ns for ns in pending if kube.try_get(f"/api/v1/namespaces/{ns}") is not None]
        if pending:
            time.sleep(1)
    if pending:
        log(f"{len(pending)} namespaces still terminating after {timeout:.0f}s")


# --- watches ------------------------------------------------------------------------


class Watch:
    """A watch stream in a thread: calls on_event(type, obj, monotonic time) per event."""

    def __init__(
        self,
        kube: Kube,
        path: str,
        on_event: Callable[[str, dict[str, Any], float], None],
        label_selector: str = "",
    ) -> None:
        self.kube, self.path, self.on_event = kube, path, on_event
        self.selector = label_selector
        self._stop = threading.Event()
        self._resp: requests.Response | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Watch:
        self.thread.start()
        if not self._ready.wait(60):
            raise RuntimeError(f"watch on {self.path} never started")
        return self

    def stop(self) -> None:
        # Closing the response from here blocks until the server ends the stream;
        # the daemon thread notices the flag at the next event or timeout instead.
        self._stop.set()

    def _run(self) -> None:
        params = {"labelSelector": self.selector} if self.selector else {}
        listed = self.kube.get(self.path, **params)
        now = time.monotonic()
        for item in listed.get("items", []):
            self.on_event("ADDED", item, now)
        rv = listed["metadata"]["resourceVersion"]
        session = requests.Session()
        session.headers.update(self.kube.session().headers)
        session.verify = self.kube.ca
        session.trust_env = False
        self._ready.set()
        while not self._stop.is_set():
            try:
                self._resp = session.get(
                    self.kube.server + self.path,
                    params={
                        **params,
                        "watch": "1",
                        "resourceVersion": rv,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": "60",
                    },
                    stream=True,
                    timeout=(10, 90),
                )
                for line in self._resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if not line:
                        continue
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        # 410 Gone: start over from a fresh list.
                        relisted = self.kube.get(self.path, **params)
                        rv = relisted["metadata"]["resourceVersion"]
                        for item in relisted.get("items", []):
                            self.on_event("ADDED", item, time.monotonic())
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev.get("type") != "BOOKMARK":
                        self.on_event(str(ev.get("type")), obj, time.monotonic())
            except (requests.RequestException, AttributeError, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.2)


def condition_true(obj: Mapping[str, Any], type_: str) -> bool:
    status = obj.get("status") or {}
    gen = obj.get("metadata", {}).get("generation")
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return bool(
                cond.get("status") == "True" and status.get("observedGeneration", gen) == gen
            )
    return False


def rb_ready(obj: Mapping[str, Any]) -> bool:
    return condition_true(obj, "Ready")


def rb_ready_injected(obj: Mapping[str, Any]) -> bool:
    workers = (obj.get("status") or {}).get("workers") or {}
    return rb_ready(obj) and int(workers.get("injected", 0)) >= 1


def deployment_injected(obj: Mapping[str, Any]) -> bool:
    tmpl = obj.get("spec", {}).get("template", {})
    annotations = tmpl.get("metadata", {}).get("annotations") or {}
    if CONFIG_HASH not in annotations:
        return False
    containers = tmpl.get("spec", {}).get("containers") or []
    return any(
        e.get("name") == "CELERY_RESULT_BACKEND" for c in containers for e in c.get("env") or []
    )


class Tracker:
    """When each object (namespace, name) first satisfied a predicate, from a watch."""

    def __init__(
        self, kube: Kube, path: str, predicate: Callable[[Mapping[str, Any]], bool], selector: str
    ) -> None:
        self.predicate = predicate
        self.first: dict[tuple[str, str], float] = {}
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.deleted: dict[tuple[str, str], float] = {}
        self.cond = threading.Condition()
        self.watch = Watch(kube, path, self._on, selector)

    def start(self) -> Tracker:
        self.watch.start()
        return self

    def stop(self) -> None:
        self.watch.stop()

    def _on(self, type_: str, obj: dict[str, Any], t: float) -> None:
        meta = obj.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        with self.cond:
            if type_ == "DELETED":
                self.deleted[key] = t
                self.latest.pop(key, None)
            else:
                self.deleted.pop(key, None)
                self.latest[key] = obj
                if key not in self.first and self.predicate(obj):
                    self.first[key] = t
            self.cond.notify_all()

    def forget(self, key: tuple[str, str]) -> None:
        with self.cond:
            self.first.pop(key, None)
            self.deleted.pop(key, None)

    def wait(self, keys: Iterable[tuple[str, str]], timeout: float) -> dict[tuple[str, str], float]:
        """First-satisfied times of all keys; raises TimeoutError naming what is missing."""
        keys = list(keys)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                missing = [k for k in keys if k not in self.first]
                if not missing:
                    return {k: self.first[k] for k in keys}
                left = deadline - time.monotonic()
                if left <= 0:
                    sample = missing[0]
                    status = (self.latest.get(sample) or {}).get("status")
                    raise TimeoutError(
                        f"{len(missing)} of {len(keys)} not satisfied after {timeout:.0f}s; "
                        f"e.g. {sample}: status={json.dumps(status)[:600]}"
                    )
                self.cond.wait(min(left, 1.0))

    def wait_deleted(self, key: tuple[str, str], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.deleted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{key} not deleted after {timeout:.0f}s")
                self.cond.wait(min(left, 1.0))
            return self.deleted[key]


# --- the operator -------------------------------------------------------------------


def operator_kubeconfig(kube: Kube) -> Path:
    """A ServiceAccount of the operator's own (bound to cluster-admin): its identity in
    the audit log is OPERATOR_USER, whatever client library made the request."""
    create_namespace(kube, SYSTEM_NS)
    kube.ensure(
        f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": OPERATOR_SA}},
    )
    kube.ensure(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "rbo-bench-operator"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": SYSTEM_NS}],
        },
    )
    token = kube.create(
        f"/api/v1/namespaces/{SYSTEM_NS}/serviceaccounts/{OPERATOR_SA}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )["status"]["token"]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "bench", "cluster": {"server": kube.server, "certificate-authority": kube.ca}}
        ],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "operator"}}],
        "current-context": "bench",
    }
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / "operator-kubeconfig"
    path.touch(mode=0o600)
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operator_defaults() -> dict[str, str]:
    """RBO_* settings and their defaults, read from the operator's own Settings class
    (so a setting added there shows up here), e.g. RBO_CHECK_INTERVAL=60."""
    import dataclasses

    from resultbackend_operator.settings import Settings

    return {
        f"RBO_{f.name.upper()}": f"{f.default:g}"
        if isinstance(f.default, float)
        else str(f.default)
        for f in dataclasses.fields(Settings)
    }


def reconcile_workers() -> int:
    """How many ResultBackends the operator reconciles at once: the controller's
    workers as handlers.py creates it (ResultBackends(post, workers=N))."""
    text = (ROOT / "operator" / "resultbackend_operator" / "handlers.py").read_text()
    m = re.search(r"ResultBackends\(post,\s*workers=(\d+)\)", text)
    return int(m.group(1)) if m else 0


class Operator:
    """`python -m resultbackend_operator` in a subprocess, as a user runs it."""

    def __init__(
        self,
        kubeconfig: Path,
        name: str,
        settings: Mapping[str, str] | None = None,
        *,
        metrics: bool = False,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.metrics = metrics  # serve /metrics (RBO_METRICS_PORT, a free port each start)
        self.log_path = BENCH_DIR / f"operator-{name}.log"
        defaults = operator_defaults()
        given = {k: os.environ[k] for k in defaults if os.environ.get(k)}
        self.settings = {**defaults, **given, **(settings or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        if stack_mode() == "shared":
            self.scope = ["--namespace", "rbo-bench-*"]
        else:
            self.scope = ["--all-namespaces"]

    def describe(self) -> str:
        s = " ".join(f"{k}={v}" for k, v in {**RUNTIME_ENV, **self.settings}.items())
        return f"python -m resultbackend_operator {' '.join(self.scope)} --liveness ...; {s}"

    def start(self) -> Operator:
        self.port = free_port()
        if self.metrics:
            self.settings["RBO_METRICS_PORT"] = str(free_port())
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "KUBECONFIG": str(self.kubeconfig),
            # the allocator settings the image runs Python with (Dockerfile ENV)
            **RUNTIME_ENV,
            **self.settings,
        }
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resultbackend_operator",
                *self.scope,
                "--liveness",
                f"http://127.0.0.1:{self.port}/healthz",
            ],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the operator exited; see {self.log_path}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).ok:
                    return self
            time.sleep(0.2)
        raise SystemExit(f"the operator never became healthy; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metric(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The samples of one metric on the running process's /metrics, by label set
        (sorted (label, value) pairs); {} while the endpoint does not answer."""
        from prometheus_client.parser import text_string_to_metric_families

        port = self.settings.get("RBO_METRICS_PORT", "0")
        if port == "0":
            raise RuntimeError("no /metrics: Operator(..., metrics=True), then start()")
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except requests.RequestException:
            return {}
        return {
            tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        }

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the audit log ------------------------------------------------------------------


@dataclass
class AuditMark:
    inode: int
    offset: int
    wall: float


class Audit:
    """Reads the apiserver's audit log from a mark on, across one rotation."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> AuditMark:
        st = self.path.stat()
        return AuditMark(st.st_ino, st.st_size, time.time())

    def _file_with_inode(self, inode: int) -> Path | None:
        for p in self.path.parent.glob(self.path.stem + "*"):
            with contextlib.suppress(OSError):
                if p.stat().st_ino == inode:
                    return p
        return None

    def read(self, since: AuditMark) -> tuple[list[dict[str, Any]], AuditMark]:
        """Entries after `since` (requests counted once: see `counted`), and a new mark."""
        chunks: list[bytes] = []
        current = self.path.stat()
        if current.st_ino == since.inode:
            with self.path.open("rb") as fh:
                fh.seek(since.offset)
                chunks.append(fh.read())
        else:
            old = self._file_with_inode(since.inode)
            if old is not None:
                with old.open("rb") as fh:
                    fh.seek(since.offset)
                    chunks.append(fh.read())
            with self.path.open("rb") as fh:
                chunks.append(fh.read())
        data = b"".join(chunks)
        cut = data.rfind(b"\n") + 1  # a partly written last line is read next time
        entries = [json.loads(line) for line in data[:cut].splitlines() if line.strip()]
        consumed = cut - (len(data) - len(chunks[-1]))
        if current.st_ino == since.inode:
            new = AuditMark(since.inode, since.offset + cut, time.time())
        else:
            new = AuditMark(current.st_ino, max(consumed, 0), time.time())
        return entries, new


def counted(entry: Mapping[str, Any]) -> bool:
    """One entry per request: watches at ResponseStarted, the rest at ResponseComplete."""
    stage = entry.get("stage")
    if entry.get("verb") == "watch":
        return stage == "ResponseStarted"
    return stage in ("ResponseComplete", "Panic")


def resource_of(entry: Mapping[str, Any]) -> str:
    ref = entry.get("objectRef") or {}
    res = str(ref.get("resource") or entry.get("requestURI", "?").split("?")[0])
    if ref.get("subresource"):
        res += "/" + str(ref["subresource"])
    return res


@dataclass
class ApiCount:
    total: int = 0
    writes: int = 0
    watches: int = 0  # watch (re)connections: kopf's streams, not reconcile work
    by: collections.Counter[str] = field(default_factory=collections.Counter)
    agents: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, entry: Mapping[str, Any]) -> None:
        verb = str(entry.get("verb"))
        self.total += 1
        self.writes += verb in WRITE_VERBS
        self.watches += verb == "watch"
        self.by[f"{verb} {resource_of(entry)}"] += 1
        agent = str(entry.get("userAgent", "?")).split("/")[0]
        self.agents[agent] += 1


def api_count(entries: Iterable[Mapping[str, Any]], user: str = OPERATOR_USER) -> ApiCount:
    out = ApiCount()
    for e in entries:
        if counted(e) and (e.get("user") or {}).get("username") == user:
            out.add(e)
    return out


def foreign_in_namespaces(entries: Iterable[Mapping[str, Any]], prefix: str) -> int:
    """Requests on the bench's namespaces by anyone but the operator, the bench and kcm."""
    n = 0
    for e in entries:
        if not counted(e):
            continue
        ns = str((e.get("objectRef") or {}).get("namespace") or "")
        agent = str(e.get("userAgent", ""))
        user = str((e.get("user") or {}).get("username") or "")
        if (
            ns.startswith(prefix)
            and user != OPERATOR_USER
            and not agent.startswith(("rbo-bench", "kube-controller-manager", "kubectl"))
            and not user.startswith("system:")
        ):
            n += 1
    return n


class AuditFollower:
    """Keeps reading the audit log; counts the operator's requests since a window start."""

    def __init__(self, audit: Audit) -> None:
        self.audit = audit
        self.mark = audit.mark()
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        new, self.mark = self.audit.read(self.mark)
        self.entries.extend(new)
        return new

    def window(self) -> None:
        self.poll()
        self.entries = []

    def operator_count(self) -> ApiCount:
        self.poll()
        return api_count(self.entries)


def wait_quiet(
    audit: AuditFollower,
    moving: Callable[[], object],
    done: Callable[[], bool],
    quiet: float,
    timeout: float,
) -> bool:
    """Until done() holds and neither the operator's API requests (the audit log) nor
    moving() (e.g. a proxy's total) changed for `quiet` s; False if `timeout` came first."""
    deadline = time.monotonic() + timeout
    last: tuple[int, object] | None = None
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        audit.poll()
        now = (api_count(audit.entries).total, moving())
        if now != last:
            last, still_since = now, time.monotonic()
        elif done() and time.monotonic() - still_since >= quiet:
            return True
        time.sleep(0.25)
    return False


def wait_settled(audit: AuditFollower, minimum: float, cap: float) -> tuple[float, list[str]]:
    """At least `minimum` s; then until two consecutive 60 s windows show no API write by
    the operator and request counts within 15% of each other (the creation's aftermath,
    e.g. queued workload events, has drained). Returns (seconds waited, per-minute log)."""
    t0 = time.monotonic()
    time.sleep(minimum)
    history: list[tuple[int, int]] = []
    per_minute: list[str] = []
    while time.monotonic() - t0 < cap:
        audit.window()
        time.sleep(60)
        count = audit.operator_count()
        history.append((count.total, count.writes))
        per_minute.append(f"{count.total}/{count.writes}")
        log(f"settling: {count.total} operator API requests, {count.writes} writes in 60 s")
        if len(history) >= 2:
            (a, wa), (b, wb) = history[-2], history[-1]
            if wa == 0 and wb == 0 and abs(a - b) <= 0.15 * max(a, b, 1):
                break
    return time.monotonic() - t0, per_minute


# --- a counting reverse proxy -------------------------------------------------------


_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


def _template(kind: str, path: str) -> tuple[str, bool]:
    """(path with names replaced by placeholders, is it the Consul check key)."""
    bare = urllib.parse.unquote(path.split("?", 1)[0])
    segs = [s for s in bare.split("/") if s]
    if kind == "consul":
        if segs[:2] == ["v1", "kv"]:
            return "/v1/kv/{key}", CONSUL_CHECK_KEY in bare
        keep = 3 if len(segs) > 2 and segs[1] in ("acl", "session") else 2
        if len(segs) > keep and segs[keep - 1] not in ("self",):
            return "/" + "/".join(segs[:keep]) + "/{id}", False
        return "/" + "/".join(segs), False
    if not segs:
        return "/", False
    if segs[0].startswith("_"):
        return "/" + segs[0] + ("/{doc}" if len(segs) > 1 else ""), False
    out = ["{db}"]
    if len(segs) > 1:
        out.append(segs[1] if segs[1].startswith("_") else "{doc}")
    if len(segs) > 2:
        out.append("{doc}")
    return "/" + "/".join(out), False


class CountingProxy:
    """HTTP reverse proxy in front of CouchDB or Consul that counts what passes.

    Each request is recorded as (method, path template, who) where who is
    `admin` for the server admin / management token and `worker` otherwise
    (the worker credentials, which only the operator's credential check uses
    while no Celery worker runs). Credentials are compared, never stored.
    """

    def __init__(self, kind: str, upstream: str, admin_secret: str) -> None:
        self.kind = kind
        parts = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.admin_secret = admin_secret
        self.counts: collections.Counter[tuple[str, str, str, bool]] = collections.Counter()
        self.errors = 0  # requests the upstream did not answer (it was down)
        self.lock = threading.Lock()
        self._local = threading.local()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self) -> None:
                body = self._body()
                proxy.record(self.command, self.path, self.headers)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body or self.command in ("PUT", "POST", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                try:
                    status, reason, resp_headers, data = proxy.upstream(
                        self.command, self.path, body, headers
                    )
                except (OSError, http.client.HTTPException):
                    proxy.record_error()
                    status, reason, resp_headers, data = 502, "Bad Gateway", [], b""
                self.send_response(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                return  # a client that went away mid-answer: nothing to count

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CountingProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _who(self, path: str, headers: Any) -> str:
        if self.kind == "couchdb":
            auth = headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user = base64.b64decode(auth[6:]).decode(errors="replace").split(":", 1)[0]
                return "admin" if user == self.admin_secret else "worker"
            return "anonymous"
        token = headers.get("X-Consul-Token") or ""
        if not token:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
            token = (query.get("token") or [""])[0]
        return "admin" if token == self.admin_secret else "worker"

    def record_error(self) -> None:
        with self.lock:
            self.errors += 1

    def record(self, method: str, path: str, headers: Any) -> None:
        template, check_key = _template(self.kind, path)
        who = self._who(path, headers)
        with self.lock:
            self.counts[(method, template, who, check_key)] += 1

    def upstream(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=60)
                self._local.conn = conn
            try:
                conn.request(method, path, body=body or None, headers=dict(headers))
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def snapshot(self) -> collections.Counter[tuple[str, str, str, bool]]:
        with self.lock:
            return collections.Counter(self.counts)

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())


def store_proxies(stores: Stores) -> dict[str, CountingProxy]:
    """A started CountingProxy in front of each store, by store type."""
    return {
        "couchdb": CountingProxy("couchdb", stores.couchdb_url, stores.couchdb_user).start(),
        "consul": CountingProxy("consul", stores.consul_url, stores.consul_token).start(),
    }


def is_store_write(kind: str, method: str, template: str) -> bool:
    if method not in ("PUT", "POST", "DELETE", "PATCH"):
        return False
    return not (kind == "couchdb" and template == "/_session")


@dataclass
class StoreCount:
    total: int = 0
    provisioning_writes: int = 0  # as the admin
    check_writes: int = 0  # as the worker: the operator's periodic credential check
    by: collections.Counter[str] = field(default_factory=collections.Counter)


def store_count(
    kind: str,
    before: collections.Counter[tuple[str, str, str, bool]],
    after: collections.Counter[tuple[str, str, str, bool]],
) -> StoreCount:
    out = StoreCount()
    for key, n in (after - before).items():
        method, template, who, _ = key
        out.total += n
        out.by[f"{method} {template} ({who})"] += n
        if is_store_write(kind, method, template):
            if who == "admin":
                out.provisioning_writes += n
            else:
                out.check_writes += n
    return out


# --- store admin calls: the floors and the clean-up ---------------------------------


class CouchAdmin:
    def __init__(self, stores: Stores) -> None:
        self.url = stores.couchdb_url
        self.auth = (stores.couchdb_user, stores.couchdb_password)
        self._local = threading.local()

    def s(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "s", None)
        if s is None:
            s = requests.Session()
            s.auth = self.auth
            s.trust_env = False
            self._local.s = s
        return s

    def _ok(self, resp: requests.Response, *codes: int) -> Any:
        if resp.status_code not in codes:
            raise RuntimeError(f"CouchDB {resp.request.method} {resp.status_code}: {resp.text}")
        return resp.json() if resp.content else None

    def create_database(self, db: str) -> None:
        self._ok(self.s().put(f"{self.url}/{db}", timeout=30), 201, 202)

    def create_user(self, user: str, password: str) -> None:
        doc = {"_id": f"org.couchdb.user:{user}", "name": user, "type": "user", "roles": []}
        doc["password"] = password
        self._ok(self.s().put(f"{self.url}/_users/{doc['_id']}", json=doc, timeout=30), 201, 202)

    def put_security(self, db: str, users: list[str]) -> None:
        body = {"admins": {"names": [], "roles": []}, "members": {"names": users, "roles": []}}
        self._ok(self.s().put(f"{self.url}/{db}/_security", json=body, timeout=30), 200, 201)

    def sweep(self, prefix: str) -> int:
        n = 0
        for db in self._ok(self.s().get(f"{self.url}/_all_dbs", timeout=60), 200):
            if db.startswith(prefix):
                self.s().delete(f"{self.url}/{db}", timeout=60)
                n += 1
        start = f"org.couchdb.user:rb_{prefix}"
        rows = self._ok(
            self.s().get(
                f"{self.url}/_users/_all_docs",
                params={"startkey": json.dumps(start), "endkey": json.dumps(start + "\ufff0")},
                timeout=60,
            ),
            200,
        )["rows"]
        rows += self._ok(
            self.s().get(
                f"{self.url}/_users/_all_docs",
                params={
                    "startkey": json.dumps("org.couchdb.user:floor_" + prefix),
                    "endkey": json.dumps("org.couchdb.user:floor_" + prefix + "\ufff0"),
                },
                timeout=60,
            ),
            200,
        )["rows"]
        for row in rows:
            self.s().delete(
                f"{self.url}/_users/{row['id']}", params={"rev": row["value"]["rev"]}, timeout=60
            )
            n += 1
        return n


class ConsulAdmin:
    def __init__(self, stores: Stores) -> None:
        self.url = stores.consul_url
        self.token = stores.consul_token
        self._local = threading.local()

    def s(self) -> requests.Session:
        s: requests.Session | None = getattr(self._local, "s", None)
        if s is None:
            s = requests.Session()
            s.headers["X-Consul-Token"] = self.token
            s.trust_env = False
            self._local.s = s
        return s

    def _ok(self, resp: requests.Response) -> Any:
        if resp.status_code != 200:
            raise RuntimeError(f"Consul {resp.request.method} {resp.status_code}: {resp.text}")
        return resp.json() if resp.content else None

    def create_policy(self, name: str, key_prefix: str) -> str:
        rules = (
            f'key_prefix "{key_prefix}/" {{ policy = "write" }}\n'
            'session_prefix "" { policy = "write" }\n'
        )
        body = {"Name": name, "Description": "rbo-bench floor", "Rules": rules}
        return str(self._ok(self.s().put(f"{self.url}/v1/acl/policy", json=body, timeout=30))["ID"])

    def create_token(self, policy_id: str) -> tuple[str, str]:
        body = {"Policies": [{"ID": policy_id}], "Description": "rbo-bench floor"}
        tok = self._ok(self.s().put(f"{self.url}/v1/acl/token", json=body, timeout=30))
        return str(tok["AccessorID"]), str(tok["SecretID"])

    def sweep(self, prefix: str) -> int:
        n = 0
        for pol in self._ok(self.s().get(f"{self.url}/v1/acl/policies", timeout=60)) or []:
            if not str(pol.get("Name", "")).startswith(("resultbackend-" + prefix, prefix)):
                continue
            tokens = self._ok(
                self.s().get(f"{self.url}/v1/acl/tokens", params={"policy": pol["ID"]}, timeout=60)
            )
            for tok in tokens or []:
                self.s().delete(f"{self.url}/v1/acl/token/{tok['AccessorID']}", timeout=60)
                n += 1
            self.s().delete(f"{self.url}/v1/acl/policy/{pol['ID']}", timeout=60)
            n += 1
        self.s().delete(f"{self.url}/v1/kv/celery/{prefix}", params={"recurse": "1"}, timeout=60)
        return n


def sweep_stores(stores: Stores, prefix: str) -> None:
    """Removes whatever the bench's namespaces left in CouchDB and Consul."""
    n = CouchAdmin(stores).sweep(prefix) + ConsulAdmin(stores).sweep(prefix)
    if n:
        log(f"swept {n} leftover store objects named {prefix}*")


def worker_password() -> str:
    return base64.urlsafe_b64encode(os.urandom(30)).decode()[:40]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_status(store: str, ns: str, name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """What the floor writes: a status of the operator's shape, Ready."""
    now = now_rfc3339()
    conds = [
        {
            "type": t,
            "status": "True",
            "reason": t,
            "message": "floor",
            "observedGeneration": 1,
            "lastTransitionTime": now,
        }
        for t in ("Provisioned", "BackendReachable", "WorkersInjected", "Ready")
    ]
    return {
        "status": {
            "observedGeneration": 1,
            "phase": "Ready",
            "secretName": f"{name}-result-backend",
            "conditions": conds,
            **fields,
        }
    }


def owner_ref(rb: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ResultBackend",
        "name": rb["metadata"]["name"],
        "uid": rb["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def worker_secret(
    ns: str, name: str, data: Mapping[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": f"{name}-result-backend",
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": "resultbackend-operator"},
            "ownerReferences": [dict(owner)],
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())},
    }


@dataclass
class FloorResult:
    fields: dict[str, Any]
    secret: dict[str, str]


def floor_store(
    store: str, ns: str, name: str, stores: Stores, couch: CouchAdmin, consul: ConsulAdmin
) -> FloorResult:
    """The minimum store calls: CouchDB db + user + _security; Consul policy + token."""
    if store == "couchdb":
        db, user, password = f"{ns}-{name}", f"floor_{ns}_{name}", worker_password()
        couch.create_database(db)
        # Two users, as the operator keeps them (the second for rotations).
        couch.create_user(user, password)
        couch.create_user(f"{user}_b", worker_password())
        couch.put_security(db, [user, f"{user}_b"])
        host = urllib.parse.urlsplit(stores.couchdb_url)
        uri = f"couchdb://{user}:{password}@{host.hostname}:{host.port}/{db}"
        return FloorResult(
            {"url": uri.replace(f":{password}", ""), "couchdb": {"database": db, "user": user}},
            {"type": "couchdb", "uri": uri, "username": user, "password": password},
        )
    prefix = f"celery/{ns}/{name}"
    policy = consul.create_policy(f"{ns}-{name}", prefix)
    accessor, token = consul.create_token(policy)
    host = urllib.parse.urlsplit(stores.consul_url)
    uri = f"consul://{host.hostname}:{host.port}/{prefix}"
    return FloorResult(
        {
            "url": uri,
            "consul": {"keyPrefix": prefix, "policyID": policy, "tokenAccessorID": accessor},
        },
        {"type": "consul", "uri": uri, "keyPrefix": prefix, "token": token},
    )


def injection_patch(store: str, ns: str, dep: str, rb_name: str, chash: str) -> dict[str, Any]:
    secret = f"{rb_name}-result-backend"
    env = [
        {
            "name": "CELERY_RESULT_BACKEND",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}},
        }
    ]
    if store == "consul":
        env.append(
            {
                "name": "CONSUL_HTTP_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
            }
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": dep, "namespace": ns, "annotations": {INJECTED_BY: rb_name}},
        "spec": {
            "template": {
                "metadata": {"annotations": {CONFIG_HASH: chash}},
                "spec": {"containers": [{"name": "worker", "env": env}]},
            }
        },
    }


# --- many objects at once -----------------------------------------------------------


WORKER_LABEL = "bench.resultstores.io/worker"


@dataclass(frozen=True)
class Item:
    """One ResultBackend and the worker Deployment it selects."""

    store: str
    ns: str
    name: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.ns, self.name)

    @property
    def dep(self) -> str:
        return f"{self.name}-worker"

    @property
    def dep_key(self) -> tuple[str, str]:
        return (self.ns, self.dep)


def make_items(n: int, prefix: str, side: str, per_ns: int) -> list[Item]:
    """n items, the stores alternating, `per_ns` per namespace."""
    out = []
    for i in range(n):
        store = ("couchdb", "consul")[i % 2]
        out.append(Item(store, f"{prefix}-{side}-{i // per_ns}", f"{store[:5]}-{i}"))
    return out


def namespaces_of(items: Iterable[Item]) -> list[str]:
    return list(dict.fromkeys(it.ns for it in items))


def prepare_namespaces(
    kube: Kube,
    namespaces: Sequence[str],
    stores: Stores,
    urls: Mapping[str, str] | None = None,
) -> None:
    def one(ns: str) -> None:
        create_namespace(kube, ns)
        admin_secrets(kube, ns, stores, urls)

    run_parallel(one, list(namespaces), 8)


def item_objects(it: Item, labels: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    rb = resultbackend(it.store, it.ns, it.name, labels, selector={WORKER_LABEL: it.name})
    dep = deployment(it.ns, it.dep, {**labels, WORKER_LABEL: it.name})
    return rb, dep


def apply_items(
    kube: Kube,
    items: Sequence[Item],
    labels: Mapping[str, str],
    threads: int,
    on_both: Callable[[Item, dict[str, Any]], None] | None = None,
) -> None:
    """Creates every ResultBackend and Deployment with `threads` concurrent clients,
    interleaved; on_both(item, created ResultBackend) once both of an item exist."""
    jobs: list[tuple[Item, str, dict[str, Any]]] = []
    for it in items:
        rb, dep = item_objects(it, labels)
        jobs += [(it, "rb", rb), (it, "dep", dep)]
    lock = threading.Lock()
    half: dict[Item, dict[str, Any] | None] = {}

    def create(job: tuple[Item, str, dict[str, Any]]) -> None:
        it, kind, body = job
        path = rb_path(it.ns) if kind == "rb" else deploy_path(it.ns)
        created = kube.create(path, body)
        if on_both is None:
            return
        with lock:
            if it not in half:
                half[it] = created if kind == "rb" else None
                return
            rb_obj = created if kind == "rb" else half[it]
        assert rb_obj is not None
        on_both(it, rb_obj)

    run_parallel(create, jobs, threads)


def template_hash(dep: Mapping[str, Any] | None) -> str:
    """The config-hash annotation on a Deployment's pod template ("" if none)."""
    tmpl = (dep or {}).get("spec", {}).get("template", {}).get("metadata", {})
    return str((tmpl.get("annotations") or {}).get(CONFIG_HASH, ""))


@dataclass
class Fleet:
    """One run's Items (ResultBackends half CouchDB, half Consul, each selecting its own
    worker Deployment), their stores reached through counting proxies or directly."""

    kube: Kube
    rid: str
    items: list[Item]
    proxies: dict[str, CountingProxy]
    urls: dict[str, str]

    @property
    def prefix(self) -> str:
        return f"rbo-bench-{self.rid}"

    @property
    def namespaces(self) -> list[str]:
        return namespaces_of(self.items)

    @property
    def selector(self) -> str:
        return f"{RUN_LABEL}={self.rid}"

    def create(self, phase: str, threads: int) -> float:
        """Creates them all with `threads` clients; seconds until every ResultBackend
        is Ready and injected and every Deployment carries the injection."""
        rbs = Tracker(self.kube, RB_PATH_ALL, rb_ready_injected, self.selector).start()
        deps = Tracker(self.kube, DEPLOY_PATH_ALL, deployment_injected, self.selector).start()
        try:
            log(f"creating {len(self.items)} ResultBackends + {len(self.items)} Deployments")
            t0 = time.monotonic()
            labels = {RUN_LABEL: self.rid, PHASE_LABEL: phase}
            apply_items(self.kube, self.items, labels, threads)
            rbs.wait([it.key for it in self.items], 1800 + 3 * len(self.items))
            deps.wait([it.dep_key for it in self.items], 600)
            return time.monotonic() - t0
        finally:
            rbs.stop()
            deps.stop()


@contextlib.contextmanager
def fleet(
    kube: Kube, stores: Stores, op: Operator, side: str, n: int, per_ns: int, proxy: bool = True
) -> Iterator[Fleet]:
    """n Items in namespaces prepared with the admin Secrets (nothing created yet); at
    the end deletes them through `op` (started again if it is not running), stops it,
    and sweeps what the run left in the stores."""
    rid = run_id()
    proxies = store_proxies(stores) if proxy else {}
    urls = {"couchdb": stores.couchdb_url, "consul": stores.consul_url}
    urls.update({k: p.url for k, p in proxies.items()})
    f = Fleet(kube, rid, make_items(n, f"rbo-bench-{rid}", side, per_ns), proxies, urls)
    try:
        log(f"preparing {len(f.namespaces)} namespaces")
        prepare_namespaces(kube, f.namespaces, stores, urls)
        yield f
    finally:
        log("cleaning up: deleting the ResultBackends through the operator")
        if not op.alive():
            op.start()
        t0 = time.monotonic()
        delete_namespaces(kube, f.namespaces, timeout=1800)
        log(f"deleted in {time.monotonic() - t0:.0f} s")
        op.stop()
        wait_namespaces_gone(kube, f.namespaces)
        for p in proxies.values():
            p.stop()
        sweep_stores(stores, f.prefix)


def config_hash_of(data: Mapping[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(data.items())).encode()).hexdigest()[:32]


# --- the machine --------------------------------------------------------------------


def _proc_cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        )
    except OSError:
        return ""


def _machine_jiffies() -> tuple[int, int]:
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


FOREIGN_MARKERS = ("pytest", "resultbackend_operator", "celery", "kopf")


class LoadMonitor:
    """Machine CPU use and foreign test processes while a bench measures."""

    def __init__(self, own_pids: Callable[[], set[int]]) -> None:
        self.own_pids = own_pids
        self.foreign: dict[int, str] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.busy0, self.total0 = _machine_jiffies()
        self.load0 = os.getloadavg()

    def start(self) -> LoadMonitor:
        self.thread.start()
        return self

    def _scan(self) -> None:
        mine = self.own_pids() | own_descendants([os.getpid()])
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in mine or pid in self.foreign:
                continue
            cmd = _proc_cmdline(pid)
            marker = next((m for m in FOREIGN_MARKERS if m in cmd), None)
            if marker is not None and str(ROOT / "bench") not in cmd:
                self.foreign[pid] = marker

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scan()
            self._stop.wait(5)

    def stop(self) -> list[str]:
        self._stop.set()
        busy1, total1 = _machine_jiffies()
        cores = os.cpu_count() or 1
        busy = (busy1 - self.busy0) / max(total1 - self.total0, 1) * cores
        load1 = os.getloadavg()
        kinds = collections.Counter(self.foreign.values())
        foreign = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
        present = bool(self.foreign)
        return [
            f"machine CPU busy (all processes, incl. the bench's): {busy:.2f} of {cores} cores "
            f"on average; loadavg 1m {self.load0[0]:.2f} at start, {load1[0]:.2f} at end",
            f"foreign processes seen (other users' tests, operators, workers): {foreign}",
            f"load from others present: {'YES' if present else 'no'}",
        ]


def own_descendants(root_pids: Iterable[int]) -> set[int]:
    """The given pids and all their descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                children[ppid].append(int(entry.name))
    out: set[int] = set()
    todo = list(root_pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


# --- what was used ------------------------------------------------------------------


def _quiet_get(url: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    try:
        return dict(requests.get(url, headers=headers, timeout=5).json())
    except (requests.RequestException, ValueError):
        return {}


def code_state() -> str:
    """The commit, and whether operator/ differs from it (others may be editing it)."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return res.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    diff = git("diff", "HEAD", "--", "operator")
    if not diff:
        return f"operator code: commit {head}, operator/ unmodified"
    import hashlib

    digest = hashlib.sha256(diff.encode()).hexdigest()[:10]
    return f"operator code: commit {head} + uncommitted changes in operator/ (diff sha256 {digest})"


def versions(kube: Kube, c: Cluster, stores: Stores, celery: bool = False) -> list[str]:
    consul = _quiet_get(
        f"{stores.consul_url}/v1/agent/self", {"X-Consul-Token": stores.consul_token}
    )
    couch = _quiet_get(stores.couchdb_url + "/")
    etcd = _quiet_get(c.etcd_url + "/version")
    rows = [
        f"Kubernetes {kube.version()} (kube-apiserver)",
        f"etcd {etcd.get('etcdserver', '?')}",
        f"Consul {consul.get('Config', {}).get('Version', '?')}",
        f"pouchdb-server {couch.get('version', '?')} (as CouchDB)",
        f"Python {platform.python_version()} ({sys.executable})",
        f"kopf {importlib.metadata.version('kopf')}, "
        f"kubernetes client {importlib.metadata.version('kubernetes')}",
    ]
    if celery:
        res = subprocess.run(
            [
                str(E2E_PYTHON),
                "-c",
                "import celery, kombu; print(celery.__version__, kombu.__version__)",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        cv, _, kv = res.stdout.strip().partition(" ")
        rows.append(f"Celery {cv or '?'}, kombu {kv or '?'} (.venv-e2e)")
    return rows


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def header(
    title: str,
    kube: Kube,
    c: Cluster,
    stores: Stores,
    *,
    operator: Operator | None = None,
    notes: Sequence[str] = (),
    celery: bool = False,
) -> None:
    print(f"\n=== {title} ===")
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), {platform.platform()}")
    for row in versions(kube, c, stores, celery=celery):
        print(f"  {row}")
    print(code_state())
    if operator is not None:
        print(f"operator: {operator.describe()}")
        print(
            f"  as ServiceAccount {SYSTEM_NS}/{OPERATOR_SA}; "
            f"reconcile workers={reconcile_workers()}"
        )
    if c.mode == "own":
        print(
            f"stack: the bench's own devstack instance ({c.kubeconfig.parent}, apiserver "
            f"{kube.server}, Consul {stores.consul_url}, CouchDB {stores.couchdb_url})"
        )
    else:
        print("stack: the shared devstack (others' tests may touch the same servers)")
    for note in notes:
        print(note)
    sys.stdout.flush()


# --- figures ------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def breakdown(counter: Mapping[str, int], limit: int = 20) -> str:
    rows = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return "\n".join(f"    {n:>6}  {what}" for what, n in rows) or "    (none)"


# --- running things in parallel -----------------------------------------------------


def run_parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """fn over items with `workers` threads; the first exception is raised."""
    q: queue.Queue[tuple[int, Any]] = queue.Queue()
    for i, item in enumerate(items):
        q.put((i, item))
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            try:
                i, item = q.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(item)
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def bench_session(title: str) -> Iterator[tuple[Stores, Cluster, Kube]]:
    """The devstack, the CRD, and the bench's client; stops the bench's devstack
    instance if it started it (unless RBO_BENCH_KEEP_STACK is set, as run_all.py does)."""
    started = time.monotonic()
    log(f"{title}: starting (or reusing) the devstack ({stack_mode()})")
    stores, c = devstack()
    kube = Kube(c.kubeconfig)
    install_crd(c)
    try:
        yield stores, c, kube
    finally:
        if c.started_here and not os.environ.get("RBO_BENCH_KEEP_STACK"):
            log("stopping the bench's devstack instance")
            stack_down()
        print(f"wall time of this bench: {time.monotonic() - started:.0f} s")
        sys.stdout.flush()
