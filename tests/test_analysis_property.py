"""For random small result trees with some runs diverged, cut short, damaged, unfinished
or on other data, the summary's counts and means are those computed by hand from the
good runs alone; with runs of two code versions and two kernel levels, its groups (split,
or pooled on request) are those computed by hand."""

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


# --------------------------------------------------------------------------------------------
# Code versions and kernel levels: split by default, pooled on request
# --------------------------------------------------------------------------------------------

COMMIT_A, COMMIT_B = "1a2b3c4d" + "a" * 32, "5e6f7a8b" + "b" * 32
#: Code versions as written (commit, dirty) and as aggregate names them.
CODES = {"A": (COMMIT_A, False), "B": (COMMIT_B, True)}
CODE_NAMES = {"A": "1a2b3c4d", "B": "5e6f7a8b-dirty", "AB": "1a2b3c4d & 5e6f7a8b-dirty"}
KERNELS = ("AVX2", "AVX512")
PROVENANCE_TREES = 16
PROVENANCE_FATES = ["good"] * 6 + ["diverged", "cut", "unfinished", "mixed"]
POOLS = [(), ("code",), ("kernels",), ("code", "kernels")]


def write_provenance_tree(root, rng):
    """A random tree of Adam and Adam+AADL runs made by two code versions on two kernel
    levels (some runs resumed under the other version: "mixed"), some seeds stored twice
    under another output name. Returns one entry per run written: (path, config, seed,
    code, kernels, fate, final), config = (variant, history)."""
    configurations = [("Adam", None)] + [("Adam+AADL", h) for h in ([10] if rng.random() < 0.5 else [5, 10])]
    codes = ["A", "B"] if rng.random() < 0.8 else [str(rng.choice(["A", "B"]))]
    kernels = list(KERNELS) if rng.random() < 0.7 else [str(rng.choice(KERNELS))]
    written = []
    for variant, history in configurations:
        identity = {} if history is None else {"method.aadl.history": history}
        for seed in range(int(rng.integers(2, 5))):
            copies = 2 if rng.random() < 0.2 else 1
            for name in ("again", "synthetic")[2 - copies:]:
                code, kernel = str(rng.choice(codes)), str(rng.choice(kernels))
                fate = PROVENANCE_FATES[int(rng.integers(len(PROVENANCE_FATES)))]
                final = float(rng.uniform(0.01, 0.1))
                curve = [1.0, float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.1, 0.2)), final]
                commit, dirty = CODES[code]
                options = dict(variant=variant, seed=seed, identity=identity, name=name, commit=commit, dirty=dirty, cpu_capability=kernel)
                if fate == "mixed":  # preempted under A, resumed under B: its own code version
                    options.update(commit=COMMIT_A, dirty=False, resumed=[{"step": 10, "git": {"commit": COMMIT_B, "dirty": True}, "cpu_capability": kernel}])
                    code = "AB"
                if fate == "diverged":
                    path = write_run(root, val_loss=curve[:2] + [NAN], outcome="diverged", total=3, **options)
                elif fate == "unfinished":
                    path = write_run(root, val_loss=curve[:2], complete=False, status="preempted", **options)
                else:
                    path = write_run(root, val_loss=curve, truncate=2 if fate == "cut" else None, **options)
                written.append((path, (variant, history), seed, code, kernel, fate, final))
    return written


def expected_groups(written, pool):
    """By hand: which provenance keys split (more than one value among the finished runs and
    not pooled), each group's label, and per group {seed: (fate, final)} of the runs that
    count (the first copy in path order where a group has a seed twice)."""
    finished = [w for w in written if w[5] in ("good", "mixed", "diverged")]
    split = [key for key, index in (("code", 3), ("kernels", 4))
             if key not in pool and len({w[index] for w in finished}) > 1]
    groups: dict[tuple, dict[int, tuple[str, float]]] = {}
    for path, config, seed, code, kernel, fate, final in sorted(finished, key=lambda w: str(w[0])):
        key = (config, *(CODE_NAMES[code] if k == "code" else kernel for k in split))
        groups.setdefault(key, {}).setdefault(seed, ("diverged" if fate == "diverged" else "good", final))
    histories = {variant: {config[1] for (config, *_) in groups if config[0] == variant} for variant in ("Adam", "Adam+AADL")}
    labels = {}
    for key in groups:
        (variant, history), values = key[0], key[1:]
        parts = [f"history={history}"] if len(histories[variant]) > 1 else []
        parts += [f"{k}={v}" for k, v in zip(split, values)]
        labels[key] = variant + (f" ({', '.join(parts)})" if parts else "")
    return split, groups, labels


