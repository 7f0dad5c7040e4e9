"""Typed models of the three kinds (ResultBackend, ResultStore, ClusterResultStore),
parsing, and the condition helpers.

The CRD's OpenAPI schema and CEL rules reject bad input at admission; this module
parses what the API server accepted into typed values, fills the defaults that
depend on the object's identity (database name, key prefix), and repeats the few
checks that matter for safety so the operator never acts on a spec the schema
would have refused (for example when the CRD was installed by an older chart).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

GROUP = "resultstores.io"
VERSION = "v1alpha2"
PLURAL = "resultbackends"
KIND = "ResultBackend"
STORE_KIND = "ResultStore"
STORE_PLURAL = "resultstores"
CLUSTER_STORE_KIND = "ClusterResultStore"
CLUSTER_STORE_PLURAL = "clusterresultstores"
STORE_PLURALS = {STORE_KIND: STORE_PLURAL, CLUSTER_STORE_KIND: CLUSTER_STORE_PLURAL}
API_VERSION = f"{GROUP}/{VERSION}"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "resultbackend-operator"
FIELD_MANAGER = "resultbackend-operator"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
# On a ResultBackend: the uid of an earlier one of the same namespace and name whose
# store objects it takes over (backends.Owner.adopts), e.g. a v1alpha1 object replaced.
ADOPT_ANNOTATION = f"{GROUP}/adopt-uid"
INJECTED_BY_ANNOTATION = f"{GROUP}/injected-by"
# Holds a ResultBackend until what it provisioned is released (reconcile/resultbackend.py),
# and a store while ResultBackends reference it (reconcile/store.py).
FINALIZER = f"{GROUP}/finalizer"
PROVIDER = GROUP

COUCHDB_DATABASE_RE = re.compile(r"^[a-z][a-z0-9_$()+/-]*$")
COUCHDB_DATABASE_MAX = 238
# Segments of letters, digits, '_', '-', '.', joined by single '/': the prefix is
# written into a Consul ACL rule, so nothing that could close the HCL string passes.
_KEY_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
KEY_PREFIX_RE = re.compile(rf"^{_KEY_SEGMENT}(/{_KEY_SEGMENT})*$")
KEY_PREFIX_MAX = 512

CONDITION_PROVISIONED = "Provisioned"
CONDITION_REACHABLE = "BackendReachable"
CONDITION_INJECTED = "WorkersInjected"
CONDITION_READY = "Ready"

Phase = Literal["Pending", "Provisioning", "Ready", "Degraded", "Deleting", "Failed"]


class InvalidSpec(ValueError):
    """The spec cannot be acted on; retrying will not help until the user edits it."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


_M = TypeVar("_M", bound=_Model)


class CouchDBAdminSecretRef(_Model):
    name: str = Field(min_length=1)
    username_key: str = Field(default="username", alias="usernameKey", min_length=1)
    password_key: str = Field(default="password", alias="passwordKey", min_length=1)


class CouchDBStoreSpec(_Model):
    url: str
    admin_secret_ref: CouchDBAdminSecretRef = Field(alias="adminSecretRef")

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _check_base_url(value)


class ConsulTokenSecretRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(default="token", min_length=1)


class ConsulStoreSpec(_Model):
    url: str
    token_secret_ref: ConsulTokenSecretRef = Field(alias="tokenSecretRef")

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return _check_base_url(value)


