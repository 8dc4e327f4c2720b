"""Figures and the command line on trees with diverged, damaged and incomplete runs."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT
from experiments.analysis import aggregate, figures
from run_trees import FIG1_SYNTHETIC

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def caption(report: figures.Report) -> str:
    return " ".join(text.get_text() for text in report.figure.texts).replace("\n", " ")


def damage_tree(root, write_run):
    """fig1_synthetic plus one run of each kind the reader must not trust or average."""
    write_run(root, variant="Adam+AADL", seed=3, val_loss=[1.0, 0.3, NAN], outcome="diverged", total=4)
    write_run(root, variant="Adam+AADL", seed=4, val_loss=[1.0, 0.3, 0.2, 0.1, NAN])  # complete, NaN final
    bad_json = write_run(root, variant="Adam", seed=5, val_loss=FIG1_SYNTHETIC["Adam"][0])
    (bad_json / "meta.json").write_text('{"status": "complete", ')
    empty = write_run(root, variant="Adam", seed=6, val_loss=FIG1_SYNTHETIC["Adam"][0])
    (empty / "metrics.csv").write_text("")
    text = write_run(root, variant="Adam", seed=7, val_loss=FIG1_SYNTHETIC["Adam"][0])
    (text / "metrics.csv").write_text((text / "metrics.csv").read_text().replace(",0.05,", ",five,", 1))
    write_run(root, variant="Adam", seed=8, val_loss=[1.0, 1e-6], truncate=1)
    old = write_run(root, variant="Adam", seed=9, val_loss=FIG1_SYNTHETIC["Adam"][0])
    (old / "COMPLETE").write_text("2024-05-01T12:00:00+00:00\n")
    write_run(root, variant="Adam+AADL+MA", seed=5, val_loss=[1.0, 0.9], complete=False, status="interrupted")
    return root


def test_caption_says_how_many_seeds_diverged_and_what_was_left_out(fig1_synthetic, write_run):
    report = figures.figure_report("fig1", damage_tree(fig1_synthetic, write_run))
    text = caption(report)
    assert "Adam+AADL: 2 of 5 seeds diverged (not in the means)" in text
    assert "Left out: 5 damaged and 1 incomplete runs (named in the warnings)." in text
    assert [note for note in report.notes if "seeds diverged" in note] == ["Adam+AADL: 2 of 5 seeds diverged (not in the means)"]
    for note in ("Adam+AADL: 2 of 5 seeds diverged", "Left out: 5 damaged and 1 incomplete runs"):
        assert note in report.summary_markdown
    # The lines are drawn from the good runs only: the diverged runs' curves are not in them.
    axes = report.figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    np.testing.assert_allclose(lines["Adam+AADL"].get_ydata(), np.mean(list(FIG1_SYNTHETIC["Adam+AADL"].values()), axis=0))
    np.testing.assert_allclose(lines["Adam"].get_ydata(), np.mean(list(FIG1_SYNTHETIC["Adam"].values()), axis=0))
    assert "3 seeds" in axes.get_title()


def test_a_clean_tree_has_no_left_out_caption(fig1_synthetic, monkeypatch):
    monkeypatch.setattr(figures, "preset_plan", lambda preset: SYNTHETIC_PLAN)  # the tree is all its preset runs
    report = figures.figure_report("fig1", fig1_synthetic)
    assert report.notes == [] and not report.figure.texts
    assert report.figure.axes[0].get_title().startswith(figures.FIGURES["fig1"].title + "\n")  # no budget remark


#: A preset that runs exactly FIG1_SYNTHETIC: its variants, seeds 0-2, 4 epochs.
SYNTHETIC_PLAN = figures.PresetPlan("epoch", 4, tuple(FIG1_SYNTHETIC), (0, 1, 2))


def test_a_figure_from_runs_short_of_the_presets_budget_says_so_in_its_title(fig1_synthetic):
    """FIG1_SYNTHETIC's runs trained 4 epochs; the fig1 preset trains 1,500."""
    report = figures.figure_report("fig1", fig1_synthetic)
    assert report.figure.axes[0].get_title().startswith("Graduate admissions (paper Fig. 1): 4 of 1,500 epochs\n")


