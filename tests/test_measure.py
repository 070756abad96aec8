"""The timing protocol's rules, checked with calls we can count."""

import csv
import json
import time

import numpy as np
import pytest
import torch

from fusionprof.measure import (
    P99_MIN_SAMPLES,
    Protocol,
    datasheet_tflops,
    host_timer,
    peak_memory,
    sample,
    sample_calls,
    sample_with_warmup,
    summarize,
)


def counting():
    calls = {"n": 0, "synced": 0}

    def call():
        calls["n"] += 1

    def sync():
        calls["synced"] += 1
    return calls, call, sync


def test_count_bound_warmup_then_exactly_min_calls():
    calls, call, sync = counting()
    start = time.perf_counter()
    samples = sample_calls(call, sync, Protocol(warmup_seconds=0, warmup_calls=3, min_seconds=0, min_calls=10))
    wall_ms = (time.perf_counter() - start) * 1e3
    assert len(samples) == 10 and calls["n"] == 13 and calls["synced"] == 13  # every call is synchronised
    assert 0 < sum(samples) <= wall_ms  # each sample is one timed call, inside the wall time of the whole run


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


def test_a_minimum_asked_for_outlasts_a_lower_cap():
    """--min-seconds 60 samples for 60 s though the time cap is 30 s; --min-calls above max_calls gets its calls.
    (Each cap still guards the other minimum: max_calls ends a run of fast calls short of min_seconds.)"""
    _, call, sync = counting()
    start = time.perf_counter()
    samples = sample_calls(lambda: (call(), time.sleep(0.001)), sync, Protocol(
        warmup_seconds=0, warmup_calls=1, min_seconds=0.05, min_calls=3, max_seconds=0.01))
    assert time.perf_counter() - start >= 0.05 and len(samples) >= 3
    samples = sample_calls(call, sync, Protocol(warmup_seconds=0, warmup_calls=1, min_seconds=0, min_calls=80,
                                                max_calls=40))
    assert len(samples) == 80


def test_one_loop_serves_every_clock():
    """``sample`` is the loop both the host timer and the CUDA-event timer go through: it keeps what it is told."""
    told = iter(range(1, 1000))
    samples = sample(lambda: float(next(told)), Protocol(warmup_seconds=0, warmup_calls=2, min_seconds=0,
                                                          min_calls=4))
    assert samples == [3.0, 4.0, 5.0, 6.0]  # the first two went to warm-up


def test_a_warmup_that_would_run_on_is_capped_and_says_so():
    """A backend that recompiles on every call would warm up for warmup_calls × its call time: the warm-up cap ends it
    after its first call past the cap, and says how many calls and seconds it took. The samples are untouched."""
    calls, call, sync = counting()
    slow = host_timer(lambda: (call(), time.sleep(0.01)), sync)
    start = time.perf_counter()
    sampled = sample_with_warmup(slow, Protocol(warmup_seconds=0, warmup_calls=10_000, max_warmup_seconds=0.1,
                                                min_seconds=0, min_calls=3))
    assert time.perf_counter() - start < 2  # not 10,000 × 10 ms
    warmup = sampled.warmup
    assert warmup.capped and 1 <= warmup.calls < 20 and 0.1 <= warmup.seconds < 1
    assert len(sampled.samples) == 3 and calls["n"] == warmup.calls + 3
    # a cap of 0 still warms up with one call: the first call (a compile) never lands in a sample
    sampled = sample_with_warmup(slow, Protocol(warmup_seconds=0, warmup_calls=5, max_warmup_seconds=0, min_seconds=0,
                                                min_calls=1))
    assert (sampled.warmup.calls, sampled.warmup.capped) == (1, True)


def test_the_warmup_cap_leaves_a_normal_warmup_alone_and_gives_way_to_a_longer_one():
    calls, call, sync = counting()
    sampled = sample_with_warmup(host_timer(call, sync), Protocol(warmup_seconds=0, warmup_calls=7, min_seconds=0,
                                                                     min_calls=2))
    assert (sampled.warmup.calls, sampled.warmup.capped) == (7, False) and calls["n"] == 9
    assert Protocol().max_warmup_seconds == 60.0
    sampled = sample_with_warmup(host_timer(lambda: time.sleep(0.005), sync), Protocol(
        warmup_seconds=0.1, warmup_calls=1, max_warmup_seconds=0.01, min_seconds=0, min_calls=1))
    assert sampled.warmup.seconds >= 0.1 and not sampled.warmup.capped  # --warmup-seconds above the cap: asked for


