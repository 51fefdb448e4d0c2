"""Why a build failed, as the operator and the user see it.

Every failure the builder reports is a `BuildError` with a CamelCase `reason` (surfaced by the
operator in the InferenceModel status), a human message, and whether retrying later can help.
The exit code of `plansmith build` follows from `retryable`:

    0   built, or a cache hit
    1   permanent failure: retrying the same inputs fails the same way (fix the spec or model)
    2   command-line usage error (argparse)
    75  retryable failure (EX_TEMPFAIL): storage unreachable or refusing; run the Job again later
"""

from __future__ import annotations

from typing import Literal

Reason = Literal[
    "InvalidSpec",
    "ModelNotFound",
    "StorageUnavailable",
    "IntegrityError",
    "UnsupportedModel",
    "AccuracyGateFailed",
    "BackendUnavailable",
    "BuildFailed",
    "KeyMismatch",
]

EXIT_OK = 0
EXIT_PERMANENT = 1
EXIT_USAGE = 2
EXIT_RETRYABLE = 75

RETRYABLE_REASONS: frozenset[str] = frozenset({"StorageUnavailable"})


class BuildError(Exception):
    """A build failure with its reason; `str()` is the message shown to users."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE_REASONS


def exit_code(status: str, reason: str | None) -> int:
    """The process exit code for a build result."""
    if status in ("built", "hit"):
        return EXIT_OK
    return EXIT_RETRYABLE if reason in RETRYABLE_REASONS else EXIT_PERMANENT
