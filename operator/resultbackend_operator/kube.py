"""The few Kubernetes API calls the operator makes (Secrets; workloads come with injection).

Every call goes through the official `kubernetes` client, and through `_call`,
which counts it for the metrics by kind and verb. `ensure_*` reads, compares and
writes only when something differs; `remove_*` tolerates absence.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import metrics
from .api import FIELD_MANAGER, GROUP, MANAGED_BY_LABEL, MANAGED_BY_VALUE, PLURAL, VERSION

T = TypeVar("T")

_lock = threading.Lock()
_api_client: kubernetes.client.ApiClient | None = None


def load_config() -> None:
    """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config."""
    global _api_client
    with _lock:
        if _api_client is not None:
            return
        try:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        _api_client = kubernetes.client.ApiClient()


def api_client() -> kubernetes.client.ApiClient:
    if _api_client is None:
        load_config()
    assert _api_client is not None
    return _api_client


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api_client())


def _call(kind: metrics.ApiKind, verb: str, method: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Send one API request: `method(*args, **kw)`, counted as (kind, verb) when sent.

    Every request of this module goes through here (a unit test checks it), so
    `resultbackend_api_requests_total` counts all of the operator's own requests
    to the API server; Kopf's own are made by Kopf's client and are not seen here.
    """
    metrics.api_request(kind, verb)
    return method(*args, **kw)


class SecretProblem(Exception):
    """A referenced Secret or key is missing. The message names them, never values."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SecretData:
    data: dict[str, str]
    owner_uids: frozenset[str]


def read_secret(namespace: str, name: str) -> SecretData | None:
    try:
        obj = _call("Secret", "get", core().read_namespaced_secret, name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
    refs = obj.metadata.owner_references if obj.metadata else None
    owners = frozenset(ref.uid for ref in (refs or []))
    return SecretData(data=data, owner_uids=owners)


def read_secret_keys(namespace: str, name: str, keys: Mapping[str, str]) -> dict[str, str]:
    """Values of `keys` (purpose -> key) from a referenced Secret, or SecretProblem."""
    secret = read_secret(namespace, name)
    if secret is None:
        raise SecretProblem("SecretNotFound", f"Secret {namespace}/{name} not found")
    out: dict[str, str] = {}
    for purpose, key in keys.items():
        value = secret.data.get(key)
        if not value:
            raise SecretProblem(
                "SecretKeyMissing", f"Secret {namespace}/{name} has no (non-empty) key {key!r}"
            )
        out[purpose] = value
    return out


def namespace_terminating(name: str) -> bool:
    """True when the namespace is being deleted (or already gone).

    Nothing can be created in such a namespace again, so a Secret it has lost
    will never come back.
    """
    try:
        obj = _call("Namespace", "get", core().read_namespace, name)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    phase = obj.status.phase if obj.status else None
    return phase == "Terminating" or bool(obj.metadata and obj.metadata.deletion_timestamp)


def secret_body(
    namespace: str, name: str, data: Mapping[str, str], owner_reference: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
            "ownerReferences": [dict(owner_reference)],
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(data.items())},
    }


def ensure_secret(
    namespace: str,
    name: str,
    data: Mapping[str, str],
    owner_reference: Mapping[str, Any],
    current: SecretData | Literal["unread"] | None = "unread",
) -> bool:
    """Create or update the worker Secret; True if it wrote.

    `current` is the Secret as the caller just read it (None: it did not
    exist), to save reading it again. A Secret of that name that is not owned
    by this ResultBackend is never overwritten: that raises SecretProblem("Conflict").
    """
    body = secret_body(namespace, name, data, owner_reference)
    if current == "unread":
        current = read_secret(namespace, name)
    if current is None:
        try:
            _call("Secret", "create", core().create_namespaced_secret, namespace, body)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = read_secret(namespace, name)
            if current is None:
                raise
    if owner_reference["uid"] not in current.owner_uids:
        raise SecretProblem(
            "Conflict",
            f"Secret {namespace}/{name} exists and is not owned by this ResultBackend",
        )
    if current.data == dict(data):
        return False
    _call(
        "Secret",
        "patch",
        core().patch_namespaced_secret,
        name,
        namespace,
        {"metadata": {"labels": body["metadata"]["labels"]}, "data": body["data"]},
    )
    return True


# --- workloads ----------------------------------------------------------------------

WORKLOAD_LISTS: dict[metrics.ApiKind, str] = {
    "Deployment": "list_namespaced_deployment",
    "StatefulSet": "list_namespaced_stateful_set",
}
WORKLOAD_PATCHES: dict[metrics.ApiKind, str] = {
    "Deployment": "patch_namespaced_deployment",
    "StatefulSet": "patch_namespaced_stateful_set",
}


def list_workloads(namespace: str) -> list[dict[str, Any]]:
    """Deployments and StatefulSets of a namespace as plain dicts with kind set.

    Raw JSON (no model objects): the injection logic reads managedFields and
    annotations exactly as the API server sends them.
    """
    out: list[dict[str, Any]] = []
    for kind, method in WORKLOAD_LISTS.items():
        resp = _call(kind, "list", getattr(apps(), method), namespace, _preload_content=False)
        for item in json.loads(resp.data).get("items", []):
            item["kind"] = kind
            item["apiVersion"] = "apps/v1"
            out.append(item)
    return out


def apply_workload(body: Mapping[str, Any]) -> None:
    """Server-side apply with the operator's field manager (no force: a conflict is a 409)."""
    meta = body["metadata"]
    method = WORKLOAD_PATCHES[body["kind"]]  # a KeyError for any other kind
    # Server-side apply is a PATCH; the API server's audit log calls it verb "patch" too.
    resp = _call(
        cast(metrics.ApiKind, body["kind"]),
        "patch",
        getattr(apps(), method),
        meta["name"],
        meta["namespace"],
        dict(body),
        field_manager=FIELD_MANAGER,
        _content_type="application/apply-patch+yaml",
        # The answer is not needed: skip building model objects from it, but
        # read it so that the connection goes back to the pool.
        _preload_content=False,
    )
    resp.read()
    resp.release_conn()


# --- ResultBackends -------------------------------------------------------------


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def patch_resultbackend_status(namespace: str, name: str, status: Mapping[str, Any]) -> None:
    _call(
        "ResultBackend",
        "patch",
        custom().patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"status": dict(status)},
    )