def test_peak_memory_is_read_when_the_block_ends():
    with peak_memory(torch.device("cpu")) as peak:
        assert peak == {}  # filled on exit, not before
        block = torch.ones(2**20)
    assert peak["host_peak_rss_mib"] > block.numel() * 4 / 2**20 and "cuda_max_allocated_mib" not in peak


def test_a_host_peak_is_of_its_own_block_not_of_what_the_process_did_before():
    """On Linux the peak RSS is reset on entry (a sweep's later cells, a compare's later fusions, are not charged
    with an earlier one's peak); the record says from when it counts."""
    from fusionprof.runtime import SINCE_RESET

    big = torch.ones(2**27)  # 512 MiB, resident
    with peak_memory(torch.device("cpu")) as with_big:
        pass
    del big  # handed back to the kernel: a large block is its own mapping
    with peak_memory(torch.device("cpu")) as after:
        torch.ones(2**20)
    assert after["host_peak_rss_scope"] == SINCE_RESET
    assert after["host_peak_rss_mib"] < with_big["host_peak_rss_mib"] - 400
    # an interleaved sweep's cell: the largest of its visits', counted since start if any visit's was
    from fusionprof.runtime import SINCE_START, largest_peaks

    assert largest_peaks([with_big, after]) == with_big
    unreset = {"host_peak_rss_mib": 1.0, "host_peak_rss_scope": SINCE_START}
    assert largest_peaks([with_big, unreset]) == {**with_big, "host_peak_rss_scope": SINCE_START}


def test_p99_only_from_enough_samples():
    few = summarize([float(i) for i in range(1, P99_MIN_SAMPLES)])
    assert few["p99_ms"] is None and f"at least {P99_MIN_SAMPLES} samples; this has {P99_MIN_SAMPLES - 1}" in \
        few["p99_note"]
    enough = summarize([float(i) for i in range(1, P99_MIN_SAMPLES + 1)])
    assert enough["p99_ms"] == pytest.approx(99.01) and enough["p99_note"] is None


def test_percentiles_are_interpolated_linearly_and_the_record_says_so():
    """Between samples a percentile is interpolated linearly (numpy's "linear", Hyndman & Fan type 7): p50 of an even
    count is the mean of the middle two; p90 of 1..10 lies a tenth of the way from 9 to 10. std is the sample one."""
    s = summarize([float(i) for i in range(10, 0, -1)])  # the order of the calls does not matter
    assert s["p50_ms"] == 5.5 and s["p90_ms"] == pytest.approx(9.1)
    assert s["std_ms"] == pytest.approx(np.std(np.arange(1, 11), ddof=1))
    assert s["cv"] == pytest.approx(s["std_ms"] / 5.5)
    assert Protocol().to_dict()["percentile_method"] == "linear"


def test_datasheet_peaks_match_exact_gpu_names():
    assert datasheet_tflops("NVIDIA L4", "bf16") == 121.0 and datasheet_tflops("NVIDIA H100 PCIe", "fp16") == 756.5
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert datasheet_tflops("NVIDIA H200", "bf16") == datasheet_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    for other_card in ("NVIDIA L40S", "NVIDIA H200 NVL", "NVIDIA H100 NVL", "L4"):  # a name fragment is not a match
        assert datasheet_tflops(other_card, "bf16") is None
    assert datasheet_tflops("NVIDIA L4", "fp32") is None


def test_summary_statistics():
    samples = list(np.arange(1, 101, dtype=float))  # 1..100 ms
    s = summarize(samples)
    assert s["n"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01) and s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(np.std(samples, ddof=1)) and s["cv"] == pytest.approx(s["std_ms"] / 50.5)
    assert (s["min_ms"], s["max_ms"]) == (1.0, 100.0)
    one = summarize([2.0])  # one call past the time cap: its spread is unknown, not zero
    assert (one["std_ms"], one["cv"], one["p50_ms"], one["p99_ms"]) == (None, None, 2.0, None)


