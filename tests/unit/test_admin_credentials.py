"""Admin credentials: one read of a shared admin Secret serves a burst, briefly."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from resultbackend_operator import api, kube, reconcile


def _rb(name: str, admin: str = "couch-admin") -> api.ResultBackend:
    return api.parse(
        {
            "metadata": {"namespace": "shop", "name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": {
                "type": "couchdb",
                "couchdb": {"url": "http://couch:5984", "adminSecretRef": {"name": admin}},
            },
        }
    )


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    made: list[str] = []

    def read(namespace: str, name: str, keys: Mapping[str, str]) -> dict[str, str]:
        made.append(name)
        return {"username": "admin", "password": f"pw-{len(made)}"}

    monkeypatch.setattr(kube, "read_secret_keys", read)
    reconcile._admin_reads.clear()
    yield made
    reconcile._admin_reads.clear()


def test_reconciles_close_together_share_one_read_of_the_admin_secret(reads: list[str]) -> None:
    first = reconcile.admin_credentials(_rb("a"), reuse=True)
    second = reconcile.admin_credentials(_rb("b"), reuse=True)

    assert reads == ["couch-admin"]
    assert first == second


def test_another_secret_is_read_on_its_own(reads: list[str]) -> None:
    reconcile.admin_credentials(_rb("a"), reuse=True)
    reconcile.admin_credentials(_rb("b", admin="other-admin"), reuse=True)

    assert reads == ["couch-admin", "other-admin"]


def test_without_reuse_the_secret_is_always_read(reads: list[str]) -> None:
    reconcile.admin_credentials(_rb("a"), reuse=True)
    again = reconcile.admin_credentials(_rb("a"))

    assert reads == ["couch-admin", "couch-admin"]
    assert again["password"] == "pw-2"


def test_a_read_older_than_the_reuse_window_is_not_used(
    reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "ADMIN_SECRET_REUSE", 0.0)
    reconcile.admin_credentials(_rb("a"), reuse=True)
    reconcile.admin_credentials(_rb("a"), reuse=True)

    assert reads == ["couch-admin", "couch-admin"]


def test_a_failed_reconcile_forgets_the_credentials_it_used(reads: list[str]) -> None:
    reconcile.admin_credentials(_rb("a"), reuse=True)
    reconcile.forget_admin_credentials(_rb("b"))
    reconcile.admin_credentials(_rb("a"), reuse=True)

    assert reads == ["couch-admin", "couch-admin"]
