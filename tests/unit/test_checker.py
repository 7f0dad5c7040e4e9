"""The checker: one due time per ResultBackend, never two checks of one at once."""

from __future__ import annotations

from typing import Any

import pytest

from resultbackend_operator.checker import Checker, trimmed


def _body(uid: str = "u1", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "resultstores.io/v1alpha1",
        "kind": "ResultBackend",
        "metadata": {
            "name": "n",
            "namespace": "ns",
            "uid": uid,
            "generation": 2,
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {"resultstores.io/last-handled-configuration": "{}"},
        },
        "spec": {"type": "consul"},
        "status": status,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _checker(clock: Clock, checked: list[str]) -> Checker:
    return Checker(60, lambda body: checked.append(body["metadata"]["uid"]), tick=1, clock=clock)


def test_the_first_check_comes_one_interval_after_first_sight(clock: Clock) -> None:
    checked: list[str] = []
    c = _checker(clock, checked)
    c.track(_body())
    assert c.due() == []
    clock.now += 60
    assert [b["metadata"]["uid"] for b in c.due()] == ["u1"]


def test_a_check_in_flight_is_not_started_again(clock: Clock) -> None:
    c = _checker(clock, [])
    c.track(_body())
    clock.now += 60
    assert len(c.due()) == 1
    clock.now += 120
    assert c.due() == []  # still running


def test_after_a_check_the_next_one_is_an_interval_later(clock: Clock) -> None:
    checked: list[str] = []
    c = _checker(clock, checked)
    c.track(_body())
    clock.now += 60
    for body in c.due():
        c.run_one(body)
    assert checked == ["u1"]
    clock.now += 30
    assert c.due() == []
    clock.now += 30
    assert len(c.due()) == 1


def test_new_versions_replace_the_body_but_not_the_due_time(clock: Clock) -> None:
    c = _checker(clock, [])
    c.track(_body(phase="Provisioning"))
    clock.now += 30
    c.track(_body(phase="Ready"))
    clock.now += 30
    (body,) = c.due()
    assert body["status"] == {"phase": "Ready"}


def test_a_forgotten_resultbackend_is_not_checked(clock: Clock) -> None:
    c = _checker(clock, [])
    c.track(_body())
    c.forget("u1")
    clock.now += 600
    assert c.due() == []
    assert len(c) == 0


def test_a_failing_check_is_logged_and_does_not_block_the_next(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(body: Any) -> None:
        raise RuntimeError("store exploded")

    c = Checker(60, boom, tick=1, clock=clock)
    c.track(_body())
    clock.now += 60
    for body in c.due():
        c.run_one(body)
    assert "periodic check of ns/n failed" in caplog.text
    clock.now += 60
    assert len(c.due()) == 1


def test_the_kept_body_drops_what_the_check_never_reads() -> None:
    kept = trimmed(_body(phase="Ready"))
    assert "managedFields" not in kept["metadata"]
    assert "annotations" not in kept["metadata"]
    assert kept["metadata"]["generation"] == 2
    assert kept["spec"] == {"type": "consul"}
    assert kept["status"] == {"phase": "Ready"}


def test_started_checker_runs_due_checks_in_its_threads() -> None:
    import threading

    ran = threading.Event()
    c = Checker(0.05, lambda body: ran.set(), tick=0.01)
    c.track(_body())
    c.start()
    try:
        assert ran.wait(5)
    finally:
        c.stop()
