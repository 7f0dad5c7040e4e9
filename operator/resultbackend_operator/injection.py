"""What a ResultBackend injects into its worker workloads, as pure functions.

Workloads are Deployments and StatefulSets as plain dicts, exactly as the API
server returns them (camelCase JSON). Nothing here talks to the API server:
`kube.py` reads the workloads and sends the bodies built here as server-side
apply (SSA) patches with `FIELD_MANAGER`.

The injection of one ResultBackend into one workload is:

- `metadata.annotations[INJECTED_BY_ANNOTATION] = <ResultBackend name>`;
- `spec.template.metadata.annotations[CONFIG_HASH_ANNOTATION] = config_hash(...)`,
  so a changed Secret rolls the pods and an unchanged one never does;
- in each chosen container, env entries that take their values from the
  ResultBackend's Secret by `valueFrom.secretKeyRef` (never a literal value).

Every function that takes `containers` takes the spec's `workers.containers`
as is (`None` = every container) and narrows it with `selected_containers`.

Ownership and the shared field manager
--------------------------------------
All ResultBackends share one field manager, `FIELD_MANAGER`. The injected-by
annotation is what tells whose injection a workload carries, so the caller must
only ever apply or release a workload that `find_conflicts` did not report as
claimed by another ResultBackend. In particular `release_patch` drops every
field the shared manager owns: send it only for a workload where
`is_injected_by(workload, rb_name)` holds (or that our manager owns fields in
while nobody claims it), never for one another ResultBackend injected.

Workloads from a list response carry no `apiVersion`/`kind` (only the list
does). `apply_patch` and `release_patch` need the kind: the caller sets it on
each item (see `with_type_meta`).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .api import CONFIG_HASH_ANNOTATION, FIELD_MANAGER, INJECTED_BY_ANNOTATION, InvalidSpec

SECRET_URI_KEY = "uri"

CONFIG_HASH_LENGTH = 32
"""Hex characters kept of the sha256 (128 bits): plenty to notice a change."""

WORKLOAD_KINDS: Mapping[str, str] = {"Deployment": "apps/v1", "StatefulSet": "apps/v1"}

Workload = Mapping[str, Any]
EnvVar = dict[str, Any]


# --- hash ----------------------------------------------------------------------


def config_hash(secret_data: Mapping[str, str]) -> str:
    """A stable hash of a Secret's `data`, for the pod-template annotation.

    Input: the Secret's `data` exactly as the API server stores and returns it,
    key -> base64 string, not decoded. The API server re-encodes `data` (and
    `stringData`) with standard padded base64, which is canonical for given
    bytes, so hashing the stored form needs no decoding and gives the same
    answer for a Secret read back as for one we are about to write with
    `encode_secret_data`.

    The hashed bytes are a canonical JSON list of sorted [key, value] pairs:
    unambiguous (no "ab"+"c" == "a"+"bc" collisions) and independent of the
    mapping's key order.
    """
    canonical = json.dumps(
        sorted(secret_data.items()), separators=(",", ":"), ensure_ascii=True
    ).encode()
    return hashlib.sha256(canonical).hexdigest()[:CONFIG_HASH_LENGTH]


def encode_secret_data(values: Mapping[str, str]) -> dict[str, str]:
    """Plain text values as the API server stores them in a Secret's `data`."""
    return {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}


# --- desired env -----------------------------------------------------------------


def desired_env(
    secret_name: str, url_env_name: str, extra_env: Mapping[str, str] | None = None
) -> list[EnvVar]:
    """The env entries to inject, each taken from the Secret by reference: the URL
    as `url_env_name`, and the store's `extra_env` (env name -> Secret key).

    Raises InvalidSpec when `url_env_name` collides with another entry we
    inject: a list-map with a duplicate key cannot be applied.
    """
    extra = dict(extra_env or {})
    if url_env_name in extra:
        raise InvalidSpec(
            f"spec.workers.urlEnvName must not be {url_env_name}: "
            f"for this store type that variable carries the Secret's {extra[url_env_name]!r}"
        )
    env = [_secret_env(url_env_name, secret_name, SECRET_URI_KEY)]
    env.extend(_secret_env(name, secret_name, key) for name, key in extra.items())
    return env


