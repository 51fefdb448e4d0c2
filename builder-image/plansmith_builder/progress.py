"""Progress: phases and byte counts on a terminal, plain structured log lines in a Job.

Log lines are `key=value` pairs (`event=phase phase=fetch uri=s3://...`), one per event, which
`kubectl logs` and log collectors read well; on a TTY the byte counters update in place."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TextIO

log = logging.getLogger("plansmith_builder")


def _fields(**fields: object) -> str:
    return " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{count} B"


class Progress:
    """Reports phases and transfers; `tty=None` decides from the stream."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._phase_started: dict[str, float] = {}

    def phase(self, name: str, **fields: object) -> None:
        self._phase_started[name] = time.monotonic()
        if self.tty:
            detail = _fields(**fields)
            self.stream.write(f"==> {name}{'  ' + detail if detail else ''}\n")
            self.stream.flush()
        else:
            log.info("%s", _fields(event="phase", phase=name, **fields))

    def done(self, name: str, **fields: object) -> None:
        started = self._phase_started.pop(name, None)
        seconds = round(time.monotonic() - started, 3) if started is not None else None
        if self.tty:
            detail = _fields(seconds=seconds, **fields)
            self.stream.write(f"    {name} done  {detail}\n")
            self.stream.flush()
        else:
            log.info("%s", _fields(event="done", phase=name, seconds=seconds, **fields))

    def transfer(self, label: str, total: int | None = None) -> Callable[[int], None]:
        """A callback counting bytes moved for `label` (storage's progress hook)."""
        moved = 0
        last_log = 0.0

        def update(count: int) -> None:
            nonlocal moved, last_log
            moved += count
            if self.tty:
                of = f" / {_human(total)}" if total else ""
                self.stream.write(f"\r    {label}: {_human(moved)}{of}   ")
                self.stream.flush()
            elif time.monotonic() - last_log > 5:  # a line every 5 s at most in a Job's log
                last_log = time.monotonic()
                log.info("%s", _fields(event="bytes", what=label, bytes=moved, total=total))

        return update

    def end_transfer(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def info(self, message: str, **fields: object) -> None:
        if self.tty:
            detail = _fields(**fields)
            self.stream.write(f"    {message}{'  ' + detail if detail else ''}\n")
            self.stream.flush()
        else:
            log.info("%s", _fields(event="info", message=repr(message), **fields))
