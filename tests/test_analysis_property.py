"""For random small result trees with some runs diverged, cut short, damaged, unfinished
or on other data, the summary's counts and means are those computed by hand from the
good runs alone."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from experiments.analysis import aggregate
from experiments.analysis.aggregate import ResultsError, t_interval
from run_trees import DEFAULT_SHA256, OTHER_SHA256, write_run

TREES = 30
NAN = float("nan")
#: What may happen to a run, and how often (good runs most often).
FATES = ["good"] * 8 + ["diverged", "nan_final", "cut", "short", "bad_meta", "text", "no_metrics", "unfinished"]
GOOD, DIVERGED = {"good"}, {"diverged", "nan_final"}
DAMAGED = {"cut", "short", "bad_meta", "text", "no_metrics"}


def write_tree(root, rng):
    """A random tree; returns {configuration: {seed: (fate, final)}} with configuration
    (variant, history, sha) (history None for the base optimizer)."""
    shas = [DEFAULT_SHA256] if rng.random() < 0.6 else [DEFAULT_SHA256, OTHER_SHA256]
    configurations = [("Adam", None, sha) for sha in shas]
    histories = [10] if rng.random() < 0.5 else [5, 10]
    configurations += [("Adam+AADL", h, sha) for h in histories for sha in shas]
    if rng.random() < 0.5:
        configurations.append(("Adam+AADL+MA", 10, shas[0]))
    seeds = range(int(rng.integers(2, 6)))
    truth = {}
    for config in configurations:
        variant, history, sha = config
        identity = {} if history is None else {"method.aadl.history": history}
        for seed in seeds:
            fate = FATES[int(rng.integers(len(FATES)))]
            final = float(rng.uniform(0.01, 0.1))
            curve = [1.0, float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.1, 0.2)), final]
            options = dict(variant=variant, seed=seed, identity=identity, data_sha256=sha)
            if fate == "diverged":
                curve = curve[:2] + [NAN]
                write_run(root, val_loss=curve, outcome="diverged", total=3, **options)
            elif fate == "nan_final":
                write_run(root, val_loss=curve[:3] + [NAN], **options)
            elif fate == "cut":
                write_run(root, val_loss=curve, truncate=2, **options)
            elif fate == "short":
                write_run(root, val_loss=curve, total=6, **options)
            elif fate == "unfinished":
                write_run(root, val_loss=curve[:2], complete=False, status=str(rng.choice(["running", "failed", "preempted"])), **options)
            else:
                run = write_run(root, val_loss=curve, **options)
                if fate == "bad_meta":
                    (run / "meta.json").write_text((run / "meta.json").read_text()[:40])
                elif fate == "text":
                    text = (run / "metrics.csv").read_text()
                    (run / "metrics.csv").write_text(text.replace(repr(curve[1]), "n/a", 1))
                elif fate == "no_metrics":
                    (run / "metrics.csv").unlink()
            truth.setdefault(config, {})[seed] = (fate, final)
    return truth


def expected_labels(truth):
    """The labelling rule, by hand: variant, history where the variant has several among
    the configurations that have good or diverged runs, data where there are several."""
    present = [c for c, runs in truth.items() if any(f in GOOD | DIVERGED for f, _ in runs.values())]
    several_data = len({sha for _, _, sha in present}) > 1
    labels = {}
    for variant, history, sha in present:
        parts = []
        if len({h for v, h, _ in present if v == variant}) > 1:
            parts.append(f"history={history}")
        if several_data:
            parts.append(f"data: graduate_admissions {sha[:8]}")
        labels[(variant, history, sha)] = variant + (f" ({', '.join(parts)})" if parts else "")
    return labels


@pytest.mark.parametrize("tree", range(TREES))
def test_summary_rests_on_the_good_runs_only(tmp_path, tree):
    rng = np.random.default_rng(tree)
    truth = write_tree(tmp_path, rng)
    fates = [fate for runs in truth.values() for fate, _ in runs.values()]
    if not any(fate in GOOD for fate in fates):
        with pytest.raises(ResultsError, match="no complete runs"):
            aggregate.load_results(tmp_path)
        return
    results = aggregate.load_results(tmp_path)
    assert len(results.damaged) == sum(f in DAMAGED for f in fates)
    assert len(results.incomplete) == fates.count("unfinished")
    assert len(results.diverged) == sum(f in DIVERGED for f in fates)
    assert len(results.runs) == fates.count("good")

    labels = expected_labels(truth)
    assert sorted(results.labels) == sorted(labels.values())
    table = aggregate.summary(results).set_index("label")
    baselines = {sha: labels.get(("Adam", None, sha)) for _, _, sha in labels}
    for config, label in labels.items():
        runs = truth[config]
        good = {seed: final for seed, (fate, final) in runs.items() if fate in GOOD}
        row = table.loc[label]
        assert row["runs"] == len(good)
        assert row["diverged"] == sum(fate in DIVERGED for fate, _ in runs.values())
        assert [row["final_mean"], row["final_low"], row["final_high"]] == pytest.approx(t_interval(list(good.values())), nan_ok=True)
        if "baseline_ratio_mean" not in table:
            assert all(b is None for b in baselines.values())
            continue
        base = baselines[config[2]]
        if base is None:  # no base optimizer on this data: no ratio
            assert math.isnan(row["baseline_ratio_mean"])
            continue
        base_good = {s: f for s, (fate, f) in truth[("Adam", None, config[2])].items() if fate in GOOD}
        pairs = [math.log(base_good[s] / good[s]) for s in good if s in base_good]
        assert row["baseline_pairs"] == len(pairs)
        assert row["baseline_ratio_mean"] == pytest.approx(math.exp(np.mean(pairs)) if pairs else np.nan, nan_ok=True)


def test_the_trees_cover_every_fate():
    """The random trees do exercise every kind of run (the property is not vacuous)."""
    seen = set()
    for tree in range(TREES):
        with tempfile.TemporaryDirectory() as directory:
            truth = write_tree(Path(directory), np.random.default_rng(tree))
        seen |= {fate for runs in truth.values() for fate, _ in runs.values()}
    assert seen == set(FATES)


def test_a_damaged_meta_json_in_the_trees_is_invalid_json(tmp_path):
    run = write_run(tmp_path, variant="Adam", seed=0, val_loss=[1.0, 0.5])
    (run / "meta.json").write_text((run / "meta.json").read_text()[:40])
    with pytest.raises(json.JSONDecodeError):
        json.loads((run / "meta.json").read_text())
