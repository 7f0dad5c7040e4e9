"""The labels of every watched workload, to know which kinds a list would find.

A reconcile used to list both Deployments and StatefulSets matching its
selector. The watches already tell which workloads exist and their labels, so a
reconcile lists only the kinds that have a selected workload (often one kind,
or none at all: a ResultBackend applied before its workers). A workload the
watch has not delivered yet is not lost: its own event queues one more run of
the ResultBackend, which injects it.

Fed by Kopf index functions (handlers.py): Kopf runs no other handler before
every indexed resource's initial listing is in, so by the first reconcile the
labels of every existing workload are here. The ResultBackend controller holds
one (`ResultBackends.watched`). Until `activate` (a process that never ran the
handlers: tests, tools) `kinds_selected` answers None, "list".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

Labels = tuple[tuple[str, str], ...]


class WatchedLabels:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._by_namespace: dict[str, dict[str, tuple[str, Labels]]] = {}

    def activate(self) -> None:
        self._active = True

    def put(self, namespace: str, uid: str, kind: str, labels: Mapping[str, str] | None) -> None:
        entry = (kind, tuple(sorted((labels or {}).items())))
        with self._lock:
            self._by_namespace.setdefault(namespace, {})[uid] = entry

    def drop(self, namespace: str, uid: str) -> None:
        with self._lock:
            workloads = self._by_namespace.get(namespace)
            if workloads is not None:
                workloads.pop(uid, None)
                if not workloads:
                    del self._by_namespace[namespace]

    def kinds_selected(
        self, namespace: str, matches: Callable[[Mapping[str, str]], bool]
    ) -> set[str] | None:
        """Kinds with a workload whose labels `matches`; None when nothing is known."""
        if not self._active:
            return None
        with self._lock:
            entries = list((self._by_namespace.get(namespace) or {}).values())
        return {kind for kind, labels in entries if matches(dict(labels))}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._by_namespace.values())
