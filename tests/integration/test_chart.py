"""The Helm chart against real tools and the real apiserver of the devstack.

- `helm lint --strict`;
- `helm template` for the main value combinations, each rendering checked by
  `kubeconform -strict` with JSON schemas generated locally from the running
  apiserver's /openapi/v2 (our pinned Kubernetes version) and from the chart's CRDs;
- `helm install` and `helm uninstall` into fresh namespaces: the objects exist, the
  RBAC rules grant what they should (and not more), the aggregated ClusterRoles reach
  the built-in view, edit and admin roles, uninstall leaves no RBAC behind.

Nothing here needs the pods to start (nor the operator's code); the operator's
behaviour under this RBAC is the e2e tests' business.
"""

from __future__ import annotations

import json
import subprocess
import time
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
    "stores": [
        "clusterResourceNamespace=platform",
        "namespacedStores=false",
        "aggregateRoles=false",
    ],
    "namespaced-stores": [
        "watch.scope=namespaces",
        "watch.namespaces={a,b}",
        "clusterResourceNamespace=platform",
    ],
}
OPERATOR_ROLES = {"rbo-resultbackend-operator-framework", "rbo-resultbackend-operator-application"}
AGGREGATED_ROLES = {
    "rbo-resultbackend-operator-view",
    "rbo-resultbackend-operator-edit",
    "rbo-resultbackend-operator-admin",
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


def _aggregated(obj: dict[str, Any]) -> bool:
    labels = obj["metadata"].get("labels", {})
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels)


def _rules(objs: list[dict[str, Any]], people: bool = False) -> list[dict[str, Any]]:
    """The rules of the operator's roles (people=True: of the aggregated roles)."""
    return [
        r
        for o in objs
        if o["kind"] in ("ClusterRole", "Role") and _aggregated(o) is people
        for r in o["rules"]
    ]


def _perms(rules: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(res, verb) for r in rules for res in r["resources"] for verb in r["verbs"]}


def _args(objs: list[dict[str, Any]]) -> list[str]:
    (deploy,) = by_kind(objs, "Deployment")
    args: list[str] = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def _env(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (deploy,) = by_kind(objs, "Deployment")
    env: list[dict[str, Any]] = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_no_broad_rbac(helm: Helm, combo: str) -> None:
    objs = docs(render(helm, *COMBINATIONS[combo]))
    for rule in _rules(objs) + _rules(objs, people=True):
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(field, []), rule
        assert not {"pods/exec", "pods", "nodes"} & set(rule["resources"]), rule
        assert "nonResourceURLs" not in rule
    # The operator deletes nothing through the API, and writes no cluster-scoped object
    # but a ClusterResultStore's finalizer and status (and its peering keep-alive).
    for res, verb in _perms(_rules(objs)):
        assert verb not in ("delete", "deletecollection"), res
        # update: only what the OwnerReferencesPermissionEnforcement plugin checks.
        assert verb != "update" or res == "resultbackends/finalizers", res
    cluster_writes = {
        (res, verb)
        for o in by_kind(objs, "ClusterRole")
        if not _aggregated(o)
        for r in o["rules"]
        for res in r["resources"]
        for verb in r["verbs"]
        if verb not in ("get", "list", "watch")
        and res.split("/")[0] in ("clusterresultstores", "namespaces", "clusterkopfpeerings")
    }
    assert cluster_writes <= {
        ("clusterresultstores", "patch"),
        ("clusterresultstores/status", "patch"),
        ("clusterkopfpeerings", "patch"),
    }


def test_cluster_wide_uses_cluster_roles_only(helm: Helm) -> None:
    objs = docs(render(helm))
    assert not by_kind(objs, "Role")
    assert not by_kind(objs, "RoleBinding")
    names = {o["metadata"]["name"] for o in by_kind(objs, "ClusterRole")}
    assert names == OPERATOR_ROLES | AGGREGATED_ROLES
    bound = {o["roleRef"]["name"] for o in by_kind(objs, "ClusterRoleBinding")}
    assert bound == OPERATOR_ROLES
    assert _args(objs) == [
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        # The release namespace, by default.
        "--cluster-resource-namespace=ops",
    ]
    (deploy,) = by_kind(objs, "Deployment")
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert not by_kind(objs, "ClusterKopfPeering")
    assert not by_kind(objs, "Service")
    perms = _perms(_rules(objs))
    assert not {res for res, _ in perms} & {"clusterkopfpeerings"}
    # Namespaces: read one (is it terminating?), list and watch them for their labels
    # (namespaceSelector).
    assert {v for res, v in perms if res == "namespaces"} == {"get", "list", "watch"}
    # Stores: watched (never read one by one), their finalizer and status patched.
    for kind in ("resultstores", "clusterresultstores"):
        assert {v for res, v in perms if res == kind} == {"list", "watch", "patch"}
        assert {v for res, v in perms if res == f"{kind}/status"} == {"patch"}
    assert {v for res, v in perms if res == "resultbackends"} == {"list", "watch", "patch"}
    # Secrets: as before (worker Secrets, and admin Secrets by name).
    assert {v for res, v in perms if res == "secrets"} == {
        "get",
        "list",
        "watch",
        "create",
        "patch",
    }


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], "ops"),
        (["clusterResourceNamespace=platform"], "platform"),
        (COMBINATIONS["namespaced"], "ops"),
    ],
)
def test_cluster_resource_namespace_is_passed_to_the_operator(
    helm: Helm, sets: list[str], expected: str
) -> None:
    args = _args(docs(render(helm, *sets)))
    assert [a for a in args if a.startswith("--cluster-resource-namespace")] == [
        f"--cluster-resource-namespace={expected}"
    ]


