"""What aggregation does with diverged, damaged and incomplete runs, runs on other data,
and methods it has not heard of: no table or figure rests on a number the user did not get."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.analysis import aggregate
from experiments.analysis.aggregate import OLDER_HARNESS, ResultsError, load_results, t_interval
from run_trees import DEFAULT_SHA256, FIG1_SYNTHETIC, OTHER_SHA256

ADAM, AADL, MA = FIG1_SYNTHETIC["Adam"], FIG1_SYNTHETIC["Adam+AADL"], FIG1_SYNTHETIC["Adam+AADL+MA"]


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return next(root.rglob(f"{variant}-*/seed={seed}"))


def finals(curves: dict[int, list[float]], seeds=(0, 1, 2)) -> list[float]:
    return [curves[s][-1] for s in seeds]


def geometric_ratio(base: list[float], this: list[float]) -> float:
    return math.exp(np.mean(np.log(np.divide(base, this))))


# --------------------------------------------------------------------------------------------
# Damaged runs: named in one warning, left out, the rest still summarised
# --------------------------------------------------------------------------------------------


def _rewrite(name, edit):
    def damage(run: Path) -> None:
        (run / name).write_text(edit((run / name).read_text()))
    return damage


def _edit_json(name, edit):
    def damage(run: Path) -> None:
        data = json.loads((run / name).read_text())
        edit(data)
        (run / name).write_text(json.dumps(data))
    return damage


def _replace_cell(column, row, value):
    def edit(text: str) -> str:
        lines = text.splitlines()
        header = lines[0].split(",")
        cells = lines[row].split(",")
        cells[header.index(column)] = value
        lines[row] = ",".join(cells)
        return "\n".join(lines) + "\n"
    return edit


def _drop_column(column):
    def edit(text: str) -> str:
        rows = [line.split(",") for line in text.splitlines()]
        index = rows[0].index(column)
        return "\n".join(",".join(r[:index] + r[index + 1 :]) for r in rows) + "\n"
    return edit


DAMAGE = {
    "meta.json invalid JSON": (_rewrite("meta.json", lambda t: t[: len(t) // 2]), "meta.json is not valid JSON"),
    "meta.json missing": (lambda run: (run / "meta.json").unlink(), "no meta.json"),
    "meta.json not UTF-8": (lambda run: (run / "meta.json").write_bytes(b"\xff\xfe{"), "meta.json is not UTF-8 text"),
    "meta.json a list": (_rewrite("meta.json", lambda t: "[1, 2]"), "meta.json holds a list, not a JSON object"),
    "meta.json lacks a key": (_edit_json("meta.json", lambda m: m.pop("expected_rows")), "meta.json lacks expected_rows"),
    "meta.json wrong type": (_edit_json("meta.json", lambda m: m.update(legend_order="first")), "meta.json: legend_order is 'first', not an integer"),
    "meta.json of an older harness": (_edit_json("meta.json", lambda m: m.pop("method")), OLDER_HARNESS),
    "status disagrees with COMPLETE": (_edit_json("meta.json", lambda m: m.update(status="running")), "meta.json says 'running', COMPLETE says 'complete'"),
    "metrics.csv missing": (lambda run: (run / "metrics.csv").unlink(), "no metrics.csv"),
    "metrics.csv 0 bytes": (_rewrite("metrics.csv", lambda t: ""), "metrics.csv is empty (0 bytes)"),
    "metrics.csv header only": (_rewrite("metrics.csv", lambda t: t.splitlines(keepends=True)[0]), "metrics.csv has a header and no rows"),
    "text in val_loss": (_rewrite("metrics.csv", _replace_cell("val_loss", 3, "oops")), "metrics.csv line 4, column val_loss: 'oops' is not a number"),
    "text in step": (_rewrite("metrics.csv", _replace_cell("step", 2, "ten")), "metrics.csv line 3, column step: 'ten' is not a number"),
    "ragged row": (_rewrite("metrics.csv", lambda t: t.rstrip("\n") + ",1,2\n"), "metrics.csv line 6 has"),
    "required column missing": (_rewrite("metrics.csv", _drop_column("wall_time")), "metrics.csv lacks column(s) wall_time"),
    "metrics of an older harness": (_rewrite("metrics.csv", _drop_column("method")), OLDER_HARNESS),
    "rows of another run": (_rewrite("metrics.csv", _replace_cell("config_id", 1, "deadbeef")), "metrics.csv holds rows of another run (config_id"),
    "COMPLETE of an older harness": (_rewrite("COMPLETE", lambda t: "2024-05-01T12:00:00+00:00\n"), OLDER_HARNESS),
    "COMPLETE invalid JSON": (_rewrite("COMPLETE", lambda t: "{\"outcome\":"), "COMPLETE is not valid JSON"),
    "COMPLETE empty": (_rewrite("COMPLETE", lambda t: ""), "COMPLETE is empty"),
    "COMPLETE lacks rows": (_edit_json("COMPLETE", lambda m: m.pop("rows")), "COMPLETE lacks rows"),
    "COMPLETE other outcome": (_edit_json("COMPLETE", lambda m: m.update(outcome="done")), "COMPLETE: outcome 'done' is none of complete, diverged"),
    "COMPLETE last step disagrees": (_edit_json("COMPLETE", lambda m: m.update(last_step=30)), "COMPLETE says the last step is 30, metrics.csv ends at step 40"),
    "metrics cut after COMPLETE": (_rewrite("metrics.csv", lambda t: "".join(t.splitlines(keepends=True)[:3])), "COMPLETE says 5 rows, metrics.csv holds 2"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_run_is_named_once_and_left_out(fig1_synthetic, caplog, case):
    damage, reason = DAMAGE[case]
    broken = run_dir(fig1_synthetic, "Adam", 0)
    damage(broken)
    with caplog.at_level(logging.WARNING, logger="experiments.analysis.aggregate"):
        results = load_results(fig1_synthetic)
    assert [issue.path for issue in results.damaged] == [broken]
    assert results.damaged[0].reason.startswith(reason), results.damaged[0].reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"left out {broken}: damaged: {results.damaged[0].reason}"]
    # The summary rests on the other eight runs; Adam's ratio pairs seeds 1 and 2 only.
    table = aggregate.summary(results).set_index("label")
    assert table["runs"].tolist() == [2, 3, 3] and table["diverged"].tolist() == [0, 0, 0]
    assert table.loc["Adam", "final_mean"] == pytest.approx(np.mean(finals(ADAM, (1, 2))))
    assert table.loc["Adam+AADL", "baseline_ratio_mean"] == pytest.approx(geometric_ratio(finals(ADAM, (1, 2)), finals(AADL, (1, 2))))
    assert table.loc["Adam+AADL", "baseline_pairs"] == 2


def test_metrics_cut_short_flip_no_ratio_silently(fig1_synthetic, write_run):
    """The issue's case: metrics cut to fewer rows than COMPLETE says. The cut run's last
    row is an early, large value; trusted, it would turn Adam+AADL's ratio around."""
    cut = write_run(fig1_synthetic, variant="Adam+AADL", seed=0, val_loss=AADL[0], truncate=2)
    results = load_results(fig1_synthetic)
    assert [issue.path for issue in results.damaged] == [cut]
    assert results.damaged[0].reason == "COMPLETE says 5 rows, metrics.csv holds 2"
    row = aggregate.summary(results).set_index("label").loc["Adam+AADL"]
    assert row["runs"] == 2
    assert row["baseline_ratio_mean"] == pytest.approx(geometric_ratio(finals(ADAM, (1, 2)), finals(AADL, (1, 2))))


