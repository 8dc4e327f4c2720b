"""The image problems (experiments/problems/images/problem.py) on tiny real trees built from
Fashion-MNIST: ResNet-50's ImageNet pipeline end to end (1 process, 2 gloo ranks under
torchrun with both AADL layouts, sharded evaluation equal to one process's), resumes after
a signal inside an epoch and after kill -9 bit for bit, BatchNorm buffers kept by the
safeguard closure, the wrapper under fp16 loss scaling with a skipped step, top-k through
evaluate against a hand computation, the learning-rate rules and the configs' checks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT, lines_of
from experiments.errors import ConfigError, DatasetError
from experiments.results import FINAL_MODEL_FILE, TIMING_COLUMNS
from experiments.run import RunPreempted, execute
from experiments.validation import validate

VENV_BIN = Path(sys.executable).parent

# ResNet-50 on 32x32 crops of 64x64 images, 40 training images (4 per class): 5 steps of 8.
IMAGENET = (
    "experiment=imagenet_resnet50", "problem.crop_size=32", "problem.resize_size=40", "problem.workers=0",
    "problem.local_batch=8", "train.device=cpu", "train.epochs=1", "train.threads=1",
    # The Fig. 4 rate (0.65 at a global batch of 8) and its warm-up are for ImageNet.
    "optimizer.lr=0.02", "schedule.warmup=0",
    "method.aadl.history=2", "method.aadl.frequency=2", "method.aadl.store_every=1",
)
# The small-image ResNet-18 at width 8 on 28x28 images: 5 steps of 8 an epoch.
FASHION = (
    "experiment=fashion_resnet", "problem.width=8", "problem.local_batch=8",
    "train.threads=1", "method=aadl_ma", "method.aadl.history=3", "method.aadl.frequency=1",
    "method.aadl.store_every=1",
)


@pytest.fixture
def image_root(image_data_root) -> Path:
    """conftest's tiny trees: fashion_mnist/ at 28x28 and imagenet1k/ at 64x64, 4 training and
    2 validation images per class, from Debian's Fashion-MNIST."""
    return image_data_root


def same_rows(a: Path, b: Path, exact: bool = True) -> None:
    left = pd.read_csv(a / "metrics.csv").drop(columns=list(TIMING_COLUMNS), errors="ignore")
    right = pd.read_csv(b / "metrics.csv").drop(columns=list(TIMING_COLUMNS), errors="ignore")
    if exact:
        pd.testing.assert_frame_equal(left, right, check_exact=True)
    else:
        pd.testing.assert_frame_equal(left, right, check_exact=False, rtol=1e-6, atol=1e-9)


def same_weights(a: Path, b: Path) -> None:
    pa = torch.load(a / FINAL_MODEL_FILE, weights_only=True)
    pb = torch.load(b / FINAL_MODEL_FILE, weights_only=True)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def problem_of(compose, image_root: Path, *overrides: str):
    run = validate(compose(*overrides, f"data.root={image_root}"))
    problem = run.problem_class(run.problem_config, data_root=image_root, seed=run.config.seed, device=torch.device("cpu"))
    return run, problem


# --- evaluation ----------------------------------------------------------------------------

