"""Does a store server answer at all? One unauthenticated request, shared per server.

The periodic check asks this once per server and interval for every ResultBackend
on that server, so that an outage shows within one check interval while the
worker credentials themselves are tried less often (each such try is several
requests per ResultBackend). The request itself is the store's `ask_server`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import requests

from .. import metrics
from .base import Store


class Session:
    """The HTTP session a store's `ask_server` sends its probe with: it never carries
    credentials, and its requests count under the store's `api_kind`. Made on first
    use: the store modules are imported before metrics is ready to count."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._session: requests.Session | None = None

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        if self._session is None:
            session = requests.Session()
            metrics.count_requests(session, self._kind)
            self._session = session
        return self._session.get(url, **kwargs)


_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}
_answers: dict[tuple[str, str], tuple[float, bool]] = {}


def server_answers(
    store: Store,
    url: str,
    max_age: float,
    timeout: float,
    ask: Callable[[str, float], bool] | None = None,
) -> bool:
    """The server's answer, asked at most once per `max_age` seconds per server."""
    key = (store.type, url)
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # the ResultBackends of one server wait for one probe, not one each
        at, answered = _answers.get(key, (float("-inf"), False))
        if time.monotonic() - at < max_age:
            return answered
        answered = (ask or store.ask_server)(url, timeout)
        _answers[key] = (time.monotonic(), answered)
        return answered


def recent_answer(store: Store, url: str, max_age: float) -> bool | None:
    """The server's answer if one is at most `max_age` seconds old (None: ask it)."""
    at, answered = _answers.get((store.type, url), (float("-inf"), False))
    return answered if time.monotonic() - at < max_age else None


def forget() -> None:
    """Drop every remembered answer (tests)."""
    with _guard:
        _answers.clear()
