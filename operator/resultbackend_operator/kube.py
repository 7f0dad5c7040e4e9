"""The few Kubernetes API calls the operator makes (Secrets; workloads come with injection).

Every call goes through the official `kubernetes` client, and through `_request`,
which counts it for the metrics by kind and verb. `ensure_*` reads, compares and
writes only when something differs; `remove_*` tolerates absence.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kubernetes
from kubernetes.client.exceptions import ApiException

from . import injection, metrics
from .api import (
    CLUSTER_STORE_KIND,
    FIELD_MANAGER,
    FINALIZER,
    GROUP,
    KIND,
    MANAGED_BY_LABEL,
    MANAGED_BY_VALUE,
    PLURAL,
    STORE_KIND,
    STORE_PLURALS,
    VERSION,
)
from .errors import Problem

_lock = threading.Lock()
_api_client: kubernetes.client.ApiClient | None = None


# Kept-alive connections to the API server. The client's default, 5 per CPU the
# machine has, is 10 on two cores, fewer than the threads that may send at once
# (the controller's 8 workers, a few side-by-side requests each): every
# request beyond it opened a connection, TLS handshake included, and dropped it.
CONNECTIONS = 32


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
        config = kubernetes.client.Configuration.get_default_copy()
        config.connection_pool_maxsize = CONNECTIONS
        _api_client = kubernetes.client.ApiClient(config)


def api_client() -> kubernetes.client.ApiClient:
    if _api_client is None:
        load_config()
    assert _api_client is not None
    return _api_client


VERB_METHODS = {"get": "GET", "list": "GET", "create": "POST", "patch": "PATCH"}


def _request(
    kind: metrics.ApiKind,
    verb: str,
    path: str,
    body: Any = None,
    *,
    query: Mapping[str, str] | None = None,
    content_type: str | None = None,
) -> Any:
    """Send one API request, counted as (kind, verb); the decoded JSON answer.

    Every request of this module goes through here, so
    `resultbackend_api_requests_total` counts all of the operator's own requests
    to the API server; Kopf's own are made by Kopf's client and are not seen here.

    It uses the kubernetes client's ApiClient (configuration, auth, TLS, the
    connection pool) but not its generated API classes: CoreV1Api alone costs
    22 MB and 1.4 s to import and validates every call with pydantic, for the
    handful of paths the operator uses. An answer outside 2xx raises
    ApiException, as the generated methods do.
    """
    metrics.api_request(kind, verb)
    client = api_client()
    headers = {"Accept": "application/json"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    elif body is not None:
        headers["Content-Type"] = "application/json"
    method, url, headers, data, _ = client.param_serialize(
        method=VERB_METHODS[verb],
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = client.call_api(method, url, header_params=headers, body=data)
    raw = resp.read()  # type: ignore[no-untyped-call]
    if not 200 <= resp.status < 300:
        raise ApiException(http_resp=resp)
    return json.loads(raw) if raw else None


def _q(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


@dataclass(frozen=True)
class SecretData:
    data: dict[str, str]
    owner_uids: frozenset[str]
    resource_version: str = ""
    managed: bool = False  # it carries this operator's managed-by label

    def adoptable_by(self, uid: str, adopts: str) -> bool:
        """Whether this Secret is one the ResultBackend `uid`, which adopts the one of
        uid `adopts` (api.ADOPT_ANNOTATION), could take over: one of ours whose owner
        was that one, or orphaned (`kubectl delete --cascade=orphan`). The operator
        cannot move its ownerReference (that takes `delete` on Secrets, which it is
        not granted): whoever migrates does, and is told how."""
        return (
            bool(adopts)
            and self.managed
            and uid not in self.owner_uids
            and self.owner_uids <= {adopts}
        )


def read_secret(namespace: str, name: str) -> SecretData | None:
    try:
        obj = _request("Secret", "get", f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}")
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    owners = frozenset(str(ref.get("uid")) for ref in refs)
    version = str(obj.get("metadata", {}).get("resourceVersion") or "")
    labels = obj.get("metadata", {}).get("labels") or {}
    managed = labels.get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE
    return SecretData(data=data, owner_uids=owners, resource_version=version, managed=managed)


# The reasons of a referenced Secret that is missing, or a key in it.
SECRET_REASONS = ("SecretNotFound", "SecretKeyMissing")


def secret_values(
    secret: SecretData | None, namespace: str, name: str, keys: Mapping[str, str]
) -> dict[str, str]:
    """Values of `keys` (purpose -> key) of the referenced Secret `namespace/name` as
    read (None: not found), else Problem (SecretNotFound, SecretKeyMissing; the
    message names them, never values)."""
    if secret is None:
        raise Problem("SecretNotFound", f"Secret {namespace}/{name} not found", transient=True)
    out: dict[str, str] = {}
    for purpose, key in keys.items():
        value = secret.data.get(key)
        if not value:
            raise Problem(
                "SecretKeyMissing",
                f"Secret {namespace}/{name} has no (non-empty) key {key!r}",
                transient=True,
            )
        out[purpose] = value
    return out


def namespace_terminating(name: str) -> bool:
    """True when the namespace is being deleted (or already gone).

    Nothing can be created in such a namespace again, so a Secret it has lost
    will never come back.
    """
    obj = _read_namespace(name)
    if obj is None:
        return True
    phase = (obj.get("status") or {}).get("phase")
    return phase == "Terminating" or bool(obj.get("metadata", {}).get("deletionTimestamp"))


def namespace_labels(name: str) -> dict[str, str] | None:
    """A namespace's labels (None: it does not exist)."""
    obj = _read_namespace(name)
    return None if obj is None else dict((obj.get("metadata") or {}).get("labels") or {})


