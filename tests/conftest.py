"""Shared fixtures: the real devstack and clients for its servers.

Integration and e2e tests get their servers from `devstack/stack`: the session
starts it (or reuses what is already running) and reads `devstack/stack env`.
With RBO_STACK=external the servers named by the environment variables are used
as they are (KUBECONFIG, CONSUL_HTTP_ADDR, CONSUL_MANAGEMENT_TOKEN, COUCHDB_URL,
COUCHDB_ADMIN_USER, COUCHDB_ADMIN_PASSWORD). A server that cannot be reached
fails the test; nothing here skips.

The `operator` fixture runs the operator authenticated as the Helm chart's
ServiceAccount, not as the admin: the chart is rendered with `helm template`
(default values: every namespace), its ServiceAccount, ClusterRoles and
ClusterRoleBindings are applied into OPERATOR_NAMESPACE, a token comes from the
TokenRequest API, and the operator gets a kubeconfig with that token. So every
scenario also proves the chart's RBAC is enough, and the apiserver's audit log
records exactly what the operator did under it (`devstack/rbac-audit` compares
the two; `make integration` runs it). RBO_OPERATOR_RELEASE names the release
(default "rbo"; one of another name is deleted after the session).
RBO_OPERATOR_AUTH=admin runs the operator with the admin kubeconfig instead (to
tell an RBAC gap from a bug). The tests themselves always use the admin identity.
A module that runs operators of its own (tests/integration/isolated.py) requests
`session_operator_stopped` instead, so that the session's is not running meanwhile.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from resultbackend_operator.memory import RUNTIME_ENV

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "devstack" / "stack"


def _parse_exports(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        key, _, value = line[len("export ") :].partition("=")
        parts = shlex.split(value)
        env[key] = os.path.expandvars(parts[0]) if parts else ""
    return env


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """Environment of the running devstack; starts it when needed."""
    if os.environ.get("RBO_STACK") == "external":
        yield dict(os.environ)
        return
    up = subprocess.run([str(STACK), "up"], capture_output=True, text=True, check=False)
    if up.returncode != 0:
        pytest.fail(f"devstack/stack up failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
    out = subprocess.run([str(STACK), "env"], capture_output=True, text=True, check=True).stdout
    env = _parse_exports(out)
    os.environ.update(env)
    yield env


@dataclass(frozen=True)
class CouchDBServer:
    url: str
    admin_user: str
    admin_password: str


@dataclass(frozen=True)
class ConsulServer:
    url: str
    management_token: str


def _need(env: dict[str, str], key: str) -> str:
    value = env.get(key)
    if not value:
        pytest.fail(f"{key} is not set by the devstack environment", pytrace=False)
    return value


@pytest.fixture(scope="session")
def couchdb_server(stack_env: dict[str, str]) -> CouchDBServer:
    return CouchDBServer(
        url=_need(stack_env, "COUCHDB_URL"),
        admin_user=_need(stack_env, "COUCHDB_ADMIN_USER"),
        admin_password=_need(stack_env, "COUCHDB_ADMIN_PASSWORD"),
    )


@pytest.fixture(scope="session")
def consul_server(stack_env: dict[str, str]) -> ConsulServer:
    addr = _need(stack_env, "CONSUL_HTTP_ADDR")
    if not addr.startswith("http"):
        addr = f"http://{addr}"
    return ConsulServer(url=addr, management_token=_need(stack_env, "CONSUL_MANAGEMENT_TOKEN"))


# --- Kubernetes ---------------------------------------------------------------------


def kubectl_path(env: dict[str, str]) -> str:
    """The devstack's kubectl (the version of the apiserver), else the one on PATH."""
    for d in env.get("PATH", "").split(":"):
        candidate = Path(d) / "kubectl"
        if "resultbackend-operator" in d and candidate.is_file():
            return str(candidate)
    return "kubectl"


@dataclass(frozen=True)
class Kubectl:
    env: dict[str, str]
    binary: str

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [self.binary, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res

    def popen(self, *args: str, stdout: IO[bytes]) -> subprocess.Popen[bytes]:
        """kubectl in the background (`logs -f`, a long `exec`), stderr with stdout."""
        return subprocess.Popen(
            [self.binary, *args],
            env={**os.environ, **self.env},
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="session")
def kubectl(stack_env: dict[str, str]) -> Kubectl:
    return Kubectl(env=stack_env, binary=kubectl_path(stack_env))


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/resultbackends.resultstores.io",
        "crd/resultstores.resultstores.io",
        "crd/clusterresultstores.resultstores.io",
    )
    # Discovery (and so `kubectl explain`, short names) may lag Established a moment.
    deadline = time.monotonic() + 60
    for kind in ("rb", "rstore", "crstore"):
        while kubectl("explain", f"{kind}.spec", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{kind} never reached discovery"
            kubectl("api-resources", "--api-group=resultstores.io", check=False)
            time.sleep(0.5)


@pytest.fixture(scope="session")
def k8s(stack_env: dict[str, str]) -> Any:
    """A kubernetes ApiClient for the devstack (the admin identity)."""
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=stack_env["KUBECONFIG"])


