"""Run-time settings from the environment (the chart sets these)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _port(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be a TCP port (0 to 65535, 0 = off), got {port}")
    return port


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value in ("true", "1")


# Where a pod finds its own namespace.
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str:
    """The namespace the operator runs in; `default` outside a cluster."""
    try:
        with open(POD_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class Settings:
    # How often each store (ResultStore, ClusterResultStore) is checked: its server
    # and admin credentials, a few requests per store, so an outage shows in its Ready
    # (and in its ResultBackends' status) within this time; and how often each
    # ResultBackend looks at its store's answer.
    check_interval: float = 60.0
    # How often each ResultBackend's worker credentials themselves are tried (as the
    # worker: CouchDB read, Consul session and key round trip), at most.
    credential_check_interval: float = 600.0
    # How often the periodic check is a full reconcile (store objects, the Secret,
    # workloads) rather than the worker-credentials check alone.
    resync_interval: float = 3600.0
    # Timeout of one call to CouchDB or Consul.
    backend_timeout: float = 10.0
    # First retry delay after a transient failure; kopf doubles nothing itself, so
    # we grow it with the retry count up to max_backoff.
    backoff: float = 5.0
    max_backoff: float = 300.0
    # After a rotation, a Consul token that pods may still use is revoked once every
    # injected workload has rolled out the new template, or after this many seconds
    # (a rollout that cannot finish must not keep old credentials alive for ever).
    rotation_grace: float = 600.0
    # Seconds between returns of freed memory to the system (malloc_trim); 0 = never.
    trim_interval: float = 30.0
    # Port of the Prometheus metrics endpoint (/metrics on 0.0.0.0); 0 = not served.
    metrics_port: int = 0
    # With --peering: seconds a replica's keep-alive counts (Kopf's peering lifetime):
    # a replica that died is replaced by a standby this long after its last keep-alive.
    peering_lifetime: float = 60.0
    # The only namespace a ClusterResultStore's admin Secret is read from (the chart's
    # release namespace; flag --cluster-resource-namespace).
    cluster_resource_namespace: str = "default"
    # Whether namespaced ResultStores are served; false: their Secrets are never read.
    namespaced_stores: bool = True
    # Whether ClusterResultStores are served: by an operator of every namespace only
    # (__main__ sets it false with --namespace: several such operators would all check
    # and write every ClusterResultStore, each from its own cluster resource namespace).
    cluster_stores: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            check_interval=_float("RBO_CHECK_INTERVAL", cls.check_interval),
            credential_check_interval=_float(
                "RBO_CREDENTIAL_CHECK_INTERVAL", cls.credential_check_interval
            ),
            resync_interval=_float("RBO_RESYNC_INTERVAL", cls.resync_interval),
            backend_timeout=_float("RBO_BACKEND_TIMEOUT", cls.backend_timeout),
            backoff=_float("RBO_BACKOFF", cls.backoff),
            max_backoff=_float("RBO_MAX_BACKOFF", cls.max_backoff),
            rotation_grace=_float("RBO_ROTATION_GRACE", cls.rotation_grace),
            trim_interval=_float("RBO_TRIM_INTERVAL", cls.trim_interval),
            metrics_port=_port("RBO_METRICS_PORT", cls.metrics_port),
            peering_lifetime=_float("RBO_PEERING_LIFETIME", cls.peering_lifetime),
            cluster_resource_namespace=os.environ.get("RBO_CLUSTER_RESOURCE_NAMESPACE")
            or _own_namespace(),
            namespaced_stores=_flag("RBO_NAMESPACED_STORES", cls.namespaced_stores),
            cluster_stores=_flag("RBO_CLUSTER_STORES", cls.cluster_stores),
        )


SETTINGS = Settings.from_env()
