"""Run-time settings from the environment (the chart sets these)."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass(frozen=True)
class Settings:
    # How often each ResultBackend's worker credentials are checked against the store.
    check_interval: float = 60.0
    # Timeout of one call to CouchDB or Consul.
    backend_timeout: float = 10.0
    # First retry delay after a transient failure; kopf doubles nothing itself, so
    # we grow it with the retry count up to max_backoff.
    backoff: float = 5.0
    max_backoff: float = 300.0

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            check_interval=_float("RBO_CHECK_INTERVAL", cls.check_interval),
            backend_timeout=_float("RBO_BACKEND_TIMEOUT", cls.backend_timeout),
            backoff=_float("RBO_BACKOFF", cls.backoff),
            max_backoff=_float("RBO_MAX_BACKOFF", cls.max_backoff),
        )


SETTINGS = Settings.from_env()
