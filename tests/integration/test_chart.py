"""The Helm chart against real tools and the real apiserver of the devstack.

- `helm lint --strict`;
- `helm template` for the main value combinations, each rendering checked by
  `kubeconform -strict` with JSON schemas generated locally from the running
  apiserver's /openapi/v2 (our pinned Kubernetes version) and from the chart's CRDs;
- `helm install` and `helm uninstall` into fresh namespaces: the objects exist, the
  RBAC rules grant what they should (and not more), uninstall leaves no RBAC behind.

The pods never start (the devstack has no kubelet); the operator's behaviour under
this RBAC is the e2e tests' business.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import (
    CHART,
    K8S_VERSION,
    Helm,
    Kubectl,
    devstack_tool,
    docs,
    render,
)

from . import kubeconform_schemas

pytestmark = pytest.mark.integration

ROOT = CHART.parents[1]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


# The combinations the chart promises to render correctly.
COMBINATIONS = {
    "cluster-wide": [],
    "namespaced": ["watch.scope=namespaces", "watch.namespaces={a,b}"],
    "peering": ["peering.enabled=true", "replicas=2"],
    "namespaced-peering": [
        "watch.scope=namespaces",
        "watch.namespaces={a,b}",
        "peering.enabled=true",
        "replicas=2",
    ],
    "metrics": ["metrics.enabled=true", "metrics.port=9191", "verbose=true"],
    "existing-sa": ["serviceAccount.create=false", "serviceAccount.name=ops-operator"],
}


def test_helm_lint(helm: Helm) -> None:
    res = helm("lint", "--strict", str(CHART), "--kube-version", K8S_VERSION)
    assert "0 chart(s) failed" in res.stdout
    for sets in COMBINATIONS.values():
        args = ["lint", "--strict", str(CHART), "--kube-version", K8S_VERSION]
        for s in sets:
            args += ["--set", s]
        helm(*args)


# --- kubeconform -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubeconform(stack_env: dict[str, str], kubectl: Kubectl, tmp_path_factory: Any) -> Any:
    """kubeconform -strict with schemas of the running apiserver and of our CRDs."""
    version = json.loads(kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert version.lstrip("v") == K8S_VERSION, "the devstack apiserver is not the pinned version"
    root = tmp_path_factory.mktemp("kubeconform-schemas")
    out = kubeconform_schemas.schema_dir(root, K8S_VERSION)
    swagger = json.loads(kubectl("get", "--raw", "/openapi/v2").stdout)
    builtin = kubeconform_schemas.from_openapi_v2(swagger, out)
    assert "deployment-apps-v1.json" in builtin
    crds = [d for p in sorted((CHART / "crds").glob("*.yaml")) for d in docs(p.read_text())]
    kubeconform_schemas.from_crds(crds, out)
    binary = devstack_tool(stack_env, "kubeconform", "KUBECONFORM_VERSION")
    workdir = tmp_path_factory.mktemp("kubeconform-input")

    def run(text: str) -> subprocess.CompletedProcess[str]:
        manifest = workdir / f"{uuid.uuid4().hex}.yaml"
        manifest.write_text(text)
        return subprocess.run(
            [
                binary,
                "-strict",
                "-summary",
                "-kubernetes-version",
                K8S_VERSION,
                "-schema-location",
                str(root),
                str(manifest),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    return run


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_rendered_manifests_are_valid(helm: Helm, kubeconform: Any, combo: str) -> None:
    text = render(helm, *COMBINATIONS[combo])
    res = kubeconform(text)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    # Every object had a schema: none was skipped, so none went unchecked.
    assert "Skipped: 0" in res.stdout, res.stdout
    assert "Invalid: 0" in res.stdout, res.stdout


def test_kubeconform_rejects_unknown_fields(helm: Helm, kubeconform: Any) -> None:
    """The generated schemas are strict: a misspelt field fails, so a pass means something."""
    text = render(helm).replace("readOnlyRootFilesystem:", "readOnlyRootFilesytem:")
    res = kubeconform(text)
    assert res.returncode != 0
    assert "readOnlyRootFilesytem" in res.stdout


def test_examples_are_valid(kubeconform: Any) -> None:
    text = "\n---\n".join(p.read_text() for p in sorted((ROOT / "examples").glob("*.yaml")))
    res = kubeconform(text)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "Skipped: 0" in res.stdout, res.stdout


# --- what the renderings contain ---------------------------------------------------


def _rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for o in objs if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_no_broad_rbac(helm: Helm, combo: str) -> None:
    for rule in _rules(docs(render(helm, *COMBINATIONS[combo]))):
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), rule
        assert not {"pods/exec", "pods", "nodes"} & set(rule["resources"]), rule
        assert "nonResourceURLs" not in rule


def test_cluster_wide_uses_cluster_roles_only(helm: Helm) -> None:
    objs = docs(render(helm))
    assert not by_kind(objs, "Role")
    assert not by_kind(objs, "RoleBinding")
    names = {o["metadata"]["name"] for o in by_kind(objs, "ClusterRole")}
    assert names == {
        "rbo-resultbackend-operator-framework",
        "rbo-resultbackend-operator-application",
    }
    (deploy,) = by_kind(objs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not by_kind(objs, "ClusterKopfPeering")
    assert not by_kind(objs, "Service")
    resources = {res for r in _rules(objs) for res in r["resources"]}
    assert "clusterkopfpeerings" not in resources
    # Kopf serves every namespace without listing or watching them; the operator only
    # reads one (is it terminating?).
    ns_verbs = {v for r in _rules(objs) if "namespaces" in r["resources"] for v in r["verbs"]}
    assert ns_verbs <= {"get"}


def test_namespaced_uses_roles_in_each_namespace(helm: Helm) -> None:
    objs = docs(render(helm, *COMBINATIONS["namespaced"]))
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in by_kind(objs, "Role")}
    assert roles == {
        (ns, f"rbo-resultbackend-operator-{part}")
        for ns in ("a", "b")
        for part in ("framework", "application")
    }
    bindings = by_kind(objs, "RoleBinding")
    assert len(bindings) == 4
    for b in bindings:
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "rbo-resultbackend-operator", "namespace": "ops"}
        ]
    (cluster_role,) = by_kind(objs, "ClusterRole")
    assert {res for r in cluster_role["rules"] for res in r["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    assert all(r["verbs"] == ["list", "watch"] for r in cluster_role["rules"])
    (deploy,) = by_kind(objs, "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=a", "--namespace=b"]
    assert "--all-namespaces" not in args


@pytest.mark.parametrize("combo", ["peering", "namespaced-peering"])
def test_peering(helm: Helm, combo: str) -> None:
    objs = docs(render(helm, *COMBINATIONS[combo]))
    (deploy,) = by_kind(objs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--peering=rbo-resultbackend-operator" in container["args"]
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in (
        container["env"]
    )
    crd_names = {o["metadata"]["name"] for o in by_kind(objs, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crd_names
    peering_rules = [r for r in _rules(objs) if r["apiGroups"] == ["kopf.dev"]]
    assert peering_rules
    for rule in peering_rules:
        assert rule["verbs"] == ["get", "list", "watch", "patch"]
    if combo == "peering":
        assert [o["metadata"]["name"] for o in by_kind(objs, "ClusterKopfPeering")] == [
            "rbo-resultbackend-operator"
        ]
    else:
        peerings = by_kind(objs, "KopfPeering")
        assert sorted(o["metadata"]["namespace"] for o in peerings) == ["a", "b"]


def test_replicas_without_peering_is_refused(helm: Helm) -> None:
    res = helm(
        "template",
        "rbo",
        str(CHART),
        "--kube-version",
        K8S_VERSION,
        "--set",
        "replicas=2",
        check=False,
    )
    assert res.returncode != 0
    assert "peering" in res.stderr


def test_metrics(helm: Helm) -> None:
    objs = docs(render(helm, *COMBINATIONS["metrics"]))
    (svc,) = by_kind(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    container = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "RBO_METRICS_PORT", "value": "9191"} in container["env"]
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in container["ports"]
    assert "--verbose" in container["args"]


def test_pod_security(helm: Helm) -> None:
    (deploy,) = by_kind(docs(render(helm)), "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "96Mi"},
        "limits": {"cpu": "500m", "memory": "512Mi"},
    }
    assert {"name": "RBO_CHECK_INTERVAL", "value": "60"} in container["env"]
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]


# --- install / uninstall against the apiserver -----------------------------------


@pytest.fixture
def fresh_namespaces(kubectl: Kubectl) -> Iterator[list[str]]:
    """Three new namespaces: the release's and two to watch."""
    names = [f"t-chart-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    for ns in names:
        kubectl("create", "namespace", ns)
    yield names
    for ns in names:
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _labelled(kubectl: Kubectl, kinds: str, release: str, *scope: str) -> list[str]:
    out = kubectl(
        "get", kinds, *scope, "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
    ).stdout
    return out.split()


def _can(kubectl: Kubectl, sa: str, *args: str) -> bool:
    res = kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
    return res.stdout.strip() == "yes"


@pytest.mark.parametrize("mode", ["cluster", "namespaces"])
def test_install_and_uninstall(
    helm: Helm, kubectl: Kubectl, fresh_namespaces: list[str], mode: str
) -> None:
    release_ns, ns_a, ns_b = fresh_namespaces
    release = f"rbo-{uuid.uuid4().hex[:6]}"
    sets = ["peering.enabled=true", "replicas=2", "metrics.enabled=true"]
    if mode == "namespaces":
        sets += ["watch.scope=namespaces", f"watch.namespaces={{{ns_a},{ns_b}}}"]
    args = ["install", release, str(CHART), "--namespace", release_ns, "--timeout", "90s"]
    for s in sets:
        args += ["--set", s]
    fullname = f"{release}-resultbackend-operator"
    sa = f"system:serviceaccount:{release_ns}:{fullname}"
    try:
        notes = helm(*args).stdout
        assert "kubectl get rb" in notes

        for crd in ("resultbackends.resultstores.io", "kopfpeerings.kopf.dev"):
            kubectl("get", "crd", crd)
        kubectl("-n", release_ns, "get", "deployment", fullname)
        kubectl("-n", release_ns, "get", "serviceaccount", fullname)
        kubectl("-n", release_ns, "get", "service", f"{fullname}-metrics")
        cluster_rbac = _labelled(kubectl, "clusterrole,clusterrolebinding", release)
        if mode == "cluster":
            assert len(cluster_rbac) == 4, cluster_rbac
            kubectl("get", "clusterkopfpeering", fullname)
        else:
            assert len(cluster_rbac) == 2, cluster_rbac
            for ns in (ns_a, ns_b):
                assert len(_labelled(kubectl, "role,rolebinding", release, "-n", ns)) == 4
                kubectl("-n", ns, "get", "kopfpeering", fullname)

        # The bindings work: the ServiceAccount may do what the operator needs where it
        # watches, and nothing it does not need.
        assert _can(kubectl, sa, "patch", "resultbackends.resultstores.io", "-n", ns_a)
        assert _can(kubectl, sa, "patch", "resultbackends.resultstores.io/status", "-n", ns_a)
        assert _can(kubectl, sa, "get", "secrets", "-n", ns_a)
        assert _can(kubectl, sa, "create", "secrets", "-n", ns_b)
        assert _can(kubectl, sa, "patch", "deployments.apps", "-n", ns_b)
        assert _can(kubectl, sa, "watch", "statefulsets.apps", "-n", ns_b)
        assert _can(kubectl, sa, "create", "events", "-n", ns_a)
        assert _can(kubectl, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        # Watched, for the operator's own worker Secrets (by label; rbac-audit checks
        # every list and watch it sends carries that selector).
        assert _can(kubectl, sa, "watch", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "delete", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "update", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "create", "pods/exec", "-n", ns_a)
        assert not _can(kubectl, sa, "get", "nodes")
        assert not _can(kubectl, sa, "delete", "resultbackends.resultstores.io", "-n", ns_a)
        if mode == "namespaces":
            assert not _can(kubectl, sa, "get", "secrets", "-n", release_ns)
            assert not _can(kubectl, sa, "get", "secrets", "-n", "default")
            assert _can(kubectl, sa, "patch", "kopfpeerings.kopf.dev", "-n", ns_a)
            assert _can(kubectl, sa, "watch", "namespaces")
        else:
            assert _can(kubectl, sa, "get", "secrets", "-n", "default")
            assert _can(kubectl, sa, "patch", "clusterkopfpeerings.kopf.dev")
            assert not _can(kubectl, sa, "watch", "namespaces")

        helm("uninstall", release, "--namespace", release_ns, "--wait", "--timeout", "90s")
        assert _labelled(kubectl, "clusterrole,clusterrolebinding", release) == []
        for ns in (release_ns, ns_a, ns_b):
            assert _labelled(kubectl, "role,rolebinding,serviceaccount", release, "-n", ns) == []
        left = kubectl("-n", release_ns, "get", "serviceaccount", fullname, check=False)
        assert left.returncode != 0
        # CRDs stay: deleting them would delete every ResultBackend.
        kubectl("get", "crd", "resultbackends.resultstores.io")
    finally:
        helm("uninstall", release, "--namespace", release_ns, "--ignore-not-found", check=False)