class ConstantLogits(torch.nn.Module):
    """The same logits for every image: class c scores -c, so the ranking is 0, 1, 2, ..."""

    def __init__(self, classes: int):
        super().__init__()
        self.logits = torch.nn.Parameter(-torch.arange(classes, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(images.shape[0], -1)


def test_evaluate_gives_top1_top5_and_loss_over_the_whole_val_set_as_computed_by_hand(compose, image_root):
    _, problem = problem_of(compose, image_root, *FASHION, "problem.val_batch=3")  # 20 images in 7 batches
    metrics = problem.evaluate(ConstantLogits(10))
    # Two val images per class: top-1 hits are class 0's 2 images, top-5 classes 0-4's 10.
    log_softmax = torch.log_softmax(-torch.arange(10, dtype=torch.float64), 0)
    expected_loss = float(-log_softmax.mean())  # every class equally often
    assert metrics["val_top1"] == 2 / 20 and metrics["val_top5"] == 10 / 20
    assert math.isclose(metrics["val_loss"], expected_loss, rel_tol=1e-6)


# --- the ImageNet pipeline -----------------------------------------------------------------

def test_imagenet_pipeline_trains_one_process_with_aadl(compose, image_root, tmp_path):
    outcome = execute(compose(*IMAGENET, "method=aadl", f"data.root={image_root}", f"output.root={tmp_path}"))
    assert outcome.status == "completed"
    rows = pd.read_csv(outcome.path / "metrics.csv")
    assert list(rows["step"]) == [0, 5]
    assert ((rows[["val_top1", "val_top5"]] >= 0) & (rows[["val_top1", "val_top5"]] <= 1)).all().all()
    assert (rows["val_top5"] >= rows["val_top1"]).all() and rows["aa_attempts"].iloc[-1] == 2
    assert rows["samples_per_second"].iloc[-1] > 0
    config = (outcome.path / "config.yaml").read_text()
    assert "crop_size: 32" in config
    meta = json.loads((outcome.path / "meta.json").read_text())
    assert any("global batch 8 = 8 per rank x 1 rank(s)" in note for note in meta["notes"])


def torchrun(overrides, root: Path, image_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    command = [
        str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "experiments.run", *overrides,
        f"data.root={image_root}", f"output.root={root}", f"hydra.run.dir={root / 'hydra'}",
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


TWO_RANKS = (*IMAGENET, "problem.local_batch=4", "method=aadl_ma")  # 2 x 4: 5 steps, AA at 2 and 4


def two_rank_run(layout: str, root: Path, image_root: Path) -> Path:
    done = torchrun((*TWO_RANKS, f"method.aadl.distributed={layout}"), root, image_root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (path,) = list(root.rglob("seed=0"))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["launcher"] == "torchrun" and meta["status"] == "complete"
    return path


@pytest.mark.distributed
def test_two_gloo_ranks_train_imagenet_and_their_sharded_evaluation_is_one_process_s(compose, image_root, tmp_path):
    """Two ranks of 4 images, AADL with the sharded history: the ranks' evaluation of their
    val shards (sums all-reduced) is what one process computes over all 20 images."""
    path = two_rank_run("sharded", tmp_path, image_root)
    last = pd.read_csv(path / "metrics.csv").iloc[-1]
    assert last["step"] == 5 and last["aa_attempts"] == 2
    _, problem = problem_of(compose, image_root, *TWO_RANKS)
    model = problem.build_model()
    model.load_state_dict(torch.load(path / FINAL_MODEL_FILE, weights_only=True))
    alone = problem.evaluate(model.eval())
    for key in ("val_loss", "val_top1", "val_top5"):
        assert math.isclose(alone[key], last[key], rel_tol=1e-5, abs_tol=1e-7), key


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_ranks_train_imagenet_alike_with_the_replicated_and_the_sharded_history(image_root, tmp_path):
    runs = [two_rank_run(layout, tmp_path / layout, image_root) for layout in ("replicated", "sharded")]
    left, right = (pd.read_csv(path / "metrics.csv") for path in runs)
    assert (left["distributed"] == "replicated").all() and (right["distributed"] == "sharded").all()
    for column in ("train_loss", "val_loss", "val_top1", "val_top5"):
        np.testing.assert_allclose(right[column], left[column], rtol=1e-6, atol=1e-9, equal_nan=True)
    assert (left["aa_accepted"] == right["aa_accepted"]).all() and (left["averages_applied"] == right["averages_applied"]).all()


# --- resumes -------------------------------------------------------------------------------

def stop_at_step(monkeypatch, step: int) -> None:
    from contextlib import contextmanager

    from experiments import run as run_module

    @contextmanager
    def fake_signals():
        calls = {"n": 0}

        def should_stop():
            calls["n"] += 1
            return "SIGUSR1" if calls["n"] == step else None

        yield should_stop

    monkeypatch.setattr(run_module, "stop_on_signals", fake_signals)


@pytest.mark.parametrize(
    "overrides, step",
    [(FASHION + ("train.epochs=3",), 7), pytest.param(IMAGENET + ("method=aadl", "train.epochs=2"), 7, marks=pytest.mark.slow)],
    ids=["fashion", "imagenet"],
)
def test_a_signal_inside_an_epoch_resumes_bit_for_bit(compose, image_root, tmp_path, monkeypatch, overrides, step):
    """Stopped at step 7 (batch 2 of epoch 2): the resumed run skips the two batches by index
    and ends where the uninterrupted run ends."""
    overrides = (*overrides, f"data.root={image_root}")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    stop_at_step(monkeypatch, step)
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert stopped.value.step == step
    monkeypatch.undo()
    resumed = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert resumed.status == "completed"
    same_rows(reference, resumed.path)
    same_weights(reference, resumed.path)


def cli(overrides, root: Path) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *overrides, f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"]


@pytest.mark.parametrize(
    "overrides, rows",
    [(FASHION + ("train.epochs=6",), 2), pytest.param(IMAGENET + ("method=aadl", "train.epochs=3"), 2, marks=pytest.mark.slow)],
    ids=["fashion", "imagenet"],
)
def test_kill_9_then_rerun_is_bit_identical(compose, image_root, tmp_path, overrides, rows):
    overrides = (*overrides, "checkpoint.every=1", f"data.root={image_root}")
    env = {**os.environ, "CI": "1"}
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'reference'}")).path
    root = tmp_path / "killed"
    process = subprocess.Popen(cli(overrides, root), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            files = list(root.rglob("checkpoints/step-*.pt"))
            metrics = list(root.rglob("metrics.csv"))
            if files and metrics and lines_of(metrics[0]) - 1 >= rows:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"the run never wrote a checkpoint and {rows} rows (exit {process.returncode})")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    done = subprocess.run(cli(overrides, root), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (resumed,) = list(root.rglob("seed=0"))
    assert json.loads((resumed / "meta.json").read_text()).get("resumed")
    same_rows(reference, resumed)
    same_weights(reference, resumed)


# --- the step: BatchNorm buffers, loss scaling ---------------------------------------------

def step_context(problem, model, optimizer, batch, precision=None):
    from experiments.parallel import DataParallel
    from experiments.step import Precision, StepContext

    return StepContext(
        problem=problem, net=model, model=model, optimizer=optimizer, parallel=DataParallel(), batch=batch,
        unit=1, index=0, unit_data_state=None, precision=precision or Precision(),
    )


def buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.named_buffers()}


def test_the_safeguard_closure_and_aadl_steps_leave_the_batchnorm_buffers_alone(compose, image_root):
    """A training-mode forward moves ResNet-50's running statistics; the loss closure (two
    calls per AA step) does not, so an AA step changes them no more than a plain one."""
    from aadl import AndersonAcceleration

    _, problem = problem_of(compose, image_root, *IMAGENET)
    torch.manual_seed(0)
    model = problem.build_model().train()
    optimizer = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), history=2, frequency=1, store_every=1)
    batches = list(problem.batches(1))
    context = step_context(problem, model, optimizer, batches[0])
    before = buffers(model)
    with torch.no_grad():
        context.loss_closure()()
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())
    with torch.no_grad():
        problem.loss(model, batches[0])  # the same forward without the closure's protection
    assert not torch.equal(before["bn1.running_mean"], model.bn1.running_mean)

    for index, batch in enumerate(batches[:4]):  # AA is attempted from the second step on
        context = step_context(problem, model, optimizer, batch)
        context.backward()
        after_backward = buffers(model)
        context.optimizer_step(context.loss_closure())
        assert all(torch.equal(after_backward[k], v) for k, v in buffers(model).items()), f"step {index}"
    assert optimizer.stats.as_dict()["aa_attempts"] >= 2


def test_the_wrapper_under_fp16_loss_scaling_steps_and_skips_a_step_with_inf_gradients(compose, image_root):
    from aadl import AndersonAcceleration
    from experiments.step import Precision

    _, problem = problem_of(compose, image_root, *FASHION)
    torch.manual_seed(0)
    model = problem.build_model().train()
    optimizer = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), history=3, frequency=1, store_every=1)
    precision = Precision.build("fp16", torch.device("cpu"))
    batches = list(problem.batches(1))

    def step(batch):
        context = step_context(problem, model, optimizer, batch, precision)
        loss = context.backward()
        context.optimizer_step(context.loss_closure())
        return loss

    for batch in batches[:3]:
        weights = [p.detach().clone() for p in model.parameters()]
        assert torch.isfinite(step(batch))
        assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    steps = optimizer.stats.as_dict()["steps"]
    assert steps == 3 and optimizer.stats.as_dict()["aa_attempts"] >= 1

    scale = precision.scaler.get_scale()
    weights = [p.detach().clone() for p in model.parameters()]
    hook = model.fc.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    step(batches[3])
    hook.remove()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # skipped
    assert optimizer.stats.as_dict()["steps"] == steps and precision.scaler.get_scale() == scale / 2
    weights = [p.detach().clone() for p in model.parameters()]
    step(batches[4])  # finite again: the wrapper steps on
    assert optimizer.stats.as_dict()["steps"] == steps + 1
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))


