"""Does a store server answer at all? One unauthenticated request, shared per server.

The periodic check asks this once per server and interval for every ResultBackend
on that server, so that an outage shows within one check interval while the
worker credentials themselves are tried less often (each such try is several
requests per ResultBackend).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import requests

from resultbackend_operator import metrics

from . import consul, couchdb

# No credentials are ever set on these sessions: they carry the probes only.
_sessions: dict[str, requests.Session] = {}
_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}
_answers: dict[tuple[str, str], tuple[float, bool]] = {}


def _session(store: str) -> requests.Session:
    with _guard:
        session = _sessions.get(store)
        if session is None:
            session = _sessions[store] = requests.Session()
            metrics.count_requests(session, "CouchDB" if store == "couchdb" else "Consul")
        return session


def ask_server(store: str, url: str, timeout: float) -> bool:
    """One request: CouchDB `GET /` answers below 500 (a 401 also says it is up);
    Consul `GET /v1/status/leader` names a leader (without one, no write succeeds)."""
    try:
        if store == "couchdb":
            reply = _session(store).get(f"{couchdb.safe_url(url)}/", timeout=timeout)
            return reply.status_code < 500
        address = consul.parse_agent_url(url)
        reply = _session(store).get(f"{address.url}/v1/status/leader", timeout=timeout)
        return reply.status_code == 200 and bool(reply.json())
    except (requests.RequestException, ValueError):
        return False


def server_answers(
    store: str,
    url: str,
    max_age: float,
    timeout: float,
    ask: Callable[[str, str, float], bool] | None = None,
) -> bool:
    """The server's answer, asked at most once per `max_age` seconds per server."""
    key = (store, url)
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # the ResultBackends of one server wait for one probe, not one each
        at, answered = _answers.get(key, (float("-inf"), False))
        if time.monotonic() - at < max_age:
            return answered
        answered = (ask or ask_server)(store, url, timeout)
        _answers[key] = (time.monotonic(), answered)
        return answered


def forget() -> None:
    """Drop every remembered answer (tests)."""
    with _guard:
        _answers.clear()
