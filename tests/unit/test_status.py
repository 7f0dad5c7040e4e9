"""Status as a pure function of what a reconcile observed."""

from __future__ import annotations

import datetime as dt

import pytest

from resultbackend_operator.status import Observed, desired_status, phase_of, status_patch

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)
OK = (True, "Fine", "fine")


def _types(status: dict[str, object]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}  # type: ignore[attr-defined,index]


def test_all_true_is_ready_with_observed_generation() -> None:
    status = desired_status(None, Observed(3, OK, OK, OK), NOW)
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == 3
    assert _types(status) == {
        "Provisioned": "True",
        "BackendReachable": "True",
        "WorkersInjected": "True",
        "Ready": "True",
    }
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


@pytest.mark.parametrize(
    ("provisioned", "reachable", "was_provisioned", "phase"),
    [
        ((False, "SecretNotFound", "m"), None, False, "Failed"),
        ((False, "Conflict", "m"), None, True, "Failed"),
        ((False, "Unreachable", "m"), None, False, "Provisioning"),
        ((False, "Unreachable", "m"), None, True, "Degraded"),
        (OK, (False, "Unreachable", "m"), True, "Degraded"),
        (OK, (False, "WorkerCredentialsRejected", "m"), True, "Degraded"),
    ],
)
def test_phase_says_whether_the_user_must_act(
    provisioned: tuple[bool, str, str],
    reachable: tuple[bool, str, str] | None,
    was_provisioned: bool,
    phase: str,
) -> None:
    current = {
        "conditions": [{"type": "Provisioned", "status": "True" if was_provisioned else "False"}]
    }
    assert phase_of(Observed(1, provisioned, reachable, OK), current) == phase


def test_ready_condition_names_the_first_failing_condition() -> None:
    status = desired_status(None, Observed(1, OK, (False, "Unreachable", "down"), OK), NOW)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "Unreachable"
    assert "BackendReachable: down" in ready["message"]


def test_unchanged_status_keeps_transition_times_and_needs_no_write() -> None:
    first = desired_status(None, Observed(1, OK, OK, OK), NOW)
    second = desired_status(first, Observed(1, OK, OK, OK), LATER)
    assert second == first
    assert status_patch(first, second) == {}


def test_a_flip_moves_only_that_transition_time() -> None:
    first = desired_status(None, Observed(1, OK, OK, OK), NOW)
    second = desired_status(first, Observed(1, OK, (False, "Unreachable", "m"), OK), LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Provisioned"] == "2026-11-23T10:00:00Z"
    assert times["BackendReachable"] == "2026-11-23T10:05:00Z"
    assert set(status_patch(first, second)) == {"conditions", "phase"}


def test_conditions_of_other_controllers_survive() -> None:
    current = {"conditions": [{"type": "Other", "status": "True", "reason": "X"}]}
    status = desired_status(current, Observed(1, OK, OK, OK), NOW)
    assert {"type": "Other", "status": "True", "reason": "X"} in status["conditions"]


def test_a_key_gone_from_a_status_object_is_removed_by_the_merge_patch() -> None:
    current = {"workers": {"selected": 1, "injected": 0, "names": [], "conflicts": ["x"]}}
    desired = {"workers": {"selected": 1, "injected": 1, "names": ["w"]}}
    assert status_patch(current, desired) == {
        "workers": {"conflicts": None, "selected": 1, "injected": 1, "names": ["w"]}
    }