def test_the_yardstick_is_the_faster_of_its_start_and_end():
    from fusionprof.measure import yardstick

    start = {"n": 2048, "dtype": "fp32", "timing": "host clock", "gflops": 100.0}
    y = yardstick(start, {**start, "gflops": 90.0})
    assert y["gflops"] == 100.0 and y["drift"] == pytest.approx(-0.10) and y["end"]["gflops"] == 90.0


def test_a_single_sample_has_no_spread_rather_than_none_at_all():
    """One call past the time cap: its CV is unknown, so the table shows a dash and says why, the cell is neither
    steady nor noisy, and a record written before the rule (CV 0 from one sample) reads the same."""
    from fusionprof.latency_output import table
    from fusionprof.records import HOST_TIMING, LatencyRow, Timing

    one = Timing.of([40_000.0], HOST_TIMING)
    assert one.cv is None and not one.cv_warning and one.to_dict()["std_ms"] is None
    old = Timing.from_dict({**one.to_dict(), "std_ms": 0.0, "cv": 0.0})
    assert (old.std_ms, old.cv) == (None, None)
    lines = table([LatencyRow("mid", "torch", "ok", 8, one, flops_per_sample=1e9),
                   LatencyRow("mid", "torch", "ok", 16, Timing.of([10.0, 30.0], HOST_TIMING), flops_per_sample=1e9)])
    assert lines[1].split()[6] == "–" and lines[2].split()[6] == "70.7%"  # CV of 10, 30: 14.14 / 20
    assert any("CV needs at least 2 (a cell of one call: --min-calls 1, or a call past the time cap)" in line
               for line in lines)
    assert lines[2].endswith(" !") and not lines[1].endswith(" !")


def test_a_cell_faster_than_the_yardstick_is_flagged():
    from fusionprof.latency import rate_against
    from fusionprof.latency_output import table
    from fusionprof.records import HOST_TIMING, LatencyRow, Timing

    row = LatencyRow("mid", "torch", "ok", 8, Timing.of([10.0] * 5, HOST_TIMING), flops_per_sample=2e9)
    rate_against([row], yardstick_gflops=1000.0, peak_tflops=None)  # 8 × 2 GFLOP in 10 ms: 1600 GFLOP/s
    assert row.share_of_matmul_yardstick == pytest.approx(1.6) and row.above_yardstick and row.mfu is None
    assert row.to_dict()["above_yardstick"] is True
    lines = table([row])
    assert lines[1].endswith(" ^") and any(line.startswith("^ faster than the sweep's matmul yardstick")
                                           for line in lines)
    rate_against([row], yardstick_gflops=1000.0, peak_tflops=989.4)  # a known GPU in bf16: MFU of the datasheet
    assert row.mfu == pytest.approx(1600 / 989_400)


def test_on_a_gpu_the_yardstick_share_and_the_mfu_rate_the_same_device_resident_figure():
    """On CUDA the yardstick is a GPU-only rate (CUDA events, no copies), as the datasheet peak is: a row's share of
    it and its MFU both rate the GPU's own rate (the device-resident mean), not the copy-inclusive one. With the
    yardstick below the datasheet peak, the share is then the larger of the two, as it must be."""
    from fusionprof.latency import rate_against
    from fusionprof.records import DEVICE_TIMING, HOST_TIMING, LatencyRow, Timing

    row = LatencyRow("mid", "torch-cudagraphs", "ok", 8, Timing.of([10.0] * 5, HOST_TIMING),  # copies: 10 ms
                     Timing.of([4.0] * 5, DEVICE_TIMING), flops_per_sample=2e9)  # the GPU's own: 4 ms
    rate_against([row], yardstick_gflops=600_000.0, peak_tflops=989.4)
    assert row.device_resident_gflops() == pytest.approx(4000) and row.achieved_gflops == pytest.approx(1600)
    assert row.mfu == pytest.approx(4000 / 989_400)
    assert row.share_of_matmul_yardstick == pytest.approx(4000 / 600_000) and row.share_of_matmul_yardstick > row.mfu


