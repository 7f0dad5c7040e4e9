"""The stores' admin credentials, read from the Secret a ResultBackend names.

Reads are shared for a few seconds, and the version of each Secret read is
kept, so that `changed` can tell whether a Secret that failed a ResultBackend
(missing, a key missing, credentials the store refused) has been changed since.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .. import kube
from ..backends import AdminSecretRef

# How long admin credentials read from a Secret are used again without reading
# it anew. The ResultBackends of a namespace usually share one admin Secret: when
# many are applied at once, one read serves them all. A change of the Secret or
# any failure of a reconcile drops the read, so a corrected Secret is used at
# once; deletion always reads afresh.
REUSE = 5.0

_Key = tuple[str, str, tuple[tuple[str, str], ...]]
Where = tuple[str, str]  # (namespace, name) of a Secret


def _key(ref: AdminSecretRef) -> _Key:
    return ref.namespace, ref.name, tuple(sorted(ref.keys.items()))


class AdminCredentials:
    """Reads of admin Secrets, each reused for `REUSE` seconds (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reads: dict[_Key, tuple[float, dict[str, str]]] = {}
        # The resourceVersion of each Secret as last read ("" when it did not exist).
        self._versions: dict[Where, str] = {}

    def read(self, ref: AdminSecretRef, *, reuse: bool = False) -> dict[str, str]:
        """The values of `ref`'s keys by purpose (errors.Problem if missing).

        `reuse`: a read of the same Secret and keys less than REUSE seconds old will do.
        """
        key = _key(ref)
        now = self._clock()
        if reuse:
            with self._lock:
                hit = self._reads.get(key)
            if hit is not None and now - hit[0] < REUSE:
                return dict(hit[1])
        secret = kube.read_secret(ref.namespace, ref.name)
        with self._lock:
            self._versions[(ref.namespace, ref.name)] = secret.resource_version if secret else ""
        values = kube.secret_values(secret, ref.namespace, ref.name, ref.keys)
        with self._lock:
            for stale in [k for k, (at, _) in self._reads.items() if now - at >= REUSE]:
                del self._reads[stale]
            self._reads[key] = (now, dict(values))
        return values

    def forget(self, ref: AdminSecretRef) -> None:
        with self._lock:
            self._reads.pop(_key(ref), None)

    def changed(self, where: Where) -> bool:
        """Whether the Secret differs now from its last read (one GET)."""
        secret = kube.read_secret(*where)
        now = secret.resource_version if secret else ""
        with self._lock:
            if self._versions.get(where) == now:
                return False
            self._versions[where] = now
            for key in [k for k in self._reads if k[:2] == where]:
                del self._reads[key]
            return True
