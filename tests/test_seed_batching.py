"""Seed-batched runs (experiments/batching.py, experiments/seed_groups.py): S seeds trained
as one batched model in one process write exactly the run directories their S single runs
write, per-seed AA decisions included; a preempted group resumes bit for bit; seeds already
finished are skipped; what cannot be batched is refused naming the key."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO_ROOT
from experiments import checkpoint, run as run_module
from experiments.errors import ConfigError, RunError
from experiments.problems import PROBLEMS
from experiments.problems.base import Problem
from experiments.results import COMPLETE_FILE, CONFIG_FILE, FINAL_MODEL_FILE, TIMING_COLUMNS, RunDirectory
from experiments.run import RunPreempted, execute
from experiments.seed_groups import GROUPS_DIRECTORY, compact_seeds, member_config, member_run, parse_seeds, seed_groups
from experiments.validation import validate

SEEDS = (0, 1, 2, 3)
GROUP = ("train.seed_group=[0,1,2,3]", "seed=0")
VARIANTS = {"Adam": ("method=none",), "AADL": ("method=aadl",), "AADL+MA": ("method=aadl_ma",)}
# Short budgets at which the seeds' safeguard (and averaging) decisions already differ.
PROBLEM_OVERRIDES = {
    "graduate_admissions": ("train.epochs=3", "method.aadl.average_threshold=0.5"),
    "burgers2d": (
        "experiment=burgers2d", "train.iterations=24", "train.eval_every=4", "problem.n_boundary=100",
        "problem.n_collocation=400", "problem.grid_x=32", "problem.grid_t=11", "method.aadl.frequency=2",
        "method.aadl.store_every=1", "method.aadl.average_threshold=0.5",
    ),
    "burgers100d": (
        "experiment=burgers100d", "train.iterations=12", "train.eval_every=3", "problem.n_boundary=60",
        "problem.n_collocation=120", "problem.n_eval=100", "method.aadl.history=4", "method.aadl.average_threshold=1",
    ),
}


def metrics(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "metrics.csv")


def assert_equal_runs(batched: Path, single: Path, *, rel: float = 1e-6) -> None:
    """The same run directory but for the clock: config.yaml, columns, counters and every
    metric to ``rel``, outcome, final model."""
    configs = [yaml.safe_load((path / CONFIG_FILE).read_text()) for path in (batched, single)]
    for config in configs:
        config["output"].pop("root")  # the two trees are side by side
    assert configs[0] == configs[1]
    a, b = metrics(batched), metrics(single)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        if column in TIMING_COLUMNS:
            continue
        if a[column].dtype.kind == "f":
            pd.testing.assert_series_equal(a[column], b[column], check_exact=False, rtol=rel, atol=0)
        else:
            assert a[column].tolist() == b[column].tolist(), column
    done_a = json.loads((batched / COMPLETE_FILE).read_text())
    done_b = json.loads((single / COMPLETE_FILE).read_text())
    assert (done_a["outcome"], done_a["rows"], done_a["last_step"]) == (done_b["outcome"], done_b["rows"], done_b["last_step"])
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (batched, single))
    assert (meta_a["config_id"], meta_a["seed"], meta_a.get("diverged")) == (meta_b["config_id"], meta_b["seed"], meta_b.get("diverged"))
    model_a = torch.load(batched / FINAL_MODEL_FILE, weights_only=True)
    model_b = torch.load(single / FINAL_MODEL_FILE, weights_only=True)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        torch.testing.assert_close(model_a[key], model_b[key], rtol=rel, atol=1e-7, equal_nan=True)


def train_both(compose, root: Path, *overrides: str) -> tuple[list, list]:
    """The group of SEEDS batched into root/batched, each seed alone into root/single."""
    common = (*overrides, "train.threads=1")
    group = execute(compose(*common, *GROUP, f"output.root={root / 'batched'}"))
    singles = [execute(compose(*common, f"seed={seed}", f"output.root={root / 'single'}")) for seed in SEEDS]
    return group, singles


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "problem",
    ["graduate_admissions", "burgers2d", pytest.param("burgers100d", marks=pytest.mark.slow)],
)
def test_a_batched_group_writes_what_its_single_runs_write(compose, data_root, tmp_path, problem, variant):
    group, singles = train_both(compose, tmp_path, *PROBLEM_OVERRIDES[problem], *VARIANTS[variant], f"data.root={data_root}")
    assert [o.status for o in group] == ["completed"] * len(SEEDS) == [o.status for o in singles]
    for batched, single in zip(group, singles):
        assert batched.path != single.path and batched.path.name == single.path.name
        assert_equal_runs(batched.path, single.path)
        meta = json.loads((batched.path / "meta.json").read_text())
        assert meta["seed_group"] == list(SEEDS) and "seed_group" not in json.loads((single.path / "meta.json").read_text())
    if variant != "Adam":  # the decisions are each seed's own: they differ between seeds
        last = [metrics(o.path).iloc[-1] for o in group]
        assert len({row["aa_accepted"] for row in last}) > 1
        if variant == "AADL+MA":
            assert len({row["averages_applied"] for row in last}) > 1
    assert not (group[0].path.parent / GROUPS_DIRECTORY).exists()  # the group's checkpoints are gone


# -- resume -------------------------------------------------------------------------------------


def stop_at_step(monkeypatch, step: int) -> None:
    """The loop sees a signal once ``step`` steps are done (as tests/test_experiments_resume.py)."""
    from contextlib import contextmanager

    @contextmanager
    def fake_signals() -> Iterator:
        calls = {"n": 0}

        def should_stop():
            calls["n"] += 1
            return "SIGUSR1" if calls["n"] == step else None

        yield should_stop

    monkeypatch.setattr(run_module, "stop_on_signals", fake_signals)


def assert_bit_identical(a: Path, b: Path) -> None:
    left, right = metrics(a), metrics(b)
    timing = [c for c in TIMING_COLUMNS if c in left]
    pd.testing.assert_frame_equal(left.drop(columns=timing), right.drop(columns=timing), check_exact=True)
    pa, pb = (torch.load(p / FINAL_MODEL_FILE, weights_only=True) for p in (a, b))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("step", [13, 25])  # inside epochs 2 and 3 (10 steps an epoch)
def test_a_preempted_group_resumes_bit_identically(compose, data_root, tmp_path, monkeypatch, step):
    overrides = ("method=aadl_ma", "train.epochs=4", "checkpoint.every=1", f"data.root={data_root}", *GROUP)
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}"))
    stop_at_step(monkeypatch, step)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    folder = Path(stopped.value.path)
    assert stopped.value.step == step and folder.parent.name == GROUPS_DIRECTORY and folder.name == "seeds=0-3"
    assert checkpoint.list_checkpoints(folder)[-1].name == f"step-{step:09d}.pt"
    for outcome in reference:
        resumed_dir = tmp_path / "b" / outcome.path.relative_to(tmp_path / "a")
        assert json.loads((resumed_dir / "meta.json").read_text())["status"] == "preempted"
        assert not RunDirectory(resumed_dir).is_complete()
    monkeypatch.undo()
    resumed = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert [o.status for o in resumed] == ["completed"] * len(SEEDS)
    for before, after in zip(reference, resumed):
        assert_bit_identical(before.path, after.path)
        (resumption,) = json.loads((after.path / "meta.json").read_text())["resumed"]
        assert resumption["step"] == step and resumption["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not folder.exists()


def test_a_group_resumes_around_a_seed_finished_meanwhile(compose, data_root, tmp_path, monkeypatch):
    """Seed 2 is run alone after the group was preempted: the group resumes without it."""
    overrides = ("method=aadl", "train.epochs=3", f"data.root={data_root}", f"output.root={tmp_path / 'b'}")
    reference = execute(compose(*overrides[:-1], *GROUP, f"output.root={tmp_path / 'a'}"))
    stop_at_step(monkeypatch, 15)
    with pytest.raises(RunPreempted):
        execute(compose(*overrides, *GROUP))
    monkeypatch.undo()
    alone = execute(compose(*overrides, "seed=2"))
    assert alone.status == "completed"
    resumed = execute(compose(*overrides, *GROUP))
    assert [o.status for o in resumed] == ["completed", "completed", "skipped", "completed"]
    for before, after in zip(reference, resumed):
        assert_bit_identical(before.path, after.path)


# -- skipping and locking ---------------------------------------------------------------------


def test_complete_seeds_are_skipped_and_busy_seeds_left_to_their_process(compose, data_root, tmp_path):
    overrides = ("train.epochs=2", f"data.root={data_root}", f"output.root={tmp_path}")
    done = execute(compose(*overrides, "seed=1"))
    before = (done.path / "metrics.csv").stat().st_mtime_ns
    held = RunDirectory(validate(compose(*overrides, "seed=2")).path)
    with held.claim() as claimed:
        assert claimed
        outcomes = execute(compose(*overrides, *GROUP))
    assert [o.status for o in outcomes] == ["completed", "skipped", "busy", "completed"]
    assert (done.path / "metrics.csv").stat().st_mtime_ns == before  # not rewritten
    assert not held.is_complete() and not (held.path / "metrics.csv").exists()
    again = execute(compose(*overrides, *GROUP))
    assert [o.status for o in again] == ["skipped", "skipped", "completed", "skipped"]
    single = execute(compose(*overrides, "seed=2", f"output.root={tmp_path / 'single'}"))
    assert_equal_runs(again[2].path, single.path)


def test_overwrite_retrains_a_group_into_siblings_swapped_in(compose, data_root, tmp_path):
    overrides = ("train.epochs=2", f"data.root={data_root}", f"output.root={tmp_path}", *GROUP)
    first = execute(compose(*overrides))
    again = execute(compose(*overrides, "output.overwrite=true"))
    assert [o.status for o in again] == ["completed"] * len(SEEDS)
    for a, b in zip(first, again):
        assert a.path == b.path and RunDirectory(b.path).is_complete()
        assert not b.path.with_name(b.path.name + ".overwrite").exists()


# -- one seed diverging -----------------------------------------------------------------------


@dataclasses.dataclass
class DivergingConfig:
    dims: int = 3
    batch_size: int = 8
    diverge_seed: int = -1  # this seed's inputs turn infinite from iteration diverge_at on
    diverge_at: int = 6


class Diverging(Problem):
    """Linear regression whose one seed sees infinite inputs from some iteration on; its
    batched loss is batching.lane_by_lane_loss (the generic hook)."""

    name = "seed_toy"
    budget_unit = "iteration"
    Config = DivergingConfig

    def __init__(self, cfg, *, data_root, seed, device):
        super().__init__(cfg, data_root=data_root, seed=seed, device=device)
        self._data = torch.Generator().manual_seed(seed)
        self._truth = torch.randn(cfg.dims, generator=torch.Generator().manual_seed(1000 + seed))
        self._val = torch.randn(32, cfg.dims, generator=torch.Generator().manual_seed(2000 + seed))

    def build_model(self):
        return torch.nn.Linear(self.cfg.dims, 1)

    def batches(self, unit):
        x = torch.randn(self.cfg.batch_size, self.cfg.dims, generator=self._data)
        y = x @ self._truth
        if self.seed == self.cfg.diverge_seed and unit >= self.cfg.diverge_at:
            x = x * float("inf")
        yield x, y

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x).squeeze(-1), y)

    def batched_loss(self, model, tensors, batch):
        from experiments.batching import lane_by_lane_loss

        return lane_by_lane_loss(self, model, tensors, batch)

    @torch.no_grad()
    def evaluate(self, model):
        return {"val_loss": torch.nn.functional.mse_loss(model(self._val).squeeze(-1), self._val @ self._truth).item()}

    def state_dict(self):
        return {"data": self._data.get_state()}

    def load_state_dict(self, state):
        self._data.set_state(state["data"])


@pytest.fixture
def toy_problem():
    from hydra.core.config_store import ConfigStore

    PROBLEMS.register(Diverging.name, Diverging)
    ConfigStore.instance().store(group="experiment", name=Diverging.name, node={"experiment": Diverging.name}, package="_global_")
    yield Diverging
    PROBLEMS.unregister(Diverging.name)


@pytest.mark.parametrize("method", ["method=none", "method=aadl_ma"])
def test_a_diverging_seed_stops_at_its_own_step_while_the_others_go_on(compose, toy_problem, tmp_path, method):
    overrides = (f"experiment={Diverging.name}", method, "train.iterations=20", "problem.diverge_seed=2", "optimizer.lr=0.05",
                 "method.aadl.history=3", "method.aadl.average_window=3")
    group, singles = train_both(compose, tmp_path, *overrides)
    assert [o.status for o in group] == ["completed", "completed", "diverged", "completed"] == [o.status for o in singles]
    for batched, single in zip(group, singles):
        assert_equal_runs(batched.path, single.path)
    diverged = json.loads((group[2].path / "meta.json").read_text())["diverged"]
    assert diverged["step"] == 5 and metrics(group[2].path)["step"].iloc[-1] == 6
    assert metrics(group[0].path)["step"].iloc[-1] == 20


# -- grouping a multirun --------------------------------------------------------------------------


def test_a_multiruns_seed_axis_is_cut_into_groups_of_batch_seeds(compose):
    from experiments.compose import expand_sweep, sweep_overrides

    overrides = ["+paper=fig1", "seed=range(0,7)", "train.batch_seeds=3", "method=aadl,none"]
    jobs = sweep_overrides(overrides)
    runs = [validate(cfg) for cfg in expand_sweep(overrides)]
    assert seed_groups(jobs, runs) == [[0, 1, 2], [3, 4, 5], [6]]
    assert seed_groups(sweep_overrides(["+paper=fig1", "train.batch_seeds=1"]), runs[:1]) is None
    assert seed_groups([["seed=4"]], [validate(compose("seed=4", "train.batch_seeds=5"))]) is None  # one seed
    mixed = [validate(compose("seed=0", "train.batch_seeds=2")), validate(compose("seed=1", "train.batch_seeds=3"))]
    with pytest.raises(ConfigError, match="one multirun batches seeds with one value"):
        seed_groups([["seed=0"], ["seed=1"]], mixed)


def test_the_fig1_preset_batches_and_batch_seeds_1_restores_one_process_per_run(compose):
    from experiments.compose import preset_sweep

    assert preset_sweep("fig1")["train.batch_seeds"] == ["20"]
    assert compose("+paper=fig1").train.batch_seeds == 1  # only a multirun reads it


def test_a_member_is_its_single_runs_config(compose):
    cfg = compose("method=aadl_ma", "train.seed_group=[3,5,8]", "seed=3")
    group = validate(cfg)
    for seed in (3, 5, 8):
        member, single = member_run(group, seed), validate(member_config(cfg, seed))
        assert (member.config, member.resolved, member.identity, member.path) == (single.config, single.resolved, single.identity, single.path)
        assert member.config_id == validate(compose("method=aadl_ma", f"seed={seed}")).config_id


def test_group_names_round_trip():
    for seeds in ([0, 1, 2, 3], [0, 1, 2, 3, 7, 9, 10], [5], [2, 4, 6]):
        assert parse_seeds(compact_seeds(seeds)) == seeds
    assert compact_seeds([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"


def test_the_cli_trains_a_sweep_batched_into_each_seeds_directory(data_root, tmp_path):
    """The real command line: the preset's sweep regrouped, one process per group."""
    env = {"AADL_DATA_ROOT": str(data_root), "CI": "1", "PATH": "/usr/bin:/bin"}
    command = [
        sys.executable, "-m", "experiments.run", "-m", "+paper=fig1", "seed=range(0,5)", "train.batch_seeds=3",
        "method=aadl", "train.epochs=2", f"output.root={tmp_path / 'runs'}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "5 run(s) validated; seeds batched 3 per process: 2 job(s)" in done.stderr
    runs = sorted((tmp_path / "runs" / "graduate_admissions" / "fig1").glob("*/seed=*"))
    assert [p.name for p in runs] == [f"seed={s}" for s in range(5)] and all(RunDirectory(p).is_complete() for p in runs)
    assert json.loads((runs[4] / "meta.json").read_text())["seed_group"] == [3, 4]
    assert "seed_group: null" in (runs[4] / CONFIG_FILE).read_text() and "seed: 4" in (runs[4] / CONFIG_FILE).read_text()


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (("train.batch_seeds=0",), "train.batch_seeds", "must be an integer >= 1"),
        (("train.seed_group=[1,1]", "seed=1"), "train.seed_group", "distinct integers >= 0"),
        (("train.seed_group=[2,3]", "seed=0"), "seed", "train.seed_group's first seed (2)"),
        (("train.batch_seeds=4", "train.precision=bf16"), "train.precision", "fp32 only"),
        (("train.batch_seeds=4", "method=aadl", "method.aadl.distributed=sharded"), "method.aadl.distributed", "replicated"),
    ],
)
def test_what_cannot_be_batched_is_refused_naming_the_key(compose, overrides, key, words):
    with pytest.raises(ConfigError) as error:
        validate(compose(*overrides))
    assert error.value.key == key and words in str(error.value) and str(error.value).startswith(f"{key}: ")