def test_a_complete_run_with_fewer_rows_than_its_budget_is_damaged(tmp_path, write_run):
    """COMPLETE and metrics.csv agree, but the run stopped short of its budget."""
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5])
    short = write_run(tmp_path, variant="Adam", seed=1, val_loss=[1.0, 0.5], total=1)
    (short / "metrics.csv").write_text("".join((short / "metrics.csv").read_text().splitlines(keepends=True)[:2]))
    marker = json.loads((short / "COMPLETE").read_text())
    (short / "COMPLETE").write_text(json.dumps({**marker, "rows": 1, "last_step": 0}))
    meta = json.loads((short / "meta.json").read_text())
    (short / "meta.json").write_text(json.dumps({**meta, "expected_rows": 2}))
    results = load_results(tmp_path)
    assert results.damaged[0].reason == "metrics.csv holds 1 rows; the whole budget (1 epochs) gives 2"
    longer = write_run(tmp_path, variant="Adam", seed=2, val_loss=[1.0, 0.5, 0.4], total=5)
    reasons = {issue.path: issue.reason for issue in load_results(tmp_path).damaged}
    assert reasons[longer] == "metrics.csv holds 3 rows; the whole budget (5 epochs) gives 6"


def test_a_run_that_ends_before_its_budget_is_damaged(tmp_path, write_run):
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5, 0.2])
    off = write_run(tmp_path, variant="Adam", seed=1, val_loss=[1.0, 0.5, 0.2])
    meta = json.loads((off / "meta.json").read_text())
    (off / "meta.json").write_text(json.dumps({**meta, "budget": {**meta["budget"], "total": 3, "eval_every": 2}, "expected_rows": 3}))
    [issue] = load_results(tmp_path).damaged
    assert issue.path == off and issue.reason == "the last row is at epoch 2, not at the end of the budget (3)"