def test_a_cell_whose_pace_changed_while_timed_is_told_apart_from_a_noisy_one(tmp_path):
    """A level shift (13 ms for half the calls, then 8 ms: measured on a shared VM with nothing else running) makes
    a p50 between two levels; a steady cell with a few slow calls has a high CV and no such shift. The table, the
    record, its CSV, a record written before the check, compare's summary and the report each say which is which."""
    from fusionprof.compare import summarize as compare_summary
    from fusionprof.latency_output import table, write_record
    from fusionprof.records import HOST_TIMING, LatencyRecord, LatencyRow, Timing
    from fusionprof.report import write_report

    shifted = Timing.of([13.0 + 0.01 * (i % 3) for i in range(40)] + [8.0 + 0.01 * (i % 3) for i in range(41)],
                        HOST_TIMING)
    assert shifted.halves_p50_ms == [13.01, 8.01] and shifted.drift == pytest.approx(8.01 / 13.01 - 1)
    assert shifted.drift_warning and shifted.cv_warning
    spiky = Timing.of([5.0] * 36 + [9.0, 5.0, 5.0, 9.0], HOST_TIMING)  # two slow calls of 40
    assert spiky.cv_warning and not spiky.drift_warning and spiky.drift == 0.0
    slower = Timing.of([10.0] * 10 + [11.5] * 10, HOST_TIMING)  # either way: 15 % slower is flagged,
    faster = Timing.of([10.0] * 10 + [9.5] * 10, HOST_TIMING)  # 5 % faster is not
    assert slower.drift_warning and not faster.drift_warning
    interleaved = Timing.from_dict({**shifted.to_dict(), "rounds_p50_ms": [13.01, 8.01]})  # two visits, by design
    assert interleaved.halves_p50_ms == [13.01, 8.01] and not interleaved.drift_warning  # minutes apart: not flagged
    few = Timing.of([13.0] * 9 + [8.0] * 10, HOST_TIMING)  # halves of 9 calls: not compared
    assert few.halves_p50_ms is None and few.drift is None and not few.drift_warning

    rows = [LatencyRow("mid", "onnxruntime", "ok", 8, shifted, flops_per_sample=1e9),
            LatencyRow("late", "onnxruntime", "ok", 8, spiky, flops_per_sample=1e9),
            LatencyRow("mid", "onnxruntime", "ok", 16, few, flops_per_sample=1e9)]
    lines = table(rows)
    assert lines[1].endswith(" ! ~") and lines[2].endswith(" !") and not lines[3].endswith("~")
    assert ("~ the p50 moved by more than 10% between the first and the second half of the cell's calls (largest: "
            "mid/onnxruntime batch 8, 13.01 → 8.01 ms)") in "\n".join(lines)
    assert not any(line.startswith("~") for line in table(rows[1:]))

    record = LatencyRecord("20261203T120000Z", {"host": "vm"}, {"preset": "tiny", "device": "cpu",
                                                                 "precision": "fp32"}, {}, rows)
    path = tmp_path / "vm" / "latency-tiny-cpu-fp32-20261203T120000Z.json"
    path.parent.mkdir()
    write_record(record, path)
    written = json.loads(path.read_text())["rows"]
    assert written[0]["halves_p50_ms"] == [13.01, 8.01] and written[0]["drift_warning"] is True
    assert written[1]["drift_warning"] is False and written[2]["drift"] is None
    csv_rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert csv_rows[0]["drift_warning"] == "True" and float(csv_rows[0]["drift"]) == pytest.approx(-0.3843, abs=1e-4)
    before = {k: v for k, v in written[0].items() if k not in ("halves_p50_ms", "drift", "drift_warning")}
    assert LatencyRow.from_dict(before).host.halves_p50_ms == [13.01, 8.01]  # a record written before the check

    lines = compare_summary({"mid": {"test_accuracy": 0.9, "train_seconds": 60},
                             "late": {"test_accuracy": 0.8, "train_seconds": 30}}, written)
    assert "8.02 ms (onnxruntime) ~" in lines[1] and lines[1].endswith(" 8.00 ms (onnxruntime)")  # batch 8, 16
    assert lines[1].count("~") == 1 and "~" not in lines[2]
    assert lines[-1].startswith("~ that p50 moved by more than 10%")

    write_report([tmp_path], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert ("Its pace changed while it was timed in 1 of 3 cells: their p50 moved by more than 10% between the first "
            "and the second half of their calls (largest: mid/onnxruntime batch 8, 13.01 → 8.01 ms)") in text
