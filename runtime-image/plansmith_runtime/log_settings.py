"""Triton's logging extension: which levels the server logs, read and changed at runtime through
`GET/POST /v2/logging` and the `LogSettings` RPC (tritonclient's get_log_settings and
update_log_settings), as Triton's front ends do it.

Triton's settings map onto Python's logging: log_info, log_warning and log_error switch the INFO,
WARNING and ERROR (and CRITICAL) records on and off one by one, and a log_verbose_level above 0
lets DEBUG records through (Triton's verbose messages; this server has one level of them). The
server logs to stderr (kubectl logs), so log_file is "" and cannot be set, and it writes one JSON
object a line, so log_format stays "default".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Mapping

LOG_FORMAT = "default"


class InvalidLogSetting(ValueError):
    """A log setting the server cannot take: HTTP 400 / gRPC INVALID_ARGUMENT, nothing changed."""


@dataclass(frozen=True)
class LogSettings:
    info: bool = True
    warning: bool = True
    error: bool = True
    verbose_level: int = 0

    @classmethod
    def from_level(cls, level: str) -> LogSettings:
        """The settings a --log-level (DEBUG, INFO, WARNING, ERROR or CRITICAL) starts the server with."""
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise InvalidLogSetting(f"unknown log level {level!r}")
        return cls(info=number <= logging.INFO, warning=number <= logging.WARNING, error=number <= logging.ERROR,
                   verbose_level=int(number <= logging.DEBUG))

    def as_triton(self) -> dict[str, str | bool | int]:
        """The settings as Triton reports them (every one, whichever were changed)."""
        return {"log_file": "", "log_info": self.info, "log_warning": self.warning, "log_error": self.error,
                "log_verbose_level": self.verbose_level, "log_format": LOG_FORMAT}

    def updated(self, changes: Mapping[str, object]) -> LogSettings:
        """These settings with Triton-named `changes` applied; a None value changes nothing, as do
        names Triton does not define. Every change is checked before any is made."""
        fields: dict[str, object] = {}
        for name, value in changes.items():
            if value is None:
                continue
            if name == "log_file":
                if value != "":
                    raise InvalidLogSetting("log file location can not be updated through network protocol: "
                                            "this server logs to stderr")
            elif name in ("log_info", "log_warning", "log_error"):
                if not isinstance(value, bool):
                    raise InvalidLogSetting(f"{name} must be a boolean, got {value!r}")
                fields[name.removeprefix("log_")] = value
            elif name == "log_verbose_level":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
                    raise InvalidLogSetting(f"log_verbose_level must be an unsigned 32-bit integer, got {value!r}")
                fields["verbose_level"] = value
            elif name == "log_format":
                if value != LOG_FORMAT:
                    raise InvalidLogSetting(f"log_format {value!r} is not supported: this server writes one JSON "
                                            "object a line, with an ISO 8601 'time' field (log_format 'default')")
        return replace(self, **fields)

    def allows(self, level: int) -> bool:
        if level >= logging.ERROR:
            return self.error
        if level >= logging.WARNING:
            return self.warning
        if level >= logging.INFO:
            return self.info
        return self.verbose_level > 0

    @property
    def lowest_level(self) -> int:
        """The least severe level any record may pass at: the loggers' level, so that records no
        setting lets through are not even made."""
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
            if self.allows(level):
                return level
        return logging.CRITICAL + 1


class LogControl(logging.Filter):
    """The process's log settings, applied to the handlers the server logs through."""

    def __init__(self, settings: LogSettings, handlers: list[logging.Handler], logger: logging.Logger | None = None) -> None:
        super().__init__()
        self._logger = logger or logging.getLogger()
        for handler in handlers:
            handler.addFilter(self)
        self.settings = settings
        self._apply()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.settings.allows(record.levelno)

    def update(self, changes: Mapping[str, object]) -> dict[str, str | bool | int]:
        """Apply Triton-named changes (InvalidLogSetting, and nothing changed, for a bad one) and
        return every setting as it is now."""
        self.settings = self.settings.updated(changes)
        self._apply()
        return self.settings.as_triton()

    def _apply(self) -> None:
        self._logger.setLevel(self.settings.lowest_level)


def install(level: str, handler: logging.Handler) -> LogControl:
    """Log through `handler` alone, from the settings a --log-level gives (InvalidLogSetting, and
    logging left as it was, for an unknown level)."""
    settings = LogSettings.from_level(level)
    logging.basicConfig(handlers=[handler], force=True)
    return LogControl(settings, [handler])
