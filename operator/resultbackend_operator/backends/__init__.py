"""The stores behind one small interface: errors and ownership shared by both."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

# Reasons a BackendError carries; they become condition reasons as they are.
REASON_UNREACHABLE = "Unreachable"  # connection refused, timeout, DNS, 5xx
REASON_ADMIN_AUTH = "AdminAuthFailed"  # the operator's admin credentials were refused
REASON_FORBIDDEN = "Forbidden"  # authenticated, but not allowed (e.g. token lacks acl=write)
REASON_CONFLICT = "Conflict"  # the object exists and is not ours
REASON_INVALID = "InvalidName"  # the server rejected a name we asked for
REASON_WORKER_AUTH = "WorkerCredentialsRejected"  # the worker credentials do not work
REASON_BACKEND = "BackendError"  # anything else the server answered unexpectedly


class BackendError(Exception):
    """A store operation failed.

    `message` is written to conditions and Events, so it must never contain a
    password or a token: build it from names, URLs without userinfo and status
    codes only.
    """

    def __init__(self, reason: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Owner:
    """Identity of the ResultBackend that owns a store object."""

    namespace: str
    name: str
    uid: str

    def describe(self) -> str:
        return f"resultbackend-operator: ResultBackend {self.namespace}/{self.name} uid={self.uid}"


def generate_password(length: int = 40) -> str:
    """URL-safe alphabet only, so it can sit in a URL's userinfo unescaped."""
    return secrets.token_urlsafe(length)[:length]
