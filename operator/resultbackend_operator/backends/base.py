"""The stores behind one interface: the `Store` protocol, its registry, shared errors.

A store module (couchdb.py, consul.py) holds everything that knows its store
and registers one `Store` object under its type, the spec block a
ResultStore or ClusterResultStore sets. The generic reconciles (reconcile/)
look the store up here and never branch on the type. In the spirit of
crossplane-runtime's ExternalClient, a store can:

- check its server and the admin credentials (`check_admin`, for the store
  object's status, once per check interval: every ResultBackend on the store
  relies on that answer rather than asking the server itself);
- provision idempotently what a ResultBackend needs (`provision`), returning
  the worker Secret's data and its status fields, revoking credentials a
  rotation superseded when the generic reconcile says they may go;
- check the worker credentials as a worker would (`check_worker`), taking them
  from the worker Secret's data;
- remove what it made (`remove`) and describe it (`describe`).

A ResultBackend handed to a store is bound (`rb.url` is its store's server).
"""

from __future__ import annotations

import concurrent.futures
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import Problem

if TYPE_CHECKING:
    from ..api import ResultBackend, ResultStore

# Reasons a BackendError carries; they become condition reasons as they are.
REASON_UNREACHABLE = "Unreachable"  # connection refused, timeout, DNS, 5xx
REASON_ADMIN_AUTH = "AdminAuthFailed"  # the operator's admin credentials were refused
REASON_FORBIDDEN = "Forbidden"  # authenticated, but not allowed (e.g. token lacks acl=write)
REASON_CONFLICT = "Conflict"  # the object exists and is not ours
REASON_INVALID = "InvalidName"  # the server rejected a name we asked for
REASON_WORKER_AUTH = "WorkerCredentialsRejected"  # the worker credentials do not work
REASON_BACKEND = "BackendError"  # anything else the server answered unexpectedly
REASON_VERSION = "UnsupportedVersion"  # a server version the store module cannot serve


# A store operation failed: the stores' name for the one error type (errors.Problem).
BackendError = Problem


@dataclass(frozen=True)
class Owner:
    """Identity of the ResultBackend that owns a store object.

    `adopts`: the uid of an earlier ResultBackend of the same namespace and name
    whose store objects this one takes over (annotation api.ADOPT_ANNOTATION,
    e.g. when it replaces a v1alpha1 object): what is marked as that one's is
    this one's too, and is marked anew as it is written.
    """

    namespace: str
    name: str
    uid: str
    adopts: str = field(default="", compare=False)

    def describe(self) -> str:
        return f"resultbackend-operator: ResultBackend {self.namespace}/{self.name} uid={self.uid}"

    def owns(self, namespace: object, name: object, uid: object) -> bool:
        """Whether a marker naming (namespace, name, uid) names this owner (or the
        ResultBackend it adopts)."""
        if not self.uid or namespace != self.namespace or name != self.name:
            return False
        return uid == self.uid or (bool(self.adopts) and uid == self.adopts)

    @classmethod
    def of(cls, rb: ResultBackend) -> Owner:
        return cls(namespace=rb.namespace, name=rb.name, uid=rb.uid, adopts=rb.adopts)


def generate_password(length: int = 40) -> str:
    """URL-safe alphabet only, so it can sit in a URL's userinfo unescaped."""
    return secrets.token_urlsafe(length)[:length]


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or default_port


@dataclass(frozen=True)
class AdminSecretRef:
    """The Secret with a store's admin credentials: its name and, per purpose, the key."""

    namespace: str
    name: str
    keys: Mapping[str, str]  # purpose ("username", "token", ...) -> key in the Secret


@dataclass(frozen=True)
class Superseded:
    """May credentials a rotation replaced go now? `keep`, or `why` they may go."""

    keep: bool
    why: str


NOTHING_SUPERSEDED = Superseded(False, "no rotation is in progress")


@dataclass
class Provisioned:
    """What `Store.provision` made sure of."""

    secret_data: dict[str, str]  # the worker Secret's data, decoded
    fields: dict[str, Any]  # status fields: `url` and the store's own block
    writes: int  # writes it made to the store
    warnings: list[str] = field(default_factory=list)  # said in the Provisioned condition
    revoked: str | None = None  # superseded credentials were revoked, and why they could go
    pending: bool = False  # superseded credentials are kept for now: look again soon


class Store(Protocol):
    """One kind of store server (see the module docstring)."""

    type: str  # the store objects' spec block, and the metrics' `store` label
    api_kind: str  # the `kind` label its HTTP requests are counted under
    # Whether a rotation keeps the credentials it replaced until the workers rolled
    # (then `provision` needs `superseded`, which takes a look at the workloads).
    keeps_superseded: bool
    # Env entries injected beside the URL: env name -> worker Secret key.
    extra_env: Mapping[str, str]

    def admin_secret(self, store: ResultStore, namespace: str) -> AdminSecretRef:
        """The admin Secret `store` names; it is read in `namespace` only."""
        ...

    def check_admin(self, url: str, admin: Mapping[str, str]) -> str:
        """The server's version, once it showed the admin credentials can do their job."""
        ...

    def provision(
        self,
        rb: ResultBackend,
        admin: Mapping[str, str],
        existing: Mapping[str, str] | None,
        *,
        rotate: bool,
        superseded: Superseded,
        io: concurrent.futures.Executor,
    ) -> Provisioned: ...

    def check_worker(
        self, rb: ResultBackend, secret_data: Mapping[str, str], io: concurrent.futures.Executor
    ) -> None: ...

    def remove(self, rb: ResultBackend, admin: Mapping[str, str]) -> str: ...

    def describe(self, rb: ResultBackend) -> str: ...


STORES: dict[str, Store] = {}


def register(store: Store) -> Store:
    """Serve ResultBackends of `store.type` with `store` (a store module does this once)."""
    STORES[store.type] = store
    return store


def store_for(store_type: str) -> Store:
    """The store of a type; KeyError for a type no module registered."""
    return STORES[store_type]