@pytest.mark.parametrize(
    ("sets", "expected"), [([], "true"), (["namespacedStores=false"], "false")]
)
def test_namespaced_stores_is_passed_to_the_operator(
    helm: Helm, sets: list[str], expected: str
) -> None:
    env = _env(docs(render(helm, *sets)))
    assert [e for e in env if e["name"] == "RBO_NAMESPACED_STORES"] == [
        {"name": "RBO_NAMESPACED_STORES", "value": expected}
    ]


def test_aggregated_roles(helm: Helm) -> None:
    """design/api.md: ResultBackend write to edit and admin, ResultStore write to admin
    only, read of all three kinds to view (and edit and admin); ClusterResultStore write
    to nobody."""
    objs = docs(render(helm))
    roles = {o["metadata"]["name"]: o for o in by_kind(objs, "ClusterRole") if _aggregated(o)}
    assert set(roles) == AGGREGATED_ROLES

    def aggregates_to(name: str) -> set[str]:
        labels = roles[name]["metadata"]["labels"]
        prefix = "rbac.authorization.k8s.io/aggregate-to-"
        return {
            k.removeprefix(prefix)
            for k, v in labels.items()
            if k.startswith(prefix) and v == "true"
        }

    write = {"create", "update", "patch", "delete", "deletecollection"}
    read = {"get", "list", "watch"}
    view, edit, admin = (f"rbo-resultbackend-operator-{r}" for r in ("view", "edit", "admin"))
    assert aggregates_to(view) == {"view", "edit", "admin"}
    assert aggregates_to(edit) == {"edit", "admin"}
    assert aggregates_to(admin) == {"admin"}
    assert _perms(roles[view]["rules"]) == {
        (res, v) for res in ("resultbackends", "resultstores", "clusterresultstores") for v in read
    }
    assert _perms(roles[edit]["rules"]) == {("resultbackends", v) for v in read | write}
    assert _perms(roles[admin]["rules"]) == {("resultstores", v) for v in read | write}
    for role in roles.values():
        assert {r["apiGroups"][0] for r in role["rules"]} == {"resultstores.io"}
        # No status: people write specs; the operator writes status.
        assert not any("/" in res for r in role["rules"] for res in r["resources"])
    assert not any(
        _aggregated(o) for o in by_kind(docs(render(helm, "aggregateRoles=false")), "ClusterRole")
    )


@pytest.mark.parametrize("combo", ["namespaced", "namespaced-stores"])
def test_namespaced_uses_roles_in_each_namespace(helm: Helm, combo: str) -> None:
    objs = docs(render(helm, *COMBINATIONS[combo]))
    cluster_resources = "platform" if combo == "namespaced-stores" else "ops"
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
    # Cluster-wide: CRDs and namespaces, read only. ClusterResultStores are served by an
    # operator of watch.scope=cluster only (several namespaced ones would all write them).
    operator_cluster = [o for o in by_kind(objs, "ClusterRole") if not _aggregated(o)]
    assert {o["metadata"]["name"] for o in operator_cluster} == OPERATOR_ROLES
    perms = _perms([r for o in operator_cluster for r in o["rules"]])
    assert perms == {
        ("customresourcedefinitions", "list"),
        ("customresourcedefinitions", "watch"),
        ("namespaces", "list"),
        ("namespaces", "watch"),
    }
    args = _args(objs)
    assert args[:2] == ["--namespace=a", "--namespace=b"]
    assert "--all-namespaces" not in args
    assert f"--cluster-resource-namespace={cluster_resources}" in args


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