def test_a_method_without_a_batched_form_is_refused(compose):
    from experiments.methods import METHODS

    from test_experiments_layout import ScaledStep

    METHODS.register(ScaledStep.name, ScaledStep)
    try:
        with pytest.raises(ConfigError) as error:
            validate(compose("method.name=scaled_step", "train.batch_seeds=2"))
    finally:
        METHODS.unregister(ScaledStep.name)
    assert error.value.key == "train.batch_seeds" and "method.name=scaled_step cannot train seeds batched" in str(error.value)
    assert "train.batch_seeds=1" in str(error.value)


def test_a_problem_without_batched_loss_is_refused(compose, toy_problem, monkeypatch):
    monkeypatch.delattr(Diverging, "batched_loss")
    with pytest.raises(ConfigError) as error:
        validate(compose(f"experiment={Diverging.name}", "train.iterations=3", "train.batch_seeds=8"))
    assert error.value.key == "train.batch_seeds" and "experiment seed_toy cannot train seeds batched" in str(error.value)


def test_a_group_is_refused_on_several_ranks(compose, data_root):
    with pytest.raises(RunError, match="a seed group trains in one process"):
        execute(compose("train.epochs=1", f"data.root={data_root}", *GROUP), ranks=run_module.Ranks(world_size=2, rank=0))


