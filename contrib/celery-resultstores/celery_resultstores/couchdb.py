"""Celery's CouchDB result backend, with forget() that deletes by the document's _rev.

Celery's ``CouchBackend.delete`` calls pycouchdb's ``Database.delete(doc_id)``,
which takes the revision to delete from the ``ETag`` header of a ``HEAD``
request. CouchDB sends the revision there (``"1-abc..."``), but a server or
proxy that sends its own ETag (pouchdb-server, the devstack's CouchDB, sends
Express's ``W/"55-..."``; a compressing proxy turns a strong ETag weak) makes
the DELETE miss: the server answers 404, and Celery 5.7 swallows NotFound, so
``forget()`` silently keeps the result. This class reads ``_rev`` from the
document itself.
"""

from __future__ import annotations

from typing import Any

import pycouchdb
from celery.backends import couchdb as celery_couchdb
from kombu.utils.encoding import bytes_to_str

__all__ = ("CouchBackend",)


class CouchBackend(celery_couchdb.CouchBackend):
    """CouchDB result backend whose forget() works whatever ETag the server sends."""

    #: Tries when the document changes between reading its _rev and deleting it.
    delete_attempts = 3

    def delete(self, key: Any) -> None:
        key = bytes_to_str(key)
        for _ in range(self.delete_attempts):
            try:
                doc = self.connection.get(key)
                self.connection.delete(doc)  # a dict: pycouchdb uses its _rev
                return
            except pycouchdb.exceptions.NotFound:
                return  # already gone: forget() stays idempotent
            except pycouchdb.exceptions.Conflict:
                continue
        raise pycouchdb.exceptions.Conflict(f"{key} kept changing while being deleted")
