"""The one-command demo (python -m experiments.demo) on a tiny budget: real runs in worker
processes, the progress lines, the summary table and the figure files; reuse on a rerun."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments import demo
from experiments.results import RunDirectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_trains_three_variants_then_prints_the_table_and_writes_the_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CI", "1")  # progress as a few lines, as in any non-interactive log
    runs_root, out = tmp_path / "runs", tmp_path / "figures"
    argv = ["--seeds", "2", "--iterations", "6", "--out", str(out), f"output.root={runs_root}"]

    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 variants (Adam+AADL+MA, Adam+AADL, Adam) x 2 seeds x 6 iterations = 6 runs" in printed
    assert "100%  36/36 iterations, 6/6 runs done" in printed
    # The table of experiments.figures, with the relative error and the ReLU caveat.
    for row in ("| Adam | 2 |", "| Adam+AADL | 2 |", "| Adam+AADL+MA | 2 |"):
        assert row in printed
    assert "final val_rel_l2" in printed and "Note: ReLU" in printed
    assert (out / "fig2_demo.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "fig2_demo.pdf").read_bytes().startswith(b"%PDF")
    assert len(pd.read_csv(out / "fig2_demo_summary.csv")) == 3
    assert str(out / "fig2_demo.png") in printed

    runs = sorted((runs_root / "burgers2d" / "demo").glob("*/seed=*"))
    assert len(runs) == 6 and all(RunDirectory(path).is_complete() for path in runs)
    assert all(pd.read_csv(path / "metrics.csv")["step"].iloc[-1] == 6 for path in runs)

    # A rerun reuses every complete run: nothing is trained, the same table comes out.
    modified = {path: (path / "metrics.csv").stat().st_mtime_ns for path in runs}
    assert demo.main(argv) == 0
    again = capsys.readouterr().out
    assert "reusing 6 complete run(s)" in again and "trained 6 run(s)" in printed and "trained 6" not in again
    assert {path: (path / "metrics.csv").stat().st_mtime_ns for path in runs} == modified


def test_demo_rejects_a_bad_override_before_running_anything(tmp_path, capsys):
    assert demo.main(["--seeds", "1", f"output.root={tmp_path}", "method.aadl.relaxation=2"]) == 2
    assert "method.aadl.relaxation" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--jobs", "0"]])
def test_demo_rejects_nonsense_counts(argv):
    with pytest.raises(SystemExit):
        demo.main(argv)
