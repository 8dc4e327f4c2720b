"""EXTRAP-SGD (experiments/methods/extrap_sgd.py): rho = 0 is the base optimizer bit for bit
through the harness; a step is the base optimizer's step from w with the gradient at
u = w - rho * lr * eps (transcribed by hand, momentum buffers included); on the bilinear
game min_x max_y xy the same extrapolated step is extragradient, whose norm shrinks by
sqrt(1 - h^2 + h^4) per step where descent-ascent grows by sqrt(1 + h^2); under 2 torchrun
ranks eps is each rank's own gradient and the step's gradient the average; a stopped run
resumes bit for bit; out-of-range settings are refused naming the key."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from experiments import run as run_module
from experiments.errors import ConfigError
from experiments.methods.extrap_sgd import ExtrapolatedOptimizer, extrapolated_step, noise_seed
from experiments.results import FINAL_MODEL_FILE
from experiments.run import RunPreempted, execute
from experiments.validation import validate

NESTEROV = ("optimizer.name=sgd", "optimizer.momentum=0.9", "optimizer.nesterov=true")
PERTURBATIONS = ("gradient", "previous", "gaussian")
# Columns that name the method rather than describe what it trained.
METHOD_COLUMNS = ["variant", "method", "config_id", "wall_time", "perturbation", "rho", "noise_std", "gradients"]


def trained(path: Path) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    return pd.read_csv(path / "metrics.csv"), torch.load(path / FINAL_MODEL_FILE, weights_only=True)


def assert_same_training(a: Path, b: Path) -> None:
    """Same metrics (but for the clock and the method's own columns) and the same final
    parameters, bit for bit."""
    (left, pa), (right, pb) = trained(a), trained(b)
    drop = lambda frame: frame.drop(columns=[c for c in METHOD_COLUMNS if c in frame])  # noqa: E731
    pd.testing.assert_frame_equal(drop(left), drop(right), check_exact=True)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# -- rho = 0 is the base optimizer -----------------------------------------------------------


@pytest.mark.parametrize(
    "perturbation, settings",
    # fp16: the local gradient is unscaled by hand, the loss scaler's state is untouched by it.
    # (Unfused: torch's fused SGD under a GradScaler on CPU diverges even alone.)
    [*((p, ()) for p in PERTURBATIONS), ("gradient", ("train.precision=fp16", "optimizer.fused=false")),
     ("gradient", ("optimizer.name=lars", "optimizer.fused=null", "optimizer.lr=1.0"))],
    ids=[*PERTURBATIONS, "gradient-fp16", "gradient-lars"],
)
def test_rho_zero_is_the_base_optimizer_bit_for_bit(compose, data_root, tmp_path, perturbation, settings):
    common = (*NESTEROV, "train.epochs=3", "train.threads=1", *settings)
    base = execute(compose("method=none", *common, f"output.root={tmp_path / 'base'}")).path
    extrap = execute(compose(
        "method=extrap_sgd", f"method.extrap_sgd.perturbation={perturbation}", "method.extrap_sgd.rho=0",
        *common, f"output.root={tmp_path / 'extrap'}",
    )).path
    assert_same_training(base, extrap)
    rows = pd.read_csv(extrap / "metrics.csv")
    per_step = 2 if perturbation == "gradient" else 1  # the local gradient is the extra one
    assert (rows["gradients"] == per_step * rows["step"]).all() and rows["step"].iloc[-1] == 30
    assert rows["variant"].iloc[0] == ("LARS" if "optimizer.name=lars" in settings else "SGD") + "+EXTRAP"


def test_rho_above_zero_changes_the_training(compose, data_root, tmp_path):
    common = (*NESTEROV, "train.epochs=1", "train.threads=1")
    base = execute(compose("method=none", *common, f"output.root={tmp_path / 'base'}")).path
    extrap = execute(compose("method=extrap_sgd", *common, f"output.root={tmp_path / 'extrap'}")).path
    assert not torch.equal(trained(base)[1]["0.weight"], trained(extrap)[1]["0.weight"])


# -- one step, transcribed -------------------------------------------------------------------


def tiny_problem(seed: int = 0):
    """A 2-layer tanh network, a batch, and its loss: enough curvature that the gradient at
    u differs from the one at w."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(16, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    return model, lambda m: torch.nn.functional.mse_loss(m(x), y)


def gradient_at(model, loss_fn, point: list[torch.Tensor]) -> list[torch.Tensor]:
    """The loss gradient at ``point`` (the model is left at ``point``)."""
    with torch.no_grad():
        for p, value in zip(model.parameters(), point):
            p.copy_(value)
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_a_step_is_the_base_step_from_w_with_the_gradient_at_u(perturbation):
    lr, rho, std = 0.1, 0.7, 0.3
    model, loss_fn = tiny_problem()
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    opt = ExtrapolatedOptimizer(base, perturbation=perturbation, rho=rho, noise_std=std, seed=5)

    def backward():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    # The transcription: a second model with plain SGD, fed the gradient at u by hand.
    twin, _ = tiny_problem()
    twin_opt = torch.optim.SGD(twin.parameters(), lr=lr, momentum=0.9, nesterov=True)
    noise = torch.Generator().manual_seed(5)
    previous = None
    for _ in range(3):
        w = [p.detach().clone() for p in twin.parameters()]
        if perturbation == "gradient":
            eps = gradient_at(twin, loss_fn, w)
        elif perturbation == "previous":
            eps = previous or [torch.zeros_like(p) for p in w]
        else:
            eps = [torch.randn(p.shape, generator=noise, dtype=p.dtype).mul_(std) for p in w]
        at_u = gradient_at(twin, loss_fn, [wi - rho * lr * e for wi, e in zip(w, eps)])
        with torch.no_grad():
            for p, wi, g in zip(twin.parameters(), w, at_u):
                p.copy_(wi)
                p.grad = g.clone()
        twin_opt.step()
        previous = at_u

        extrapolated_step(opt, local_gradient=backward, gradient=backward, step=opt.step)

    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)
        # The momentum buffer holds only gradients at u: the extrapolation never touched it.
        torch.testing.assert_close(base.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"], rtol=1e-14, atol=1e-15)
    assert opt.gradients == 3 * (2 if perturbation == "gradient" else 1)


# -- the bilinear game min_x max_y xy ----------------------------------------------------------


def bilinear_run(h: float, rho: float, steps: int, perturbation: str = "gradient") -> list[float]:
    """Norms of (x, y) along the extrapolated step applied to the descent-ascent field of
    xy, F(x, y) = (y, -x), with plain SGD of step h as the base: rho = 1 is extragradient,
    rho = 0 simultaneous gradient descent-ascent."""
    z = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = ExtrapolatedOptimizer(torch.optim.SGD([z], lr=h), perturbation=perturbation, rho=rho)

    def field() -> None:
        with torch.no_grad():
            z.grad = torch.stack([z[1], -z[0]])

    norms = [float(z.detach().norm())]
    for _ in range(steps):
        extrapolated_step(opt, local_gradient=field, gradient=field, step=opt.step)
        norms.append(float(z.detach().norm()))
    return norms


@pytest.mark.parametrize("h", [0.1, 0.5])
def test_extragradient_converges_on_the_bilinear_game_where_descent_ascent_diverges(h):
    steps = 2000
    extragradient = bilinear_run(h, rho=1.0, steps=steps)
    descent_ascent = bilinear_run(h, rho=0.0, steps=steps)
    # Closed forms: z' = (1 - h^2) z - h A z and z' = z - h A z, with A z orthogonal to z.
    for norms, factor in ((extragradient, math.sqrt(1 - h**2 + h**4)), (descent_ascent, math.sqrt(1 + h**2))):
        ratios = [b / a for a, b in zip(norms, norms[1:])]
        assert max(abs(r - factor) for r in ratios) < 1e-12
    assert extragradient[-1] < 1e-3 * extragradient[0]  # converges to the saddle (0, 0)
    assert descent_ascent[-1] > 1e1 * descent_ascent[0]  # spirals out


def test_extrapolation_from_the_past_also_converges_on_the_bilinear_game():
    # "previous" is Popov's past extragradient: u_t = z_t - h F(u_{t-1}), z_{t+1} = z_t - h F(u_t).
    h, steps = 0.2, 600
    norms = bilinear_run(h, rho=1.0, steps=steps, perturbation="previous")
    z, at_u = torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    field = lambda v: torch.stack([v[1], -v[0]])  # noqa: E731
    for _ in range(steps):
        at_u = field(z - h * at_u)
        z = z - h * at_u
    assert norms[-1] == pytest.approx(float(z.norm()), rel=1e-9)
    assert norms[-1] < 1e-2 * norms[0]


# -- state, checkpoints and resume --------------------------------------------------------------


def test_state_dict_holds_the_previous_gradient_and_the_generator_and_loads_with_weights_only(tmp_path):
    results = {}
    for perturbation in ("previous", "gaussian"):
        model, loss_fn = tiny_problem()
        opt = ExtrapolatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), perturbation=perturbation, seed=3)

        def backward():
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            return loss

        for _ in range(2):
            extrapolated_step(opt, local_gradient=backward, gradient=backward, step=opt.step)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "saved.pt")
        for _ in range(2):
            extrapolated_step(opt, local_gradient=backward, gradient=backward, step=opt.step)
        straight = [p.detach().clone() for p in model.parameters()]

        saved = torch.load(tmp_path / "saved.pt", weights_only=True)
        fresh, _ = tiny_problem(seed=1)  # other weights: everything must come from the file
        fresh.load_state_dict(saved["model"])
        model = fresh
        opt = ExtrapolatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), perturbation=perturbation, seed=99)
        opt.load_state_dict(saved["opt"])
        assert opt.gradients == 2
        for _ in range(2):
            extrapolated_step(opt, local_gradient=backward, gradient=backward, step=opt.step)
        assert all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))
        results[perturbation] = straight
    with pytest.raises(ValueError, match="perturbation='previous'"):
        model, _ = tiny_problem()
        ExtrapolatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), perturbation="gaussian").load_state_dict(saved["opt"] | {
            "extrapolation": {**saved["opt"]["extrapolation"], "perturbation": "previous"}})


