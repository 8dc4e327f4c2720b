"""Aggregation over seeds: the Student-t interval, curves, summaries, and what is read."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import FIG1_SYNTHETIC
from experiments.analysis import aggregate
from experiments.analysis.aggregate import ResultsError, load_results, t_interval

# t_{0.975, 4} from a printed table of Student's t distribution.
T_975_DF4 = 2.776445105


def test_t_interval_matches_a_hand_computed_case():
    # values 1..5: mean 3, sample sd sqrt(2.5), half width t * sd / sqrt(5)
    mean, low, high = t_interval([1, 2, 3, 4, 5])
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # = 1.963243
    assert mean == 3
    assert (low, high) == pytest.approx((3 - half, 3 + half), abs=1e-8)
    assert half == pytest.approx(1.963243, abs=1e-6)


def test_t_interval_edge_cases():
    assert t_interval([2.0]) == (2.0, pytest.approx(np.nan, nan_ok=True), pytest.approx(np.nan, nan_ok=True))
    assert all(math.isnan(v) for v in t_interval([]))
    # Non-finite values (diverged runs) are left out, not propagated.
    assert t_interval([1, 2, 3, 4, 5, np.nan, np.inf]) == t_interval([1, 2, 3, 4, 5])
    # A 90% interval is narrower than the 95% one.
    assert t_interval([1, 2, 3, 4, 5], confidence=0.9)[2] < t_interval([1, 2, 3, 4, 5])[2]


def test_results_group_by_variant_in_legend_order(fig1_synthetic):
    results = load_results(fig1_synthetic)
    assert results.labels == ["Adam", "Adam+AADL", "Adam+AADL+MA"]
    assert results.varying == [] and results.incomplete == []
    assert len(results.runs) == 9 and len(results.metrics) == 9 * 5


def test_curves_are_mean_and_t_interval_over_seeds(fig1_synthetic):
    curve = aggregate.curves(load_results(fig1_synthetic), "val_loss", "epoch")
    for variant, seeds in FIG1_SYNTHETIC.items():
        for epoch in range(5):
            values = [seeds[s][epoch] for s in seeds]
            row = curve[(curve.label == variant) & (curve.epoch == epoch)].iloc[0]
            expected = t_interval(values)
            assert row["runs"] == 3
            assert (row["mean"], row["low"], row["high"]) == pytest.approx(expected, nan_ok=True)


def test_summary_reports_final_best_threshold_and_paired_ratio(fig1_synthetic):
    table = aggregate.summary(load_results(fig1_synthetic), "val_loss", "epoch", threshold=0.05).set_index("label")
    adam, ma = FIG1_SYNTHETIC["Adam"], FIG1_SYNTHETIC["Adam+AADL+MA"]
    final_ma = [ma[s][-1] for s in range(3)]
    assert table.loc["Adam+AADL+MA", "runs"] == 3
    assert (table.loc["Adam+AADL+MA", ["final_mean", "final_low", "final_high"]].tolist()
            == pytest.approx(t_interval(final_ma)))
    best_adam = [min(adam[s]) for s in range(3)]  # 0.04, 0.05, 0.06
    assert table.loc["Adam", "best_mean"] == pytest.approx(np.mean(best_adam))
    # First epoch at or below 0.05: Adam seeds reach it at epochs 3, 4 and never (0.06).
    assert table.loc["Adam", "epochs_to_threshold_mean"] == pytest.approx(3.5)
    assert table.loc["Adam", "reached_threshold"] == "2/3"
    # Ratio of Adam's final to AADL+MA's, paired by seed: geometric mean of 5, 5, 5.
    assert table.loc["Adam+AADL+MA", "baseline_ratio_mean"] == pytest.approx(5.0)
    assert table.loc["Adam+AADL+MA", "baseline_ratio_low"] == pytest.approx(5.0)
    assert table.loc["Adam", "baseline_ratio_mean"] == pytest.approx(1.0)
    ratios = [adam[s][-1] / FIG1_SYNTHETIC["Adam+AADL"][s][-1] for s in range(3)]  # 2, 2, 2
    log_mean, log_low, log_high = t_interval(np.log(ratios))
    assert table.loc["Adam+AADL", ["baseline_ratio_mean", "baseline_ratio_low", "baseline_ratio_high"]].tolist() == pytest.approx(
        [math.exp(log_mean), math.exp(log_low), math.exp(log_high)]
    )


def test_incomplete_runs_are_not_aggregated(fig1_synthetic, write_run):
    interrupted = write_run(fig1_synthetic, variant="Adam", seed=7, val_loss=[1e6, 1e6], complete=False)
    results = load_results(fig1_synthetic)
    assert [issue.path for issue in results.incomplete] == [interrupted]
    assert results.incomplete[0].reason == "running"
    assert 7 not in results.runs.seed.tolist() and results.metrics.val_loss.max() < 1e6
    curve = aggregate.curves(results)
    assert curve[(curve.label == "Adam") & (curve.epoch == 0)].runs.item() == 3


def test_a_run_directory_without_metrics_or_marker_is_incomplete(fig1_synthetic):
    results_before = load_results(fig1_synthetic)
    crashed = fig1_synthetic / "graduate_admissions" / "synthetic" / "Adam-x" / "seed=9"
    crashed.mkdir(parents=True)
    (crashed / "meta.json").write_text('{"status": "running"}')
    results = load_results(fig1_synthetic)
    assert [issue.path for issue in results.incomplete] == [crashed] and len(results.runs) == len(results_before.runs)


def test_no_complete_runs_is_an_error_that_says_how_to_make_them(tmp_path, write_run):
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0], complete=False)
    with pytest.raises(ResultsError, match=r"no complete runs .*\(1 incomplete\).*experiments.run"):
        load_results(tmp_path)


def test_metrics_file_missing_a_column_leaves_that_run_out(fig1_synthetic, caplog):
    path = next(fig1_synthetic.rglob("metrics.csv"))
    frame = __import__("pandas").read_csv(path).drop(columns="lr")
    frame.to_csv(path, index=False)
    results = load_results(fig1_synthetic)
    assert [(issue.path, issue.reason) for issue in results.damaged] == [(path.parent, "metrics.csv lacks column(s) lr")]
    assert len(results.runs) == 8
    assert f"{path.parent}: damaged: metrics.csv lacks column(s) lr" in caplog.text


def test_same_config_and_seed_stored_twice_counts_once(fig1_synthetic, write_run):
    write_run(fig1_synthetic, variant="Adam", seed=0, val_loss=FIG1_SYNTHETIC["Adam"][0], name="copy")
    results = load_results(fig1_synthetic)
    assert len(results.runs) == 9


def test_sweep_configurations_are_labelled_by_what_varies(tmp_path, write_run):
    for history in (5, 10):
        for seed in (0, 1):
            write_run(tmp_path, variant="Adam+AADL", seed=seed, val_loss=[1.0, 0.1 * history + seed], identity={"method.aadl.history": history})
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 2.0])
    results = load_results(tmp_path)
    assert results.varying == ["method.aadl.history"]
    assert results.labels == ["Adam", "Adam+AADL (history=5)", "Adam+AADL (history=10)"]
    table = aggregate.summary(results).set_index("label")
    assert table.loc["Adam+AADL (history=10)", "final_mean"] == pytest.approx(1.5)
    assert table.loc["Adam+AADL (history=5)", "method.aadl.history"] == 5
    assert math.isnan(table.loc["Adam", "method.aadl.history"])


def test_markdown_summary_shows_mean_and_interval(fig1_synthetic):
    table = aggregate.summary(load_results(fig1_synthetic), threshold=0.05)
    text = aggregate.to_markdown(aggregate.format_summary(table))
    lines = text.splitlines()
    assert lines[0].startswith("| configuration | seeds | diverged | final val_loss | best val_loss | epochs to val_loss <= 0.05 | reached |")
    assert len(lines) == 2 + 3
    mean, low, high = t_interval([0.008, 0.01, 0.012])
    assert f"{mean:.4g} [{low:.4g}, {high:.4g}]" in lines[4]


def test_load_runs_reads_exactly_the_given_run_directories(tmp_path, write_run):
    """What the demo relies on: other configurations stored beside its runs stay out."""
    mine = [write_run(tmp_path, variant="Adam", seed=seed, val_loss=[1.0, 0.5]) for seed in range(2)]
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.1], identity={"train.iterations": 7})
    results = aggregate.load_runs(mine)
    assert results.labels == ["Adam"] and sorted(results.runs["seed"]) == [0, 1]
    assert len(load_results(tmp_path).runs) == 3
    with pytest.raises(ResultsError):
        aggregate.load_runs([])


def test_summary_adds_the_final_value_of_other_metrics(tmp_path, write_run):
    for seed, rel in enumerate([0.2, 0.4]):
        write_run(tmp_path, variant="Adam", seed=seed, val_loss=[1.0, 0.5], metrics={"val_rel_l2": [1.0, rel]})
    table = aggregate.summary(load_results(tmp_path), also=("val_rel_l2",))
    assert table["final_val_rel_l2_mean"].iloc[0] == pytest.approx(0.3)
    assert list(aggregate.format_summary(table).columns[:5]) == ["configuration", "seeds", "diverged", "final val_loss", "final val_rel_l2"]
