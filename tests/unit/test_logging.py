"""Routine successes of the watch handlers stay out of the log."""

from __future__ import annotations

import logging

import pytest

from resultbackend_operator import handlers


def _record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, msg, None, None)


@pytest.mark.parametrize(
    ("msg", "level", "kept"),
    [
        pytest.param("Handler 'rb_event' succeeded.", logging.INFO, False, id="rb-watch"),
        pytest.param("Handler 'deployment_event' succeeded.", logging.INFO, False, id="watch"),
        pytest.param("Handler 'reconcile_rb' succeeded.", logging.INFO, True, id="reconcile"),
        pytest.param("Handler 'delete_rb' succeeded.", logging.INFO, True, id="delete"),
        pytest.param(
            "Handler 'rb_event' failed with an exception and will try again in 60 seconds: x",
            logging.ERROR,
            True,
            id="watch-failure",
        ),
    ],
)
def test_only_routine_successes_are_dropped(msg: str, level: int, kept: bool) -> None:
    assert handlers.RoutineSuccess().filter(_record(msg, level)) is kept


def test_configure_logging_installs_the_filter_once() -> None:
    handlers.configure_logging()
    handlers.configure_logging()
    filters = logging.getLogger("kopf.objects").filters
    assert sum(isinstance(f, handlers.RoutineSuccess) for f in filters) == 1