def test_a_partial_sweep_names_its_missing_variants_and_seeds(fig1_synthetic, write_run, monkeypatch):
    """Of a preset of 3 variants x seeds 0-3: one variant never started, one seed of Adam
    was interrupted, seed 3 never ran; the caption names each, not only a count."""
    plan = figures.PresetPlan("epoch", 4, (*FIG1_SYNTHETIC, "Adam+LBFGS"), (0, 1, 2, 3))
    monkeypatch.setattr(figures, "preset_plan", lambda preset: plan)
    interrupted = next(fig1_synthetic.rglob("Adam-*/seed=2"))
    (interrupted / "COMPLETE").unlink()
    report = figures.figure_report("fig1", fig1_synthetic)
    missing = "Missing: Adam: seed 2 incomplete, seed 3 not run; Adam+AADL: seed 3 not run; Adam+AADL+MA: seed 3 not run; Adam+LBFGS: no finished run (seeds 0-3 not run)."
    assert missing in report.notes
    assert missing in caption(report) and missing in report.summary_markdown


def test_the_real_fig1_preset_names_the_seeds_a_short_tree_lacks(fig1_synthetic):
    """From the composed preset: seeds 0-19 and its variants (the budget test uses it too)."""
    plan = figures.preset_plan("fig1")
    assert plan.total == 1500 and plan.unit == "epoch" and plan.seeds == tuple(range(20))
    assert {"Adam", "Adam+AADL", "Adam+AADL+MA"} <= set(plan.variants)
    report = figures.figure_report("fig1", fig1_synthetic)
    assert "Adam+AADL: seeds 3-19 not run" in caption(report)


def test_figures_command_pools_kernel_levels_only_when_asked(tmp_path, write_run, capsys):
    for seed in range(4):
        for variant in ("Adam", "Adam+AADL"):
            write_run(tmp_path / "runs", variant=variant, seed=seed, val_loss=[1.0, 0.5, 0.1 + 0.01 * seed],
                      cpu_capability="AVX2" if seed % 2 else "AVX512")
    out = tmp_path / "out"
    assert figures.main(["sweep", str(tmp_path / "runs"), "--out", str(out), "--name", "split"]) == 0
    split = (out / "split_summary.md").read_text()
    assert "| Adam (kernels=AVX2) | 2 |" in split and "kept apart (labels say kernels=...; pool=kernels pools them)" in split
    assert figures.main(["sweep", str(tmp_path / "runs"), "--out", str(out), "--name", "pooled", "--pool", "kernels"]) == 0
    pooled = (out / "pooled_summary.md").read_text()
    assert "| Adam | 4 |" in pooled and "Pooled across kernel levels on request (pool=kernels): AVX2 (4 runs), AVX512 (4 runs)." in pooled
    capsys.readouterr()
    assert figures.main(["sweep", str(tmp_path / "runs"), "--out", str(out), "--pool", "gpu"]) == 1
    assert capsys.readouterr().err.strip() == "error: pool: 'gpu' is none of code, kernels or all"


def test_title_gives_the_range_of_seed_counts(fig1_synthetic, write_run):
    write_run(fig1_synthetic, variant="Adam", seed=3, val_loss=[1.0, NAN], outcome="diverged", total=4)
    path = next(fig1_synthetic.rglob("Adam+AADL-*/seed=2"))
    (path / "meta.json").unlink()
    title = figures.figure_report("fig1", fig1_synthetic).figure.axes[0].get_title()
    assert "over 2-3 seeds" in title


def test_a_configuration_whose_every_seed_diverged_has_no_curve_but_a_caption(fig1_synthetic, write_run):
    for seed in range(3):
        write_run(fig1_synthetic, variant="Adam+AADL", seed=seed, val_loss=[1.0, NAN], identity={"method.aadl.history": 50},
                  outcome="diverged", total=4)
    report = figures.curves_report(fig1_synthetic)
    assert [line.get_label() for line in report.figure.axes[0].get_lines()] == ["Adam", "Adam+AADL (history=10)", "Adam+AADL+MA"]
    assert "Adam+AADL (history=50): 3 of 3 seeds diverged" in caption(report)
    assert report.summary["label"].tolist() == report.results.labels  # its row stays in the table


def test_colours_follow_the_legend_order_in_every_figure(tmp_path, write_run):
    for seed in range(2):
        write_run(tmp_path / "all", variant="SGD", seed=seed, val_loss=[1.0, 0.4])
        write_run(tmp_path / "all", variant="SGD+AADL", seed=seed, val_loss=[1.0, 0.1])
        write_run(tmp_path / "all", variant="SGD+Lookahead", seed=seed, val_loss=[1.0, 0.2], method="lookahead", legend_order=5)
        write_run(tmp_path / "two", variant="SGD", seed=seed, val_loss=[1.0, 0.4])
        write_run(tmp_path / "two", variant="SGD+Lookahead", seed=seed, val_loss=[1.0, 0.2], method="lookahead", legend_order=5)

    def colours(root):
        lines = figures.curves_report(root).figure.axes[0].get_lines()
        return {line.get_label(): mcolors.to_hex(line.get_color()) for line in lines}

    every, two = colours(tmp_path / "all"), colours(tmp_path / "two")
    assert every == {"SGD": mcolors.to_hex("tab:blue"), "SGD+AADL": mcolors.to_hex("tab:orange"), "SGD+Lookahead": mcolors.to_hex("C5")}
    assert two == {"SGD": every["SGD"], "SGD+Lookahead": every["SGD+Lookahead"]}


