"""The pure parts of reconcile: Secret contents, the rotation rule, Events."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest

from resultbackend_operator import api, injection
from resultbackend_operator.backends import Superseded
from resultbackend_operator.backends.consul import secret_data as consul_secret_data
from resultbackend_operator.backends.couchdb import secret_data as couchdb_secret_data
from resultbackend_operator.reconcile.events import Event, coalesce
from resultbackend_operator.reconcile.rotation import superseded, wants_rotation
from resultbackend_operator.settings import SETTINGS

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def test_couchdb_secret_has_the_service_binding_keys() -> None:
    data = couchdb_secret_data("http://couch.db:5984", "rb_ns_n", "pw", "ns-n")
    assert data == {
        "type": "couchdb",
        "provider": "resultstores.io",
        "uri": "couchdb://rb_ns_n:pw@couch.db:5984/ns-n",
        "host": "couch.db",
        "port": "5984",
        "username": "rb_ns_n",
        "password": "pw",
        "database": "ns-n",
    }


def test_couchdb_default_port_follows_the_scheme() -> None:
    assert couchdb_secret_data("https://couch.db", "u", "p", "d")["port"] == "6984"


@pytest.mark.parametrize(
    ("one_client", "uri"),
    [
        (False, "consul://c.svc:8500/celery/ns/n"),
        (True, "consul://c.svc:8500/celery/ns/n?one_client=1"),
    ],
)
def test_consul_secret_carries_token_and_prefix(one_client: bool, uri: str) -> None:
    data = consul_secret_data("http://c.svc:8500", "celery/ns/n", one_client, "tok")
    assert data["uri"] == uri
    assert data["token"] == "tok"
    assert data["keyPrefix"] == "celery/ns/n"
    assert "username" not in data


def _rb(trigger: str | None) -> api.ResultBackend:
    spec: dict[str, Any] = {"storeRef": {"name": "consul"}}
    if trigger:
        spec["rotation"] = {"trigger": trigger}
    return api.parse({"metadata": {"namespace": "ns", "name": "n", "uid": "u"}, "spec": spec})


@pytest.mark.parametrize(
    ("trigger", "rotated_at", "rotate"),
    [
        (None, None, False),
        ("2026-11-23T09:00:00Z", None, True),
        ("2026-11-23T09:00:00Z", "2026-11-23T09:30:00Z", False),
        ("2026-11-23T09:45:00Z", "2026-11-23T09:30:00Z", True),
        # A future trigger waits for its time instead of rotating at every reconcile.
        ("2026-11-24T00:00:00Z", "2026-11-23T09:30:00Z", False),
    ],
)
def test_rotation_happens_once_per_trigger_move(
    trigger: str | None, rotated_at: str | None, rotate: bool
) -> None:
    status = {"credentialsRotatedAt": rotated_at} if rotated_at else {}
    assert wants_rotation(_rb(trigger), status, NOW) is rotate


# --- revoking what a rotation replaced -------------------------------------------

SECRET = {"uri": "consul://c:8500/celery/ns/n", "token": "new"}
HASH = injection.config_hash(injection.encode_secret_data(SECRET))


def _deployment(
    *,
    wanted: int = 1,
    pods: int = 1,
    updated: int = 1,
    observed: int = 3,
    injected_by: str | None = "n",
    chash: str = HASH,
) -> dict[str, Any]:
    """A Deployment at generation 3 whose status counts `pods`, `updated` of them new."""
    annotations = {api.INJECTED_BY_ANNOTATION: injected_by} if injected_by else {}
    return {
        "kind": "Deployment",
        "metadata": {"name": "w", "generation": 3, "annotations": annotations},
        "spec": {
            "replicas": wanted,
            "template": {"metadata": {"annotations": {api.CONFIG_HASH_ANNOTATION: chash}}},
        },
        "status": {"observedGeneration": observed, "replicas": pods, "updatedReplicas": updated},
    }


DONE = _deployment()
ROLLING = _deployment(pods=2)  # the old ReplicaSet's pod is still there


def test_deployment_is_rolled_out_when_every_pod_is_of_the_new_template() -> None:
    assert injection.rolled_out(_deployment(wanted=2, pods=2, updated=2))
    # Pods of the old ReplicaSet still counted (no node made the new ones available).
    assert not injection.rolled_out(_deployment(wanted=2, pods=3, updated=2))
    assert not injection.rolled_out(_deployment(wanted=2, pods=2, updated=1))


def test_deployment_with_terminating_pods_is_not_rolled_out_yet() -> None:
    # Kubernetes 1.35 counts them apart: an old pod may still store its last results.
    terminating = _deployment(wanted=2, pods=2, updated=2)
    terminating["status"]["terminatingReplicas"] = 1
    assert not injection.rolled_out(terminating)
    terminating["status"]["terminatingReplicas"] = 0
    assert injection.rolled_out(terminating)


def test_deployment_status_of_an_older_generation_is_not_rolled_out() -> None:
    assert not injection.rolled_out(_deployment(observed=2))


def test_scaled_to_zero_deployment_is_rolled_out_at_once() -> None:
    assert injection.rolled_out(_deployment(wanted=0, pods=0, updated=0))


def test_statefulset_is_rolled_out_when_current_revision_is_the_update_revision() -> None:
    sts: dict[str, Any] = {
        "kind": "StatefulSet",
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "currentRevision": "a", "updateRevision": "b"},
    }
    assert not injection.rolled_out(sts)
    sts["status"]["currentRevision"] = "b"
    assert injection.rolled_out(sts)


def test_workers_settle_only_when_our_workloads_run_the_current_template() -> None:
    assert injection.workers_settled([DONE], "n", HASH)
    assert not injection.workers_settled([DONE], "n", "another-hash")
    assert not injection.workers_settled([DONE, ROLLING], "n", HASH)
    # Someone else's workload says nothing about our credentials.
    assert injection.workers_settled([DONE, _deployment(pods=2, injected_by="x")], "n", HASH)


def _status(rotated_at: str | None) -> dict[str, Any]:
    return {"credentialsRotatedAt": rotated_at} if rotated_at else {}


RECENT = _status("2026-11-23T09:58:00Z")


def test_superseded_token_is_kept_while_a_recent_rotation_still_rolls() -> None:
    assert superseded(_rb(None), RECENT, SECRET, [ROLLING], NOW).keep
    # Workloads that cannot be listed right now: keep, decide next time.
    assert superseded(_rb(None), RECENT, SECRET, None, NOW).keep


def test_superseded_token_goes_once_the_workers_rolled() -> None:
    assert superseded(_rb(None), RECENT, SECRET, [DONE], NOW) == Superseded(
        False, "every injected workload rolled out the new credentials"
    )


def test_superseded_token_goes_after_the_grace_period_whatever_the_rollout() -> None:
    rotated = NOW - dt.timedelta(seconds=SETTINGS.rotation_grace + 1)
    keep, why = dataclasses.astuple(
        superseded(_rb(None), _status(api.now_rfc3339(rotated)), SECRET, [ROLLING], NOW)
    )
    assert not keep
    assert "since the rotation" in why


def test_without_a_rotation_a_stray_token_is_a_leftover_to_remove() -> None:
    assert not superseded(_rb(None), _status(None), SECRET, [ROLLING], NOW).keep


# --- Events of one reconcile --------------------------------------------------------


def _ev(reason: str, message: str, subject: str = "", type_: str = "Normal") -> Event:
    return Event(type_, reason, message, subject)


def test_injections_of_the_reconcile_that_provisioned_ride_on_its_event() -> None:
    events = [
        _ev("Injected", "Deployment/a: injected the result backend", "Deployment/a"),
        _ev("Injected", "StatefulSet/b: injected the result backend", "StatefulSet/b"),
        _ev("Provisioned", "store and credentials exist as specified"),
    ]

    assert coalesce(events) == [
        _ev(
            "Provisioned",
            "store and credentials exist as specified; injected into Deployment/a, StatefulSet/b",
        )
    ]


def test_injections_without_a_provisioned_event_keep_their_own_events() -> None:
    events = [
        _ev("Injected", "Deployment/a: injected the result backend", "Deployment/a"),
        _ev("Released", "Deployment/c: released"),
    ]

    assert coalesce(events) == events


def test_other_events_of_the_reconcile_stay_beside_the_merged_one() -> None:
    events = [
        _ev("Rolled", "Deployment/r: the result backend changed, rolling"),
        _ev("Injected", "Deployment/a: injected the result backend", "Deployment/a"),
        _ev("Provisioned", "ok"),
        _ev("Degraded", "x: y", type_="Warning"),
    ]

    merged = coalesce(events)

    assert [e.reason for e in merged] == ["Rolled", "Provisioned", "Degraded"]
    assert merged[1].message == "ok; injected into Deployment/a"


@pytest.mark.parametrize(
    ("owners", "managed", "adopts", "adoptable"),
    [
        (frozenset(), True, "old", True),  # orphaned: kubectl delete --cascade=orphan
        (frozenset({"old"}), True, "old", True),
        (frozenset({"old"}), True, "", False),  # no annotation: a Conflict
        (frozenset({"third"}), True, "old", False),
        (frozenset(), False, "old", False),  # not one this operator made
        (frozenset({"new"}), True, "old", False),  # ours already
    ],
)
def test_a_worker_secret_is_adopted_only_from_the_resultbackend_named_to_adopt(
    owners: frozenset[str], managed: bool, adopts: str, adoptable: bool
) -> None:
    from resultbackend_operator.kube import SecretData

    secret = SecretData({"uri": "x"}, owners, "1", managed=managed)
    assert secret.adoptable_by("new", adopts) is adoptable