def _read_namespace(name: str) -> dict[str, Any] | None:
    try:
        obj = _request("Namespace", "get", f"/api/v1/namespaces/{_q(name)}")
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return cast(dict[str, Any], obj or {})


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
    current: SecretData | None,
) -> bool:
    """Create or update the worker Secret; True if it wrote.

    `current` is the Secret as the caller just read it (None: it did not
    exist). A Secret of that name that is not owned by this ResultBackend is
    never overwritten (Problem "Conflict").
    """
    body = secret_body(namespace, name, data, owner_reference)
    if current is None:
        try:
            _request("Secret", "create", f"/api/v1/namespaces/{_q(namespace)}/secrets", body)
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = read_secret(namespace, name)
            if current is None:
                raise
    if owner_reference["uid"] not in current.owner_uids:
        raise Problem(
            "Conflict",
            f"Secret {namespace}/{name} exists and is not owned by this ResultBackend",
            transient=True,
        )
    if current.data == dict(data):
        return False
    _request(
        "Secret",
        "patch",
        f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}",
        {"metadata": {"labels": body["metadata"]["labels"]}, "data": body["data"]},
        content_type="application/strategic-merge-patch+json",
    )
    return True


# --- workloads ----------------------------------------------------------------------

WORKLOAD_PLURALS: dict[metrics.ApiKind, str] = {
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
}


def list_workloads(namespace: str) -> list[dict[str, Any]]:
    """Deployments and StatefulSets of a namespace as plain dicts with kind set.

    Raw JSON (no model objects): the injection logic reads managedFields and
    annotations exactly as the API server sends them.
    """
    return [wl for kind in WORKLOAD_PLURALS for wl in list_workloads_of(namespace, kind)]


def list_workloads_of(
    namespace: str, kind: metrics.ApiKind, label_selector: str = ""
) -> list[dict[str, Any]]:
    """One kind (`Deployment`, `StatefulSet`) of `list_workloads`, optionally
    only those matching a label-selector query."""
    plural = WORKLOAD_PLURALS[kind]
    listed = _request(
        kind,
        "list",
        f"/apis/apps/v1/namespaces/{_q(namespace)}/{plural}",
        query={"labelSelector": label_selector} if label_selector else None,
    )
    return [injection.with_type_meta(item, kind) for item in listed.get("items", [])]


