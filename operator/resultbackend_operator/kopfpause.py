"""Follow Kopf's peering pause, so that our queues pause with Kopf's watches.

With `--peering`, Kopf pauses every watch while a peer of higher priority is
alive ("Pausing operations in favour of ..."). Kopf's own handlers then stop,
but our work queues, their periodic checks and their retries are ours: left
alone they would go on reconciling beside the active replica. Kopf keeps the
pause in a toggle set that it creates inside `kopf.spawn_tasks` and passes to
its daemon killer, and offers no public way to read it. `install()` wraps that
one call to keep a reference to the toggle set (kopf is pinned in
constraints.txt; tests/unit/test_kopfpause.py fails if the hook point moves).
`follow()` then pauses and resumes the controllers as Kopf does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from kopf._core.engines import daemons as kopf_daemons

log = logging.getLogger(__name__)


class Pausable(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...


class _Toggles(Protocol):
    def is_on(self) -> bool: ...

    async def wait_for(self, state: bool, /) -> None: ...


_toggles: asyncio.Future[_Toggles] | None = None
_original: Callable[..., Any] | None = None


def _future() -> asyncio.Future[_Toggles]:
    global _toggles
    if _toggles is None or _toggles.get_loop() is not asyncio.get_running_loop():
        _toggles = asyncio.get_running_loop().create_future()
    return _toggles


def install() -> None:
    """Wrap Kopf's daemon killer to capture the operator's pause toggles (once)."""
    global _original
    if _original is not None:
        return
    original = kopf_daemons.daemon_killer
    _original = original

    @functools.wraps(original)
    async def daemon_killer(*, operator_paused: Any, **kwargs: Any) -> None:
        future = _future()
        if not future.done():
            future.set_result(operator_paused)
        await original(operator_paused=operator_paused, **kwargs)

    kopf_daemons.daemon_killer = daemon_killer


async def follow(controllers: Iterable[Pausable]) -> None:
    """Pause `controllers` whenever Kopf is paused, resume them when it resumes."""
    toggles = await _future()
    targets = list(controllers)
    while True:
        if not toggles.is_on():
            await toggles.wait_for(True)
        log.info("Kopf paused for a peer: no reconciles until it resumes")
        for c in targets:
            c.pause()
        await toggles.wait_for(False)
        log.info("Kopf resumed: requeueing every object")
        for c in targets:
            c.resume()