@pytest.mark.parametrize("tree", range(PROVENANCE_TREES))
def test_summary_groups_by_code_version_and_kernel_level_as_computed_by_hand(tmp_path, tree):
    rng = np.random.default_rng(1000 + tree)
    written = write_provenance_tree(tmp_path, rng)
    pool = POOLS[tree % len(POOLS)]
    options = {"pool": pool} if pool else {}  # the default splits
    split, groups, labels = expected_groups(written, pool)
    if not any(fate == "good" for by_seed in groups.values() for fate, _ in by_seed.values()):
        with pytest.raises(ResultsError, match="no complete runs"):
            aggregate.load_results(tmp_path, **options)
        return
    results = aggregate.load_results(tmp_path, **options)
    assert sorted(results.labels) == sorted(labels.values())
    assert sorted(results.provenance) == sorted(set(split) | {k for k in pool if k in results.provenance})
    assert set(results.pooled) <= set(pool) and not set(results.pooled) & set(split)
    assert len(results.mixed) == sum(w[5] == "mixed" for w in written)
    notes = aggregate.left_out_notes(results)
    for key in split:  # one line names the split, with every value
        (line,) = [n for n in notes if n.startswith("Runs of") and f"pool={key}" in n]
        assert all(f"{value} (" in line for value in results.provenance[key])
    for key in results.pooled:
        assert any(n.startswith(f"Pooled across {aggregate.PROVENANCE_NAMES[key]}") for n in notes)

    table = aggregate.summary(results).set_index("label")
    for key, by_seed in groups.items():
        row = table.loc[labels[key]]
        good = {seed: final for seed, (fate, final) in by_seed.items() if fate == "good"}
        assert row["runs"] == len(good)
        assert row["diverged"] == sum(fate == "diverged" for fate, _ in by_seed.values())
        assert [row["final_mean"], row["final_low"], row["final_high"]] == pytest.approx(t_interval(list(good.values())), nan_ok=True)
        # Paired only with the base optimizer of the same code version and kernel level.
        base_key = (("Adam", None), *key[1:])
        if key[0][0] == "Adam" or "baseline_ratio_mean" not in table:
            continue
        if base_key not in groups:
            assert math.isnan(row["baseline_ratio_mean"]) or row["baseline_pairs"] == 0
            continue
        base_good = {s: f for s, (fate, f) in groups[base_key].items() if fate == "good"}
        pairs = [math.log(base_good[s] / good[s]) for s in good if s in base_good]
        assert row["baseline_pairs"] == len(pairs)
        assert row["baseline_ratio_mean"] == pytest.approx(math.exp(np.mean(pairs)) if pairs else np.nan, nan_ok=True)


def test_the_provenance_trees_split_and_pool_both_keys():
    """The random trees do split and pool by code and by kernels, with mixed runs (the
    property is not vacuous)."""
    seen = set()
    for tree in range(PROVENANCE_TREES):
        with tempfile.TemporaryDirectory() as directory:
            written = write_provenance_tree(Path(directory), np.random.default_rng(1000 + tree))
        split, _, _ = expected_groups(written, POOLS[tree % len(POOLS)])
        seen |= {f"split {key}" for key in split}
        seen |= {f"pooled {key}" for key in POOLS[tree % len(POOLS)] if len({w[3 if key == "code" else 4] for w in written}) > 1}
        seen |= {"mixed" for w in written if w[5] == "mixed"} | {"twice" for w in written if "again" in str(w[0])}
    assert seen == {"split code", "split kernels", "pooled code", "pooled kernels", "mixed", "twice"}
