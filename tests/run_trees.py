"""Synthetic run directories in the harness's format, written with json and csv alone.

Independent of the writer's classes on purpose: the reader's tests pin the format, so a
change on the writer side that breaks it shows up as a failure instead of moving both
sides together. ``conftest`` turns these into fixtures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

#: The checksum of the graduate-admissions file that runs record unless told otherwise.
DEFAULT_SHA256 = "3f2a1c9b" + "0" * 56
OTHER_SHA256 = "9e8d7c6b" + "1" * 56

#: variant suffix -> (method, legend_order, average): the registry's names and order.
METHODS = {"+AADL+MA": ("aadl", 2, True), "+AADL": ("aadl", 1, False), "": ("none", 0, None)}
AADL_COUNTERS = ("aa_attempts", "aa_accepted", "averages_applied")


def method_of(variant: str) -> tuple[str, int, bool | None]:
    return next(m for suffix, m in METHODS.items() if variant.endswith(suffix))


def write_run(
    root: Path,
    *,
    variant: str,
    seed: int,
    val_loss: Sequence[float],
    identity: dict | None = None,
    complete: bool = True,
    status: str = "running",
    outcome: str = "complete",
    experiment: str = "graduate_admissions",
    name: str = "synthetic",
    metrics: dict[str, Sequence[float]] | None = None,
    unit: str = "epoch",
    total: int | None = None,
    truncate: int | None = None,
    data_sha256: str | None = None,
    method: str | None = None,
    legend_order: int | None = None,
    commit: str | None = None,
    dirty: bool | None = None,
    cpu_capability: str | None = None,
    resumed: Sequence[dict] = (),
) -> Path:
    """One run directory with the given validation curve (one value per evaluation, from
    unit 0), as the driver writes it, without training anything; returns its path.

    ``complete=False`` leaves it unfinished with meta.json ``status``; ``outcome="diverged"``
    finishes it as diverged (its curve usually ends non-finite); ``total`` is the budget
    (default: what the curve covers; larger with outcome "complete" is a run that wrote
    fewer rows than its budget gives); ``truncate=N`` cuts metrics.csv to N rows after the
    run finished; ``data_sha256`` the checksum of the graduate-admissions file (default
    DEFAULT_SHA256; burgers experiments have no data file); ``identity`` adds config keys
    (e.g. {"method.aadl.history": 5}); ``metrics`` adds the problem's own columns;
    ``unit="iteration"`` writes an iteration budget (empty epoch column, 10 steps a row);
    ``commit``/``dirty`` the git block, ``cpu_capability`` the kernel level (absent where
    None), ``resumed`` the resumption entries (each e.g. {"step", "git", "cpu_capability"}).
    """
    default_method, default_order, average = method_of(variant)
    method = method or default_method
    legend_order = default_order if legend_order is None else legend_order
    full_identity: dict[str, Any] = {
        "experiment": experiment,
        "method.name": method,
        "optimizer.name": "adam",
        "optimizer.lr": 0.02,
    }
    if method == "aadl":
        full_identity.update({"method.aadl.history": 10, "method.aadl.average": average})
    if experiment == "graduate_admissions":
        full_identity["data.graduate_admissions.sha256"] = data_sha256 or DEFAULT_SHA256
    full_identity.update(identity or {})
    config_id = hashlib.sha1(json.dumps(full_identity, sort_keys=True).encode()).hexdigest()[:8]
    directory = Path(root) / experiment / name / f"{variant}-{config_id}" / f"seed={seed}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text("synthetic: true\n")
    (directory / "run.log").write_text("")

    steps_per_row = 10
    eval_every = 1 if unit == "epoch" else steps_per_row
    total = total if total is not None else (len(val_loss) - 1) * eval_every
    hyperparameters = {k.split(".", 2)[2]: v for k, v in full_identity.items() if k.startswith(f"method.{method}.")}
    rows = []
    for index, value in enumerate(val_loss):
        rows.append({
            "experiment": experiment, "variant": variant, "method": method, "optimizer": "adam",
            "seed": seed, "config_id": config_id, **hyperparameters,
            "step": steps_per_row * index,
            "epoch": index if unit == "epoch" else "",
            "train_loss": value if index else math.nan,  # no training before the first row
            "val_loss": value,
            **{column: values[index] for column, values in (metrics or {}).items()},
            "lr": 0.02,
            "wall_time": 0.01 * index,
            **(dict.fromkeys(AADL_COUNTERS, index) if method == "aadl" else {}),
        })
    with open(directory / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    meta: dict[str, Any] = {
        "status": status if not complete else outcome,
        "experiment": experiment,
        "variant": variant,
        "method": method,
        "legend_order": legend_order,
        "baseline": method == "none",
        "seed": seed,
        "config_id": config_id,
        "identity": full_identity,
        "budget": {"unit": unit, "total": total, "eval_every": eval_every},
        "expected_rows": 1 + math.ceil(total / eval_every),
        "final": rows[-1],
        "git": {"commit": commit, "dirty": dirty},
        "host": "synthetic",
    }
    if cpu_capability is not None:
        meta["cpu_capability"] = cpu_capability
    if resumed:
        meta["resumed"] = [dict(entry) for entry in resumed]
    if complete and outcome == "diverged":
        meta["diverged"] = {"step": rows[-1]["step"], "unit": len(rows) - 1, "quantity": "val_loss"}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if complete:
        marker = {"outcome": outcome, "rows": len(rows), "last_step": rows[-1]["step"], "ended": "2025-01-01T00:00:00+00:00"}
        (directory / "COMPLETE").write_text(json.dumps(marker) + "\n")
    if truncate is not None:
        lines = (directory / "metrics.csv").read_text().splitlines(keepends=True)
        (directory / "metrics.csv").write_text("".join(lines[: 1 + truncate]))
    return directory


#: A small Fig. 1-like results set: validation curves (epochs 0-4) per variant and seed.
FIG1_SYNTHETIC = {
    "Adam": {0: [1.0, 0.5, 0.1, 0.05, 0.04], 1: [1.0, 0.6, 0.2, 0.06, 0.05], 2: [1.0, 0.4, 0.15, 0.07, 0.06]},
    "Adam+AADL": {0: [1.0, 0.3, 0.05, 0.02, 0.02], 1: [1.0, 0.35, 0.06, 0.03, 0.025], 2: [1.0, 0.25, 0.04, 0.02, 0.03]},
    "Adam+AADL+MA": {0: [1.0, 0.2, 0.02, 0.01, 0.008], 1: [1.0, 0.25, 0.03, 0.012, 0.01], 2: [1.0, 0.15, 0.025, 0.011, 0.012]},
}


def write_fig1_synthetic(root: Path) -> Path:
    """FIG1_SYNTHETIC as complete runs under ``root``; returns ``root``."""
    for variant, seeds in FIG1_SYNTHETIC.items():
        for seed, curve in seeds.items():
            write_run(root, variant=variant, seed=seed, val_loss=curve)
    return root


#: The config keys of each paper preset's runs that decide which caveats its figure carries.
def _preset_identity() -> dict[str, dict]:
    from experiments.analysis.figures import FIGURES

    return {name: {caveat.key: caveat.value for caveat in spec.caveats} for name, spec in FIGURES.items()}


#: The config keys of each paper preset's runs that decide which caveats its figure carries
#: (tests/test_experiments_config.py checks that the presets really have these values).
PRESET_IDENTITY = _preset_identity()


def write_paper_synthetic(root: Path, figure: str) -> Path:
    """FIG1_SYNTHETIC's curves written as the runs of a paper figure's preset (its
    experiment, budget unit, identity keys and extra metrics, each extra metric 10x the
    validation loss) under ``root``; returns ``root``."""
    from experiments.analysis.figures import FIGURES

    spec = FIGURES[figure]
    for variant, seeds in FIG1_SYNTHETIC.items():
        for seed, curve in seeds.items():
            write_run(
                root, variant=variant, seed=seed, val_loss=curve, experiment=spec.experiment,
                identity=PRESET_IDENTITY[figure], unit="epoch" if spec.x == "epoch" else "iteration",
                metrics={metric: [10 * value for value in curve] for metric in spec.also},
            )
    return root


# --------------------------------------------------------------------------------------------
# Result trees with known effects (the claims report's tests)
# --------------------------------------------------------------------------------------------


def curve_to(final: float, rows: int = 6, start: float = 1.0) -> list[float]:
    """A validation curve falling geometrically from ``start`` to exactly ``final`` in its
    last row (``rows`` evaluations)."""
    return [start * (final / start) ** (index / (rows - 1)) for index in range(rows)]


def seed_noise(key: str, seed: int, spread: float) -> float:
    """A reproducible draw of N(0, spread^2) for one (key, seed): independent between
    variants and seeds, the same on every call."""
    digest = hashlib.sha256(f"{key}/{seed}".encode()).digest()
    uniform = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
    from statistics import NormalDist

    return spread * NormalDist().inv_cdf(uniform)


def write_finals(
    root: Path,
    finals: dict[str, float],
    *,
    seeds: Sequence[int] = range(10),
    spread: float = 0.05,
    rows: int = 6,
    also: dict[str, float] | None = None,
    **options: Any,
) -> Path:
    """Per variant and seed, a complete run whose val_loss ends at ``finals[variant]`` times
    exp(N(0, spread^2)) (``seed_noise``); ``also`` adds metrics that are that curve times a
    factor (e.g. {"val_rel_l2": 10}); ``options`` go to ``write_run`` (experiment, name,
    unit, identity, ...). Returns ``root``."""
    for variant, value in finals.items():
        for seed in seeds:
            curve = curve_to(value * math.exp(seed_noise(variant, seed, spread)), rows)
            metrics = {name: [factor * v for v in curve] for name, factor in (also or {}).items()}
            write_run(root, variant=variant, seed=seed, val_loss=curve, metrics=metrics, **options)
    return root


def set_seconds_per_step(run: Path, seconds: float) -> Path:
    """Rewrite a run's wall_time column as ``step * seconds`` (a method that costs that much)."""
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["wall_time"] = repr(float(row["step"]) * seconds)
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run


