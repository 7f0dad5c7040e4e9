"""Shared fixtures: the real devstack and clients for its servers.

Integration and e2e tests get their servers from `devstack/stack`: the session
starts it (or reuses what is already running) and reads `devstack/stack env`.
With RBO_STACK=external the servers named by the environment variables are used
as they are (KUBECONFIG, CONSUL_HTTP_ADDR, CONSUL_MANAGEMENT_TOKEN, COUCHDB_URL,
COUCHDB_ADMIN_USER, COUCHDB_ADMIN_PASSWORD). A server that cannot be reached
fails the test; nothing here skips.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
    )
    # Discovery (and so `kubectl explain`, short names) may lag Established a moment.
    deadline = time.monotonic() + 60
    while kubectl("explain", "rb.spec", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the ResultBackend kind never reached discovery"
        kubectl("api-resources", "--api-group=resultstores.io", check=False)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def k8s(stack_env: dict[str, str]) -> Any:
    """A kubernetes ApiClient for the devstack (the admin identity)."""
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=stack_env["KUBECONFIG"])


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- the operator -------------------------------------------------------------------


class OperatorProcess:
    """The operator as a user runs it: `python -m resultbackend_operator`, logs captured."""

    def __init__(self, env: dict[str, str], log_path: Path, extra_env: dict[str, str]) -> None:
        self.env = {**os.environ, **env, **extra_env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resultbackend_operator", "--all-namespaces", "--verbose"],
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
    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.proc is not None, "the operator was never started"
        assert self.proc.poll() is None, f"the operator exited:\n{self.logs[-4000:]}"


# Short periods so the tests see periodic checks and retries within seconds.
OPERATOR_TEST_ENV = {"RBO_CHECK_INTERVAL": "3", "RBO_BACKOFF": "1", "RBO_MAX_BACKOFF": "5"}


@pytest.fixture(scope="session")
def operator(
    stack_env: dict[str, str], crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        stack_env, tmp_path_factory.mktemp("operator") / "operator.log", OPERATOR_TEST_ENV
    )
    op.start()
    yield op
    op.stop()


# --- no silent skips ----------------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and ("integration" in report.nodeid or "e2e" in report.nodeid):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("RBO_FORBID_SKIPS") and _skipped and exitstatus == 0:
        session.exitstatus = 1
        print(f"\nRBO_FORBID_SKIPS: {len(_skipped)} integration/e2e test(s) skipped: {_skipped}")
