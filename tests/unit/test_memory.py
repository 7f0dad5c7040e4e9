"""The allocator settings and the periodic malloc_trim."""

from __future__ import annotations

import threading

import pytest

from resultbackend_operator import memory

from ..dockerfile import stages


def test_malloc_trim_is_found_in_glibc() -> None:
    # this machine and the image (python:3.11-slim) run glibc
    trim = memory._malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_the_trimmer_trims_every_interval_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    done = threading.Event()

    def fake_trim(pad: int) -> int:
        calls.append(pad)
        if len(calls) == 3:
            done.set()
        return 1

    monkeypatch.setattr(memory, "_malloc_trim", lambda: fake_trim)
    stop = threading.Event()
    thread = memory.start_trimmer(0.01, stop)
    assert thread is not None
    assert done.wait(5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert calls[:3] == [0, 0, 0]


def test_no_trimmer_without_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.start_trimmer(60) is None


def test_the_image_runs_python_with_the_allocator_settings_the_bench_measured() -> None:
    final = stages()[-1]
    env = " ".join(args for instr, args in final if instr == "ENV")
    for key, value in memory.RUNTIME_ENV.items():
        assert f"{key}={value}" in env