def test_a_directory_without_meta_json_does_not_disappear(fig1_synthetic, caplog):
    orphan = fig1_synthetic / "graduate_admissions" / "synthetic" / "Adam-0000" / "seed=5"
    orphan.mkdir(parents=True)
    shutil.copy(run_dir(fig1_synthetic, "Adam", 0) / "metrics.csv", orphan / "metrics.csv")
    results = load_results(fig1_synthetic)
    assert [(i.path, i.reason) for i in results.damaged] == [(orphan, "no meta.json")]
    assert f"left out {orphan}: damaged: no meta.json" in caplog.text


def test_hidden_directories_are_not_runs(fig1_synthetic):
    hydra = fig1_synthetic / "graduate_admissions" / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text("a: 1\n")
    results = load_results(fig1_synthetic)
    assert results.damaged == [] and len(results.runs) == 9


def test_nothing_good_left_is_one_line_error(tmp_path, write_run):
    run = write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5])
    (run / "meta.json").write_text("{")
    write_run(tmp_path, variant="Adam", seed=1, val_loss=[1.0, float("nan")], outcome="diverged", total=3)
    write_run(tmp_path, variant="Adam", seed=2, val_loss=[1.0], complete=False, status="preempted")
    with pytest.raises(ResultsError) as error:
        load_results(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message == f"no complete runs under {tmp_path} (1 diverged, 1 damaged, 1 incomplete); run them first with python -m experiments.run"


# --------------------------------------------------------------------------------------------
# Incomplete runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["running", "failed", "interrupted", "preempted"])
def test_incomplete_runs_are_named_with_their_status(fig1_synthetic, write_run, caplog, status):
    run = write_run(fig1_synthetic, variant="Adam", seed=4, val_loss=[1.0, 0.01], complete=False, status=status)
    results = load_results(fig1_synthetic)
    assert [(i.path, i.kind, i.reason) for i in results.incomplete] == [(run, "incomplete", status)]
    assert f"left out {run}: incomplete: {status}" in caplog.text
    assert len(results.runs) == 9


# --------------------------------------------------------------------------------------------
# Diverged runs: counted, never averaged
# --------------------------------------------------------------------------------------------


def test_a_nan_final_value_is_not_replaced_by_the_last_finite_one(fig1_synthetic, write_run):
    """A run marked complete whose last val_loss is NaN: GroupBy.last() would report its
    last finite value (0.03) and count it as a seed."""
    nan_run = write_run(fig1_synthetic, variant="Adam+AADL", seed=1, val_loss=[*AADL[1][:4], float("nan")])
    results = load_results(fig1_synthetic)
    assert [(i.path, i.label, i.seed) for i in results.diverged] == [(nan_run, "Adam+AADL", 1)]
    assert results.diverged[0].reason == "finished, but its last train_loss is nan"
    table = aggregate.summary(results).set_index("label")
    assert table.loc["Adam+AADL", "runs"] == 2 and table.loc["Adam+AADL", "diverged"] == 1
    assert table.loc["Adam+AADL", "final_mean"] == pytest.approx(np.mean(finals(AADL, (0, 2))))
    assert table.loc["Adam+AADL", "baseline_ratio_mean"] == pytest.approx(geometric_ratio(finals(ADAM, (0, 2)), finals(AADL, (0, 2))))
    curve = aggregate.curves(results)
    assert curve[(curve.label == "Adam+AADL") & (curve.epoch == 1)].runs.item() == 2  # not in the curves either
    text = aggregate.to_markdown(aggregate.format_summary(aggregate.summary(results)))
    assert "| Adam+AADL | 2 | 1/3 |" in text and "| Adam | 3 | 0/3 |" in text


def test_per_run_final_is_the_last_row_as_it_is(fig1_synthetic):
    results = load_results(fig1_synthetic)
    last = results.metrics.index[-1]  # the last row of the last run in legend order (Adam+AADL+MA)
    results.metrics.loc[last, "val_loss"] = np.nan
    final = aggregate.per_run(results)["final"]
    run = results.metrics.loc[last, "run"]
    assert math.isnan(final[run]) and final.drop(run).notna().all()
    # A good run with a non-finite final value of the summarised metric is counted as diverged.
    row = aggregate.summary(results).iloc[-1]
    assert (row["runs"], row["diverged"]) == (2, 1)


def test_a_diverged_outcome_is_counted_and_left_out_of_means(fig1_synthetic, write_run, caplog):
    stopped = write_run(fig1_synthetic, variant="Adam+AADL+MA", seed=3, val_loss=[1.0, 0.3, float("inf")], outcome="diverged", total=4)
    # Without stop_on_divergence a diverged run goes on to the end, finite again: still diverged.
    went_on = write_run(fig1_synthetic, variant="Adam+AADL+MA", seed=4, val_loss=[1.0, 0.3, 0.2, 0.1, 0.001], outcome="diverged")
    results = load_results(fig1_synthetic)
    assert {i.path: i.reason for i in results.diverged} == {
        stopped: "diverged at step 20 (val_loss not finite)",
        went_on: "diverged at step 40 (val_loss not finite)",
    }
    assert f"not averaged: {stopped}: diverged: diverged at step 20" in caplog.text
    row = aggregate.summary(results).set_index("label").loc["Adam+AADL+MA"]
    assert (row["runs"], row["diverged"]) == (3, 2)
    assert row["final_mean"] == pytest.approx(np.mean(finals(MA)))
    assert results.metrics["val_loss"].min() > 0.001
    assert results.configurations.set_index("label").loc["Adam+AADL+MA", ["seeds", "diverged"]].tolist() == [3, 2]


def test_a_configuration_whose_every_seed_diverged_keeps_its_row(fig1_synthetic, write_run):
    for seed in range(2):
        write_run(fig1_synthetic, variant="Adam+AADL", seed=seed, val_loss=[1.0, float("nan")],
                  identity={"method.aadl.history": 50}, outcome="diverged", total=4)
    results = load_results(fig1_synthetic)
    assert results.labels == ["Adam", "Adam+AADL (history=10)", "Adam+AADL (history=50)", "Adam+AADL+MA"]
    table = aggregate.summary(results).set_index("label")
    row = table.loc["Adam+AADL (history=50)"]
    assert (row["runs"], row["diverged"]) == (0, 2) and math.isnan(row["final_mean"]) and math.isnan(row["baseline_ratio_mean"])
    assert "| Adam+AADL (history=50) | 0 | 2/2 | n/a |" in aggregate.to_markdown(aggregate.format_summary(aggregate.summary(results)))


# --------------------------------------------------------------------------------------------
# Data identity
# --------------------------------------------------------------------------------------------


def test_runs_on_other_data_are_never_pooled_and_say_so(tmp_path, write_run):
    for sha, scale in ((DEFAULT_SHA256, 1.0), (OTHER_SHA256, 2.0)):
        for seed in range(3):
            write_run(tmp_path, variant="Adam", seed=seed, val_loss=[1.0, scale * ADAM[seed][-1]], data_sha256=sha)
            write_run(tmp_path, variant="Adam+AADL", seed=seed, val_loss=[1.0, scale * AADL[seed][-1] * (1 + seed)], data_sha256=sha)
    results = load_results(tmp_path)
    assert results.varying == ["data.graduate_admissions.sha256"]
    assert results.labels == [
        "Adam (data: graduate_admissions 3f2a1c9b)", "Adam (data: graduate_admissions 9e8d7c6b)",
        "Adam+AADL (data: graduate_admissions 3f2a1c9b)", "Adam+AADL (data: graduate_admissions 9e8d7c6b)",
    ]
    table = aggregate.summary(results).set_index("label")
    assert table["runs"].tolist() == [3, 3, 3, 3]
    other = "Adam (data: graduate_admissions 9e8d7c6b)"
    assert table.loc[other, "final_mean"] == pytest.approx(2 * np.mean(finals(ADAM)))
    # Each configuration is compared with the base optimizer on its own data.
    aadl = [AADL[s][-1] * (1 + s) for s in range(3)]
    for sha in ("3f2a1c9b", "9e8d7c6b"):
        assert table.loc[f"Adam+AADL (data: graduate_admissions {sha})", "baseline_ratio_mean"] == pytest.approx(geometric_ratio(finals(ADAM), aadl))
    assert aggregate.summary(results).attrs["baseline"] == "the base optimizer"


def test_settings_outside_the_method_that_differ_are_in_every_label(tmp_path, write_run):
    """Adam+AADL has one configuration, but the base optimizer was run at two learning
    rates: the label says which one Adam+AADL used, and its ratio pairs it with that one."""
    for lr, final in ((0.001, 0.4), (0.02, 0.2)):
        write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, final], identity={"optimizer.lr": lr})
    write_run(tmp_path, variant="Adam+AADL", seed=0, val_loss=[1.0, 0.1], identity={"optimizer.lr": 0.001})
    results = load_results(tmp_path)
    assert results.labels == ["Adam (optimizer.lr=0.001)", "Adam (optimizer.lr=0.02)", "Adam+AADL (optimizer.lr=0.001)"]
    table = aggregate.summary(results).set_index("label")
    assert table.loc["Adam+AADL (optimizer.lr=0.001)", "baseline_ratio_mean"] == pytest.approx(4.0)