def apply_workload(body: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply with the operator's field manager (no force: a conflict is a
    409); the workload as it is after."""
    meta = body["metadata"]
    plural = WORKLOAD_PLURALS[body["kind"]]  # a KeyError for any other kind
    # Server-side apply is a PATCH; the API server's audit log calls it verb "patch" too.
    applied = _request(
        cast(metrics.ApiKind, body["kind"]),
        "patch",
        f"/apis/apps/v1/namespaces/{_q(meta['namespace'])}/{plural}/{_q(meta['name'])}",
        dict(body),
        query={"fieldManager": FIELD_MANAGER},
        content_type="application/apply-patch+yaml",
    )
    return cast(dict[str, Any], applied or {})


# --- ResultBackends -------------------------------------------------------------


def patch_resultbackend_status(
    namespace: str, name: str, status: Mapping[str, Any]
) -> dict[str, Any]:
    """A JSON merge patch of a ResultBackend's status; the object as it is after."""
    return patch_status(KIND, namespace, name, status)


def patch_status(kind: str, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch of the status of one of our kinds; the object as it is after."""
    return cast(
        dict[str, Any],
        _request(
            _api_kind(kind),
            "patch",
            _path(kind, namespace, name) + "/status",
            {"status": dict(status)},
            content_type="application/merge-patch+json",
        ),
    )


def _api_kind(kind: str) -> metrics.ApiKind:
    if kind == STORE_KIND:
        return "ResultStore"
    if kind == CLUSTER_STORE_KIND:
        return "ClusterResultStore"
    return "ResultBackend"


def _path(kind: str, namespace: str, name: str) -> str:
    """The API path of one of our objects (a ClusterResultStore has no namespace)."""
    plural = STORE_PLURALS.get(kind, PLURAL)
    if kind == CLUSTER_STORE_KIND:
        return f"/apis/{GROUP}/{VERSION}/{plural}/{_q(name)}"
    return f"/apis/{GROUP}/{VERSION}/namespaces/{_q(namespace)}/{plural}/{_q(name)}"


def list_resultbackends_of(store: tuple[str, str, str]) -> list[str]:
    """`namespace/name` of every ResultBackend that references the store (kind,
    namespace, name), as the API server has them now (one list)."""
    kind, namespace, name = store
    where = f"/namespaces/{_q(namespace)}" if kind == STORE_KIND else ""
    found = _request("ResultBackend", "list", f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}")
    users = []
    for item in (found or {}).get("items") or ():
        ref = (item.get("spec") or {}).get("storeRef") or {}
        if ref.get("name") == name and (ref.get("kind") or STORE_KIND) == kind:
            meta = item.get("metadata") or {}
            users.append(f"{meta.get('namespace')}/{meta.get('name')}")
    return users


def _path_of(body: Mapping[str, Any]) -> tuple[metrics.ApiKind, str]:
    kind = str(body.get("kind") or KIND)
    meta = body["metadata"]
    return _api_kind(kind), _path(kind, str(meta.get("namespace") or ""), meta["name"])


def add_finalizer(body: Mapping[str, Any]) -> dict[str, Any]:
    """Put our finalizer on the object (of our kinds) as it is in `body`; the object after.

    A JSON patch that first tests the resourceVersion: it never drops a
    finalizer someone else added meanwhile, and fails (409/422, ApiException)
    when the object changed since `body` was read.
    """
    meta = body["metadata"]
    add: dict[str, Any]
    test = {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]}
    if meta.get("finalizers"):
        add = {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
    else:
        add = {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
    api_kind, path = _path_of(body)
    patched = _request(
        api_kind,
        "patch",
        path,
        [test, add],
        content_type="application/json-patch+json",
    )
    return cast(dict[str, Any], patched)


def remove_finalizer(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Take our finalizer off (the object may then go); the object after (None:
    gone already, or the finalizer was not on).

    Tests the entry at its index first, so a list changed meanwhile fails
    (422, ApiException) rather than losing someone else's entry.
    """
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if FINALIZER not in finalizers:
        return None
    path = f"/metadata/finalizers/{finalizers.index(FINALIZER)}"
    api_kind, target = _path_of(body)
    try:
        return cast(
            dict[str, Any],
            _request(
                api_kind,
                "patch",
                target,
                [{"op": "test", "path": path, "value": FINALIZER}, {"op": "remove", "path": path}],
                content_type="application/json-patch+json",
            ),
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None
