"""The one error type a reconcile turns into a condition instead of raising on."""

from __future__ import annotations


class Problem(Exception):
    """A failure with a condition reason.

    `message` is written to conditions and Events, so it must never contain a
    password or a token: build it from names, URLs without userinfo and status
    codes only. `transient`: whether trying again can help by itself (else the
    fix is a change someone makes: a spec, a Secret, an object in the store).
    """

    def __init__(self, reason: str, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient
