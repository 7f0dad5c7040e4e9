"""Admin credentials: one read of a shared admin Secret serves a burst, briefly."""

from __future__ import annotations

import pytest

from resultbackend_operator import api, kube
from resultbackend_operator.backends import AdminSecretRef, store_for
from resultbackend_operator.errors import Problem
from resultbackend_operator.reconcile.credentials import REUSE, AdminCredentials


def _ref(name: str, admin: str = "couch-admin") -> AdminSecretRef:
    """The admin Secret of store `name` (the stores of a cluster often share one)."""
    store = api.parse_store(
        {
            "kind": "ClusterResultStore",
            "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
            "spec": {
                "couchdb": {"url": "http://couch:5984", "adminSecretRef": {"name": admin}},
            },
        }
    )
    return store_for("couchdb").admin_secret(store, "shop")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    made: list[str] = []

    def read(namespace: str, name: str) -> kube.SecretData:
        made.append(name)
        data = {"username": "admin", "password": f"pw-{len(made)}"}
        return kube.SecretData(data, frozenset(), resource_version="1")

    monkeypatch.setattr(kube, "read_secret", read)
    return made


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_couchdb_store_names_the_secret_and_keys_of_its_spec_in_the_given_namespace() -> None:
    assert _ref("a") == AdminSecretRef(
        "shop", "couch-admin", {"username": "username", "password": "password"}
    )


def test_reconciles_close_together_share_one_read_of_the_admin_secret(reads: list[str]) -> None:
    admin = AdminCredentials()
    first = admin.read(_ref("a"), reuse=True)
    second = admin.read(_ref("b"), reuse=True)

    assert reads == ["couch-admin"]
    assert first == second


def test_another_secret_is_read_on_its_own(reads: list[str]) -> None:
    admin = AdminCredentials()
    admin.read(_ref("a"), reuse=True)
    admin.read(_ref("b", admin="other-admin"), reuse=True)

    assert reads == ["couch-admin", "other-admin"]


def test_without_reuse_the_secret_is_always_read(reads: list[str]) -> None:
    admin = AdminCredentials()
    admin.read(_ref("a"), reuse=True)
    again = admin.read(_ref("a"))

    assert reads == ["couch-admin", "couch-admin"]
    assert again["password"] == "pw-2"


def test_a_read_older_than_the_reuse_window_is_not_used(reads: list[str]) -> None:
    clock = Clock()
    admin = AdminCredentials(clock)
    admin.read(_ref("a"), reuse=True)
    clock.now += REUSE
    admin.read(_ref("a"), reuse=True)

    assert reads == ["couch-admin", "couch-admin"]


def test_a_failed_reconcile_forgets_the_credentials_it_used(reads: list[str]) -> None:
    admin = AdminCredentials()
    admin.read(_ref("a"), reuse=True)
    admin.forget(_ref("b"))
    admin.read(_ref("a"), reuse=True)

    assert reads == ["couch-admin", "couch-admin"]


def test_a_missing_key_names_the_secret_and_key_but_no_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = {"username": "admin", "pasword": "s3cret-value"}
    monkeypatch.setattr(kube, "read_secret", lambda ns, name: kube.SecretData(data, frozenset()))
    with pytest.raises(Problem) as caught:
        AdminCredentials().read(_ref("a"))
    assert caught.value.reason == "SecretKeyMissing"
    assert "shop/couch-admin" in caught.value.message
    assert "'password'" in caught.value.message
    assert "s3cret-value" not in str(caught.value)


def test_a_secret_is_changed_when_its_version_moved_since_the_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    versions = iter(["", "", "", "7", "7", "8"])  # missing, missing, created, then edited

    def read(namespace: str, name: str) -> kube.SecretData | None:
        version = next(versions)
        if not version:
            return None
        return kube.SecretData({"username": "a", "password": "p"}, frozenset(), version)

    monkeypatch.setattr(kube, "read_secret", read)
    admin = AdminCredentials()
    with pytest.raises(Problem):
        admin.read(_ref("a"))  # SecretNotFound
    where = ("shop", "couch-admin")
    assert [admin.changed(where) for _ in range(5)] == [False, False, True, False, True]
