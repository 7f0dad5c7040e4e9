"""devstack's node: containerd, the kubelet and kube-scheduler run real pods.

The node's images (a static pause program, a static busybox) are built locally and
imported into its containerd; every registry points at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STACK, Kubectl
from tests.integration.helpers import apply, get_json, wait_for

pytestmark = pytest.mark.integration

NODE = "devstack-node"
BUSYBOX = "localhost/rbo/busybox:1"
BLACKHOLE = "127.0.0.1:1"


def _pod(ns: str, name: str, image: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": image, "command": ["sh", "-c", script]}],
            **spec,
        },
    }


def _phase(kubectl: Kubectl, ns: str, name: str) -> str:
    return str(get_json(kubectl, "pod", name, "-n", ns).get("status", {}).get("phase", ""))


def test_the_node_is_ready(kubectl: Kubectl) -> None:
    node = get_json(kubectl, "node", NODE)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert not addresses["InternalIP"].startswith("127.")
    assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def test_a_pod_runs_its_env_is_resolved_and_its_logs_and_exec_work(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl("create", "secret", "generic", "greeting", "-n", namespace, "--from-literal=word=hi")
    pod = _pod(
        namespace,
        "hello",
        BUSYBOX,
        'echo "says $GREETING from $(cat /etc/hostname)"; exec sleep 3600',
    )
    pod["spec"]["containers"][0]["env"] = [
        {"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "greeting", "key": "word"}}}
    ]
    apply(kubectl, pod)
    wait_for("pod/hello Running", lambda: _phase(kubectl, namespace, "hello") == "Running", 90)
    status = get_json(kubectl, "pod", "hello", "-n", namespace)["status"]
    assert status["hostIP"] == get_json(kubectl, "node", NODE)["status"]["addresses"][0]["address"]
    logs = wait_for(
        "the pod's logs",
        lambda: kubectl("logs", "hello", "-n", namespace).stdout.strip() or None,
        timeout=30,
    )
    assert logs == "says hi from hello"
    assert kubectl("exec", "hello", "-n", namespace, "--", "echo", "in", "pod").stdout == "in pod\n"


def test_a_pod_on_the_bridge_gets_an_address_of_the_pod_subnet(
    kubectl: Kubectl, namespace: str
) -> None:
    apply(kubectl, _pod(namespace, "bridged", BUSYBOX, "exec sleep 3600"))
    wait_for("pod/bridged Running", lambda: _phase(kubectl, namespace, "bridged") == "Running", 90)
    status = get_json(kubectl, "pod", "bridged", "-n", namespace)["status"]
    assert status["podIP"].startswith("10.244.")
    out = kubectl("exec", "bridged", "-n", namespace, "--", "ip", "-o", "-4", "addr").stdout
    assert status["podIP"] in out


def test_a_deployment_rolls_out_real_pods(kubectl: Kubectl, namespace: str) -> None:
    apply(
        kubectl,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {"name": "web", "image": BUSYBOX, "command": ["sleep", "3600"]}
                        ],
                    },
                },
            },
        },
    )
    kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=90s")
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", "app=web")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running", "Running"]


@pytest.mark.parametrize(
    "image", ["docker.io/library/busybox:1.36", "registry.example.com/team/app:1"]
)
def test_no_image_pull_leaves_the_machine(kubectl: Kubectl, namespace: str, image: str) -> None:
    """A pod whose image is not local: containerd's only registry endpoint is a closed
    port on 127.0.0.1, for the named registries and for any other (`_default`)."""
    apply(kubectl, _pod(namespace, "remote", image, "true"))

    def pull_error() -> str | None:
        pod = get_json(kubectl, "pod", "remote", "-n", namespace)
        for cs in pod.get("status", {}).get("containerStatuses", []):
            waiting = cs.get("state", {}).get("waiting", {})
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff") and waiting.get(
                "message"
            ):
                return str(waiting["message"])
        return None

    message = wait_for(f"the pull of {image} to fail", pull_error, timeout=90)
    assert BLACKHOLE in message, message


def test_containerd_sends_every_registry_to_loopback(stack_env: dict[str, str]) -> None:
    certs = Path(stack_env["RBO_DEVSTACK_DIR"]) / "node" / "containerd" / "certs.d"
    hosts = {d.name: tomllib.loads((d / "hosts.toml").read_text()) for d in certs.iterdir()}
    assert "_default" in hosts
    for registry, config in hosts.items():
        assert config["server"] == f"http://{BLACKHOLE}", registry
        assert list(config["host"]) == [f"http://{BLACKHOLE}"], registry
    config = (certs.parent / "config.toml").read_text()
    assert f'config_path = "{certs}"' in config
    assert "restrict_oom_score_adj = true" in config
    # containerd read every one of them (it falls back to the real registry on a bad one).
    log = (Path(stack_env["RBO_DEVSTACK_DIR"]) / "logs" / "containerd.log").read_text()
    assert "failed to decode hosts.toml" not in log.split("starting containerd")[-1]


def test_the_kubelet_refuses_anonymous_requests(kubectl: Kubectl) -> None:
    import requests
    import urllib3

    node = get_json(kubectl, "node", NODE)
    ip = node["status"]["addresses"][0]["address"]
    port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
    urllib3.disable_warnings()
    res = requests.get(f"https://{ip}:{port}/pods", verify=False, timeout=10)  # noqa: S501
    assert res.status_code == 401
    # The apiserver, with its client certificate, is let in (and verified the kubelet's).
    raw = kubectl("get", "--raw", f"/api/v1/nodes/{NODE}/proxy/healthz").stdout
    assert raw == "ok"
    pods = json.loads(kubectl("get", "--raw", f"/api/v1/nodes/{NODE}/proxy/pods").stdout)
    assert pods["kind"] == "PodList"


def _sysctl(key: str) -> str:
    return (Path("/proc/sys") / key).read_text().strip()


def _node_processes(node_dir: Path) -> list[str]:
    """Processes whose command line names the node's folder (containerd, its shims,
    the kubelet), and the containers' own, found by their cgroup."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue
        if str(node_dir) in cmdline or f"/{os.environ['DEVSTACK_NODE_CGROUP']}/" in cgroups:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_stopping_the_node_leaves_nothing_behind(
    stack_env: dict[str, str], kubectl: Kubectl, namespace: str
) -> None:
    """`devstack/stack stop` of the node (as `down` does it) with a pod running: no
    process, mount, cgroup, bridge or changed sysctl is left. Then the node starts again."""
    state = Path(stack_env["RBO_DEVSTACK_DIR"]).resolve()
    node_dir = state / "node"
    apply(kubectl, _pod(namespace, "left", BUSYBOX, "exec sleep 3600"))
    wait_for("pod/left Running", lambda: _phase(kubectl, namespace, "left") == "Running", 90)
    before = json.loads((node_dir / "host-before.json").read_text())
    assert _node_processes(node_dir)
    assert any(
        str(node_dir) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    cgroup = os.environ["DEVSTACK_NODE_CGROUP"]
    bridge = os.environ["DEVSTACK_NODE_BRIDGE"]
    assert Path(f"/sys/class/net/{bridge}").exists()
    try:
        res = subprocess.run(
            [str(STACK), "stop", "kube-scheduler", "kubelet", "containerd"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert _node_processes(node_dir) == []
        mounts = [
            line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(node_dir) in line
        ]  # fmt: skip
        assert mounts == []
        cgroups = [
            str(h / cgroup) for h in Path("/sys/fs/cgroup").iterdir() if (h / cgroup).exists()
        ]
        assert cgroups == []
        assert not Path(f"/sys/class/net/{bridge}").exists()
        for key, value in before["sysctls"].items():
            assert _sysctl(key) == value, key
        for folder, existed in before["dirs"].items():
            assert Path(folder).exists() == existed, folder
        # The kubelet is told to make no iptables chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY,
        # KUBE-IPTABLES-HINT), and the bridge masquerades nothing: none is there.
        config = json.loads((node_dir / "kubelet-config.json").read_text())
        assert config["makeIPTablesUtilChains"] is False
        for save in ("iptables-save", "ip6tables-save"):
            if shutil.which(save):
                rules = subprocess.run([save], capture_output=True, text=True, check=True).stdout
                assert "KUBE-" not in rules, save
                assert "CNI-" not in rules, save
    finally:
        res = subprocess.run(
            [str(STACK), "start", "containerd", "kubelet", "kube-scheduler"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, res.stderr