# --- configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks, lr", [(384, 0.98), (1536, 1.96), (768, 0.98 + 0.98 * (768 - 384) / 1152), (1, 0.98 - 0.98 * 383 / 1152)])
def test_the_fig4_rate_follows_the_world_size_and_the_resolved_number_is_recorded(compose, image_root, monkeypatch, ranks, lr):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", str(ranks)), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    run = validate(compose("experiment=imagenet_resnet50", f"data.root={image_root}"))
    assert math.isclose(run.config.optimizer.lr, lr, rel_tol=1e-12)
    assert run.resolved["optimizer"]["lr"] == run.config.optimizer.lr == run.identity["optimizer.lr"]
    assert (run.config.schedule.warmup, run.config.schedule.warmup_start_lr, run.config.schedule.milestones) == (5, 0.05, [30, 60, 80])


def test_the_fashion_rate_scales_linearly_with_the_global_batch(compose, image_root, monkeypatch):
    base = validate(compose("experiment=fashion_resnet", f"data.root={image_root}"))
    large = validate(compose("experiment=fashion_resnet", "problem.local_batch=16", f"data.root={image_root}"))
    assert math.isclose(large.config.optimizer.lr, base.config.optimizer.lr * 16 / 128)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    four = validate(compose("experiment=fashion_resnet", "problem.local_batch=16", f"data.root={image_root}"))
    assert math.isclose(four.config.optimizer.lr, base.config.optimizer.lr * 64 / 128)


