"""The timing protocol's rules, checked with calls we can count."""

import time

import numpy as np
import pytest

from fusionprof.measure import Protocol, sample_calls, summarize


def counting():
    calls = {"n": 0, "synced": 0}

    def call():
        calls["n"] += 1

    def sync():
        calls["synced"] += 1
    return calls, call, sync


def test_count_bound_warmup_then_exactly_min_calls():
    calls, call, sync = counting()
    samples = sample_calls(call, sync, Protocol(warmup_seconds=0, warmup_calls=3, min_seconds=0, min_calls=10))
    assert len(samples) == 10 and calls["n"] == 13 and calls["synced"] == 13  # every call is synchronised
    assert all(s >= 0 for s in samples)


def test_time_bound_sampling_goes_on_until_min_seconds():
    _, call, sync = counting()
    start = time.perf_counter()
    samples = sample_calls(lambda: (call(), time.sleep(0.002)), sync,
                           Protocol(warmup_seconds=0.02, warmup_calls=1, min_seconds=0.1, min_calls=2))
    assert time.perf_counter() - start >= 0.12
    assert len(samples) > 10 and min(samples) >= 2.0  # each sample is at least the 2 ms sleep


def test_max_calls_caps_a_fast_call():
    _, call, sync = counting()
    samples = sample_calls(call, sync, Protocol(warmup_seconds=0, warmup_calls=1, min_seconds=60, min_calls=5,
                                                max_calls=50))
    assert len(samples) == 50


def test_summary_statistics():
    samples = list(np.arange(1, 101, dtype=float))  # 1..100 ms
    s = summarize(samples)
    assert s["n"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(np.std(samples, ddof=1)) and s["cv"] == pytest.approx(s["std_ms"] / 50.5)
    assert (s["min_ms"], s["max_ms"]) == (1.0, 100.0)
    assert summarize([2.0])["std_ms"] == 0.0
