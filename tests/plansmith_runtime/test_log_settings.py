"""Triton's logging extension: the settings (pure) and what a LogControl lets through a real handler."""

from __future__ import annotations

import logging

import pytest

from plansmith_runtime.log_settings import InvalidLogSetting, LogControl, LogSettings

DEFAULTS = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True, "log_verbose_level": 0,
            "log_format": "default"}


@pytest.mark.parametrize("level, expected", [
    ("debug", LogSettings(True, True, True, 1)), ("INFO", LogSettings()), ("WARNING", LogSettings(info=False)),
    ("ERROR", LogSettings(info=False, warning=False)), ("CRITICAL", LogSettings(False, False, False, 0)),
])
def test_a_log_level_gives_the_settings_triton_would_start_with(level, expected):
    assert LogSettings.from_level(level) == expected


def test_an_unknown_log_level_is_refused():
    with pytest.raises(InvalidLogSetting, match="unknown log level 'LOUD'"):
        LogSettings.from_level("LOUD")


def test_changes_apply_only_to_the_settings_named_and_nulls_and_unknown_names_change_nothing():
    changed = LogSettings().updated({"log_verbose_level": 2, "log_info": False, "log_warning": None, "log_file": "",
                                     "log_format": "default", "log_something_else": 7})
    assert changed == LogSettings(info=False, verbose_level=2)
    assert changed.as_triton() == {**DEFAULTS, "log_info": False, "log_verbose_level": 2}


@pytest.mark.parametrize("changes, message", [
    ({"log_file": "/tmp/triton.log"}, "can not be updated through network protocol"),
    ({"log_info": "yes"}, "log_info must be a boolean"),
    ({"log_verbose_level": -1}, "unsigned 32-bit integer"),
    ({"log_verbose_level": True}, "unsigned 32-bit integer"),
    ({"log_verbose_level": 1 << 32}, "unsigned 32-bit integer"),
    ({"log_format": "ISO8601"}, "log_format 'ISO8601' is not supported"),
])
def test_a_setting_the_server_cannot_take_is_refused_with_the_reason(changes, message):
    with pytest.raises(InvalidLogSetting, match=message):
        LogSettings().updated(changes)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@pytest.fixture
def logger():
    logger = logging.getLogger("test-log-settings")
    logger.propagate = False
    yield logger
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


def test_the_control_lets_through_exactly_the_levels_switched_on(logger):
    handler = Records()
    logger.addHandler(handler)
    control = LogControl(LogSettings.from_level("INFO"), [handler], logger)

    def log_every_level() -> list[str]:
        handler.seen.clear()
        for level in ("debug", "info", "warning", "error", "critical"):
            getattr(logger, level)(level)
        return handler.seen

    assert log_every_level() == ["info", "warning", "error", "critical"]
    assert control.update({"log_verbose_level": 1})["log_verbose_level"] == 1
    assert log_every_level() == ["debug", "info", "warning", "error", "critical"]
    control.update({"log_verbose_level": 0, "log_info": False, "log_warning": False})
    assert log_every_level() == ["error", "critical"] and logger.level == logging.ERROR
    control.update({"log_info": True})  # info without warnings: not a single threshold
    assert log_every_level() == ["info", "error", "critical"]
    control.update({"log_info": False, "log_error": False})
    assert log_every_level() == [] and logger.level > logging.CRITICAL  # records are not even made


def test_a_refused_change_changes_nothing(logger):
    control = LogControl(LogSettings(), [], logger)
    with pytest.raises(InvalidLogSetting):
        control.update({"log_verbose_level": 3, "log_format": "ISO8601"})
    assert control.settings == LogSettings() and logger.level == logging.INFO