def test_each_rank_and_seed_draws_its_own_noise():
    seeds = {noise_seed(s, r) for s in (0, 1) for r in (0, 1)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)


@contextmanager
def _signal_at_step(step: int):
    """What SIGUSR1 does to a run, on cue: the loop sees a stop request after ``step`` steps."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return "SIGUSR1" if calls["n"] == step else None

    yield should_stop


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(compose, data_root, tmp_path, monkeypatch, perturbation):
    overrides = ("method=extrap_sgd", f"method.extrap_sgd.perturbation={perturbation}", "method.extrap_sgd.rho=2",
                 *NESTEROV, "train.epochs=3", "train.threads=1")
    reference = execute(compose(*overrides, f"output.root={tmp_path / 'a'}")).path
    monkeypatch.setattr(run_module, "stop_on_signals", lambda: _signal_at_step(14))
    with pytest.raises(RunPreempted) as stopped:
        execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert stopped.value.step == 14
    monkeypatch.undo()
    resumed = execute(compose(*overrides, f"output.root={tmp_path / 'b'}"))
    assert resumed.status == "completed"
    assert_same_training(reference, resumed.path)
    pd.testing.assert_series_equal(trained(reference)[0]["gradients"], trained(resumed.path)[0]["gradients"])


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.extrap_sgd.rho=-0.5", "method.extrap_sgd.rho"),
        ("method.extrap_sgd.rho=inf", "method.extrap_sgd.rho"),
        ("method.extrap_sgd.rho=nan", "method.extrap_sgd.rho"),
        ("method.extrap_sgd.perturbation=momentum", "method.extrap_sgd.perturbation"),
        ("method.extrap_sgd.noise_std=0", "method.extrap_sgd.noise_std"),
        ("method.extrap_sgd.noise_std=-1", "method.extrap_sgd.noise_std"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_key(compose, data_root, override, key):
    with pytest.raises(ConfigError) as refused:
        validate(compose("method=extrap_sgd", override))
    assert refused.value.key == key


def test_the_method_is_labelled_after_its_base(compose, data_root):
    run = validate(compose("method=extrap_sgd", *NESTEROV))
    assert run.variant == "SGD+EXTRAP" and run.method.legend_order == 4
    assert run.resolved["method"]["extrap_sgd"] == {"perturbation": "gradient", "rho": 1.0, "noise_std": 0.01}


# -- two ranks --------------------------------------------------------------------------------


def transcribed_run(run, *, local_eps: bool, steps: int) -> dict[str, torch.Tensor]:
    """Full-batch EXTRAP-SGD on 2 ranks written out by hand in one process: rank k
    extrapolates along its own half-batch gradient (``local_eps``) or along their average,
    and the step uses the average over ranks of each rank's gradient at its own u."""
    from experiments.optimizers import build_base_optimizer

    cfg = run.config
    problem = run.problem_class(run.problem_config, data_root=Path(cfg.data.root), seed=cfg.seed, device=torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = problem.build_model()
    opt = build_base_optimizer(model.parameters(), cfg.optimizer)
    gamma = run.method.settings.rho * cfg.optimizer.lr
    for unit in range(1, steps + 1):
        (batch,) = list(problem.batches(unit))
        halves = [problem.local_batch(batch, rank, 2) for rank in range(2)]
        w = [p.detach().clone() for p in model.parameters()]
        loss_of = lambda half: (lambda m: problem.loss(m, half))  # noqa: E731
        eps = [gradient_at(model, loss_of(half), w) for half in halves]
        if not local_eps:
            eps = [[(a + b) / 2 for a, b in zip(*eps)]] * 2
        at_u = [gradient_at(model, loss_of(half), [wi - gamma * e for wi, e in zip(w, e_k)]) for half, e_k in zip(halves, eps)]
        with torch.no_grad():
            for p, wi, g0, g1 in zip(model.parameters(), w, *at_u):
                p.copy_(wi)
                p.grad = g0 / 2 + g1 / 2  # what DDP's all-reduce of the halved gradients gives
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.distributed
def test_two_torchrun_ranks_extrapolate_along_their_own_gradients_and_step_with_the_average(compose, data_root, tmp_path):
    steps = 3
    overrides = ("method=extrap_sgd", "method.extrap_sgd.rho=5", *NESTEROV, "optimizer.lr=0.05",
                 "problem.batch_size=400", f"train.epochs={steps}")  # full batch: one step per epoch
    root = tmp_path / "two"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CI": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "experiments.run", *overrides,
         f"output.root={root}", f"hydra.run.dir={root / 'hydra'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (path,) = list(root.rglob("seed=0"))
    rows, trained_params = trained(path)
    assert (rows["gradients"] == 2 * rows["step"]).all()

    run = validate(compose(*overrides))
    local = transcribed_run(run, local_eps=True, steps=steps)
    averaged = transcribed_run(run, local_eps=False, steps=steps)
    # Rank 1's parameters enter every later step through its gradient, so matching the
    # transcription over 3 steps also says the ranks held the same parameters after each.
    distance = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    assert distance(trained_params, local) < 1e-6
    assert distance(local, averaged) > 1e-4  # an all-reduced eps would be told apart
