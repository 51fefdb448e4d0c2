"""Triton's latency summaries: the --metrics-config settings and the sliding-window quantiles."""

import math

import numpy as np
import pytest

from plansmith_runtime.summaries import (DEFAULT_QUANTILES, InvalidMetricsConfig, SlidingSummary, parse_metrics_config,
                                         parse_quantiles)


def test_summaries_are_off_unless_asked_and_take_tritons_default_quantiles():
    assert parse_metrics_config([]) == ()
    assert parse_metrics_config(["summary_latencies=false"]) == ()
    assert parse_metrics_config(["summary_latencies=true"]) == DEFAULT_QUANTILES
    assert [quantile for quantile, _ in DEFAULT_QUANTILES] == [0.5, 0.9, 0.95, 0.99, 0.999]
    assert parse_metrics_config(["summary_quantiles=0.5:0.05,0.99:0.001", "summary_latencies=true"]) == (
        (0.5, 0.05), (0.99, 0.001))
    assert parse_quantiles("0.9") == ((0.9, 0.0),)


@pytest.mark.parametrize("settings, message", [
    (["summary_latencies=yes"], "summary_latencies is true or false"),
    (["summary_latencies"], "expected KEY=VALUE"),
    (["counter_latencies=false"], "this server takes summary_latencies and summary_quantiles"),
    (["summary_quantiles=0.5:x"], "expected quantile:error pairs, got '0.5:x'"),
    (["summary_quantiles=1.5:0.01"], "'1.5:0.01' is outside 0 to 1"),
])
def test_settings_triton_does_not_know_are_refused_with_the_setting_named(settings, message):
    with pytest.raises(InvalidMetricsConfig, match=f"--metrics-config '{settings[0]}': {message}"):
        parse_metrics_config(settings)


def test_quantiles_are_within_one_percent_of_the_values_and_count_and_sum_are_exact():
    values = np.random.default_rng(3).lognormal(mean=6.0, sigma=1.0, size=20_000)  # latencies in us, long tail
    summary = SlidingSummary()
    for value in values:
        summary.observe(float(value))
    quantiles = [0.5, 0.9, 0.99, 0.999]
    for estimate, exact in zip(summary.quantiles(quantiles), np.quantile(values, quantiles, method="lower")):
        assert abs(estimate - exact) <= 0.01 * exact + 1e-9
    assert summary.count == 20_000 and summary.sum == pytest.approx(values.sum())


def test_a_batch_counts_once_for_each_of_its_requests():
    summary = SlidingSummary()
    summary.observe(1000.0, times=31)
    summary.observe(10.0)
    assert summary.count == 32 and summary.sum == pytest.approx(31_010.0)
    assert summary.quantiles([0.5])[0] == pytest.approx(1000.0, rel=0.01)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_window_is_the_last_minute_in_five_buckets_while_count_and_sum_stay_cumulative():
    clock = FakeClock()
    summary = SlidingSummary(clock=clock)  # 60 s in buckets of 12 s, like prometheus-cpp's defaults
    summary.observe(5000.0)
    clock.now += 30
    summary.observe(100.0)
    assert summary.quantiles([1.0])[0] == pytest.approx(5000.0, rel=0.01)  # both still in the window
    clock.now += 31  # the first bucket started 61 s ago
    assert summary.quantiles([1.0])[0] == pytest.approx(100.0, rel=0.01)
    clock.now += 60
    assert all(math.isnan(value) for value in summary.quantiles([0.5, 0.99]))  # nothing in the last minute
    assert summary.count == 2 and summary.sum == 5100.0
    for second in range(0, 120, 3):  # a steady stream keeps at most five buckets
        clock.now += 3
        summary.observe(float(second))
    assert len(summary._buckets) <= 5