# --- the devstack's tools and the Helm chart -----------------------------------------

CHART = ROOT / "helm" / "resultbackend-operator"
CACHE_BIN = (
    Path(
        os.environ.get(
            "RBO_CACHE_DIR",
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
            / "resultbackend-operator",
        )
    )
    / "bin"
)


def pinned(name: str) -> str:
    """A version from devstack/versions.env."""
    for line in (ROOT / "devstack" / "versions.env").read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key == name:
            return value
    raise AssertionError(f"{name} missing from devstack/versions.env")


K8S_VERSION = pinned("KUBERNETES_VERSION").lstrip("v")


def devstack_tool(stack_env: dict[str, str], name: str, version_key: str) -> str:
    """The devstack's binary: from `devstack/stack env`'s PATH, else its cache path."""
    for d in stack_env.get("PATH", "").split(":"):
        if "resultbackend-operator" in d and (Path(d) / name).is_file():
            return str(Path(d) / name)
    cached = CACHE_BIN / f"{name}-{pinned(version_key)}" / name
    if not cached.is_file():
        pytest.fail(f"{name} not found: run `devstack/stack build`", pytrace=False)
    return str(cached)


Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """`helm(*args, check=True)`: the devstack's pinned Helm with a throwaway home."""
    binary = devstack_tool(stack_env, "helm", "HELM_VERSION")
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        **{k: v for k, v in stack_env.items() if k != "PATH"},
        # Keep Helm's repository config and caches out of the user's home.
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [binary, *args], capture_output=True, text=True, env=env, check=False, timeout=120
        )
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res

    return run


def render(
    helm: Helm, *sets: str, release: str = "rbo", namespace: str = "ops", crds: bool = True
) -> str:
    """`helm template` of the chart for the pinned Kubernetes version."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    args += ["--kube-version", K8S_VERSION]
    if crds:
        args.append("--include-crds")
    for s in sets:
        args += ["--set", s]
    out: str = helm(*args).stdout
    return out


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- the operator -------------------------------------------------------------------


class OperatorProcess:
    """The operator as a user runs it: `python -m resultbackend_operator`, logs captured."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        extra_env: dict[str, str],
        args: Sequence[str] = ("--all-namespaces",),
    ) -> None:
        # extra_env last: it carries KUBECONFIG when the operator runs as the chart's SA.
        self.env = {**os.environ, **env, **extra_env}
        self.log_path = log_path
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resultbackend_operator", *self.args, "--verbose"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.proc is not None, "the operator was never started"
        assert self.proc.poll() is None, f"the operator exited:\n{self.logs[-4000:]}"


# Short periods so the tests see periodic checks and retries within seconds.
OPERATOR_TEST_ENV = {
    **RUNTIME_ENV,  # Python's allocator as the image sets it
    "RBO_CHECK_INTERVAL": "3",
    # Every other tick tries the worker credentials, the others only probe the server.
    "RBO_CREDENTIAL_CHECK_INTERVAL": "6",
    "RBO_BACKOFF": "1",
    "RBO_MAX_BACKOFF": "5",
    "RBO_ROTATION_GRACE": "10",
    # A standby takes over 15 s after the active replica's last keep-alive, not 60.
    "RBO_PEERING_LIFETIME": "15",
    # ClusterResultStores' admin Secrets live where the chart would install the operator.
    "RBO_CLUSTER_RESOURCE_NAMESPACE": "resultbackend-system",
}


def free_port() -> str:
    """A TCP port nothing listens on right now (the operator's metrics port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


# The operator's identity in the tests: the chart's ServiceAccount of release
# OPERATOR_RELEASE in OPERATOR_NAMESPACE (devstack/rbac-audit has the same defaults).
# `make integration` sets a release of its own, so that the audit counts only its run
# (the default identity may be shared by concurrent sessions, so it is never deleted).
DEFAULT_OPERATOR_RELEASE = "rbo"
OPERATOR_RELEASE = os.environ.get("RBO_OPERATOR_RELEASE", DEFAULT_OPERATOR_RELEASE)
OPERATOR_NAMESPACE = "resultbackend-system"
OPERATOR_TOKEN_DURATION = "12h"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")


def _request_token(kubectl: Kubectl, namespace: str, service_account: str) -> str:
    """A token from the TokenRequest API. Its value is never put in a message."""
    res = subprocess.run(
        [
            kubectl.binary,
            "create",
            "token",
            service_account,
            "--namespace",
            namespace,
            "--duration",
            OPERATOR_TOKEN_DURATION,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **kubectl.env},
        check=False,
    )
    token = res.stdout.strip()
    if res.returncode != 0 or not token:
        raise AssertionError(
            f"kubectl create token {namespace}/{service_account} failed: {res.stderr.strip()}"
        )
    return token


def write_token_kubeconfig(
    kubectl: Kubectl, namespace: str, service_account: str, path: Path
) -> None:
    """A kubeconfig at `path` (mode 0600): the admin's cluster, a token of the ServiceAccount."""
    token = _request_token(kubectl, namespace, service_account)
    # The admin kubeconfig's current cluster (server, CA inline), our token as the user.
    admin = json.loads(kubectl("config", "view", "--minify", "--flatten", "-o", "json").stdout)
    cluster = admin["clusters"][0]
    user = f"system:serviceaccount:{namespace}:{service_account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": user}}],
        "current-context": "operator",
    }
    path.touch(mode=0o600)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="session")