def test_a_baseline_on_other_data_is_no_baseline(tmp_path, write_run):
    write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5], data_sha256=OTHER_SHA256)
    write_run(tmp_path, variant="Adam+AADL", seed=0, val_loss=[1.0, 0.25])
    table = aggregate.summary(load_results(tmp_path)).set_index("label")
    assert math.isnan(table.loc["Adam+AADL (data: graduate_admissions 3f2a1c9b)", "baseline_ratio_mean"])


def test_one_configuration_written_under_two_config_ids_is_told_apart(tmp_path, write_run):
    original = write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5])
    copy = tmp_path / "graduate_admissions" / "synthetic" / "Adam-feedbeef" / "seed=0"
    shutil.copytree(original, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "config_id": "feedbeef"}))
    (copy / "metrics.csv").write_text((copy / "metrics.csv").read_text().replace(meta["config_id"], "feedbeef"))
    labels = load_results(tmp_path).labels
    assert sorted(labels) == sorted([f"Adam [config {meta['config_id']}]", "Adam [config feedbeef]"])


# --------------------------------------------------------------------------------------------
# Baseline and legend order from meta.json
# --------------------------------------------------------------------------------------------


def test_baseline_and_legend_order_come_from_meta_json(tmp_path, write_run):
    """A method the harness did not know when this was written: its order and the baseline
    are what its runs say, not what its label looks like."""
    for seed in range(2):
        write_run(tmp_path, variant="SGD+Lookahead", seed=seed, val_loss=[1.0, 0.2], method="lookahead", legend_order=5)
        write_run(tmp_path, variant="SGD", seed=seed, val_loss=[1.0, 0.4])
        write_run(tmp_path, variant="SGD+AADL", seed=seed, val_loss=[1.0, 0.1])
    results = load_results(tmp_path)
    assert results.labels == ["SGD", "SGD+AADL", "SGD+Lookahead"]
    assert results.legend_orders == {"SGD": 0, "SGD+AADL": 1, "SGD+Lookahead": 5}
    assert aggregate.baseline_label(results) == "SGD"
    table = aggregate.summary(results).set_index("label")
    assert table["baseline_ratio_mean"].tolist() == pytest.approx([1.0, 4.0, 2.0])
    assert table.attrs["baseline"] == "SGD"


