"""benchmarks/bench_training.py --rounds: every measured step of every round pooled, failures kept."""

import importlib.util
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_training", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def run(cpu, peak):
    return {"mode": "ours", "kind": "train", "params": 10, **bench.timing([9.0] + cpu, [9.0] + cpu),
            "peak_rss_gb": peak, "setup_rss_gb": 1.0, "step_peak_gb": peak - 1.0}


def test_rounds_pool_every_step_not_the_round_medians():
    rounds = [run([1.0, 1.1, 5.0], 2.0), run([1.2, 1.3, 1.4], 2.2), run([0.9, 6.0, 7.0], 2.1)]
    pooled = bench.pool_rounds(rounds)
    steps = [1.0, 1.1, 5.0, 1.2, 1.3, 1.4, 0.9, 6.0, 7.0]
    assert pooled["cpu_times_s"] == steps and pooled["cpu_s"] == statistics.median(steps) == 1.3
    assert pooled["round_cpu_s"] == [1.1, 1.3, 6.0] and pooled["rounds"] == 3
    assert pooled["peak_rss_gb"] == 2.1 and pooled["step_peak_gb"] == pytest.approx(1.1)  # the median round's
    assert rounds[0]["cpu_times_s"] == [1.0, 1.1, 5.0]  # inputs untouched


def test_one_failed_round_fails_the_mode_and_one_round_is_itself():
    failed = {"mode": "ours", "kind": "failed", "returncode": 1}
    assert bench.pool_rounds([run([1.0], 2.0), failed])["kind"] == "failed"
    single = run([1.0, 2.0], 2.0)
    assert bench.pool_rounds([single]) is single


def test_rounds_below_one_are_refused():
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench.main(["--rounds", "0"])
