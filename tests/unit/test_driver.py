"""driver.py: which watch events make a run, and one run at a time per object."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from resultbackend_operator import api, driver, handlers, kube, reconcile
from resultbackend_operator.driver import CREATE, DELETE, RESUME, RETRY, UPDATE, Driver, wants


def _body(
    uid: str = "u1",
    generation: int = 1,
    finalizers: list[str] | None = None,
    deleting: bool = False,
    rv: str = "1",
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "n",
        "namespace": "ns",
        "uid": uid,
        "generation": generation,
        "resourceVersion": rv,
        "finalizers": finalizers if finalizers is not None else [api.FINALIZER],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-23T00:00:00Z"
    return {"metadata": meta, "spec": {}}


def _wants(body: dict[str, Any], **kw: Any) -> str | None:
    args: dict[str, Any] = {"event_type": "MODIFIED", "first_sight": False, "busy": False}
    args["covered"] = 1
    args.update(kw)
    return wants(body, **args)


def test_first_sight_in_the_initial_listing_is_a_resume() -> None:
    assert _wants(_body(), event_type=None, first_sight=True) == RESUME


def test_first_sight_of_a_new_object_is_a_create() -> None:
    assert _wants(_body(finalizers=[]), event_type="ADDED", first_sight=True) == CREATE


def test_a_status_only_event_needs_no_run() -> None:
    assert _wants(_body(generation=3), covered=3) is None


def test_a_generation_past_the_covered_one_is_an_update() -> None:
    assert _wants(_body(generation=4), covered=3) == UPDATE


def test_a_finalizer_taken_off_is_put_back_unless_a_run_is_going_on() -> None:
    assert _wants(_body(finalizers=["other"])) == UPDATE
    assert _wants(_body(finalizers=["other"]), busy=True) is None


def test_deletion_runs_only_while_our_finalizer_holds_the_object() -> None:
    assert _wants(_body(deleting=True)) == DELETE
    assert _wants(_body(deleting=True, finalizers=["other"])) is None
    assert _wants(_body(deleting=True), event_type=None, first_sight=True) == DELETE


def test_the_stronger_reason_wins_when_two_are_queued() -> None:
    assert driver.stronger(RETRY, UPDATE) == UPDATE
    assert driver.stronger(DELETE, UPDATE) == DELETE
    assert driver.stronger(None, RETRY) == RETRY


class Recorder:
    """A run that records its calls and can be held until released."""

    def __init__(self, delays: list[float | None] | None = None) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.delays = list(delays or [])
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, body: Mapping[str, Any], reason: str, attempt: int) -> float | None:
        self.calls.append((body["metadata"]["resourceVersion"], reason, attempt))
        self.entered.set()
        self.gate.wait(5)
        return self.delays.pop(0) if self.delays else None


async def _settle(d: Driver, uid: str = "u1", timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while d.busy(uid) and loop.time() < end:
        await asyncio.sleep(0.01)


async def _create_run_held(rec: Recorder) -> Driver:
    """A driver whose create run (of resourceVersion 1) has begun and is held."""
    d = Driver(rec, workers=2)
    rec.gate.clear()
    d.observe(_body(rv="1", finalizers=[]), "ADDED")
    await asyncio.get_running_loop().run_in_executor(None, rec.entered.wait, 5)
    return d


def test_events_during_a_run_make_exactly_one_more_run_with_the_newest_body() -> None:
    rec = Recorder()

    async def scenario() -> None:
        d = await _create_run_held(rec)
        d.observe(_body(rv="2", generation=2), "MODIFIED")
        d.observe(_body(rv="3", generation=3), "MODIFIED")
        rec.gate.set()
        await _settle(d)
        d.shutdown()

    asyncio.run(scenario())
    assert rec.calls == [("1", CREATE, 0), ("3", UPDATE, 0)]


def test_our_own_finalizer_patch_event_during_the_create_run_starts_no_second_run() -> None:
    rec = Recorder()

    async def scenario() -> None:
        d = await _create_run_held(rec)
        # The patch's event (finalizer on, same generation) and then the status write's.
        d.observe(_body(rv="2"), "MODIFIED")
        rec.gate.set()
        await _settle(d)
        d.observe(_body(rv="3"), "MODIFIED", status_generation=1)
        await _settle(d)
        d.shutdown()

    asyncio.run(scenario())
    assert rec.calls == [("1", CREATE, 0)]


def test_a_failed_run_runs_again_after_its_delay_with_the_newest_body() -> None:
    rec = Recorder(delays=[0.05, None])

    async def scenario() -> None:
        d = Driver(rec, workers=2)
        d.observe(_body(rv="1"), "ADDED")
        await _settle(d)
        d.observe(_body(rv="2"), "MODIFIED", status_generation=1)  # no run of its own
        for _ in range(200):
            if len(rec.calls) == 2:
                break
            await asyncio.sleep(0.01)
        await _settle(d)
        d.shutdown()

    asyncio.run(scenario())
    assert rec.calls == [("1", CREATE, 0), ("2", RETRY, 1)]


def test_forgetting_an_object_cancels_its_retry() -> None:
    rec = Recorder(delays=[0.05])

    async def scenario() -> None:
        d = Driver(rec, workers=2)
        d.observe(_body(), "ADDED")
        await _settle(d)
        d.forget("u1")
        await asyncio.sleep(0.2)
        d.shutdown()

    asyncio.run(scenario())
    assert rec.calls == [("1", CREATE, 0)]


def test_a_run_that_raises_is_tried_again_after_the_error_delay() -> None:
    calls: list[str] = []

    def boom(body: Mapping[str, Any], reason: str, attempt: int) -> float | None:
        calls.append(reason)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return None

    async def scenario() -> None:
        d = Driver(boom, workers=1, error_delay=0.05)
        d.observe(_body(), "ADDED")
        for _ in range(200):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        await _settle(d)
        d.shutdown()

    asyncio.run(scenario())
    assert calls == [CREATE, RETRY]


# --- handlers.run: the finalizer goes on before anything is written ------------------


def _consul_body(finalizers: list[str]) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "ns",
            "name": "n",
            "uid": "uid-run",
            "generation": 1,
            "resourceVersion": "7",
            "finalizers": finalizers,
        },
        "spec": {
            "type": "consul",
            "consul": {"url": "http://c:8500", "tokenSecretRef": {"name": "t"}},
        },
    }


class _Stores:
    def __init__(self, monkeypatch: Any, finalizer_status: int | None) -> None:
        self.calls: list[str] = []
        monkeypatch.setattr(kube, "read_secret", lambda ns, name: None)
        monkeypatch.setattr(reconcile, "admin_credentials", lambda rb, **_: {"token": "t"})

        def add_finalizer(body: Mapping[str, Any]) -> dict[str, Any]:
            self.calls.append("finalizer")
            if finalizer_status is not None:
                raise ApiException(status=finalizer_status)
            return dict(body)

        def provision(*args: Any, **kwargs: Any) -> Any:
            self.calls.append("provision")
            raise RuntimeError("stop here")

        monkeypatch.setattr(kube, "add_finalizer", add_finalizer)
        monkeypatch.setattr(reconcile, "provision_consul", provision)
        monkeypatch.setattr(handlers, "_apply", lambda body, result: None)


def test_a_run_puts_the_finalizer_on_before_provisioning(monkeypatch: Any) -> None:
    stores = _Stores(monkeypatch, finalizer_status=None)
    with pytest.raises(RuntimeError, match="stop here"):
        handlers.run(_consul_body([]), CREATE, 0)
    assert stores.calls == ["finalizer", "provision"]


def test_a_run_whose_finalizer_patch_conflicts_writes_nothing_and_comes_back_soon(
    monkeypatch: Any,
) -> None:
    stores = _Stores(monkeypatch, finalizer_status=422)
    assert handlers.run(_consul_body([]), CREATE, 0) == 1.0
    assert stores.calls == ["finalizer"]


def test_a_run_of_an_object_gone_meanwhile_ends_there(monkeypatch: Any) -> None:
    stores = _Stores(monkeypatch, finalizer_status=404)
    assert handlers.run(_consul_body([]), CREATE, 0) is None
    assert stores.calls == ["finalizer"]


def test_a_run_with_the_finalizer_on_does_not_patch_it_again(monkeypatch: Any) -> None:
    stores = _Stores(monkeypatch, finalizer_status=None)
    with pytest.raises(RuntimeError, match="stop here"):
        handlers.run(_consul_body(["other", api.FINALIZER]), UPDATE, 0)
    assert stores.calls == ["provision"]


def test_kopf_has_no_create_update_or_daemon_handlers_that_the_empty_diff_base_would_blind() -> (
    None
):
    # handlers.NoDiffBase tells Kopf every object is unchanged: right only while
    # driver.py, not Kopf's changing handlers (or daemons), decides on changes.
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    essence = handlers.NoDiffBase().build(body=kopf.Body({"spec": {"a": 1}}))
    assert essence == {}
