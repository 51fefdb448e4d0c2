"""Triton's latency summaries (`--metrics-config summary_latencies=true`): quantiles of each
request's duration, queue time and compute phases over a sliding window, beside the cumulative
counters, so p95 and p99 can be charted and alerted on from the server's own view.

Triton's summaries are prometheus-cpp's: quantiles over the last 60 seconds kept in 5 buckets that
age out in turn, and a count and sum since the start. Here each bucket is a DDSketch (the `ddsketch`
library): a quantile it reports is within 1% of the true value, in bounded memory whatever the
request rate, and an observation costs about half a microsecond. Triton's `summary_quantiles`
syntax (`quantile:error,...`) is accepted; the error part is CKMS's rank error, which a DDSketch
does not take (its bound is on the value).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable, Sequence

from ddsketch import LogCollapsingLowestDenseDDSketch

# Triton's default quantiles and their CKMS errors
DEFAULT_QUANTILES = ((0.5, 0.05), (0.9, 0.01), (0.95, 0.001), (0.99, 0.001), (0.999, 0.000001))
MAX_AGE_SECONDS = 60.0  # prometheus-cpp's Summary defaults, which Triton keeps
AGE_BUCKETS = 5
RELATIVE_ACCURACY = 0.01
BIN_LIMIT = 2048  # bins a sketch keeps; with 1% accuracy they span 1 us to beyond an hour


class InvalidMetricsConfig(ValueError):
    """A --metrics-config setting that is not Triton's."""


def parse_quantiles(text: str) -> tuple[tuple[float, float], ...]:
    """Triton's summary_quantiles: "0.5:0.05,0.9:0.01,..."."""
    quantiles = []
    for part in text.split(","):
        quantile, _, error = part.strip().partition(":")
        try:
            pair = (float(quantile), float(error or 0))
        except ValueError:
            raise InvalidMetricsConfig(f"expected quantile:error pairs, got {part.strip()!r}") from None
        if not (0 <= pair[0] <= 1 and 0 <= pair[1] <= 1):
            raise InvalidMetricsConfig(f"{part.strip()!r} is outside 0 to 1")
        quantiles.append(pair)
    return tuple(quantiles)


def parse_metrics_config(settings: Sequence[str]) -> tuple[tuple[float, float], ...]:
    """The quantiles to summarize from Triton's `--metrics-config KEY=VALUE` settings; () when
    summaries are off (Triton's default)."""
    enabled, quantiles = False, DEFAULT_QUANTILES
    for setting in settings:
        key, separator, value = setting.partition("=")
        try:
            if not separator:
                raise InvalidMetricsConfig("expected KEY=VALUE")
            if key == "summary_latencies":
                if value not in ("true", "false"):
                    raise InvalidMetricsConfig("summary_latencies is true or false")
                enabled = value == "true"
            elif key == "summary_quantiles":
                quantiles = parse_quantiles(value)
            else:
                raise InvalidMetricsConfig("this server takes summary_latencies and summary_quantiles")
        except InvalidMetricsConfig as error:
            raise InvalidMetricsConfig(f"--metrics-config {setting!r}: {error}") from None
    return quantiles if enabled else ()


class SlidingSummary:
    """Values observed over the last `max_age` seconds, for quantiles; their count and sum since
    the start. Not thread-safe: observed and read on the event loop thread."""

    def __init__(self, max_age: float = MAX_AGE_SECONDS, age_buckets: int = AGE_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket_seconds = max_age / age_buckets
        self.age_buckets = age_buckets
        self.clock = clock
        self.count = 0
        self.sum = 0.0
        self._buckets: deque[tuple[float, LogCollapsingLowestDenseDDSketch]] = deque()

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` (the requests of one batch share its compute time)."""
        now = self.clock()
        if not self._buckets or now - self._buckets[-1][0] >= self.bucket_seconds:
            self._buckets.append((now, LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, BIN_LIMIT)))
            while len(self._buckets) > self.age_buckets:
                self._buckets.popleft()
        self._buckets[-1][1].add(value, times)
        self.count += times
        self.sum += value * times

    def quantiles(self, quantiles: Sequence[float]) -> list[float]:
        """The quantiles of the window's values; NaN for each when the window is empty."""
        now = self.clock()
        merged = LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, BIN_LIMIT)
        for started, sketch in self._buckets:
            if now - started < self.bucket_seconds * self.age_buckets:
                merged.merge(sketch)
        if merged.count == 0:
            return [math.nan] * len(quantiles)
        return [merged.get_quantile_value(quantile) for quantile in quantiles]
