"""The workers of a ResultBackend: inject into the selected workloads, release the rest.

Pure decisions come from injection.py; this module lists and applies through
kube.py and records what it saw of each selected workload (`Seen`), so that a
later workload event or periodic check knows what this ResultBackend injected.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from .. import api, injection, kube
from ..api import ResultBackend
from ..watched import WatchedLabels
from .events import Event


def no_workers() -> dict[str, Any]:
    return {"selected": 0, "injected": 0, "names": []}


@dataclass(frozen=True)
class Seen:
    """One selected workload as the last look at it left it."""

    name: str
    injected: bool
    conflicts: tuple[str, ...] = ()
    # metadata.generation after our last apply to it (0: not applied by us): a
    # watch event of an older generation was overtaken by that apply.
    generation: int = 0


@dataclass
class Workers:
    seen: dict[str, Seen] = field(default_factory=dict)  # selected workloads by Kind/name
    events: list[Event] = field(default_factory=list)
    writes: int = 0

    @property
    def injected(self) -> list[str]:
        return [self.seen[i].name for i in sorted(self.seen) if self.seen[i].injected]

    @property
    def conflicts(self) -> list[str]:
        return [c for i in sorted(self.seen) for c in self.seen[i].conflicts]

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "selected": len(self.seen),
            "injected": len(self.injected),
            "names": sorted(self.injected),
        }
        if self.conflicts:
            out["conflicts"] = self.conflicts
        return out

    def condition(self) -> tuple[bool, str, str]:
        if self.conflicts:
            return False, "Conflict", "; ".join(self.conflicts)
        if not self.seen:
            return True, "NoWorkersSelected", "no Deployment or StatefulSet is selected"
        return True, "Injected", f"{len(self.injected)} workload(s) carry the current injection"


def ident_of(workload: Mapping[str, Any]) -> str:
    return f"{workload.get('kind')}/{workload.get('metadata', {}).get('name')}"


def injected_count(status: Mapping[str, Any]) -> int:
    """How many workloads carry the current injection, as status says."""
    workers = status.get("workers")
    count = workers.get("injected") if isinstance(workers, Mapping) else None
    return count if isinstance(count, int) else 0


def desired_env(rb: ResultBackend, extra_env: Mapping[str, str]) -> list[injection.EnvVar]:
    return injection.desired_env(rb.secret_name, rb.spec.workers.url_env_name, extra_env)


def sync_workers(
    rb: ResultBackend,
    env: list[injection.EnvVar],
    secret_data: Mapping[str, str],
    workloads: list[dict[str, Any]],
) -> Workers:
    """Inject into every selected workload of `workloads` (what `Listing` found),
    release the ones of it that stopped matching."""
    out = Workers()
    for wl in workloads:
        sync_workload(rb, env, secret_data, wl, out)
    return out


def sync_workload(
    rb: ResultBackend,
    env: list[injection.EnvVar],
    secret_data: Mapping[str, str],
    wl: Mapping[str, Any],
    out: Workers,
) -> None:
    """Bring one workload in line with `rb`; record it in `out.seen` if selected."""
    chash = injection.config_hash(injection.encode_secret_data(secret_data))
    containers = rb.spec.workers.containers
    selector = rb.spec.workers.selector
    meta = wl.get("metadata", {})
    ident = ident_of(wl)
    name = str(meta.get("name"))
    out.seen.pop(ident, None)
    if selector is not None and selector.matches(meta.get("labels")):
        state = injection.workload_status(wl, rb.name, env, containers, chash)
        if state.action == "conflict":
            out.seen[ident] = Seen(name, False, state.reasons)
            return
        if state.action == "apply":
            was = injection.is_injected_by(wl, rb.name)
            applied = kube.apply_workload(
                injection.apply_patch(wl, rb.name, env, containers, chash)
            )
            out.writes += 1
            out.events.append(
                Event("Normal", "Rolled", f"{ident}: the result backend changed, rolling")
                if was
                else Event("Normal", "Injected", f"{ident}: injected the result backend", ident)
            )
            out.seen[ident] = Seen(name, True, generation=api.generation(applied))
        elif state.action == "release":
            applied = kube.apply_workload(injection.release_patch(wl))
            out.writes += 1
            out.events.append(Event("Normal", "Released", f"{ident}: released"))
            out.seen[ident] = Seen(name, False, generation=api.generation(applied))
        else:
            out.seen[ident] = Seen(name, state.injected)
    elif injection.is_injected_by(wl, rb.name):
        kube.apply_workload(injection.release_patch(wl))
        out.writes += 1
        out.events.append(Event("Normal", "Released", f"{ident}: no longer selected, released"))


def concerns(rb: ResultBackend, seen: Mapping[str, Seen], workload: Mapping[str, Any]) -> bool:
    """Whether a workload (its newest version) may matter to `rb` at all: selected
    now, selected at the last look (`seen`), or carrying its injection."""
    meta = workload.get("metadata", {})
    selector = rb.spec.workers.selector
    return (
        ident_of(workload) in seen
        or injection.is_injected_by(workload, rb.name)
        or (selector is not None and selector.matches(meta.get("labels")))
    )


def release_workers(rb: ResultBackend) -> list[Event]:
    events = []
    for wl in kube.list_workloads(rb.namespace):
        if injection.is_injected_by(wl, rb.name):
            kube.apply_workload(injection.release_patch(wl))
            events.append(Event("Normal", "Released", f"{ident_of(wl)}: released"))
    return events


class Listing:
    """Deployments and StatefulSets of a namespace, the two lists side by side.

    `selector` is a label-selector query ("" for every workload, None for no
    list at all). `expect` names workloads (Kind/name) that must be in the
    result, the ones this ResultBackend injected: if the selector no longer
    finds one, the whole namespace is listed so that it can be released.
    """

    def __init__(
        self,
        io: concurrent.futures.Executor,
        namespace: str,
        selector: str | None,
        expect: Collection[str] = (),
        kinds: Collection[str] | None = None,
    ) -> None:
        self._namespace = namespace
        self._expect = set(expect)
        if selector is None and self._expect:
            selector, kinds = "", None
        self._kinds = (
            []
            if selector is None
            else [
                io.submit(kube.list_workloads_of, namespace, kind, selector)
                for kind in kube.WORKLOAD_PLURALS
                if kinds is None or kind in kinds
            ]
        )
        self._everything = selector == "" and kinds is None

    def result(self) -> list[dict[str, Any]]:
        found = [wl for kind in self._kinds for wl in kind.result()]
        if self._everything or self._expect <= {ident_of(wl) for wl in found}:
            return found
        return kube.list_workloads(self._namespace)

    def result_or_none(self) -> list[dict[str, Any]] | None:
        """The workloads, or None when they cannot be listed now."""
        try:
            return self.result()
        except ApiException:
            return None


def listing(
    io: concurrent.futures.Executor,
    rb: ResultBackend,
    seen: Mapping[str, Seen],
    watched: WatchedLabels,
    *,
    everything: bool,
) -> Listing:
    """What a reconcile needs to list: the workloads the selector selects and
    those this process saw `rb` inject (`seen`), or `everything` when it does
    not know what was injected (at start, or another process injected)."""
    if everything:
        return Listing(io, rb.namespace, "")
    injected = [i for i, s in seen.items() if s.injected]
    selector = rb.spec.workers.selector
    if selector is None:
        return Listing(io, rb.namespace, None, injected)
    # Only the kinds the watches saw a selected workload of, and those injected.
    kinds = watched.kinds_selected(rb.namespace, selector.matches)
    if kinds is not None:
        kinds |= {ident.split("/", 1)[0] for ident in injected}
    return Listing(io, rb.namespace, selector.to_query(), injected, kinds)