def write_gap_study(
    root: Path,
    top1: dict[str, tuple[float, float]],
    *,
    seeds: Sequence[int] = range(10),
    spread: float = 0.005,
    batches: tuple[int, int] = (128, 4096),
    seconds_per_step: dict[str, float] | None = None,
    experiment: str = "fashion_resnet",
    name: str = "fashion_gap",
    methods: dict[str, tuple[str, int]] | None = None,
) -> Path:
    """A small- vs large-batch study: per variant, runs at both ``batches`` (key
    ``problem.local_batch``, with ``optimizer.lr`` scaled linearly with it, as the
    linear-scaling rule does) whose final ``val_top1`` is ``top1[variant]`` = (small, large)
    plus N(0, spread^2) per run; ``seconds_per_step`` sets each variant's wall_time;
    ``methods`` gives (method, legend_order) for variants that are not AADL's. Returns ``root``."""
    for variant, ends in top1.items():
        method, order = (methods or {}).get(variant, (None, None))
        for batch, accuracy in zip(batches, ends):
            for seed in seeds:
                value = accuracy + seed_noise(f"{variant}/{batch}", seed, spread)
                run = write_run(
                    root, variant=variant, seed=seed, val_loss=curve_to(1.0 - value), experiment=experiment, name=name,
                    identity={"problem.local_batch": batch, "optimizer.lr": 0.05 * batch / batches[0]},
                    metrics={"val_top1": [value] * 6}, method=method, legend_order=order,
                )
                if seconds_per_step and variant in seconds_per_step:
                    set_seconds_per_step(run, seconds_per_step[variant])
    return root
