"""celery_resultstores against real servers (stdlib unittest: runs in the worker venv).

    CONSUL_HTTP_ADDR=http://127.0.0.1:8500 CONSUL_HTTP_TOKEN=<acl token> \\
    COUCHDB_URL=http://127.0.0.1:5984 COUCHDB_ADMIN_USER=admin COUCHDB_ADMIN_PASSWORD=... \\
      python -m unittest discover -s contrib/celery-resultstores/tests -v

A missing server or variable fails the tests; nothing is skipped.
"""

from __future__ import annotations

import os
import time
import unittest
import uuid
from urllib.parse import urlsplit

import consul
import pycouchdb
from celery import Celery
from celery.app.backends import by_url
from celery.backends.consul import ConsulBackend as StockConsulBackend
from celery_resultstores.consul import ConsulBackend
from celery_resultstores.couchdb import CouchBackend


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise AssertionError(f"{name} must be set (see this module's docstring)")
    return value


def _app(expires: int | None = 60) -> Celery:
    app = Celery("resultstores-tests", set_as_current=False)
    app.conf.result_expires = expires
    return app


class ConsulBackendTest(unittest.TestCase):
    def setUp(self) -> None:
        addr = urlsplit(
            _env("CONSUL_HTTP_ADDR")
            if "//" in _env("CONSUL_HTTP_ADDR")
            else f"http://{_env('CONSUL_HTTP_ADDR')}"
        )
        _env("CONSUL_HTTP_TOKEN")  # python-consul sends it with every request
        self.prefix = f"celery-resultstores-test/{uuid.uuid4().hex[:8]}"
        self.url = f"consul://{addr.hostname}:{addr.port}/{self.prefix}"
        self.kv = consul.Consul(host=addr.hostname, port=addr.port)
        self.k = f"celery-task-meta-{uuid.uuid4()}"
        self.addCleanup(self.cleanup)

    def cleanup(self) -> None:
        for session in self.sessions_named(self.k):
            self.kv.session.destroy(session["ID"])
        self.kv.kv.delete(self.prefix, recurse=True)

    def backend(self, cls: type = ConsulBackend, expires: int | None = 60) -> ConsulBackend:
        return cls(app=_app(expires), url=self.url)

    def entry(self, key: str) -> dict | None:
        return self.kv.kv.get(f"{self.prefix}/{key}")[1]

    def sessions_named(self, key: str) -> list[dict]:
        return [s for s in self.kv.session.list()[1] if s["Name"] == key]

    def test_the_package_serves_consul_urls(self) -> None:
        self.assertIs(by_url("consul://127.0.0.1:8500/x", _app().loader)[0], ConsulBackend)

    def test_stock_backend_loses_the_second_write(self) -> None:
        # Why this package exists: Consul refuses the second session's acquire.
        b = self.backend(StockConsulBackend)
        self.assertTrue(b.set(self.k, "STARTED"))
        self.assertFalse(b.set(self.k, "SUCCESS"))
        self.assertEqual(b.get(self.k), b"STARTED")

    def test_second_write_wins_through_one_session(self) -> None:
        b = self.backend()
        self.assertTrue(b.set(self.k, "STARTED"))
        self.assertTrue(b.set(self.k, "SUCCESS"))
        self.assertEqual(b.get(self.k), b"SUCCESS")
        sessions = self.sessions_named(self.k)
        self.assertEqual(len(sessions), 1)
        self.assertEqual(self.entry(self.k)["Session"], sessions[0]["ID"])
        self.assertEqual((sessions[0]["TTL"], sessions[0]["Behavior"]), ("60s", "delete"))
        self.assertEqual(sessions[0]["LockDelay"], 0)

    def test_reads_the_stock_backends_keys_and_takes_them_over(self) -> None:
        self.backend(StockConsulBackend).set(self.k, "STARTED")
        b = self.backend()
        self.assertTrue(b.set(self.k, "SUCCESS"))
        self.assertEqual(b.get(self.k), b"SUCCESS")

    def test_forget_deletes_the_key_and_its_session(self) -> None:
        b = self.backend()
        b.set(self.k, "SUCCESS")
        b.delete(self.k)
        self.assertIsNone(self.entry(self.k))
        self.assertEqual(self.sessions_named(self.k), [])
        b.delete(self.k)  # idempotent
        self.assertTrue(b.set(self.k, "AGAIN"))  # lock-delay 0: writable again at once
        self.assertEqual(b.get(self.k), b"AGAIN")

    def test_a_vanished_session_is_replaced(self) -> None:
        b = self.backend()
        b.set(self.k, "STARTED")
        holder = self.entry(self.k)["Session"]
        self.kv.session.destroy(holder)  # as if its TTL ran out: the key goes with it
        self.assertTrue(b.set(self.k, "SUCCESS"))
        self.assertEqual(b.get(self.k), b"SUCCESS")
        self.assertNotEqual(self.entry(self.k)["Session"], holder)

    def test_writing_through_a_dead_session_reports_it(self) -> None:
        client = self.backend().client()
        dead = client.session.create(ttl=10)
        client.session.destroy(dead)
        self.assertFalse(ConsulBackend._rewrite(client, f"{self.prefix}/{self.k}", "v", dead))

    def test_no_ttl_when_results_never_expire(self) -> None:
        b = self.backend(expires=None)
        b.set(self.k, "SUCCESS")
        b.set(self.k, "SUCCESS")
        self.assertEqual(self.sessions_named(self.k)[0]["TTL"], "")

    def test_rewrite_restarts_the_ttl_and_the_result_still_expires(self) -> None:
        b = self.backend(expires=10)
        b.set(self.k, "STARTED")
        b.set(self.k, "SUCCESS")
        deadline = time.monotonic() + 40  # Consul may take up to 2 x TTL
        while self.entry(self.k) is not None:
            self.assertLess(time.monotonic(), deadline, "the result never expired")
            time.sleep(1)
        self.assertIsNone(b.get(self.k))


class CouchBackendTest(unittest.TestCase):
    def setUp(self) -> None:
        url = urlsplit(_env("COUCHDB_URL"))
        user, password = _env("COUCHDB_ADMIN_USER"), _env("COUCHDB_ADMIN_PASSWORD")
        self.db = f"celery-resultstores-test-{uuid.uuid4().hex[:8]}"
        server = pycouchdb.Server(
            f"http://{user}:{password}@{url.hostname}:{url.port}", authmethod="basic"
        )
        server.create(self.db)
        self.addCleanup(server.delete, self.db)
        self.url = f"couchdb://{user}:{password}@{url.hostname}:{url.port}/{self.db}"

    def test_the_package_serves_couchdb_urls(self) -> None:
        self.assertIs(by_url(self.url, _app().loader)[0], CouchBackend)

    def test_forget_deletes_the_document(self) -> None:
        b = CouchBackend(app=_app(), url=self.url)
        b.set("k", "SUCCESS")
        b.set("k", "SUCCESS, again")  # a second revision
        b.delete("k")
        self.assertIsNone(b.get("k"))
        b.delete("k")  # idempotent

    def test_set_and_get_are_celerys(self) -> None:
        b = CouchBackend(app=_app(), url=self.url)
        b.set("k", "v1")
        b.set("k", "v2")
        self.assertEqual(b.get("k"), "v2")


if __name__ == "__main__":
    unittest.main()