def test_no_decay_on_norms_and_biases_puts_them_in_a_group_without_weight_decay():
    from experiments.optimizers import build_base_optimizer
    from experiments.problems.images.models import small_resnet18
    from experiments.schema import OptimizerConfig

    model = small_resnet18(10, width=4)
    cfg = OptimizerConfig(name="sgd", lr=0.1, weight_decay=1e-2, decay_norm_and_bias=False)  # p -= lr * (g + wd * p)
    optimizer = build_base_optimizer(model.parameters(), cfg)
    decayed, exempt = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-2 and exempt["weight_decay"] == 0.0
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = {id(p) for m in norms for p in (m.weight, m.bias)} | {id(model.fc.bias)}
    assert {id(p) for p in exempt["params"]} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only weight decay moves a parameter
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.allclose(p, before[name] * (1 - 0.1 * 1e-2)), name


@pytest.mark.parametrize(
    "override, key",
    [
        ("problem.local_batch=0", "problem.local_batch"),
        ("problem.label_smoothing=1.0", "problem.label_smoothing"),
        ("problem.eval_every_steps=0", "problem.eval_every_steps"),
        ("problem.resize_size=16", "problem.resize_size"),
        ("optimizer.weight_decay=0", "optimizer.decay_norm_and_bias"),
    ],
)
def test_image_problem_values_out_of_range_are_config_errors(compose, image_root, override, key):
    extra = ("optimizer.decay_norm_and_bias=false",) if key == "optimizer.decay_norm_and_bias" else ()
    with pytest.raises(ConfigError) as error:
        validate(compose("experiment=imagenet_resnet50", override, *extra, f"data.root={image_root}"))
    assert error.value.key == key


