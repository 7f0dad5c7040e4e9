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
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
        env[key] = parts[0] if parts else ""
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