def test_without_a_baseline_run_there_is_no_ratio(tmp_path, write_run):
    write_run(tmp_path, variant="Adam+AADL", seed=0, val_loss=[1.0, 0.1])
    table = aggregate.summary(load_results(tmp_path))
    assert "baseline_ratio_mean" not in table and table.attrs["baseline"] is None


def test_label_keys_are_readable():
    assert aggregate.label_key("method.aadl.history") == "history"
    assert aggregate.label_key("method.lookahead.inner.steps") == "inner.steps"
    assert aggregate.label_key("accel.history") == "history"
    assert aggregate.label_key("optimizer.lr") == "optimizer.lr"


# --------------------------------------------------------------------------------------------
# The COMPLETE marker and the required columns, as the writer imports them
# --------------------------------------------------------------------------------------------


def test_read_complete_marker(tmp_path):
    marker = {"outcome": "diverged", "rows": 3, "last_step": 20, "ended": "2025-01-01T00:00:00+00:00"}
    (tmp_path / "COMPLETE").write_text(json.dumps(marker) + "\n")
    assert aggregate.read_complete_marker(tmp_path) == marker
    assert aggregate.read_complete_marker(tmp_path / "COMPLETE") == marker
    (tmp_path / "COMPLETE").write_text("2024-05-01T12:00:00+00:00\n")
    with pytest.raises(aggregate.DamagedRun, match="older version of the harness; rerun with output.overwrite=true"):
        aggregate.read_complete_marker(tmp_path)
    (tmp_path / "COMPLETE").write_text(json.dumps({**marker, "rows": -1}))
    with pytest.raises(aggregate.DamagedRun, match="rows is -1, not a count"):
        aggregate.read_complete_marker(tmp_path)