def test_a_missing_fashion_tree_says_how_to_build_it_and_a_tree_of_another_size_is_refused(compose, image_root, tmp_path):
    with pytest.raises(DatasetError, match="python -m experiments.data fashion-mnist"):
        validate(compose("experiment=fashion_resnet", f"data.root={tmp_path}"))
    with pytest.raises(ConfigError, match=r"problem.size: must be the side the tree .* was built with \(28\)"):
        validate(compose("experiment=fashion_resnet", "problem.size=32", f"data.root={image_root}"))


def test_the_data_identity_follows_the_tree(compose, image_root, tmp_path):
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(image_root / "imagenet1k", copy / "imagenet1k")
    first = validate(compose(*IMAGENET, f"data.root={copy}")).identity["data.imagenet1k.sha256"]
    assert first == validate(compose(*IMAGENET, f"data.root={image_root}")).identity["data.imagenet1k.sha256"]
    victim = next((copy / "imagenet1k" / "train").rglob("*.png"))
    victim.rename(victim.with_name("renamed.png"))
    assert validate(compose(*IMAGENET, f"data.root={copy}")).identity["data.imagenet1k.sha256"] != first


# --- the gap table -------------------------------------------------------------------------

def test_the_gap_table_pairs_seeds_and_says_how_much_of_the_baseline_s_gap_a_variant_closes(tmp_path, write_run):
    from experiments.analysis import aggregate, batch_gap

    # Final val_top1 by (variant, batch, seed): SGD loses 0.10 at the large batch, AADL 0.10,
    # AADL+MA 0.04 (it closes 0.06 of the gap), each seed shifted alike.
    final = {"SGD": (0.90, 0.80), "SGD+AADL": (0.91, 0.81), "SGD+AADL+MA": (0.90, 0.86)}
    for variant, (small, large) in final.items():
        for batch, value in ((128, small), (1024, large)):
            for seed, shift in enumerate((0.0, 0.01, -0.01)):
                write_run(tmp_path, variant=variant, seed=seed, val_loss=[1.0, 0.5], experiment="fashion_resnet",
                          identity={"problem.local_batch": batch, "data.fashion_mnist.sha256": "ab" * 32},
                          metrics={"val_top1": [0.1, value + shift]})
    raw = batch_gap.gap_table(aggregate.load_results(tmp_path))
    table = raw.set_index("variant")
    assert list(table.index) == ["SGD", "SGD+AADL", "SGD+AADL+MA"] and (table["seeds"] == 3).all()
    np.testing.assert_allclose(table["gap_mean"], [-0.10, -0.10, -0.04], atol=1e-12)
    np.testing.assert_allclose(table["gap_high"] - table["gap_low"], 0, atol=1e-12)  # paired: no spread
    np.testing.assert_allclose(table.loc[["SGD+AADL", "SGD+AADL+MA"], "closes_mean"], [0.0, 0.06], atol=1e-12)
    assert np.isnan(table.loc["SGD", "closes_mean"])
    np.testing.assert_allclose(table["small_val_top1_mean"], [0.90, 0.91, 0.90])
    text = batch_gap.to_markdown(raw)
    assert "| SGD+AADL+MA | 3 | 90.00" in text and "6.00 [6.00, 6.00]" in text


def test_a_global_batch_larger_than_the_training_set_names_problem_local_batch(compose, image_root):
    run = validate(compose(*FASHION, "problem.local_batch=64", f"data.root={image_root}"))  # 40 images
    with pytest.raises(ConfigError, match=r"^problem.local_batch: the global batch 64 x 1 ranks = 64 exceeds the 40 training images"):
        run.problem_class(run.problem_config, data_root=image_root, seed=0, device=torch.device("cpu"))
