"""Pure functions that compute status: phase, conditions, the status patch."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .api import (
    CONDITION_INJECTED,
    CONDITION_PROVISIONED,
    CONDITION_REACHABLE,
    CONDITION_READY,
    condition,
    get_condition,
    merge_conditions,
)

# Condition reasons that need the user to act (the phase is Failed); anything
# else that fails is a passing outage (Provisioning before the first success,
# Degraded after it).
USER_ACTION_REASONS = frozenset(
    {
        "InvalidSpec",
        "SecretNotFound",
        "SecretKeyMissing",
        "Conflict",
        "AdminAuthFailed",
        "Forbidden",
        "InvalidName",
        "StoreNotFound",
        "StoreNotAllowed",
        "StoreTypeMismatch",
    }
)


@dataclass
class Observed:
    """What one reconcile found, in the terms status speaks."""

    generation: int
    provisioned: tuple[bool, str, str] | None = None  # (ok, reason, message)
    reachable: tuple[bool, str, str] | None = None
    injected: tuple[bool, str, str] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # url, secretName, couchdb/consul ...


def _cond(
    type_: str, value: tuple[bool, str, str] | None, gen: int, current: Mapping[str, Any]
) -> dict[str, Any]:
    if value is None:
        # Not looked at this time (an earlier step failed): keep what we knew,
        # with the generation it was observed at.
        known = get_condition(current.get("conditions"), type_)
        if known is not None:
            return {k: v for k, v in known.items() if k != "lastTransitionTime"}
        return condition(type_, None, "NotChecked", "not checked yet", gen)
    ok, reason, message = value
    return condition(type_, ok, reason, message, gen)


def desired_status(
    current: Mapping[str, Any] | None, observed: Observed, now: dt.datetime
) -> dict[str, Any]:
    """The whole status this operator owns, from what the reconcile observed."""
    current = current or {}
    gen = observed.generation
    parts = [
        _cond(CONDITION_PROVISIONED, observed.provisioned, gen, current),
        _cond(CONDITION_REACHABLE, observed.reachable, gen, current),
        _cond(CONDITION_INJECTED, observed.injected, gen, current),
    ]
    not_ready = [c for c in parts if c["status"] != "True"]
    if not_ready:
        first = not_ready[0]
        ready = condition(
            CONDITION_READY, False, first["reason"], f"{first['type']}: {first['message']}", gen
        )
    else:
        ready = condition(CONDITION_READY, True, "Ready", "the result backend is ready", gen)
    conditions = merge_conditions(current.get("conditions"), [*parts, ready], now)
    status: dict[str, Any] = {
        **{k: v for k, v in current.items() if k not in ("conditions",)},
        **observed.fields,
        "observedGeneration": gen,
        "phase": phase_of(observed, current),
        "conditions": conditions,
    }
    return status


def phase_of(observed: Observed, current: Mapping[str, Any]) -> str:
    failing = [
        v for v in (observed.provisioned, observed.reachable, observed.injected) if v and not v[0]
    ]
    if any(reason in USER_ACTION_REASONS for _, reason, _ in failing):
        return "Failed"
    if observed.provisioned is None or not observed.provisioned[0]:
        was = get_condition(current.get("conditions"), CONDITION_PROVISIONED)
        return "Degraded" if was and was.get("status") == "True" else "Provisioning"
    if failing:
        return "Degraded"
    if observed.reachable is None or observed.injected is None:
        return "Provisioning"
    return "Ready"


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level status keys whose value differs; empty means no write is needed.

    Status is written as a JSON merge patch, which merges objects key by key: a
    key an object value no longer has (e.g. `workers.conflicts` once the conflict
    is gone) is sent as null, so that the merge removes it.
    """
    current = current or {}
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if old == value:
            continue
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            value = {**{k: None for k in old if k not in value}, **value}
        patch[key] = value
    return patch


def transitions(
    current: Sequence[Mapping[str, Any]] | None, desired: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[str | None, str]]:
    """Condition types whose status changed: type -> (old status or None, new status)."""
    old = {c.get("type"): c.get("status") for c in current or ()}
    return {
        c["type"]: (old.get(c["type"]), c["status"])
        for c in desired
        if old.get(c["type"]) != c["status"]
    }