def test_configurations_of_one_method_share_its_colour_and_differ_in_style(tmp_path, write_run):
    for history in (5, 10, 20):
        write_run(tmp_path, variant="Adam+AADL", seed=0, val_loss=[1.0, 0.1], identity={"method.aadl.history": history})
    lines = figures.curves_report(tmp_path).figure.axes[0].get_lines()
    assert len({mcolors.to_hex(line.get_color()) for line in lines}) == 1
    assert [line.get_linestyle() for line in lines] == ["-", "--", ":"]


def test_sweep_of_a_damaged_tree_carries_the_caption(tmp_path, write_run):
    runs = {(history, seed): write_run(tmp_path, variant="Adam+AADL", seed=seed, val_loss=[1.0, 0.01 * history],
                                       identity={"method.aadl.history": history}) for history in (5, 10) for seed in range(2)}
    write_run(tmp_path, variant="Adam+AADL", seed=2, val_loss=[1.0, NAN], identity={"method.aadl.history": 10}, outcome="diverged", total=3)
    (runs[5, 1] / "metrics.csv").unlink()
    report = figures.sweep_report(tmp_path)
    assert "Adam+AADL (history=10): 1 of 3 seeds diverged" in caption(report)
    assert "Left out: 1 damaged run (named in the warnings)." in caption(report)


def test_curves_command_on_a_damaged_tree_warns_and_draws_the_rest(fig1_synthetic, write_run, tmp_path, caplog):
    damage_tree(fig1_synthetic, write_run)
    out = tmp_path / "figures"
    assert figures.main(["curves", str(fig1_synthetic), "--out", str(out), "--name", "mine"]) == 0
    assert (out / "mine.png").read_bytes().startswith(PNG_MAGIC) and (out / "mine.pdf").exists()
    table = pd.read_csv(out / "mine_summary.csv").set_index("label")
    assert table["runs"].tolist() == [3, 3, 3] and table["diverged"].tolist() == [0, 2, 0]
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 5
    assert any("meta.json is not valid JSON" in m for m in damaged)
    assert any("metrics.csv is empty (0 bytes)" in m for m in damaged)
    assert any("'five' is not a number" in m for m in damaged)
    assert any("COMPLETE says 2 rows, metrics.csv holds 1" in m for m in damaged)
    assert any("older version of the harness" in m for m in damaged)


def _figures_command(*args):
    return subprocess.run([sys.executable, "-m", "experiments.figures", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_real_command_line_never_shows_a_traceback(fig1_synthetic, write_run, tmp_path):
    damage_tree(fig1_synthetic, write_run)
    done = _figures_command("curves", str(fig1_synthetic), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "WARNING left out" in done.stderr and ": damaged: meta.json is not valid JSON" in done.stderr
    assert (tmp_path / "out" / "runs.png").exists()
    assert "| Adam+AADL | 3 | 2/5 |" in done.stdout

    # Nothing usable: exit status 1 and one line of error after the warnings.
    for run in fig1_synthetic.rglob("seed=*"):
        if (run / "meta.json").exists():
            (run / "meta.json").write_text(json.dumps({"status": "complete"}))
    done = _figures_command("curves", str(fig1_synthetic), "--out", str(tmp_path / "out2"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no complete runs under {fig1_synthetic} (")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("metric", ["val_rel_l2", "wall_time_typo"])
def test_a_metric_the_runs_lack_is_one_line(fig1_synthetic, tmp_path, capsys, metric):
    assert figures.main(["curves", str(fig1_synthetic), "--metric", metric, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the runs' metrics have no column {metric!r}; they have " + err[0].split("they have ", 1)[1]]


def test_report_of_loaded_results_matches_the_directory(fig1_synthetic, write_run):
    damage_tree(fig1_synthetic, write_run)
    results = aggregate.load_results(fig1_synthetic)
    pd.testing.assert_frame_equal(figures.figure_report("fig1", results).summary, figures.figure_report("fig1", fig1_synthetic).summary)
