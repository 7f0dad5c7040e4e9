"""controller.py: the work queue's semantics and the controller's workers, on a real loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from resultbackend_operator.controller import (
    RETRY,
    Cache,
    Controller,
    Hints,
    Outcome,
    WorkQueue,
    backoff_delay,
    trimmed,
)

from .fakes import until


def _body(uid: str = "u1", rv: str = "1", namespace: str = "ns") -> dict[str, Any]:
    return {
        "metadata": {
            "uid": uid,
            "name": uid,
            "namespace": namespace,
            "resourceVersion": rv,
            "generation": 1,
            "managedFields": [{"manager": "kubectl"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
        },
        "spec": {"x": 1},
        "status": {"y": 2},
    }


# --- backoff -----------------------------------------------------------------------


def test_the_backoff_doubles_per_failure_up_to_the_cap() -> None:
    delays = [backoff_delay(n, 5.0, 300.0, rand=0.5) for n in range(9)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]


@pytest.mark.parametrize("failures", [0, 3, 10])
def test_the_jitter_spreads_by_a_quarter_and_never_passes_the_cap(failures: int) -> None:
    low = backoff_delay(failures, 5.0, 300.0, rand=0.0)
    high = backoff_delay(failures, 5.0, 300.0, rand=1.0)
    middle = backoff_delay(failures, 5.0, 300.0, rand=0.5)
    assert low == pytest.approx(middle * 0.75)
    assert high == min(middle * 1.25, 300.0)


def test_the_backoff_doubles_up_to_the_cap_and_resets_on_success() -> None:
    async def scenario() -> list[float]:
        q = WorkQueue(5.0, 300.0, rand=lambda: 0.5)
        delays = [q.add_rate_limited("k", {RETRY: True}) for _ in range(8)]
        q.forget("k")  # a success
        delays.append(q.add_rate_limited("k", {RETRY: True}))
        q.clear()
        return delays

    assert asyncio.run(scenario()) == [5, 10, 20, 40, 80, 160, 300, 300, 5]


# --- the queue ---------------------------------------------------------------------


def test_a_key_is_queued_once_and_its_hints_merge() -> None:
    async def scenario() -> tuple[int, tuple[str, Hints]]:
        q = WorkQueue(1, 1)
        q.add("k", {"a": 1})
        q.add("k", {"b": 2})
        q.add("k", {"a": 3})
        return len(q), await q.get()

    assert asyncio.run(scenario()) == (1, ("k", {"a": 3, "b": 2}))


def test_a_key_added_while_processing_comes_back_once_when_done() -> None:
    async def scenario() -> list[object]:
        q = WorkQueue(1, 1)
        q.add("k")
        key, _ = await q.get()
        q.add("k", {"x": 1})
        q.add("k", {"y": 1})
        waiting = len(q)  # not handed out while the first run goes on
        q.done(key)
        again = await q.get()
        q.done("k")
        return [waiting, again, len(q)]

    assert asyncio.run(scenario()) == [0, ("k", {"x": 1, "y": 1}), 0]


def test_the_earlier_delayed_add_wins_unless_reset() -> None:
    async def scenario() -> list[float | None]:
        q = WorkQueue(1, 1)
        q.add_after("k", 10, {"check": True})
        q.add_after("k", 50, {"other": True})
        kept = q.delayed("k")
        q.add_after("k", 50, {"check": True}, reset=True)
        replaced = q.delayed("k")
        q.clear()
        return [kept, replaced]

    kept, replaced = asyncio.run(scenario())
    assert kept is not None
    assert kept <= 10
    assert replaced is not None
    assert 40 < replaced <= 50


def test_a_delayed_key_comes_due_with_its_hints() -> None:
    async def scenario() -> tuple[str, Hints]:
        q = WorkQueue(1, 1)
        q.add_after("k", 0.01, {"check": True})
        return await asyncio.wait_for(q.get(), 5)

    assert asyncio.run(scenario()) == ("k", {"check": True})


# --- the cache -----------------------------------------------------------------------


def test_the_cache_never_goes_back_to_an_older_version() -> None:
    cache = Cache()
    cache.put(_body(rv="7"))
    cache.put(_body(rv="5"))
    assert cache.get("u1")["metadata"]["resourceVersion"] == "7"  # type: ignore[index]
    cache.put(_body(rv="8"))
    assert cache.get("u1")["metadata"]["resourceVersion"] == "8"  # type: ignore[index]


def test_the_cache_knows_the_keys_of_a_namespace() -> None:
    cache = Cache()
    cache.put(_body("a", namespace="one"))
    cache.put(_body("b", namespace="one"))
    cache.put(_body("c", namespace="two"))
    cache.remove("b")
    assert cache.in_namespace("one") == ["a"]
    assert sorted(cache.all_keys()) == ["a", "c"]


def test_the_kept_body_drops_what_a_run_never_reads() -> None:
    kept = trimmed(_body())
    assert "managedFields" not in kept["metadata"]
    assert "annotations" not in kept["metadata"]
    assert kept["metadata"]["resourceVersion"] == "1"
    assert kept["spec"] == {"x": 1}
    assert kept["status"] == {"y": 2}


# --- the controller ------------------------------------------------------------------


class Runs:
    """A reconcile that records its runs, can be held, and answers from a script."""

    def __init__(self, outcomes: list[Outcome] | None = None) -> None:
        self.calls: list[tuple[str, str | None, Hints]] = []
        self.outcomes = list(outcomes or [])
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.overlap = 0
        self.forgotten: list[str] = []

    def __call__(self, key: str, body: Mapping[str, Any] | None, hints: Hints) -> Outcome:
        with self.lock:
            self.running[key] = self.running.get(key, 0) + 1
            self.overlap = max(self.overlap, self.running[key])
            rv = body["metadata"]["resourceVersion"] if body else None
            self.calls.append((key, rv, dict(hints)))
        self.entered.set()
        self.gate.wait(5)
        with self.lock:
            self.running[key] -= 1
        return self.outcomes.pop(0) if self.outcomes else Outcome()

    def forget(self, key: str) -> None:
        self.forgotten.append(key)


def _controller(runs: Runs, workers: int = 4) -> Controller:
    return Controller("test", runs, runs.forget, workers=workers, backoff=0.01, max_backoff=0.04)


def test_two_runs_of_one_key_never_overlap_and_events_during_a_run_make_one_more() -> None:
    runs = Runs()

    async def scenario() -> None:
        c = _controller(runs)
        c.start()
        c.cache.put(_body(rv="1"))
        runs.gate.clear()
        c.enqueue("u1")
        await asyncio.get_running_loop().run_in_executor(None, runs.entered.wait, 5)
        for rv in ("2", "3", "4"):  # three events while the first run is held
            c.cache.put(_body(rv=rv))
            c.enqueue("u1", {"event": rv})
        runs.gate.set()
        await until(lambda: len(runs.calls) == 2 and not c.busy("u1"))
        c.shutdown()

    asyncio.run(scenario())
    assert runs.overlap == 1
    # Exactly one more run, with the newest body and the newest hint.
    assert [(rv, hints) for _, rv, hints in runs.calls] == [("1", {}), ("4", {"event": "4"})]


def test_different_keys_run_side_by_side() -> None:
    runs = Runs()
    both = threading.Barrier(2, timeout=5)

    def reconcile(key: str, body: Mapping[str, Any] | None, hints: Hints) -> Outcome:
        both.wait()  # would time out were the second key to wait for the first
        return runs(key, body, hints)

    async def scenario() -> None:
        c = Controller("test", reconcile, runs.forget, workers=2)
        c.start()
        for uid in ("a", "b"):
            c.cache.put(_body(uid))
            c.enqueue(uid)
        await until(lambda: len(runs.calls) == 2)
        c.shutdown()

    asyncio.run(scenario())
    assert sorted(k for k, _, _ in runs.calls) == ["a", "b"]


def test_a_failing_key_backs_off_and_a_success_resets_its_backoff() -> None:
    outcomes = [Outcome(failed=True), Outcome(failed=True), Outcome(), Outcome(failed=True)]
    seen: list[int] = []  # the key's failures so far, as each run begins
    hints: list[Hints] = []

    async def scenario() -> None:
        c: Controller

        def reconcile(key: str, body: Mapping[str, Any] | None, given: Hints) -> Outcome:
            seen.append(c.queue.failures(key))
            hints.append(dict(given))
            return outcomes.pop(0)

        c = Controller("test", reconcile, lambda key: None, backoff=0.01, max_backoff=0.04)
        c.start()
        c.cache.put(_body())
        c.enqueue("u1")
        await until(lambda: len(seen) == 3 and not c.busy("u1"))
        c.enqueue("u1")
        await until(lambda: len(seen) == 4 and not c.busy("u1"))
        seen.append(c.queue.failures("u1"))
        c.shutdown()

    asyncio.run(scenario())
    assert seen == [0, 1, 2, 0, 1]
    # The retries came back as retries.
    assert hints[1:3] == [{RETRY: True}, {RETRY: True}]


def test_requeue_after_brings_the_key_back_with_its_hint() -> None:
    runs = Runs([Outcome(requeue_after=0.01, hint="check")])

    async def scenario() -> None:
        c = _controller(runs)
        c.start()
        c.cache.put(_body())
        c.enqueue("u1")
        await until(lambda: len(runs.calls) == 2)
        c.shutdown()

    asyncio.run(scenario())
    assert runs.calls[1][2] == {"check": True}


def test_a_gone_object_runs_once_more_with_no_body_and_keeps_no_timer() -> None:
    runs = Runs([Outcome(requeue_after=30, hint="check"), Outcome()])

    async def scenario() -> float | None:
        c = _controller(runs)
        c.start()
        c.cache.put(_body())
        c.enqueue("u1")
        await until(lambda: len(runs.calls) == 1 and not c.busy("u1"))
        c.cache.remove("u1")  # its DELETED event
        c.enqueue("u1")
        await until(lambda: len(runs.calls) == 2 and not c.busy("u1"))
        delayed = c.queue.delayed("u1")
        c.shutdown()
        return delayed

    assert asyncio.run(scenario()) is None
    assert runs.calls[1][1] is None


def test_while_paused_nothing_is_handed_out_and_a_run_under_way_finishes() -> None:
    runs = Runs()

    async def scenario() -> tuple[list[object], int, list[str]]:
        c = _controller(runs)
        c.start()
        c.cache.put(_body("a"))
        c.cache.put(_body("b"))
        runs.gate.clear()
        c.enqueue("a")
        await asyncio.get_running_loop().run_in_executor(None, runs.entered.wait, 5)
        c.queue.add_after("b", 0.01, {"check": True})  # a periodic check about to come due
        c.pause()
        c.enqueue("b")  # a trigger while paused
        runs.gate.set()
        await until(lambda: not c.queue.processing("a"))
        # Nothing queued, no timer left that could bring a key: nothing can run.
        during = [len(runs.calls), len(c.queue), c.queue.delayed("b"), c.queue.queued("b")]
        forgotten = list(runs.forgotten)
        # Kopf lists everything again on resume: the watch brings both back.
        c.resume()
        c.cache.put(_body("a", rv="9"))
        c.cache.put(_body("b", rv="9"))
        c.enqueue_all(["a", "b"], {})
        await until(lambda: len(runs.calls) == 3)
        c.shutdown()
        return during, len(runs.calls), forgotten

    during, after, forgotten = asyncio.run(scenario())
    assert during == [1, 0, None, False]  # only the run under way when the pause came
    assert after == 3
    assert sorted(forgotten) == ["a", "b"]  # nothing kept a run could act on after the pause
    assert sorted(rv for _, rv, _ in runs.calls[1:]) == ["9", "9"]


def test_a_run_that_raises_is_retried_with_backoff() -> None:
    calls: list[Hints] = []

    def reconcile(key: str, body: Mapping[str, Any] | None, hints: Hints) -> Outcome:
        calls.append(dict(hints))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return Outcome()

    async def scenario() -> None:
        c = Controller("test", reconcile, lambda key: None, backoff=0.01, max_backoff=0.01)
        c.start()
        c.cache.put(_body())
        c.enqueue("u1")
        await until(lambda: len(calls) == 2)
        c.shutdown()

    asyncio.run(scenario())
    assert calls == [{}, {RETRY: True}]


def test_a_partial_run_keeps_the_backoff_and_the_pending_retry() -> None:
    runs = Runs([Outcome(failed=True), Outcome(partial=True)])

    async def scenario() -> tuple[int, float | None]:
        c = Controller("test", runs, runs.forget, backoff=30.0, max_backoff=60.0)
        c.start()
        c.cache.put(_body())
        c.enqueue("u1")
        await until(lambda: len(runs.calls) == 1 and not c.busy("u1"))
        c.enqueue("u1", {"workload": True})  # e.g. a workload event while backing off
        await until(lambda: len(runs.calls) == 2 and not c.busy("u1"))
        state = c.queue.failures("u1"), c.queue.delayed("u1")
        c.shutdown()
        return state

    failures, delayed = asyncio.run(scenario())
    assert failures == 1
    assert delayed is not None
    assert delayed > 20


def test_the_answer_that_took_the_last_finalizer_off_does_not_bring_the_object_back() -> None:
    """A deleted object's last write can be answered after its DELETED event was handled."""
    cache = Cache()
    body = {"metadata": {"uid": "u", "resourceVersion": "5", "finalizers": ["f"]}}
    cache.put(body)
    cache.remove("u")  # the watch's DELETED event
    gone = {"metadata": {"uid": "u", "resourceVersion": "6", "deletionTimestamp": "t"}}
    cache.put(gone)  # the answer of the PATCH that removed the finalizer
    assert cache.get("u") is None
    assert cache.all_keys() == []
