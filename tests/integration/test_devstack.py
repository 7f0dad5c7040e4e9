"""devstack itself: idempotent up, exact down, one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, STACK

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )


def _pids_of_group(pgid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(proc.name))
    return out


def test_up_twice_starts_nothing_the_second_time(stack_env: dict[str, str]) -> None:
    res = _stack({}, "up")
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 9  # 6 servers, then containerd, kubelet and kube-scheduler
    assert all(line.endswith("already running") for line in lines), res.stderr


def test_down_stops_exactly_what_it_started(stack_env: dict[str, str], tmp_path: Path) -> None:
    # A second, private stack of two services, so the shared one keeps running.
    env = {
        "RBO_DEVSTACK_DIR": str(tmp_path / "stack"),
        "RBO_ETCD_PORT": str(_free_port()),
        "RBO_ETCD_PEER_PORT": str(_free_port()),
        "RBO_COUCHDB_PORT": str(_free_port()),
    }
    res = _stack(env, "start", "etcd", "couchdb")
    assert res.returncode == 0, res.stderr
    pids = {
        name: int((tmp_path / "stack" / "pids" / f"{name}.pid").read_text())
        for name in ("etcd", "couchdb")
    }
    assert all(_pids_of_group(pid) for pid in pids.values())
    assert "running pid" in _stack(env, "status").stdout
    res = _stack(env, "down")
    assert res.returncode == 0, res.stderr
    for pid in pids.values():
        assert _pids_of_group(pid) == []
    assert not list((tmp_path / "stack" / "pids").glob("*.pid"))
    # The shared stack is untouched.
    assert "stopped" not in _stack({}, "status").stdout


def test_busy_port_is_a_one_line_reason(stack_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RBO_DEVSTACK_DIR": str(tmp_path / "stack"), "RBO_REDIS_PORT": str(port)}
        res = _stack(env, "start", "redis")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1
    assert f"port {port} for redis is busy" in res.stderr
    assert "Traceback" not in res.stderr


def test_go_consumer_modules_pin_the_versions_devstack_reports() -> None:
    versions = dict(
        line.split("=", 1)
        for line in (ROOT / "devstack" / "versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    gomods = {
        "KUBERNETES_VERSION": ("kubernetes", "k8s.io/kubernetes "),
        "ETCD_VERSION": ("etcd", "go.etcd.io/etcd/server/v3 "),
        "CONSUL_VERSION": ("consul", "github.com/hashicorp/consul "),
    }
    for key, (module, path) in gomods.items():
        text = (ROOT / "devstack" / "go" / module / "go.mod").read_text()
        assert f"{path}{versions[key]}" in text, f"{module}/go.mod does not pin {versions[key]}"


def test_apiserver_reports_the_real_version(stack_env: dict[str, str]) -> None:
    from tests.conftest import kubectl_path

    out = subprocess.run(
        [kubectl_path(stack_env), "version", "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **stack_env},
        check=True,
    ).stdout
    assert '"gitVersion": "v1.34.4"' in out