# `kubectl auth can-i VERB RESOURCE/x` asks about the object named x, not a subresource.
STATUS = ("--subresource=status",)


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

        for crd in (
            "resultbackends.resultstores.io",
            "resultstores.resultstores.io",
            "clusterresultstores.resultstores.io",
            "kopfpeerings.kopf.dev",
        ):
            kubectl("get", "crd", crd)
        kubectl("-n", release_ns, "get", "deployment", fullname)
        kubectl("-n", release_ns, "get", "serviceaccount", fullname)
        kubectl("-n", release_ns, "get", "service", f"{fullname}-metrics")
        cluster_rbac = _labelled(kubectl, "clusterrole,clusterrolebinding", release)
        # framework and application, each a ClusterRole and its binding; the three
        # aggregated ClusterRoles.
        assert len(cluster_rbac) == 7, cluster_rbac
        if mode == "cluster":
            kubectl("get", "clusterkopfpeering", fullname)
        else:
            for ns in (ns_a, ns_b):
                assert len(_labelled(kubectl, "role,rolebinding", release, "-n", ns)) == 4
                kubectl("-n", ns, "get", "kopfpeering", fullname)
            # Nothing in the release namespace: a namespaced operator serves no
            # ClusterResultStore, so it reads no Secret there.
            assert not _labelled(kubectl, "role,rolebinding", release, "-n", release_ns)

        # The bindings work: the ServiceAccount may do what the operator needs where it
        # watches, and nothing it does not need.
        assert _can(kubectl, sa, "patch", "resultbackends.resultstores.io", "-n", ns_a)
        assert _can(kubectl, sa, "patch", "resultbackends.resultstores.io", *STATUS, "-n", ns_a)
        assert _can(kubectl, sa, "get", "secrets", "-n", ns_a)
        assert _can(kubectl, sa, "create", "secrets", "-n", ns_b)
        assert _can(kubectl, sa, "patch", "deployments.apps", "-n", ns_b)
        assert _can(kubectl, sa, "watch", "statefulsets.apps", "-n", ns_b)
        assert _can(kubectl, sa, "create", "events", "-n", ns_a)
        assert _can(kubectl, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        # The stores: watched, finalizer and status patched (never read one by one);
        # ClusterResultStores by an operator of every namespace only; namespaces watched.
        cluster = mode == "cluster"
        for verb in ("list", "watch", "patch"):
            assert _can(kubectl, sa, verb, "resultstores.resultstores.io", "-n", ns_a)
            assert _can(kubectl, sa, verb, "clusterresultstores.resultstores.io") == cluster
        assert not _can(kubectl, sa, "get", "resultstores.resultstores.io", "-n", ns_a)
        assert _can(kubectl, sa, "patch", "resultstores.resultstores.io", *STATUS, "-n", ns_b)
        assert _can(kubectl, sa, "patch", "clusterresultstores.resultstores.io", *STATUS) == (
            cluster
        )
        assert not _can(kubectl, sa, "delete", "clusterresultstores.resultstores.io")
        assert not _can(kubectl, sa, "create", "resultstores.resultstores.io", "-n", ns_a)
        assert _can(kubectl, sa, "watch", "namespaces")
        # ClusterResultStores' admin Secrets: read in the cluster resource namespace (by an
        # operator of every namespace, which may read Secrets everywhere).
        assert _can(kubectl, sa, "get", "secrets", "-n", release_ns) == cluster
        # Watched, for the operator's own worker Secrets (by label; rbac-audit checks
        # every list and watch it sends carries that selector).
        assert _can(kubectl, sa, "watch", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "delete", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "update", "secrets", "-n", ns_a)
        assert not _can(kubectl, sa, "create", "pods/exec", "-n", ns_a)
        assert not _can(kubectl, sa, "get", "nodes")
        assert not _can(kubectl, sa, "delete", "resultbackends.resultstores.io", "-n", ns_a)
        if mode == "namespaces":
            # By name only, there; nothing in a namespace it neither watches nor reads.
            assert not _can(kubectl, sa, "list", "secrets", "-n", release_ns)
            assert not _can(kubectl, sa, "get", "secrets", "-n", "default")
            assert not _can(kubectl, sa, "list", "resultstores.resultstores.io", "-n", "default")
            assert _can(kubectl, sa, "patch", "kopfpeerings.kopf.dev", "-n", ns_a)
        else:
            assert _can(kubectl, sa, "get", "secrets", "-n", "default")
            assert _can(kubectl, sa, "patch", "clusterkopfpeerings.kopf.dev")

        helm("uninstall", release, "--namespace", release_ns, "--wait", "--timeout", "90s")
        assert _labelled(kubectl, "clusterrole,clusterrolebinding", release) == []
        for ns in (release_ns, ns_a, ns_b):
            assert _labelled(kubectl, "role,rolebinding,serviceaccount", release, "-n", ns) == []
        left = kubectl("-n", release_ns, "get", "serviceaccount", fullname, check=False)
        assert left.returncode != 0
        # CRDs stay: deleting them would delete every store and ResultBackend.
        for crd in ("resultbackends", "resultstores", "clusterresultstores"):
            kubectl("get", "crd", f"{crd}.resultstores.io")
    finally:
        helm("uninstall", release, "--namespace", release_ns, "--ignore-not-found", check=False)


def _bind(kubectl: Kubectl, namespace: str, role: str, user: str) -> None:
    kubectl(
        "create",
        "rolebinding",
        f"{role}-{user}",
        f"--clusterrole={role}",
        f"--user={user}",
        "-n",
        namespace,
    )


def _eventually_can(kubectl: Kubectl, user: str, *args: str, timeout: float = 30.0) -> bool:
    """`kubectl auth can-i` once the aggregation controller (kube-controller-manager) has
    copied the rules into the built-in roles."""
    deadline = time.monotonic() + timeout
    while not _can(kubectl, user, *args):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def test_aggregated_roles_follow_peoples_roles(
    helm: Helm, kubectl: Kubectl, fresh_namespaces: list[str]
) -> None:
    """Installed, the chart's ClusterRoles reach the built-in view, edit and admin: a
    namespace's editor may create ResultBackends there but no ResultStore, its admin
    ResultStores too, its viewer only reads; nobody of them writes ClusterResultStores
    or reads the cluster resource namespace's Secrets."""
    release_ns, app_ns, _ = fresh_namespaces
    release = f"rbo-{uuid.uuid4().hex[:6]}"
    tag = uuid.uuid4().hex[:6]
    viewer, editor, admin = (f"{who}-{tag}" for who in ("viewer", "editor", "admin"))
    try:
        helm("install", release, str(CHART), "--namespace", release_ns, "--timeout", "90s")
        _bind(kubectl, app_ns, "view", viewer)
        _bind(kubectl, app_ns, "edit", editor)
        _bind(kubectl, app_ns, "admin", admin)
        rb, rstore = "resultbackends.resultstores.io", "resultstores.resultstores.io"
        crstore = "clusterresultstores.resultstores.io"
        ns = ["-n", app_ns]
        assert _eventually_can(kubectl, editor, "create", rb, *ns)
        assert _eventually_can(kubectl, admin, "create", rstore, *ns)
        assert _eventually_can(kubectl, viewer, "list", rstore, *ns)
        for user in (viewer, editor, admin):
            for verb in ("get", "list", "watch"):
                for resource in (rb, rstore):
                    assert _can(kubectl, user, verb, resource, *ns), (user, verb, resource)
            for verb in ("create", "update", "patch", "delete"):
                assert not _can(kubectl, user, verb, crstore), (user, verb)
                assert _can(kubectl, user, verb, rb, *ns) is (user != viewer), (user, verb)
                assert _can(kubectl, user, verb, rstore, *ns) is (user == admin), (user, verb)
            assert not _can(kubectl, user, "patch", rb, *STATUS, *ns)
            assert not _can(kubectl, user, "get", "secrets", "-n", release_ns)
            # A RoleBinding in a namespace reaches nothing in another one.
            assert not _can(kubectl, user, "list", rb, "-n", release_ns)
        helm("uninstall", release, "--namespace", release_ns, "--wait", "--timeout", "90s")
        assert _labelled(kubectl, "clusterrole", release) == []
    finally:
        helm("uninstall", release, "--namespace", release_ns, "--ignore-not-found", check=False)
