"""Rotation: when new worker credentials are due, and when the ones they replaced may go.

Shared by every store: a store that keeps superseded credentials
(`Store.keeps_superseded`) is told by `superseded` whether to keep them still.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from .. import injection
from ..api import ResultBackend
from ..backends import NOTHING_SUPERSEDED, Superseded
from ..settings import SETTINGS


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def wants_rotation(rb: ResultBackend, status: Mapping[str, Any], now: dt.datetime) -> bool:
    """Rotate when the trigger moved past the last rotation and its time has come.

    A trigger in the future schedules the rotation for the first reconcile after
    it; rotating at every reconcile until then would restart workers in a loop.
    """
    trigger = rb.spec.rotation.trigger
    if trigger is None:
        return False
    if trigger.tzinfo is None:
        trigger = trigger.replace(tzinfo=dt.UTC)
    if trigger > now:
        return False
    rotated = status.get("credentialsRotatedAt")
    if not rotated:
        return True
    return trigger > _time(rotated)


def superseded(
    rb: ResultBackend,
    status: Mapping[str, Any],
    secret_data: Mapping[str, str] | None,
    workloads: list[dict[str, Any]] | None,
    now: dt.datetime,
) -> Superseded:
    """May credentials a rotation replaced be revoked now?

    They are kept while a rotation is recent and some injected workload still
    runs pods of the previous template (`workloads` None: they could not be
    listed, so keep them); after `SETTINGS.rotation_grace` seconds they go
    whatever the rollout says. Outside that window, credentials that are not
    the Secret's are a crash leftover no pod ever saw.
    """
    rotated = status.get("credentialsRotatedAt")
    if not rotated:
        return NOTHING_SUPERSEDED
    since = (now - _time(rotated)).total_seconds()
    if since >= SETTINGS.rotation_grace:
        return Superseded(False, f"{SETTINGS.rotation_grace:.0f}s passed since the rotation")
    if workloads is None:
        return Superseded(True, "")
    chash = injection.config_hash(injection.encode_secret_data(secret_data or {}))
    if injection.workers_settled(workloads, rb.name, chash):
        return Superseded(False, "every injected workload rolled out the new credentials")
    return Superseded(True, "")