def operator_kubeconfig(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    helm: Helm,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """KUBECONFIG for the operator: the chart's ServiceAccount (or the admin's, see above)."""
    if os.environ.get("RBO_OPERATOR_AUTH", "serviceaccount") == "admin":
        yield stack_env["KUBECONFIG"]
        return
    objs = [
        o
        for o in docs(render(helm, release=OPERATOR_RELEASE, namespace=OPERATOR_NAMESPACE))
        if o["kind"] in RBAC_KINDS
    ]
    # The operator's two ClusterRoles and bindings, and the three aggregated roles
    # (view, edit, admin) that the tests of who may do what rely on.
    assert sorted(o["kind"] for o in objs) == sorted(
        ["ServiceAccount", *["ClusterRole"] * 5, "ClusterRoleBinding", "ClusterRoleBinding"]
    ), [f"{o['kind']}/{o['metadata']['name']}" for o in objs]
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=rbo-tests",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": OPERATOR_NAMESPACE},
                    },
                    *objs,
                ],
            }
        ),
    )
    (sa,) = (o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount")
    path = tmp_path_factory.mktemp("operator-auth") / "kubeconfig"
    write_token_kubeconfig(kubectl, OPERATOR_NAMESPACE, sa, path)
    # No `kubectl auth whoami` here: requests with this token are what the audit of the
    # operator's RBAC counts. The operator's first list proves the token works.
    yield str(path)
    if OPERATOR_RELEASE != DEFAULT_OPERATOR_RELEASE:
        kubectl(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
            check=False,
        )


# The session's operator once a test asked for it. It watches every namespace: a module
# that runs operators of its own (other settings, peering) stops it meanwhile.
_SESSION_OPERATORS: list[OperatorProcess] = []


@pytest.fixture(scope="session")
def operator(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    crd: None,
    operator_kubeconfig: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        stack_env,
        tmp_path_factory.mktemp("operator") / "operator.log",
        {**OPERATOR_TEST_ENV, "KUBECONFIG": operator_kubeconfig, "RBO_METRICS_PORT": free_port()},
    )
    op.start()
    _SESSION_OPERATORS.append(op)
    yield op
    _let_deletions_finish(kubectl)
    op.stop()
    _SESSION_OPERATORS.remove(op)


@pytest.fixture(scope="module")
def session_operator_stopped() -> Iterator[None]:
    """No session operator runs during this module's tests; one that ran is started after.

    Requesting this never starts one (unlike requesting `operator`)."""
    stopped = [op for op in _SESSION_OPERATORS if op.running]
    for op in stopped:
        op.stop()
    yield
    for op in stopped:
        op.start()


def _let_deletions_finish(kubectl: Kubectl, timeout: float = 90.0) -> None:
    """Keep the operator until the test namespaces deleted last have let go.

    Their ResultBackends carry its finalizer: stopped first, it would leave them
    (and their namespaces) Terminating until the next session's operator resumes.
    Bounded, and not an assertion: a test that wants a deletion checks it itself.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = kubectl("get", "rb", "-A", "-o", "json", check=False)
        if listed.returncode != 0:
            return
        items = json.loads(listed.stdout or "{}").get("items", [])
        if not any(i["metadata"].get("deletionTimestamp") for i in items):
            return
        time.sleep(1)


# --- every test of a folder carries the folder's marker -----------------------------

_FOLDER_MARKS = {"integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make integration` selects with `-m integration`: a module that forgot its
    `pytestmark` would otherwise be deselected without a word."""
    for item in items:
        parts = item.path.parts
        for folder, mark in _FOLDER_MARKS.items():
            if "tests" in parts and folder in parts[parts.index("tests") :]:
                item.add_marker(mark)


# --- no silent skips ----------------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and ("integration" in report.nodeid or "e2e" in report.nodeid):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("RBO_FORBID_SKIPS") and _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nRBO_FORBID_SKIPS: {len(_skipped)} integration/e2e test(s) skipped: {_skipped}")
