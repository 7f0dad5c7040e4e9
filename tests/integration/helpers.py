"""Small helpers shared by the integration tests (no fakes: real servers only)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tests.conftest import CouchDBServer, Kubectl, OperatorProcess

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.5
) -> T:
    """Poll until probe returns something truthy; fail naming `what` after timeout.

    The timeout bounds a failing test; it is not a performance assertion.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def wait_for_runs(
    operator: OperatorProcess,
    ns: str,
    name: str,
    count: int,
    what: str = "periodic check",
    timeout: float = 60.0,
) -> None:
    """Until the operator has logged `count` more runs of ns/name of this kind (it logs
    each run at DEBUG: "ns/name: periodic check", "full reconcile", ...): a test that
    asserts nothing changed first waits for the runs that could have changed it."""
    marker = f"{ns}/{name}: {what}\n"
    start = operator.logs.count(marker)
    wait_for(
        f"{count} x {marker.strip()!r} in the operator's log",
        lambda: operator.logs.count(marker) >= start + count,
        timeout,
    )


def wait_for_store_checks(
    operator: OperatorProcess,
    ns: str,
    name: str,
    count: int,
    kind: str = "ResultStore",
    timeout: float = 60.0,
) -> None:
    """Until the operator has logged `count` more checks of the store (it logs each at
    DEBUG: "ResultStore name in namespace ns: check", "ClusterResultStore name: check")."""
    where = f" in namespace {ns}" if kind == "ResultStore" else ""
    marker = f"{kind} {name}{where}: check\n"
    start = operator.logs.count(marker)
    wait_for(
        f"{count} x {marker.strip()!r} in the operator's log",
        lambda: operator.logs.count(marker) >= start + count,
        timeout,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    res = kubectl("get", *args, "-o", "json")
    return dict(json.loads(res.stdout))


def try_get_json(kubectl: Kubectl, *args: str) -> dict[str, Any] | None:
    res = kubectl("get", *args, "-o", "json", check=False)
    if res.returncode != 0:
        return None
    return dict(json.loads(res.stdout))


def apply(kubectl: Kubectl, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _where(kind: str, ns: str, name: str) -> list[str]:
    """kubectl's arguments for one object (a cluster-scoped kind takes no namespace)."""
    return [kind.lower(), name] if kind == "ClusterResultStore" else [kind.lower(), name, "-n", ns]


def wait_condition(
    kubectl: Kubectl,
    ns: str,
    name: str,
    type_: str,
    status: str,
    timeout: float = 60.0,
    *,
    kind: str = "ResultBackend",
    reason: str | None = None,
) -> dict[str, Any]:
    """The object (a ResultBackend by default) once its condition `type_` has `status`
    (and `reason`, when given)."""

    def probe() -> dict[str, Any] | None:
        obj = try_get_json(kubectl, *_where(kind, ns, name))
        if obj is None:
            return None
        cond = condition(obj, type_)
        if not cond or cond.get("status") != status:
            return None
        return obj if reason is None or cond.get("reason") == reason else None

    what = f"{kind} {ns}/{name} {type_}={status}" + (f" ({reason})" if reason else "")
    return wait_for(what, probe, timeout)


def wait_store_ready(
    kubectl: Kubectl,
    ns: str,
    name: str,
    status: str = "True",
    reason: str | None = None,
    *,
    kind: str = "ResultStore",
    backends: int | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """A store (a ResultStore in `ns`, or a ClusterResultStore) once its Ready has `status`
    (and `reason`) for its current generation (and it counts `backends` ResultBackends)."""

    def probe() -> dict[str, Any] | None:
        obj = try_get_json(kubectl, *_where(kind, ns, name))
        if obj is None:
            return None
        status_ = obj.get("status") or {}
        cond = condition(obj, "Ready")
        if (
            not cond
            or cond.get("status") != status
            or status_.get("observedGeneration") != obj["metadata"].get("generation")
            or (backends is not None and status_.get("resultBackends") != backends)
        ):
            return None
        return obj if reason is None or cond.get("reason") == reason else None

    what = f"{kind} {ns}/{name} Ready={status}" + (f" ({reason})" if reason else "")
    what += f" with {backends} ResultBackend(s)" if backends is not None else ""
    return wait_for(what, probe, timeout)


def store_not_ready(
    kubectl: Kubectl, ns: str, name: str, store_reason: str, timeout: float = 60.0
) -> dict[str, Any]:
    """A ResultBackend once it is Ready=False with StoreNotReady quoting its store's
    `store_reason` (the store's own failure, as the contract says it shows there)."""

    def probe() -> dict[str, Any] | None:
        obj = try_get_json(kubectl, "resultbackend", name, "-n", ns)
        cond = condition(obj, "Ready") if obj is not None else None
        if (
            cond
            and cond.get("status") == "False"
            and cond.get("reason") == "StoreNotReady"
            and f"is not ready: {store_reason}: " in str(cond.get("message"))
        ):
            return obj
        return None

    return wait_for(f"{ns}/{name} StoreNotReady ({store_reason})", probe, timeout)


def settled_version(kubectl: Kubectl, ns: str, name: str, timeout: float = 60.0) -> str:
    """The resourceVersion once the operator is done with the object: our
    finalizer on, Ready, and status observing the current generation."""

    def probe() -> str | None:
        obj = try_get_json(kubectl, "resultbackend", name, "-n", ns)
        if obj is None:
            return None
        cond = condition(obj, "Ready")
        meta = obj["metadata"]
        observed = (obj.get("status") or {}).get("observedGeneration")
        if (
            cond
            and cond.get("status") == "True"
            and observed == meta.get("generation")
            and "resultstores.io/finalizer" in (meta.get("finalizers") or [])
        ):
            return str(meta["resourceVersion"])
        return None

    return wait_for(f"{ns}/{name} settled", probe, timeout)


API_VERSION = "resultstores.io/v1alpha2"


def secret_data(kubectl: Kubectl, ns: str, name: str) -> dict[str, str]:
    obj = get_json(kubectl, "secret", name, "-n", ns)
    return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}


def admin_secret(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": data,
    }


def couchdb_admin_secret(ns: str, name: str, server: CouchDBServer) -> dict[str, Any]:
    """The Secret a store's couchdb.adminSecretRef names: the server admin."""
    return admin_secret(
        ns, name, {"username": server.admin_user, "password": server.admin_password}
    )


def _store(
    kind: str, ns: str, name: str, spec: dict[str, Any], selector: dict[str, Any] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind == "ResultStore":
        meta["namespace"] = ns
    elif selector is not None:
        spec = {**spec, "namespaceSelector": selector}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def couchdb_store(
    ns: str,
    name: str,
    url: str,
    secret: str,
    *,
    kind: str = "ResultStore",
    selector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A CouchDB ResultStore in `ns` (or a ClusterResultStore: `ns` is then unused)."""
    spec = {"couchdb": {"url": url, "adminSecretRef": {"name": secret}}}
    return _store(kind, ns, name, spec, selector)


def consul_store(
    ns: str,
    name: str,
    url: str,
    secret: str,
    *,
    kind: str = "ResultStore",
    selector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Consul ResultStore in `ns` (or a ClusterResultStore) with a management token."""
    spec = {"consul": {"url": url, "tokenSecretRef": {"name": secret}}}
    return _store(kind, ns, name, spec, selector)


def result_backend(
    ns: str,
    name: str,
    store: str,
    deletion: str = "Retain",
    *,
    kind: str = "ResultStore",
    **extra: Any,
) -> dict[str, Any]:
    """A ResultBackend of store `store` (`kind` ResultStore or ClusterResultStore);
    `extra`: more spec fields (workers, rotation, couchdb / consul options)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "ResultBackend",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"storeRef": {"kind": kind, "name": store}, "deletionPolicy": deletion, **extra},
    }


def events_text(kubectl: Kubectl, ns: str) -> str:
    return kubectl("get", "events", "-n", ns, "-o", "json").stdout


def assert_no_secret(texts: Iterable[str], secrets: Iterable[str]) -> None:
    for secret in secrets:
        assert secret, "empty secret value"
        for text in texts:
            assert secret not in text, "a secret value leaked into logs/events/status"