def _secret_env(name: str, secret_name: str, key: str) -> EnvVar:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}


# --- reading a workload ----------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _annotations(workload: Workload) -> Mapping[str, Any]:
    return _mapping(_mapping(workload.get("metadata")).get("annotations"))


def _template_annotations(workload: Workload) -> Mapping[str, Any]:
    template = _mapping(_mapping(workload.get("spec")).get("template"))
    return _mapping(_mapping(template.get("metadata")).get("annotations"))


def _pod_containers(workload: Workload) -> list[Mapping[str, Any]]:
    template = _mapping(_mapping(workload.get("spec")).get("template"))
    containers = _list(_mapping(template.get("spec")).get("containers"))
    return [c for c in containers if isinstance(c, Mapping) and isinstance(c.get("name"), str)]


def _container_env(workload: Workload, container: str) -> list[Mapping[str, Any]]:
    for c in _pod_containers(workload):
        if c["name"] == container:
            return [e for e in _list(c.get("env")) if isinstance(e, Mapping)]
    return []


def _describe(workload: Workload) -> str:
    meta = _mapping(workload.get("metadata"))
    kind = workload.get("kind") or "workload"
    name = meta.get("name", "?")
    namespace = meta.get("namespace")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def with_type_meta(item: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A list item with the `apiVersion` and `kind` its list response left out."""
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"unsupported workload kind {kind!r}")
    return {**item, "apiVersion": WORKLOAD_KINDS[kind], "kind": kind}


def _type_meta(workload: Workload) -> tuple[str, str]:
    kind = workload.get("kind")
    if not isinstance(kind, str) or kind not in WORKLOAD_KINDS:
        raise ValueError(
            f"workload kind {kind!r} is not one of {sorted(WORKLOAD_KINDS)}; "
            "items of a list response carry no kind, see with_type_meta"
        )
    api_version = workload.get("apiVersion") or WORKLOAD_KINDS[kind]
    return str(api_version), kind


def _identity(workload: Workload) -> dict[str, Any]:
    api_version, kind = _type_meta(workload)
    meta = _mapping(workload.get("metadata"))
    if not meta.get("name") or not meta.get("namespace"):
        raise ValueError(f"{kind} has no metadata.name or metadata.namespace")
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
    }


# --- choosing, checking ----------------------------------------------------------


def selected_containers(workload: Workload, containers: Sequence[str] | None) -> list[str]:
    """Names of the pod template's containers to inject into, in template order.

    Every container when `containers` is None; otherwise the named ones that
    exist (a name the template lacks is skipped, not an error). Init and
    ephemeral containers are never injected: they are not Celery workers.
    """
    names = [c["name"] for c in _pod_containers(workload)]
    if containers is None:
        return names
    wanted = set(containers)
    return [n for n in names if n in wanted]


def _is_ours(live: Mapping[str, Any], ours: Mapping[str, Any]) -> bool:
    """Whether a live env entry is exactly our entry (our own earlier injection).

    The API server drops an empty `value` and never defaults `optional`, so
    `value: ""` and `optional: false` count as absent.
    """
    if live.get("name") != ours.get("name") or live.get("value"):
        return False
    value_from = _mapping(live.get("valueFrom"))
    if set(value_from) != {"secretKeyRef"}:
        return False
    ref = {k: v for k, v in _mapping(value_from["secretKeyRef"]).items()}
    if ref.get("optional") is False:
        del ref["optional"]
    return ref == dict(_mapping(ours.get("valueFrom")).get("secretKeyRef", {}))


def _source(live: Mapping[str, Any]) -> str:
    """Where a live env entry's value comes from, without ever saying the value."""
    if live.get("value"):
        return "a literal value"
    value_from = _mapping(live.get("valueFrom"))
    ref = _mapping(value_from.get("secretKeyRef"))
    if ref:
        return f"Secret {ref.get('name')!r} key {ref.get('key')!r}"
    cm = _mapping(value_from.get("configMapKeyRef"))
    if cm:
        return f"ConfigMap {cm.get('name')!r} key {cm.get('key')!r}"
    if value_from:
        return f"a {'/'.join(sorted(value_from))} reference"
    return "an empty value"


def find_conflicts(
    workload: Workload,
    rb_name: str,
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
) -> list[str]:
    """Why this workload must be left alone; empty when we may inject.

    - it is annotated as injected by another ResultBackend;
    - a chosen container already sets one of our env vars to something other
      than exactly our secretKeyRef (a literal, another Secret or key, a
      ConfigMap, a fieldRef, ...), or sets it more than once (a list-map with a
      duplicate key cannot be applied).

    An entry that is exactly ours is our own earlier injection, not a conflict.
    Messages name the workload, container and variable, never a value.
    """
    reasons: list[str] = []
    what = _describe(workload)
    owner = _annotations(workload).get(INJECTED_BY_ANNOTATION)
    if owner and owner != rb_name:
        reasons.append(
            f"{what} is already injected by ResultBackend {owner!r} "
            f"(annotation {INJECTED_BY_ANNOTATION})"
        )
    for container in selected_containers(workload, containers):
        live_env = _container_env(workload, container)
        for ours in env:
            same_name = [e for e in live_env if e.get("name") == ours["name"]]
            if len(same_name) > 1:
                reasons.append(
                    f"{what}: container {container!r} sets {ours['name']} {len(same_name)} times"
                )
            elif same_name and not _is_ours(same_name[0], ours):
                reasons.append(
                    f"{what}: container {container!r} already sets {ours['name']} "
                    f"from {_source(same_name[0])}"
                )
    return reasons


# --- what we own -----------------------------------------------------------------


def _list_map_key(field: str) -> str | None:
    """The `name` of a `k:{"name":"..."}` fieldsV1 key, None for anything else."""
    if not field.startswith("k:"):
        return None
    try:
        key = json.loads(field[2:])
    except ValueError:
        return None
    name = key.get("name") if isinstance(key, dict) else None
    return name if isinstance(name, str) else None


def owned_env(workload: Workload) -> dict[str, set[str]]:
    """Container name -> env var names that our field manager applied.

    Read from `metadata.managedFields`: entries of `FIELD_MANAGER` with
    operation Apply on the main resource, path
    `f:spec/f:template/f:spec/f:containers/k:{"name":C}/f:env/k:{"name":V}`.
    A container we own with no env entry maps to an empty set. Anything that
    does not parse is ignored: this only decides whether an apply is needed,
    and SSA itself computes the real removal.
    """
    owned: dict[str, set[str]] = {}
    for entry in _list(_mapping(workload.get("metadata")).get("managedFields")):
        entry = _mapping(entry)
        if entry.get("manager") != FIELD_MANAGER or entry.get("operation") != "Apply":
            continue
        if entry.get("subresource"):
            continue
        fields = _mapping(entry.get("fieldsV1"))
        for step in ("f:spec", "f:template", "f:spec", "f:containers"):
            fields = _mapping(fields.get(step))
        for container_key, container_fields in fields.items():
            container = _list_map_key(container_key)
            if container is None:
                continue
            names = owned.setdefault(container, set())
            for env_key in _mapping(_mapping(container_fields).get("f:env")):
                env_name = _list_map_key(env_key)
                if env_name is not None:
                    names.add(env_name)
    return owned


def owns_fields(workload: Workload) -> bool:
    """Whether our field manager has applied anything to this workload."""
    for entry in _list(_mapping(workload.get("metadata")).get("managedFields")):
        entry = _mapping(entry)
        if (
            entry.get("manager") == FIELD_MANAGER
            and entry.get("operation") == "Apply"
            and not entry.get("subresource")
            and _mapping(entry.get("fieldsV1"))
        ):
            return True
    return False


# --- state -----------------------------------------------------------------------


def is_injected_by(workload: Workload, rb_name: str) -> bool:
    """Whether the workload carries this ResultBackend's injected-by annotation."""
    return _annotations(workload).get(INJECTED_BY_ANNOTATION) == rb_name


def injected_containers(
    workload: Workload, rb_name: str, env: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Containers that carry every one of our env entries exactly, in template order.

    Empty unless the workload is annotated as injected by `rb_name`.
    """
    if not is_injected_by(workload, rb_name):
        return []
    result = []
    for c in _pod_containers(workload):
        live_env = [e for e in _list(c.get("env")) if isinstance(e, Mapping)]
        if all(any(_is_ours(e, ours) for e in live_env) for ours in env):
            result.append(c["name"])
    return result


def needs_apply(
    workload: Workload,
    rb_name: str,
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
    config_hash: str,
) -> bool:
    """Whether applying `apply_patch` would change anything.

    True when the live object lacks one of our fields or has it with another
    value (injected-by, config-hash, an env entry in a chosen container), or
    when our field manager still owns env entries or containers we no longer
    want (a container dropped from workers.containers, a renamed urlEnvName):
    the apply then removes them. False for an already injected workload with
    the same Secret, whatever the user added next to our fields, so a restart
    of the operator writes nothing and restarts no worker.

    Call it only for a workload without conflicts (`find_conflicts`).
    """
    if _annotations(workload).get(INJECTED_BY_ANNOTATION) != rb_name:
        return True
    if _template_annotations(workload).get(CONFIG_HASH_ANNOTATION) != config_hash:
        return True
    chosen = selected_containers(workload, containers)
    for container in chosen:
        live_env = _container_env(workload, container)
        for ours in env:
            if not any(_is_ours(e, ours) for e in live_env):
                return True
    wanted_names = {e["name"] for e in env}
    for container, names in owned_env(workload).items():
        if container not in chosen or names - wanted_names:
            return True
    return False


# --- SSA bodies ------------------------------------------------------------------


def apply_patch(
    workload: Workload,
    rb_name: str,
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
    config_hash: str,
) -> dict[str, Any]:
    """The server-side apply body that sets our injection, and nothing else.

    With SSA the body is our field manager's whole intent: the manager owns
    exactly the fields in it, and fields it owned before and no longer sends
    are removed (unless another manager also owns them). So the body lists
    only what we inject: `containers` and `env` are list-maps keyed by `name`,
    so each item needs just its key to be merged into the live item; the
    user's image, command, other env entries and so on stay theirs.

    Required fields of the schema (`spec.selector`, `spec.template`'s
    labels, `containers[].image`, a StatefulSet's `serviceName`) are not
    needed: the API server validates the object that results from merging the
    body into the live object, not the body. The body only has to be well
    formed for the structured merge (list-map keys present). Should the
    workload vanish between our read and the apply, SSA would try to create
    it from this body alone and fail validation (422), so no half workload is
    ever created.

    Send it with `fieldManager=FIELD_MANAGER` and without force: our entries
    are either absent or exactly ours (`find_conflicts`), so a 409 means a
    user changed one of them in between; re-read and report it.

    Raises ValueError when no container is chosen: an injection without env
    would only roll the pods. Release the workload instead (`workload_status`
    says so).
    """
    chosen = selected_containers(workload, containers)
    if not chosen:
        raise ValueError(f"{_describe(workload)} has no container to inject into")
    body = _identity(workload)
    body["metadata"]["annotations"] = {INJECTED_BY_ANNOTATION: rb_name}
    body["spec"] = {
        "template": {
            "metadata": {"annotations": {CONFIG_HASH_ANNOTATION: config_hash}},
            "spec": {
                "containers": [
                    {"name": name, "env": [_copy_env(e) for e in env]} for name in chosen
                ]
            },
        }
    }
    return body


def _copy_env(entry: Mapping[str, Any]) -> EnvVar:
    return copy.deepcopy(dict(entry))


def release_patch(workload: Workload) -> dict[str, Any]:
    """The server-side apply body that gives up everything our manager owns.

    Only apiVersion, kind, name and namespace: identity, which is not tracked
    as owned. Applying it as `FIELD_MANAGER` tells the API server our manager
    now wants no field at all, so every field only we owned is removed: the
    injected-by annotation, the config-hash annotation (which rolls the pods,
    now without our env) and our env entries. A field another manager also
    owns (a user who set the same value) stays and becomes only theirs;
    containers stay because their owner also owns them. Our managedFields
    entry disappears, so releasing twice is a no-op.

    The manager is shared by every ResultBackend: send this only for a
    workload `is_injected_by` the releasing ResultBackend.
    """
    return _identity(workload)


# --- one call for the reconciler ---------------------------------------------------

Action = Literal["apply", "none", "release", "conflict"]


@dataclass(frozen=True)
class WorkloadState:
    """What to do with one selected workload, and what to report about it."""

    name: str
    action: Action
    containers: tuple[str, ...]
    """The chosen containers."""
    injected: bool
    """Carries this ResultBackend's current injection in every chosen container."""
    reasons: tuple[str, ...] = ()
    """Conflicts (action "conflict") or why nothing is injected (no container)."""


def workload_status(
    workload: Workload,
    rb_name: str,
    env: Sequence[Mapping[str, Any]],
    containers: Sequence[str] | None,
    config_hash: str,
) -> WorkloadState:
    """Decide about a workload that `workers.selector` matches.

    - conflict: claimed by another ResultBackend or a clashing env var; leave
      it alone (even if we injected it earlier: a user's edit wins, and we say so);
    - release: none of `workers.containers` exists in it but it still carries
      our injection;
    - apply: `needs_apply`;
    - none: it already carries the current injection, or has no chosen
      container and nothing of ours.
    """
    name = str(_mapping(workload.get("metadata")).get("name", ""))
    chosen = tuple(selected_containers(workload, containers))
    conflicts = find_conflicts(workload, rb_name, env, containers)
    if conflicts:
        return WorkloadState(name, "conflict", chosen, False, tuple(conflicts))
    if not chosen:
        reason = f"{_describe(workload)} has none of the containers {sorted(containers or ())}"
        # Claimed by nobody else here (that would be a conflict above), so fields
        # of the shared manager are ours to drop.
        mine = is_injected_by(workload, rb_name) or owns_fields(workload)
        return WorkloadState(name, "release" if mine else "none", chosen, False, (reason,))
    if needs_apply(workload, rb_name, env, containers, config_hash):
        return WorkloadState(name, "apply", chosen, False)
    return WorkloadState(name, "none", chosen, True)


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


def rolled_out(workload: Workload) -> bool:
    """Whether the controller has finished rolling out the current pod template.

    Deployment: the controller saw this generation and every pod it counts is of
    the new template (`status.replicas == updatedReplicas == spec.replicas`: the
    old ReplicaSets are scaled to zero), and no pod is terminating: `replicas`
    leaves terminating pods out, and an old pod may still store its last results
    during its grace period (`status.terminatingReplicas`, Kubernetes 1.35 on by
    default; absent before, where such a pod is not waited for). StatefulSet:
    the current revision is the update revision (it replaces a pod only once the
    old one is gone). A workload that cannot finish (no nodes, OnDelete) never is.
    """
    meta, spec = _mapping(workload.get("metadata")), _mapping(workload.get("spec"))
    status = _mapping(workload.get("status"))
    if _int(status.get("observedGeneration")) < _int(meta.get("generation")):
        return False
    if workload.get("kind") == "StatefulSet":
        update = status.get("updateRevision")
        return bool(update) and status.get("currentRevision") == update
    wanted = _int(spec.get("replicas"), 1)
    if _int(status.get("terminatingReplicas")) > 0:
        return False
    return _int(status.get("replicas")) == _int(status.get("updatedReplicas")) == wanted


def workers_settled(workloads: Sequence[Workload], rb_name: str, config_hash: str) -> bool:
    """Every workload injected by `rb_name` runs pods of the `config_hash` template.

    Old credentials may be revoked once this holds: no pod still uses them.
    """
    return all(
        _template_annotations(wl).get(CONFIG_HASH_ANNOTATION) == config_hash and rolled_out(wl)
        for wl in workloads
        if is_injected_by(wl, rb_name)
    )
