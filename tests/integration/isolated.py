"""Operator processes a test runs itself, in its own namespace, and their /metrics.

The session's `operator` watches every namespace with OPERATOR_TEST_ENV. A test that
needs other settings (long intervals, a long backoff) or several replicas with
peering runs its own processes instead, and its module requests
`session_operator_stopped` so that no other operator acts on its objects:

- `namespaced_identity`: the Helm chart rendered for the test's namespace alone
  (`watch.scope=namespaces`, and with a peering name `peering.enabled`, so the chart
  brings its KopfPeering and the Role that lets the operator keep alive in it). Its
  ServiceAccount, Roles, ClusterRole and peering object are applied, and the
  operator gets a kubeconfig with a token of that ServiceAccount: these operators
  prove the namespaced chart's RBAC as the session's proves the cluster-wide one's.
- `namespaced_operator`: `python -m resultbackend_operator --namespace NS ...` with
  a metrics port of its own and NS as its cluster resource namespace, as the chart
  rendered for NS runs it (its Role to read ClusterResultStores' admin Secrets is in
  NS). Kopf serves cluster-scoped kinds cluster-wide in either scope, so such an
  operator serves every ClusterResultStore besides the ResultStores of NS.
- `delete_resultbackends`, `delete_stores`: what a test made, taken away while its
  operator still runs (our finalizers are on all of them; ResultBackends first, since
  a store in use waits for them).
- `scrape`, `counter`, `requests_moved`: what its /metrics says.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Helm,
    Kubectl,
    OperatorProcess,
    docs,
    free_port,
    render,
    write_token_kubeconfig,
)
from tests.integration.helpers import unique, wait_for

# What a namespaced operator needs of the chart's rendering (not its Deployment).
IDENTITY_KINDS = (
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "KopfPeering",
)
CLUSTER_KINDS = ("ClusterRole", "ClusterRoleBinding")


def _apply_server_side(kubectl: Kubectl, objs: Sequence[Mapping[str, Any]]) -> None:
    kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=rbo-tests",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}),
    )


@contextmanager
def namespaced_identity(
    helm: Helm, kubectl: Kubectl, namespace: str, directory: Path, peering: str | None = None
) -> Iterator[str]:
    """A kubeconfig for the chart's ServiceAccount of a release watching `namespace` only.

    The release lives in `namespace` itself, so its namespaced objects go with it;
    its ClusterRole and ClusterRoleBinding are deleted on the way out.
    """
    release = unique("rbo-t")
    sets = ["watch.scope=namespaces", f"watch.namespaces={{{namespace}}}"]
    if peering is not None:
        sets += ["peering.enabled=true", f"peering.name={peering}"]
    objs = docs(render(helm, *sets, release=release, namespace=namespace))
    peering_crds = [
        o
        for o in objs
        if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev"
    ]
    identity = [o for o in objs if o["kind"] in IDENTITY_KINDS]
    if peering is not None:
        assert peering_crds, "the chart renders no kopf.dev CRDs"
        _apply_server_side(kubectl, peering_crds)
        for o in peering_crds:
            kubectl(
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                f"crd/{o['metadata']['name']}",
            )
        assert [o["metadata"]["name"] for o in identity if o["kind"] == "KopfPeering"] == [
            peering
        ], "the chart renders no KopfPeering of that name"
    _apply_server_side(kubectl, identity)
    (sa,) = (o["metadata"]["name"] for o in identity if o["kind"] == "ServiceAccount")
    path = directory / f"{release}.kubeconfig"
    write_token_kubeconfig(kubectl, namespace, sa, path)
    try:
        yield str(path)
    finally:
        cluster = [o for o in identity if o["kind"] in CLUSTER_KINDS]
        kubectl(
            "delete",
            "--ignore-not-found",
            "--wait=false",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": cluster}),
            check=False,
        )


def namespaced_operator(
    stack_env: dict[str, str],
    kubeconfig: str,
    log_path: Path,
    namespace: str,
    env: Mapping[str, str],
    *args: str,
) -> OperatorProcess:
    """The operator watching `namespace` only, with its own metrics port (not started).

    Its cluster resource namespace is `namespace` too: the chart's default (the release
    namespace), where `namespaced_identity` lets it read ClusterResultStores' Secrets."""
    return OperatorProcess(
        stack_env,
        log_path,
        {**env, "KUBECONFIG": kubeconfig, "RBO_METRICS_PORT": free_port()},
        args=["--namespace", namespace, "--cluster-resource-namespace", namespace, *args],
    )