class LabelSelectorRequirement(_Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(_Model):
    match_labels: Mapping[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field(
        default=(), alias="matchExpressions"
    )

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """Kubernetes LabelSelector semantics; an empty selector matches everything."""
        labels = labels or {}
        for key, value in self.match_labels.items():
            if labels.get(key) != value:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True

    def to_query(self) -> str:
        """The selector as a label-selector query string for list calls."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "In":
                parts.append(f"{req.key} in ({','.join(req.values)})")
            elif req.operator == "NotIn":
                parts.append(f"{req.key} notin ({','.join(req.values)})")
            elif req.operator == "Exists":
                parts.append(req.key)
            else:
                parts.append(f"!{req.key}")
        return ",".join(parts)


class WorkersSpec(_Model):
    selector: LabelSelector | None = None
    containers: tuple[str, ...] | None = None
    url_env_name: str = Field(default="CELERY_RESULT_BACKEND", alias="urlEnvName")


class RotationSpec(_Model):
    trigger: dt.datetime | None = None


# The spec blocks of the stores the CRD knows: a store sets exactly one (its type),
# a ResultBackend at most the one of its store's type (its options).
STORE_BLOCKS = ("couchdb", "consul")


class StoreSpec(_Model):
    # Blocks of store types the CRD does not spell out here are kept (extra), so a
    # store module registered elsewhere (a test's) reads its own block.
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="allow")

    couchdb: CouchDBStoreSpec | None = None
    consul: ConsulStoreSpec | None = None
    # ClusterResultStore only: the namespaces whose ResultBackends may use it.
    namespace_selector: LabelSelector | None = Field(default=None, alias="namespaceSelector")

    def blocks(self) -> dict[str, Any]:
        """The store blocks set: name -> its model (or mapping, for an extra one)."""
        found: dict[str, Any] = {b: getattr(self, b) for b in STORE_BLOCKS if getattr(self, b)}
        for name, value in (self.model_extra or {}).items():
            if isinstance(value, Mapping) and isinstance(value.get("url"), str):
                found[name] = value
        return found


class ResultStore(_Model):
    """A parsed ResultStore or ClusterResultStore (namespace "")."""

    kind: Literal["ResultStore", "ClusterResultStore"]
    namespace: str
    name: str
    uid: str
    generation: int
    spec: StoreSpec

    @property
    def type(self) -> str:
        return next(iter(self.spec.blocks()))

    @property
    def url(self) -> str:
        block = self.spec.blocks()[self.type]
        return str(block["url"] if isinstance(block, Mapping) else block.url)

    @property
    def ref(self) -> StoreKey:
        return (self.kind, self.namespace, self.name)

    def describe(self) -> str:
        return describe_store(self.ref)

    def allows(self, namespace_labels: Mapping[str, str] | None) -> bool:
        """Whether a ResultBackend in a namespace with these labels may use this store.

        A ResultStore serves its own namespace only (the caller looks it up there);
        a ClusterResultStore every namespace its selector matches (absent: all)."""
        selector = self.spec.namespace_selector
        return self.kind == STORE_KIND or selector is None or selector.matches(namespace_labels)


# (kind, namespace or "" for a ClusterResultStore, name)
StoreKey = tuple[str, str, str]


def describe_store(key: StoreKey) -> str:
    """A store as messages name it: "ResultStore s in namespace n", "ClusterResultStore s"."""
    kind, namespace, name = key
    return f"{kind} {name}" + (f" in namespace {namespace}" if namespace else "")


class StoreRef(_Model):
    kind: Literal["ResultStore", "ClusterResultStore"] = "ResultStore"
    name: str = Field(min_length=1)

    def key(self, namespace: str) -> StoreKey:
        """The store this names from a ResultBackend in `namespace`."""
        return (self.kind, namespace if self.kind == STORE_KIND else "", self.name)


class CouchDBOptions(_Model):
    database: str | None = None

    @field_validator("database")
    @classmethod
    def _database_name(cls, value: str | None) -> str | None:
        if value is not None:
            check_couchdb_database(value)
        return value


class ConsulOptions(_Model):
    key_prefix: str | None = Field(default=None, alias="keyPrefix")
    one_client: bool = Field(default=False, alias="oneClient")

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None:
            check_key_prefix(value)
        return value


class ResultBackendSpec(_Model):
    store_ref: StoreRef = Field(alias="storeRef")
    couchdb: CouchDBOptions | None = None
    consul: ConsulOptions | None = None
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", alias="deletionPolicy")
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    rotation: RotationSpec = Field(default_factory=RotationSpec)


class Bound(_Model):
    """The store serving a ResultBackend, as its reconcile found it."""

    kind: str
    name: str
    type: str
    url: str


class StoreMismatch(ValueError):
    """A ResultBackend's option block is not its store's type."""


class ResultBackend(_Model):
    """A parsed ResultBackend: identity plus spec with every default resolved."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: ResultBackendSpec

    @property
    def secret_name(self) -> str:
        return f"{self.name}-result-backend"

    store: Bound | None = None  # set by `bind`, once its store is resolved
    adopts: str = ""  # ADOPT_ANNOTATION

    def bind(self, store: ResultStore) -> ResultBackend:
        """This ResultBackend served by `store` (StoreMismatch: options of another type)."""
        others = [b for b in STORE_BLOCKS if b != store.type and getattr(self.spec, b)]
        if others:
            # The ResultBackend's options are of one store type; its store is another.
            raise StoreMismatch(
                f"spec.{others[0]} is set but {store.describe()} is a {store.type} store"
            )
        if store.type == "couchdb" and self.couchdb_options.database is None:
            try:
                check_couchdb_database(self.couchdb_database)
            except ValueError as exc:
                raise InvalidSpec(
                    f"the default database name is not valid for CouchDB ({exc}); "
                    "set spec.couchdb.database"
                ) from None
        bound = Bound(kind=store.kind, name=store.name, type=store.type, url=store.url)
        return self.model_copy(update={"store": bound})

    @property
    def url(self) -> str:
        """Its store's server URL (bound ResultBackends only)."""
        assert self.store is not None, "a ResultBackend's store is resolved before use"
        return self.store.url

    @property
    def couchdb_options(self) -> CouchDBOptions:
        return self.spec.couchdb or CouchDBOptions()

    @property
    def consul_options(self) -> ConsulOptions:
        return self.spec.consul or ConsulOptions()

    @property
    def couchdb_database(self) -> str:
        return self.couchdb_options.database or default_database(self.namespace, self.name)

    @property
    def couchdb_user(self) -> str:
        return f"rb_{self.namespace}_{self.name}"

    @property
    def consul_key_prefix(self) -> str:
        return self.consul_options.key_prefix or f"celery/{self.namespace}/{self.name}"

    @property
    def consul_policy_name(self) -> str:
        # Consul policy names allow [A-Za-z0-9_-]; Kubernetes names never hold '_',
        # so mapping '.' to '_' keeps distinct names distinct.
        return f"resultbackend-{self.namespace}-{self.name}".replace(".", "_")

    @property
    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def default_database(namespace: str, name: str) -> str:
    """`<namespace>-<name>`; both are DNS labels/subdomains, so only dots need mapping."""
    return f"{namespace}-{name}".replace(".", "-")


def check_couchdb_database(value: str) -> None:
    if len(value) > COUCHDB_DATABASE_MAX:
        raise ValueError(f"database name is longer than {COUCHDB_DATABASE_MAX} characters")
    if not COUCHDB_DATABASE_RE.match(value):
        raise ValueError(
            f"database name {value!r} does not match CouchDB's rule {COUCHDB_DATABASE_RE.pattern}"
        )


def check_key_prefix(value: str) -> None:
    if len(value) > KEY_PREFIX_MAX or not KEY_PREFIX_RE.match(value):
        raise ValueError(
            "keyPrefix must be segments of letters, digits, '_', '-' and '.' joined by single "
            f"'/', with no leading or trailing '/', at most {KEY_PREFIX_MAX} characters"
        )


def _check_base_url(value: str) -> str:
    if not re.match(r"^https?://[^/@\s]+(:[0-9]+)?/?$", value):
        raise ValueError(
            "url must be an http:// or https:// base URL with no path and no credentials"
        )
    return value.rstrip("/")


def parse(body: Mapping[str, Any]) -> ResultBackend:
    """Parse a ResultBackend object as the API server returns it.

    Raises InvalidSpec with a message that names the offending field and never
    echoes field values that could hold secrets (there are none in the spec by
    design: a ResultBackend names no URL and no Secret).
    """
    meta = body.get("metadata", {})
    parsed = _validate(ResultBackendSpec, body)
    blocks = [b for b in STORE_BLOCKS if getattr(parsed, b) is not None]
    if len(blocks) > 1:
        raise InvalidSpec(f"set at most one of {' and '.join('spec.' + b for b in blocks)}")
    return ResultBackend(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        spec=parsed,
        adopts=str((meta.get("annotations") or {}).get(ADOPT_ANNOTATION) or ""),
    )


def parse_store(body: Mapping[str, Any]) -> ResultStore:
    """Parse a ResultStore or ClusterResultStore (its `kind` says which)."""
    meta = body.get("metadata", {})
    kind = body.get("kind")
    if kind not in STORE_PLURALS:
        raise InvalidSpec(f"not a store kind: {kind!r}")
    parsed = _validate(StoreSpec, body)
    blocks = parsed.blocks()
    if len(blocks) != 1:
        raise InvalidSpec(f"set exactly one of {' and '.join('spec.' + b for b in STORE_BLOCKS)}")
    if kind == STORE_KIND and parsed.namespace_selector is not None:
        raise InvalidSpec("spec.namespaceSelector: only a ClusterResultStore has one")
    return ResultStore(
        kind=kind,
        namespace=meta.get("namespace") or "",
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        generation=int(meta.get("generation", 0)),
        spec=parsed,
    )


def _validate(model: type[_M], body: Mapping[str, Any]) -> _M:
    try:
        return model.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        raise InvalidSpec(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"spec.{loc}: {err['msg']}")
    return "; ".join(parts)


# --- conditions -------------------------------------------------------------


def generation(obj: Mapping[str, Any] | None) -> int:
    """An object's metadata.generation (0 when it has none)."""
    return int(((obj or {}).get("metadata") or {}).get("generation") or 0)


def now_rfc3339(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: bool | None, reason: str, message: str, generation: int
) -> dict[str, Any]:
    """A condition without lastTransitionTime; merge_conditions adds it."""
    return {
        "type": type_,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def merge_conditions(
    current: Sequence[Mapping[str, Any]] | None,
    desired: Sequence[Mapping[str, Any]],
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """Desired conditions, keeping lastTransitionTime where the status did not change.

    Conditions of types we do not manage are kept as they are, so another
    controller's conditions survive our status writes.
    """
    by_type = {c.get("type"): c for c in current or ()}
    merged: list[dict[str, Any]] = []
    for cond in desired:
        old = by_type.pop(cond["type"], None)
        new = dict(cond)
        if (
            old is not None
            and old.get("status") == cond["status"]
            and old.get("lastTransitionTime")
        ):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            new["lastTransitionTime"] = now_rfc3339(now)
        merged.append(new)
    merged.extend(dict(c) for c in by_type.values())
    return merged


def get_condition(
    conditions: Sequence[Mapping[str, Any]] | None, type_: str
) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == type_:
            return cond
    return None
