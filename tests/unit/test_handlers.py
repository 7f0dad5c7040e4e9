"""handlers.py: what is registered with Kopf, its log filter, and the pause hook."""

from __future__ import annotations

import inspect
import logging

import kopf
import pytest
from kopf._core.engines import daemons as kopf_daemons
from kopf._core.reactor import running as kopf_running

from resultbackend_operator import handlers, kopfpause


def _record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)


def _registered() -> dict[str, str]:
    """Kopf's name for each registered handler -> the log line prefix Kopf uses."""
    registry = kopf.get_default_registry()
    watching = [h.id for h in registry._watching.get_all_handlers()]
    indexing = [h.id for h in registry._indexing.get_all_handlers()]
    return {
        **{str(i): f"Handler '{i}'" for i in watching},
        **{str(i): f"Indexer '{i}'" for i in indexing},
    }


def test_every_watch_handler_and_index_is_quiet_on_success_and_nothing_else() -> None:
    # The filter names handlers by the names Kopf logs them with: one renamed or
    # added without the filter would flood the log with a line per event.
    assert sorted(handlers.RoutineSuccess.QUIET) == sorted(_registered().values())


@pytest.mark.parametrize("prefix", sorted(handlers.RoutineSuccess.QUIET))
def test_a_routine_success_is_dropped_and_a_failure_kept(prefix: str) -> None:
    quiet = handlers.RoutineSuccess()
    assert quiet.filter(_record(f"{prefix} succeeded.")) is False
    failure = f"{prefix} failed with an exception and will try again in 60 seconds: x"
    assert quiet.filter(_record(failure, logging.ERROR)) is True


def test_lines_of_other_handlers_stay() -> None:
    assert handlers.RoutineSuccess().filter(_record("Handler 'configure' succeeded.")) is True


def test_configure_logging_installs_the_filter_once() -> None:
    handlers.configure_logging()
    handlers.configure_logging()
    filters = logging.getLogger("kopf.objects").filters
    assert sum(isinstance(f, handlers.RoutineSuccess) for f in filters) == 1


def test_kopf_has_no_create_update_or_daemon_handlers_that_the_empty_diff_base_would_blind() -> (
    None
):
    # handlers.NoDiffBase tells Kopf every object is unchanged: right only while
    # the controller, not Kopf's changing handlers (or daemons), decides on changes.
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    essence = handlers.NoDiffBase().build(body=kopf.Body({"spec": {"a": 1}}))
    assert essence == {}


def test_the_pause_hook_wraps_what_kopf_hands_its_pause_toggles_to() -> None:
    # kopfpause captures Kopf's pause toggles where spawn_tasks passes them to the
    # daemon killer; should a Kopf upgrade move that, the queues would no longer
    # pause with Kopf, so this fails instead.
    assert "operator_paused" in inspect.signature(kopf_daemons.daemon_killer).parameters
    assert "daemons.daemon_killer(" in inspect.getsource(kopf_running.spawn_tasks)
    assert kopf_daemons.daemon_killer.__wrapped__ is kopfpause._original  # installed on import