@contextmanager
def running_operator(
    stack_env: dict[str, str],
    kubectl: Kubectl,
    helm: Helm,
    namespace: str,
    directory: Path,
    env: Mapping[str, str],
) -> Iterator[OperatorProcess]:
    """A started operator watching `namespace` only, as the namespaced chart's identity,
    with `env`; on the way out its ResultBackends are deleted while it still runs."""
    with namespaced_identity(helm, kubectl, namespace, directory) as kubeconfig:
        op = namespaced_operator(stack_env, kubeconfig, directory / "operator.log", namespace, env)
        op.start()
        try:
            yield op
        finally:
            delete_resultbackends(kubectl, namespace)
            delete_stores(kubectl, namespace)
            op.stop()


@contextmanager
def own_namespace(kubectl: Kubectl, prefix: str) -> Iterator[str]:
    """A namespace of a module's own, deleted (without waiting) afterwards."""
    name = unique(prefix)
    kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl("delete", "namespace", name, "--wait=false", check=False)


def delete_resultbackends(kubectl: Kubectl, namespace: str, timeout: float = 60.0) -> None:
    """Delete the namespace's ResultBackends while an operator of the test still runs,
    so that it takes our finalizer off (and, with deletionPolicy Delete, the store's
    objects away). Bounded and not an assertion: were none left running, the session
    operator finishes them once it runs again."""
    kubectl("delete", "resultbackend", "--all", "-n", namespace, "--wait=false", check=False)

    def gone() -> bool:
        listed = kubectl("get", "resultbackend", "-n", namespace, "-o", "json", check=False)
        return listed.returncode == 0 and not json.loads(listed.stdout).get("items")

    with suppress(AssertionError):
        wait_for(f"the ResultBackends of {namespace} to be deleted", gone, timeout)


def delete_stores(kubectl: Kubectl, namespace: str, timeout: float = 60.0) -> None:
    """Delete the namespace's ResultStores while an operator of the test still runs (their
    ResultBackends gone first, or each waits for them), so that it takes our finalizer
    off. Bounded and not an assertion, like `delete_resultbackends`."""
    kubectl("delete", "resultstore", "--all", "-n", namespace, "--wait=false", check=False)

    def gone() -> bool:
        listed = kubectl("get", "resultstore", "-n", namespace, "-o", "json", check=False)
        return listed.returncode == 0 and not json.loads(listed.stdout).get("items")

    with suppress(AssertionError):
        wait_for(f"the ResultStores of {namespace} to be deleted", gone, timeout)


# --- /metrics ------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

REQUESTS = "resultbackend_api_requests_total"
# Requests that change something: Kubernetes verbs and the stores' HTTP methods.
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "post", "put"})
# Every request to these counts, reads included (the stores' kinds in the metric).
STORE_KINDS = frozenset({"CouchDB", "Consul"})


def scrape(op: OperatorProcess) -> Samples:
    """The process's /metrics now (waits, bounded, while it is still starting)."""
    op.assert_running()
    url = f"http://127.0.0.1:{op.env['RBO_METRICS_PORT']}/metrics"

    def get() -> str | None:
        try:
            res = requests.get(url, timeout=10)
        except requests.ConnectionError:
            op.assert_running()
            return None
        res.raise_for_status()
        return res.text

    text = wait_for(f"the operator's metrics at {url}", get)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def counter(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when none yet)."""
    want = set(labels.items())
    return sum(value for (n, ls), value in samples.items() if n == name and want <= ls)


def requests_by_kind_verb(samples: Samples) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in samples.items():
        if name == REQUESTS:
            ls = dict(labels)
            out[(ls["kind"], ls["verb"])] = value
    return out


def writes_and_store_requests(samples: Samples) -> dict[tuple[str, str], float]:
    """API requests with a write verb (any kind) and every request to a store."""
    return {
        (kind, verb): value
        for (kind, verb), value in requests_by_kind_verb(samples).items()
        if verb in WRITE_VERBS or kind in STORE_KINDS
    }


def moved(
    before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float]
) -> dict[str, float]:
    """`kind verb` -> how many more requests `after` counts than `before`."""
    return {
        f"{kind} {verb}": value - before.get((kind, verb), 0.0)
        for (kind, verb), value in sorted(after.items())
        if value > before.get((kind, verb), 0.0)
    }
