"""The stores: the interface and shared errors (base.py), one module per store.

Importing this package registers every store; adding one is a module and a line here.
"""

from __future__ import annotations

from . import consul, couchdb  # the registry: each store module registers itself
from .base import (
    NOTHING_SUPERSEDED,
    REASON_ADMIN_AUTH,
    REASON_BACKEND,
    REASON_CONFLICT,
    REASON_FORBIDDEN,
    REASON_INVALID,
    REASON_UNREACHABLE,
    REASON_VERSION,
    REASON_WORKER_AUTH,
    STORES,
    AdminSecretRef,
    BackendError,
    Owner,
    Provisioned,
    Store,
    Superseded,
    generate_password,
    host_port,
    register,
    store_for,
)

__all__ = [
    "NOTHING_SUPERSEDED",
    "REASON_ADMIN_AUTH",
    "REASON_BACKEND",
    "REASON_CONFLICT",
    "REASON_FORBIDDEN",
    "REASON_INVALID",
    "REASON_UNREACHABLE",
    "REASON_VERSION",
    "REASON_WORKER_AUTH",
    "STORES",
    "AdminSecretRef",
    "BackendError",
    "Owner",
    "Provisioned",
    "Store",
    "Superseded",
    "consul",
    "couchdb",
    "generate_password",
    "host_port",
    "register",
    "store_for",
]