def test_thread_defaults_follow_the_process_count_and_the_experiment(compose):
    from experiments.run import Ranks, torch_threads

    burgers = validate(compose("experiment=burgers2d"))
    images_like = type("Unpinned", (Problem,), {})  # a problem that states no preference
    assert torch_threads(burgers.config, False, Ranks(), burgers.problem_class) == 1  # the experiment's choice
    assert torch_threads(burgers.config, False, Ranks(), images_like) is None  # torch's default
    assert torch_threads(burgers.config, True, Ranks(), images_like) == 1  # a multirun worker
    assert torch_threads(burgers.config, False, Ranks(world_size=2, threads=8), burgers.problem_class) == 8  # a rank's share
    pinned = validate(compose("experiment=burgers2d", "train.threads=3"))
    assert torch_threads(pinned.config, True, Ranks(world_size=2, threads=8), burgers.problem_class) == 3


# -- stacked PINN lanes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("experiment", "activation"), [("burgers2d", "relu"), ("burgers2d", "tanh"), ("burgers100d", "relu")])
def test_pinn_lanes_are_one_stacked_pass_each_equal_to_its_single_run(experiment, activation):
    """In reverse mode the S seeds' PINN losses are one pass over the stacked network (each
    hidden layer one batched product with the lanes as its batch); each lane's loss and
    parameter gradient equal its single run's (bit for bit on the kernels measured; held to
    the seed-batching tolerance here), under torch.no_grad() too (the safeguard)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from experiments.batching import SeedStack, stack_batches

    problem_class = PROBLEMS.get(experiment)
    small = {"n_collocation": 120, "n_boundary": 40, "activation": activation}
    problems = [problem_class(problem_class.Config(**small), data_root=Path("."), seed=s, device=torch.device("cpu")) for s in SEEDS]
    assert problems[0].derivative_method == "reverse"
    models = []
    for seed, problem in zip(SEEDS, problems):
        torch.manual_seed(seed)
        models.append(problem.build_model())
    stack = SeedStack(models)
    batch = stack_batches([p.batches(1)[0] for p in problems])

    class BatchedProducts(TorchDispatchMode):
        lanes: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
                self.lanes.append(args[1].shape[0] if func._overloadpacket is torch.ops.aten.baddbmm else args[0].shape[0])
            return func(*args, **(kwargs or {}))

    with BatchedProducts() as products:
        losses = problems[0].batched_loss(models[0], stack.tensors(), batch)
    assert products.lanes and set(products.lanes) == {len(SEEDS)}
    gradients = torch.autograd.grad(losses.sum(), list(stack.parameters()))
    with torch.no_grad():
        quiet = problems[0].batched_loss(models[0], stack.tensors(), batch)
    for lane, (problem, model) in enumerate(zip(problems, models)):
        single = problem.loss(model, problem.batches(1)[0])
        torch.testing.assert_close(losses[lane], single, rtol=1e-6, atol=0)
        torch.testing.assert_close(quiet[lane], single.detach(), rtol=1e-6, atol=0)
        for stacked, own in zip(gradients, torch.autograd.grad(single, list(model.parameters())), strict=True):
            torch.testing.assert_close(stacked[lane], own, rtol=1e-5, atol=1e-7)
