"""Celery's Consul result backend, with a result's later writes kept.

Celery's own ``ConsulBackend.set`` creates a new TTL session for every write
and stores the value with ``PUT /v1/kv/<key>?acquire=<new session>``. Consul
refuses to let a second session acquire a key that a live session holds: the
PUT answers ``false`` and the old value stays. Celery ignores the answer, so
when a task writes its result twice (``track_started=True``: STARTED then
SUCCESS; a retry: RETRY then SUCCESS) the final state is lost until the first
session expires, and the client never sees it.

This class writes a result that already exists through the session that holds
it and renews that session (so expiry counts from the last write, as with
every other backend's ``result_expires``). A new result gets a new session
exactly as before. Values and key names are unchanged, so workers and clients
using either class read each other's results.
"""

from __future__ import annotations

from typing import Any

import consul
from celery.backends import consul as celery_consul
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

__all__ = ("ConsulBackend",)


class ConsulBackend(celery_consul.ConsulBackend):
    """Consul K/V result backend whose last write to a result is the one read."""

    #: Consul's lock-delay for result sessions. Consul's default (15 s) would keep
    #: a key that was just expired or forgotten from being written again for 15 s.
    lock_delay = 0

    #: How many times a write is tried when the session it relied on went away
    #: between reading the key and writing it (an expiry racing the write).
    write_attempts = 5

    def set(self, key: Any, value: Any) -> bool:
        session_name = bytes_to_str(key)
        key = self._key_to_consul_key(key)
        client = self.client()
        for _ in range(self.write_attempts):
            _, current = client.kv.get(key)
            holder = current.get("Session") if current else None
            if holder:
                if self._rewrite(client, key, value, holder):
                    return True
                continue
            session_id = client.session.create(
                name=session_name, behavior="delete", ttl=self.expires, lock_delay=self.lock_delay
            )
            if client.kv.put(key=key, value=value, acquire=session_id):
                return True
            # Someone else's session got the key first: drop ours and write through theirs.
            client.session.destroy(session_id)
        raise BackendStoreError(f"could not write {key} to Consul")

    @staticmethod
    def _rewrite(client: Any, key: str, value: Any, session_id: str) -> bool:
        """Write through the session that holds the key; False if it is gone."""
        try:
            if not client.kv.put(key=key, value=value, acquire=session_id):
                return False
            client.session.renew(session_id)
        except consul.ConsulException:
            # The session expired between our read and our write (Consul answers
            # 500 "invalid session" or 404): its key went with it; start over.
            return False
        return True

    def delete(self, key: Any) -> bool:
        key = self._key_to_consul_key(key)
        client = self.client()
        _, current = client.kv.get(key)
        deleted = bool(client.kv.delete(key))
        holder = current.get("Session") if current else None
        if holder:
            # Without this the session would outlive the result until its TTL.
            client.session.destroy(holder)
        return deleted