def test_required_columns_are_the_contract():
    assert aggregate.REQUIRED_COLUMNS == (
        "experiment", "variant", "method", "optimizer", "seed", "config_id",
        "step", "epoch", "train_loss", "val_loss", "lr", "wall_time",
    )


def test_metric_columns_are_read_as_numbers_and_other_text_is_kept(tmp_path, write_run):
    run = write_run(tmp_path, variant="Adam+AADL", seed=0, val_loss=[1.0, 0.5], identity={"method.aadl.solver": "lstsq"},
                    metrics={"val_r2": [0.1, 0.9]})
    frame = aggregate.read_metrics(run)
    assert frame["step"].dtype == np.int64 and frame["val_loss"].dtype == float and frame["val_r2"].tolist() == [0.1, 0.9]
    assert frame["solver"].tolist() == ["lstsq", "lstsq"] and frame["aa_attempts"].tolist() == [0, 1]
    assert math.isnan(frame["train_loss"].iloc[0])


def test_asking_for_a_metric_the_runs_lack_is_an_error_not_a_traceback(fig1_synthetic):
    with pytest.raises(ResultsError, match="no column 'val_rel_l2'"):
        aggregate.summary(load_results(fig1_synthetic), "val_rel_l2")


def test_t_interval_is_not_what_keeps_diverged_runs_out(fig1_synthetic, write_run):
    """Had diverged runs been dropped only by t_interval's finite filter, a diverged run
    that went on to a finite end would be in the mean."""
    write_run(fig1_synthetic, variant="Adam", seed=3, val_loss=[1.0, 0.5, 0.1, 0.05, 1e-9], outcome="diverged")
    row = aggregate.summary(load_results(fig1_synthetic)).set_index("label").loc["Adam"]
    assert (row["runs"], row["diverged"]) == (3, 1)
    assert [row["final_mean"], row["final_low"], row["final_high"]] == pytest.approx(t_interval(finals(ADAM)))
