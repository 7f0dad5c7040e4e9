"""The Events a reconcile posts: on transitions only, so a steady state posts nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import api
from ..status import transitions


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str
    subject: str = ""  # the workload (Kind/name) an injection Event is about


def coalesce(events: list[Event]) -> list[Event]:
    """One Event where a reconcile both provisioned and injected.

    A first reconcile usually does both; posted apart they were two API writes
    for one thing done. The injections then ride on the Provisioned Event's
    message ("...; injected into Deployment/w"). Injections on their own (a
    workload arriving later) keep their own Events.
    """
    provisioned = [e for e in events if e.type == "Normal" and e.reason == "Provisioned"]
    injected = [e for e in events if e.reason == "Injected" and e.subject]
    if len(provisioned) != 1 or not injected:
        return events
    into = ", ".join(e.subject for e in injected)
    merged = dataclasses.replace(
        provisioned[0], message=f"{provisioned[0].message}; injected into {into}"
    )
    return [merged if e is provisioned[0] else e for e in events if e not in injected]


def for_transitions(current: Mapping[str, Any], desired: Mapping[str, Any]) -> list[Event]:
    """The Events of the condition changes from `current` to `desired` status."""
    changed = transitions(current.get("conditions"), desired["conditions"])
    conds = {c["type"]: c for c in desired["conditions"]}
    events: list[Event] = []
    prov = changed.get(api.CONDITION_PROVISIONED)
    if prov and prov[1] == "True":
        events.append(Event("Normal", "Provisioned", conds[api.CONDITION_PROVISIONED]["message"]))
    elif prov and prov[1] == "False":
        c = conds[api.CONDITION_PROVISIONED]
        events.append(Event("Warning", c["reason"], c["message"]))
    reach = changed.get(api.CONDITION_REACHABLE)
    if reach and reach[1] == "False":
        c = conds[api.CONDITION_REACHABLE]
        events.append(Event("Warning", "Degraded", f"{c['reason']}: {c['message']}"))
    elif reach and reach[1] == "True" and reach[0] == "False":
        events.append(Event("Normal", "Recovered", "the worker credentials work again"))
    return events
