"""Figures, summary tables and the notebook, from small synthetic results sets."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient

from conftest import FIG1_SYNTHETIC, REPO_ROOT
from experiments.analysis import aggregate, figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("fig*_*.ipynb"))


def test_fig1_plots_the_mean_curves_with_bands_on_a_log_scale(fig1_synthetic):
    report = figures.figure_report("fig1", fig1_synthetic)
    axes = report.figure.axes[0]
    assert axes.get_yscale() == "log" and axes.get_xlabel() == "epochs"
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == ["Adam", "Adam+AADL", "Adam+AADL+MA"]
    for line, (variant, seeds) in zip(lines, FIG1_SYNTHETIC.items()):
        np.testing.assert_allclose(line.get_xdata(), range(5))
        np.testing.assert_allclose(line.get_ydata(), np.mean(list(seeds.values()), axis=0))
    assert len(axes.collections) == 3  # one shaded CI band per variant
    assert "3 seeds" in axes.get_title()


def test_fig1_command_writes_png_pdf_and_tables(fig1_synthetic, tmp_path, capsys):
    out = tmp_path / "figures"
    assert figures.main(["fig1", "--results", str(fig1_synthetic), "--out", str(out)]) == 0
    assert (out / "fig1.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "fig1.pdf").read_bytes().startswith(b"%PDF")
    table = pd.read_csv(out / "fig1_summary.csv")
    expected = aggregate.summary(aggregate.load_results(fig1_synthetic), threshold=figures.FIGURES["fig1"].threshold)
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert {"final_mean", "final_low", "final_high", "best_mean", "baseline_ratio_mean", "epochs_to_threshold_mean"} <= set(table.columns)
    markdown = (out / "fig1_summary.md").read_text()
    assert markdown in capsys.readouterr().out
    assert "| Adam+AADL+MA | 3 |" in markdown


def test_generic_curves_command_reads_any_results_directory(fig1_synthetic, tmp_path):
    out = tmp_path / "figures"
    assert figures.main(["curves", str(fig1_synthetic), "--out", str(out), "--name", "mine", "--threshold", "0.1"]) == 0
    table = pd.read_csv(out / "mine_summary.csv")
    assert table["label"].tolist() == ["Adam", "Adam+AADL", "Adam+AADL+MA"]
    assert (out / "mine.png").exists() and (out / "mine.pdf").exists()


def test_sweep_command_tabulates_and_plots_final_metric_per_combination(tmp_path, write_run):
    root = tmp_path / "sweep"
    for history in (5, 10, 20):
        for seed in range(3):
            write_run(root, variant="Adam+AADL", seed=seed, val_loss=[1.0, history * 1e-3 * (1 + 0.1 * seed)], identity={"method.aadl.history": history})
    for seed in range(3):
        write_run(root, variant="Adam", seed=seed, val_loss=[1.0, 0.05])
    out = tmp_path / "figures"
    assert figures.main(["sweep", str(root), "--out", str(out)]) == 0
    table = pd.read_csv(out / "sweep_sweep_summary.csv")
    swept = table[table.variant == "Adam+AADL"]
    assert swept["method.aadl.history"].tolist() == [5, 10, 20]
    assert swept["final_mean"].tolist() == pytest.approx([h * 1e-3 * 1.1 for h in (5, 10, 20)])
    assert (out / "sweep_sweep.png").read_bytes().startswith(PNG_MAGIC)

    report = figures.sweep_report(root)
    axes = report.figure.axes[0]
    assert axes.get_xlabel() == "history" and axes.get_yscale() == "log"
    bars = next(container for container in axes.containers if container.get_label() == "Adam+AADL")
    np.testing.assert_allclose(bars.lines[0].get_xdata(), [5, 10, 20])
    np.testing.assert_allclose(bars.lines[0].get_ydata(), swept["final_mean"])
    baseline = next(line for line in axes.get_lines() if line.get_label() == "Adam")  # a dashed level
    assert baseline.get_linestyle() == "--" and baseline.get_ydata()[0] == pytest.approx(0.05)


def test_sweep_over_two_keys_plots_one_bar_per_combination(tmp_path, write_run):
    for history in (5, 10):
        for relaxation in (0.5, 1.0):
            for seed in range(2):
                write_run(tmp_path, variant="Adam+AADL", seed=seed, val_loss=[1.0, history * relaxation],
                          identity={"method.aadl.history": history, "method.aadl.relaxation": relaxation})
    report = figures.sweep_report(tmp_path)
    labels = [tick.get_text() for tick in report.figure.axes[0].get_yticklabels()]
    assert labels == [f"Adam+AADL (history={h}, relaxation={r})" for h in (5, 10) for r in (0.5, 1.0)]


def test_missing_results_are_reported_not_raised(tmp_path, capsys):
    assert figures.main(["fig1", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no complete runs" in capsys.readouterr().err


@pytest.mark.parametrize("figure", ["fig2", "fig3"])
def test_burgers_figures_plot_validation_mse_against_iterations(paper_synthetic, figure):
    report = figures.figure_report(figure, paper_synthetic(figure))
    axes = report.figure.axes[0]
    assert axes.get_xlabel() == "iterations" and axes.get_yscale() == "log"
    assert [line.get_label() for line in axes.get_lines()] == ["Adam", "Adam+AADL", "Adam+AADL+MA"]
    np.testing.assert_allclose(axes.get_lines()[0].get_xdata(), [0, 10, 20, 30, 40])  # steps
    np.testing.assert_allclose(axes.get_lines()[0].get_ydata(), np.mean(list(FIG1_SYNTHETIC["Adam"].values()), axis=0))


@pytest.mark.parametrize("figure", ["fig2", "fig3"])
def test_burgers_summary_reports_the_relative_error_beside_the_validation_mse(paper_synthetic, figure):
    report = figures.figure_report(figure, paper_synthetic(figure))
    finals = {variant: [10 * curve[-1] for curve in seeds.values()] for variant, seeds in FIG1_SYNTHETIC.items()}
    assert report.summary["final_val_rel_l2_mean"].tolist() == pytest.approx([np.mean(v) for v in finals.values()])
    header = report.summary_markdown.splitlines()[0]
    assert "| final val_loss | final val_rel_l2 |" in header


def test_fig3_caption_and_summary_state_the_1e_27_caveat(paper_synthetic):
    report = figures.figure_report("fig3", paper_synthetic("fig3"))
    caption = " ".join(text.get_text() for text in report.figure.texts)
    for shown in (caption.replace("\n", " "), report.summary_markdown):
        assert "1e-27" in shown and "val_rel_l2" in shown and "ReLU" in shown


def test_caveats_follow_the_runs_settings(tmp_path, write_run):
    """A caveat about the paper's ReLU is not shown for runs made with tanh."""
    for variant in ("Adam", "Adam+AADL"):
        for seed in range(2):
            write_run(tmp_path, variant=variant, seed=seed, val_loss=[1.0, 0.5], experiment="burgers2d",
                      identity={"problem.activation": "tanh"}, unit="iteration", metrics={"val_rel_l2": [1.0, 0.4]})
    report = figures.figure_report("fig2", aggregate.load_results(tmp_path))  # a chosen subset: no seed is missing
    assert report.notes == [] and "Note:" not in report.summary_markdown and not report.figure.texts
    assert figures.figure_report("fig2", tmp_path).summary.equals(report.summary)


def test_missing_paper_figure_runs_name_the_preset(tmp_path, capsys):
    assert figures.main(["fig3", "--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "+paper=fig3" in capsys.readouterr().err


def test_every_paper_figure_has_a_notebook():
    assert sorted(path.name.split("_")[0] for path in NOTEBOOKS) == sorted(figures.FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless_on_a_results_set(path: Path, paper_synthetic, monkeypatch):
    figure = path.name.split("_")[0]
    results = paper_synthetic(figure)
    monkeypatch.setenv("AADL_RESULTS_DIR", str(results))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("data", {}).get("text/markdown", "") + o.get("text", "") for o in outputs)
    assert "9 complete runs" in text and "| Adam+AADL+MA | 3 |" in text
    if figure == "fig3":
        assert "1e-27" in text and "final val_rel_l2" in text
    assert os.environ["AADL_RESULTS_DIR"] == str(results)
