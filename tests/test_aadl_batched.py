"""BatchedAndersonAcceleration: S seeds stepped as one equal S single AndersonAcceleration
runs, decision by decision; its solves, checkpoints, closure and settings checks."""

import contextlib
import copy
import functools
import io
import math
import re

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import aadl.batched as batched_module
import aadl.hyperparameters as hyperparameters
import aadl.solvers as solvers_module
from aadl import SETTING_NAMES, AndersonAcceleration, BatchedAndersonAcceleration, kernels
from aadl.batched import (
    batched_memory_bytes,
    r_factors_batched,
    solve_normal_equations_batched,
    solve_r_factors_batched,
)
from aadl.solvers import solve_normal_equations, solve_r_factor

SEEDS = (0, 1, 2)
COUNTERS = ("steps", "aa_attempts", "aa_accepted", "averages_applied", "qr_fallbacks")
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: worker threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- S single runs and one batched run of the same seeds -----------------------------


def make_model(seed, dtype):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)


def minibatch(seed, k, dtype):
    """Seed s's k-th minibatch: its own inputs and its own target function, so that the
    seeds' safeguard and averaging decisions differ."""
    gen = torch.Generator().manual_seed(1000 * seed + k)
    x = torch.randn(24, 4, generator=gen, dtype=dtype)
    return x, torch.sin((1.0 + 0.4 * seed) * x.sum(dim=1, keepdim=True))


def make_base(kind, params):
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.02)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def run_single(seed, kind, dtype, steps, closure=True, **settings):
    """Per step: the flat parameters and the step's (accepted, averaged) increments."""
    model = make_model(seed, dtype)
    opt = AndersonAcceleration(make_base(kind, model.parameters()), **settings)
    trajectory, decisions = [], []
    for k in range(steps):
        x, y = minibatch(seed, k, dtype)
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss_fn().backward()
        before = (opt.stats.aa_accepted, opt.stats.averages_applied)
        opt.step(loss_fn if closure else None)
        decisions.append((opt.stats.aa_accepted - before[0], opt.stats.averages_applied - before[1]))
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return trajectory, decisions, opt


class StackedRun:
    """The seeds' models stacked with torch.func.stack_module_state; each seed's loss is
    its own model's forward on its [s] slices (functional_call), so the gradients are
    bitwise the single runs' and only the optimizers can differ."""

    def __init__(self, seeds, kind, dtype, **settings):
        self.seeds, self.dtype = seeds, dtype
        models = [make_model(s, dtype) for s in seeds]
        self.params, _ = stack_module_state(models)
        self.template = copy.deepcopy(models[0]).to("meta")
        base = make_base(kind, list(self.params.values()))
        self.opt = BatchedAndersonAcceleration(base, seeds=len(seeds), **settings)

    def losses(self, k):
        data = [minibatch(s, k, self.dtype) for s in self.seeds]

        def closure():
            return torch.stack([
                torch.nn.functional.mse_loss(
                    functional_call(self.template, {name: p[i] for name, p in self.params.items()}, (x,)), y
                )
                for i, (x, y) in enumerate(data)
            ])

        return closure

    def flat(self):
        return torch.cat([p.detach().reshape(len(self.seeds), -1) for p in self.params.values()], dim=1)

    def train(self, steps, start=0, closure=True, scheduler=None):
        trajectory, decisions = [], []
        for k in range(start, start + steps):
            losses = self.losses(k)
            self.opt.zero_grad()
            losses().sum().backward()
            before = (self.opt.stats.aa_accepted.clone(), self.opt.stats.averages_applied.clone())
            self.opt.step(losses if closure else None)
            if scheduler is not None:
                scheduler.step()
            stats = self.opt.stats
            decisions.append((stats.aa_accepted - before[0], stats.averages_applied - before[1]))
            trajectory.append(self.flat())
        return trajectory, decisions


def assert_batched_equals_singles(kind, dtype, steps, closure=True, seeds=SEEDS, exact=False, **settings):
    """Seed by seed, step by step: the iterates to TOLERANCE (bitwise with ``exact``), every
    safeguard and averaging decision, and the counters."""
    run = StackedRun(seeds, kind, dtype, **settings)
    batched, batched_decisions = run.train(steps, closure=closure)
    for i, seed in enumerate(seeds):
        single, decisions, opt = run_single(seed, kind, dtype, steps, closure, **settings)
        for k, (a, b) in enumerate(zip(single, batched), start=1):
            error = float((a - b[i]).norm() / a.norm())
            assert error <= TOLERANCE[dtype], f"seed {seed}, step {k}: relative error {error:.2e}"
            assert not exact or torch.equal(a, b[i]), f"seed {seed}, step {k}: not bitwise equal"
        # Every decision, step by step, and every counter.
        assert [(int(a[i]), int(v[i])) for a, v in batched_decisions] == decisions, f"seed {seed}"
        mine, theirs = run.opt.stats_for(i), opt.stats.as_dict()
        assert {key: mine[key] for key in COUNTERS} == {key: theirs[key] for key in COUNTERS}
        for key in ("last_g_norm", "last_condition"):  # g is far more sensitive than w
            assert mine[key] == pytest.approx(theirs[key], rel=1e2 * TOLERANCE[dtype], nan_ok=True)
    return run, batched_decisions


def mixed(decisions, which):
    """Steps where some seeds took a decision and others did not."""
    return sum(int(step[which].min() != step[which].max()) for step in decisions)


# -- the key property: per seed, the contract's run ---------------------------------

AVERAGING = dict(average=True, average_threshold=1.0)


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no-closure"])
@pytest.mark.parametrize("average", [False, True], ids=["plain", "average"])
@pytest.mark.parametrize("kind", ["adam", "sgd_momentum"])
def test_batched_run_equals_single_runs_float32(kind, average, closure):
    """On the CPU with numba the passes are the single wrapper's own compiled loops and the
    small float64 solves round to the same float32 coefficients, so the iterates are the
    single runs' bit for bit, every decision included (the seed-batched harness relies on
    it). Without a closure AA is unguarded and chaotic here: the single wrapper's numba
    and torch passes alone part by 0.45 relative over 40 steps, so only bitwise equality
    can hold there."""
    if not kernels.compiled_loops_enabled():
        pytest.skip(
            "the torch passes sum the dot products in another order and agree to rounding, which "
            "unguarded AA amplifies as it does between the single wrapper's own two passes "
            "(test_torch_passes_equal_single_runs)"
        )
    settings = dict(history=4, relaxation=0.5, **(AVERAGING if average else {}))
    with _closure_warning(closure):
        run, decisions = assert_batched_equals_singles(kind, torch.float32, 40, closure, exact=True, **settings)
    stats = run.opt.stats
    assert int(stats.aa_attempts[0]) == 39
    if closure:
        assert mixed(decisions, 0) > 0  # the safeguard kept AA for some seeds, not others
    if average:
        assert mixed(decisions, 1) > 0 and bool((stats.averages_applied > 0).all())


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "no-closure"])
@pytest.mark.parametrize("average", [False, True], ids=["plain", "average"])
@pytest.mark.parametrize("kind", ["adam", "sgd_momentum"])
def test_batched_run_equals_single_runs_float64(kind, average, closure):
    """float64 coefficients carry the last-bit differences of the batched solves (MKL's
    results depend on each matrix's alignment in the batch) into the iterates; unguarded
    AA on a network amplifies them (1e-16 to 1e-8 over 30 steps with lam = 0), so these
    runs take lam = 1e-4."""
    settings = dict(history=5, relaxation=0.5, regularization=1e-4, **(AVERAGING if average else {}))
    with _closure_warning(closure):
        assert_batched_equals_singles(kind, torch.float64, 25, closure, **settings)


def _closure_warning(closure):
    if closure:
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match="needs a closure")


SETTINGS = {
    "m3 p2 beta0.5 lam": dict(history=3, frequency=2, relaxation=0.5, regularization=1e-3),
    "m4 p3 q2 beta0.7 warmup": dict(history=4, frequency=3, store_every=2, relaxation=0.7, warmup=3),
    "m2 q3 (accelerate without storing)": dict(history=2, store_every=3),
    "paper_eq6 beta0.5": dict(history=4, relaxation=0.5, mixing="paper_eq6"),
    "qr solver lam": dict(history=4, frequency=2, solver="qr", relaxation=0.6, regularization=1e-4),
    "safeguard none": dict(history=3, safeguard="none", relaxation=0.3),
    "reference_code average t3": dict(
        history=4, relaxation=0.5, average=True, average_window=3, average_criterion="reference_code",
        average_threshold=0.5,
    ),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_every_schedule_solver_and_mixing_equals_single_runs(settings):
    assert_batched_equals_singles("adam", torch.float64, 20, seeds=(0, 1), **settings)


def test_torch_passes_equal_single_runs(monkeypatch):
    """The passes GPUs run (batched torch operations), here on the CPU, against single
    runs on their torch passes too. The dot products are summed in another order than
    the single wrapper's, which moves float32 coefficients by an ulp now and then; lam
    keeps AA from amplifying that past the tolerance."""
    monkeypatch.setenv("AADL_CPU_KERNELS", "torch")
    assert not kernels.compiled_loops_enabled()
    assert_batched_equals_singles(
        "adam", torch.float32, 30, history=4, relaxation=0.5, regularization=1e-4, **AVERAGING
    )


def test_decisions_differ_between_seeds_and_follow_each_seeds_own_losses():
    """Per step: seed s keeps its AA point exactly when its own loss there is lower, and
    the kept points' losses are what step() returns; across seeds the decisions differ."""
    run = StackedRun(SEEDS, "adam", torch.float32, history=4, relaxation=0.5, **AVERAGING)
    differing = {"safeguard": 0, "average": 0}
    for k in range(30):
        losses = run.losses(k)
        calls = []

        def closure():
            calls.append(losses())
            return calls[-1]

        run.opt.zero_grad()
        losses().sum().backward()
        accepted, averaged = run.opt.stats.aa_accepted.clone(), run.opt.stats.averages_applied.clone()
        returned = run.opt.step(closure)
        kept = run.opt.stats.aa_accepted - accepted
        fired = run.opt.stats.averages_applied - averaged
        if k == 0:
            assert returned is None and calls == []  # nothing to accelerate yet
            continue
        plain, at_aa = calls
        assert torch.equal(kept.bool(), at_aa < plain)
        assert torch.equal(returned, torch.where(at_aa < plain, at_aa, plain))
        after = losses()  # the loss where each seed now stands
        unaveraged = ~fired.bool()
        assert torch.equal(after[unaveraged], returned[unaveraged])
        differing["safeguard"] += int(0 < int(kept.sum()) < len(SEEDS))
        differing["average"] += int(0 < int(fired.sum()) < len(SEEDS))
    assert differing["safeguard"] >= 5 and differing["average"] >= 5, differing
    accepted = run.opt.stats.aa_accepted.tolist()
    assert len(set(accepted)) > 1, accepted


def test_gram_fallback_to_qr_is_decided_per_seed(monkeypatch):
    """With the trust limit lowered to a Gram condition number of 30 (this problem's run
    between 4 and 80), each seed's system is refused on some steps and solved by QR on
    those, as the single wrapper does, seed by seed."""
    monkeypatch.setattr(solvers_module, "GRAM_MAX_CONDITION", 30.0)  # read by both wrappers
    run, _ = assert_batched_equals_singles("adam", torch.float64, 25, history=4, relaxation=0.5)
    fallbacks = run.opt.stats.qr_fallbacks.tolist()
    assert len(set(fallbacks)) > 1 and all(0 < count < 24 for count in fallbacks), fallbacks


# -- the batched passes and solves ----------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("passes", ["numba", "torch"])
def test_passes_are_the_single_kernels_seed_by_seed(monkeypatch, passes, threads):
    """Dot products and mixing over the (S, m, n) block against aadl.kernels per seed, on
    two row blocks with the seeds split over worker threads: bitwise with numba (any
    thread count), to rounding with the torch passes."""
    if passes == "numba" and kernels._compiled is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("AADL_CPU_KERNELS", passes)
    monkeypatch.setattr(kernels, "BLOCK_WORKERS", threads)  # the passes' worker threads
    torch.manual_seed(0)
    seeds, m, h, n = 3, 6, 5, kernels.CPU_BLOCK + 7000
    rows, vector = torch.randn(seeds, m, n), torch.randn(seeds, n)
    base, shift = torch.randn(seeds, n), torch.randn(seeds, n)
    coefficients = torch.randn(seeds, h, dtype=torch.float64)
    coefficients[2, 0] = 1e38  # seed 2's point overflows float32
    dots = batched_module.batched_dots(rows, h, vector, square_row=2)
    out = torch.empty(seeds, n)
    finite = batched_module.batched_mix(out, base, rows, h, coefficients, shift, -0.5)
    assert finite.tolist() == [True, True, False]
    same = torch.equal if passes == "numba" else (lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-6))
    for s in range(seeds):
        b, square = kernels.row_dots_and_square(rows[s, :h], vector[s], 2)
        assert same(dots[s], torch.cat([b, square.reshape(1)]))
        single = torch.empty(n)
        kernels.mix(single, base[s], rows[s, :h], coefficients[s], shift[s], -0.5)
        if s < 2:
            assert same(out[s], single)




def test_batched_normal_equations_match_the_single_solver_seed_by_seed():
    rng = np.random.default_rng(0)
    h, systems = 5, []
    for kind in ("good", "good", "collinear", "nan", "good"):
        dR = rng.standard_normal((60, h))
        if kind == "collinear":
            dR[:, 1] = dR[:, 0]
        gram = dR.T @ dR
        if kind == "nan":
            gram[2, 3] = math.nan
        systems.append((torch.tensor(gram), torch.tensor(dR.T @ rng.standard_normal(60))))
    gram = torch.stack([g for g, _ in systems])
    rhs = torch.stack([b for _, b in systems])
    for lam in (0.0, 1e-3):
        coefficients, condition, trusted = solve_normal_equations_batched(gram, rhs, lam)
        for s, (g, b) in enumerate(systems):
            single = solve_normal_equations(g, b, lam)
            assert bool(trusted[s]) == (single is not None)
            if single is not None:
                # Batched LAPACK differs from one call per system in the last bits, which
                # the collinear system (condition 1e5 with lam) magnifies to 1e-11.
                torch.testing.assert_close(coefficients[s], single.coefficients, rtol=1e-9, atol=0)
                assert float(condition[s]) == pytest.approx(single.condition, rel=1e-9)
        collinear_trusted = lam > 0  # lam lifts the zero eigenvalue
        assert trusted.tolist() == [True, True, collinear_trusted, False, True]


@pytest.mark.parametrize("n", [7, 900, kernels.CPU_BLOCK + 901], ids=["n<h", "one block", "two blocks"])
@pytest.mark.parametrize("lam", [0.0, 1e-3])
def test_batched_r_factors_solve_as_the_single_qr_route(n, lam):
    torch.manual_seed(0)
    seeds, h = 3, 9
    rows = torch.randn(seeds, h, n)
    rows[1, 2] = rows[1, 0]  # rank-deficient: minimum-norm solution
    residual = torch.randn(seeds, n)
    coefficients, condition = solve_r_factors_batched(r_factors_batched(rows, residual), lam)
    for s in range(seeds):
        single = solve_r_factor(kernels.streaming_r_factor(rows[s], residual[s]), lam)
        torch.testing.assert_close(coefficients[s], single.coefficients, rtol=1e-7, atol=1e-9)
        if math.isfinite(single.condition) and single.condition < 1e10:
            assert float(condition[s]) == pytest.approx(single.condition, rel=1e-6)
        else:
            assert float(condition[s]) > 1e10


def test_non_finite_r_factor_gives_nan_coefficients_for_that_seed_only():
    r_factor = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    r_factor[1, 0, 3] = math.inf
    coefficients, condition = solve_r_factors_batched(r_factor, 0.0)
    assert torch.isfinite(coefficients[0]).all() and torch.isnan(coefficients[1]).all()
    assert float(condition[0]) == 1.0 and float(condition[1]) == math.inf


# -- checkpoints ---------------------------------------------------------------------

RESUME_SETTINGS = dict(history=4, relaxation=0.5, **AVERAGING)


def _with_scheduler(run):
    return torch.optim.lr_scheduler.StepLR(run.opt, step_size=4, gamma=0.5)


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


RESUMES = {
    "average": (RESUME_SETTINGS, torch.float32),
    "p3 q2 qr": (dict(history=3, frequency=3, store_every=2, solver="qr"), torch.float32),
    "float64 m5": (dict(history=5, relaxation=0.5, **AVERAGING), torch.float64),
}


@pytest.mark.parametrize("settings, dtype", RESUMES.values(), ids=RESUMES.keys())
def test_resumed_run_is_bit_identical(settings, dtype):
    n = 7  # mid-history
    straight = StackedRun(SEEDS, "adam", dtype, **settings)
    straight.train(2 * n, scheduler=_with_scheduler(straight))

    first = StackedRun(SEEDS, "adam", dtype, **settings)
    scheduler = _with_scheduler(first)
    first.train(n, scheduler=scheduler)
    saved = _saved({
        "params": {k: v.detach() for k, v in first.params.items()},
        "opt": first.opt.state_dict(),
        "sched": scheduler.state_dict(),
    })

    resumed = StackedRun((5, 6, 7), "adam", dtype, **settings)  # other weights, overwritten
    resumed.seeds = SEEDS  # the data order of the saved seeds
    with torch.no_grad():
        for name, p in resumed.params.items():
            p.copy_(saved["params"][name])
    resumed.opt.load_state_dict(saved["opt"])
    scheduler = _with_scheduler(resumed)
    scheduler.load_state_dict(saved["sched"])
    assert resumed.opt.stats.as_dict() == first.opt.stats.as_dict()
    resumed.train(n, start=n, scheduler=scheduler)

    assert torch.equal(straight.flat(), resumed.flat())
    assert straight.opt.stats.as_dict() == resumed.opt.stats.as_dict()
    assert int(straight.opt.stats.aa_accepted.sum()) > 0


def _assert_unchanged(before, opt):
    def same(a, b, path):
        if isinstance(a, dict):
            assert isinstance(b, dict) and set(a) == set(b), path
            for key in a:
                same(a[key], b[key], f"{path}.{key}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        elif isinstance(a, torch.Tensor):
            assert a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num()), path
        else:
            assert a == b or (a != a and b != b), path

    same(before, opt.state_dict(), "state")


def _trained(seeds=SEEDS, steps=6, **settings):
    run = StackedRun(seeds, "adam", torch.float32, **{**RESUME_SETTINGS, **settings})
    run.train(steps)
    return run


def _other_model_run():
    """Three seeds of a model with another n (4-16-1)."""
    models = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)) for _ in SEEDS]
    params, _ = stack_module_state(models)
    return BatchedAndersonAcceleration(torch.optim.Adam(list(params.values())), seeds=3, **RESUME_SETTINGS)


@functools.lru_cache(maxsize=None)
def _state_of(kind):
    """A checkpoint of each kind, made once (tests deep-copy before changing it)."""
    if kind == "source":
        return _trained(steps=5).opt.state_dict()
    if kind == "two seeds":
        return _trained(seeds=(0, 1)).opt.state_dict()
    if kind == "history 3":
        return _trained(history=3).opt.state_dict()
    if kind == "no averaging":
        return _trained(average=False).opt.state_dict()
    if kind == "other n":
        return _other_model_run().state_dict()
    if kind == "single":
        return AndersonAcceleration(torch.optim.Adam(make_model(0, torch.float32).parameters())).state_dict()
    raise KeyError(kind)


def _changed(path, value=None):
    """The source checkpoint with the key at ``path`` deleted (value None) or set."""
    state = copy.deepcopy(_state_of("source"))
    *parents, last = path.split(".")
    part = state
    for key in parents:
        part = part[key]
    if value is None:
        del part[last]
    else:
        part[last] = value(part[last])
    return state


REFUSED = {
    "other seeds": (lambda: _state_of("two seeds"), r"seeds=2 but this optimizer has seeds=3"),
    "other n": (lambda: _state_of("other n"), r"n=97 but this optimizer has n=49"),
    "other history": (lambda: _state_of("history 3"), "history=3 in the checkpoint, history=4 here"),
    "averaging off": (lambda: _state_of("no averaging"), "average=False in the checkpoint, average=True here"),
    "a single wrapper's": (lambda: _state_of("single"), "single AndersonAcceleration checkpoint"),
    "missing key": (
        lambda: _changed("batched_anderson.history.gram"), r"incomplete, missing batched_anderson\.history\.gram"
    ),
    "bad shape": (
        lambda: _changed("batched_anderson.stored.u", lambda u: u[:, :-1]),
        r"stored 'u' has shape \(3, 48\), expected \(3, 49\)",
    ),
    "format": (lambda: _changed("batched_anderson.format", lambda _: 7), "unsupported state format 7"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_bad_checkpoint_is_refused_in_one_line_and_changes_nothing(case):
    make_state, expected = case
    run = _trained()
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError) as error:
        run.opt.load_state_dict(make_state())
    message = str(error.value)
    assert message.startswith("BatchedAndersonAcceleration.load_state_dict: ") and "\n" not in message
    assert re.search(expected, message), message
    _assert_unchanged(before, run.opt)


def test_state_dict_holds_every_seeds_state():
    run = _trained(steps=5)
    state = run.opt.state_dict()["batched_anderson"]
    assert state["seeds"] == 3 and state["n"] == 49
    assert tuple(state["history"]["X"].shape) == (3, 4, 49)
    assert tuple(state["history"]["gram"].shape) == (3, 4, 4)
    assert tuple(state["average"]["buffer"].shape) == (3, 4, 49)
    assert state["stats"]["steps"].tolist() == [5, 5, 5]


# -- settings, parameters, closure ---------------------------------------------------


def _stacked(seeds=3, shape=(5,)):
    return [torch.nn.Parameter(torch.zeros(seeds, *shape)), torch.nn.Parameter(torch.zeros(seeds))]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(distributed="sharded"), "distributed='sharded' is not supported batched"),
        (dict(history=0), "history=0 is invalid"),
        (dict(relaxation=2.0), "0 < relaxation <= 1"),
    ],
)
def test_settings_are_checked_as_for_the_single_wrapper(settings, message):
    with pytest.raises(ValueError, match=message):
        BatchedAndersonAcceleration(torch.optim.SGD(_stacked(), lr=0.1), seeds=3, **settings)


def test_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="histroy"):
        BatchedAndersonAcceleration(torch.optim.SGD(_stacked(), lr=0.1), seeds=3, histroy=3)


def test_variant_other_than_the_contract_is_refused():
    if "variant" not in SETTING_NAMES:
        pytest.skip("this aadl has no variant setting yet")
    choices = getattr(hyperparameters, "VARIANTS", ("contract", "reference_code"))
    other = next(choice for choice in choices if choice != "contract")
    with pytest.raises(ValueError, match=f"variant={other!r} is not supported batched"):
        BatchedAndersonAcceleration(torch.optim.SGD(_stacked(), lr=0.1), seeds=3, variant=other)


@pytest.mark.parametrize(
    "params, seeds, message",
    [
        (_stacked(3), 4, r"parameter 0 has shape \(3, 5\); .*seeds=4"),
        ([torch.nn.Parameter(torch.zeros(()))], 1, r"parameter 0 has shape \(\)"),
        (_stacked(3), 0, "seeds=0 is invalid"),
        (_stacked(3), True, "seeds=True is invalid"),
    ],
)
def test_parameters_must_be_stacked_over_the_seeds(params, seeds, message):
    with pytest.raises(ValueError, match=message):
        BatchedAndersonAcceleration(torch.optim.SGD(params, lr=0.1), seeds=seeds)


def test_lbfgs_and_wrappers_are_refused():
    with pytest.raises(TypeError, match="LBFGS"):
        BatchedAndersonAcceleration(torch.optim.LBFGS(_stacked()), seeds=3)
    inner = BatchedAndersonAcceleration(torch.optim.SGD(_stacked(), lr=0.1), seeds=3)
    with pytest.raises(TypeError, match="cannot wrap another"):
        BatchedAndersonAcceleration(inner, seeds=3)


@pytest.mark.parametrize(
    "value, shown",
    [(torch.tensor(1.0), r"shape \(\)"), (torch.ones(2), r"shape \(2,\)"), (None, "None")],
    ids=["scalar", "wrong length", "None"],
)
def test_closure_must_return_one_loss_per_seed(value, shown):
    run = StackedRun(SEEDS, "adam", torch.float32, history=3)
    run.train(1)
    run.opt.zero_grad()
    run.losses(1)().sum().backward()
    expected = f"the closure returned .*{shown}.*expected a real tensor of shape \\(3,\\)"
    with pytest.raises(TypeError, match=expected):
        run.opt.step(lambda: value)


def test_torch_style_closure_with_backward_is_explained():
    run = StackedRun(SEEDS, "adam", torch.float32, history=3)
    run.train(1)
    losses = run.losses(1)

    def torch_style():
        total = losses()
        total.sum().backward()
        return total

    run.opt.zero_grad()
    losses().sum().backward()
    with pytest.raises(RuntimeError, match="backward\\(\\) is the caller's"):
        run.opt.step(torch_style)


def test_closure_failing_at_the_aa_points_leaves_every_seed_at_its_plain_step():
    run = StackedRun(SEEDS, "sgd_momentum", torch.float32, history=3)
    run.train(3)
    attempts = int(run.opt.stats.aa_attempts[0])
    accepted = run.opt.stats.aa_accepted.clone()
    losses, calls = run.losses(3), []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("at the AA point")
        return losses()

    run.opt.zero_grad()
    losses().sum().backward()
    plain = copy.deepcopy(run.opt.optimizer)  # the base step alone, from the same state and grads
    plain.step()
    expected = dict(zip(run.params, plain.param_groups[0]["params"]))
    with pytest.raises(KeyError):
        run.opt.step(closure)
    for name, p in run.params.items():
        assert torch.equal(p.detach(), expected[name].detach())
    assert int(run.opt.stats.aa_attempts[0]) == attempts + 1
    assert torch.equal(run.opt.stats.aa_accepted, accepted)
    run.train(2, start=4)  # goes on as after a rejection


def test_stats_per_seed_and_as_lists():
    run = _trained(steps=4)
    stats = run.opt.stats.as_dict()
    assert set(stats) == set(run.opt.stats_for(0)) and all(len(v) == 3 for v in stats.values())
    for s in range(3):
        assert run.opt.stats_for(s) == {key: values[s] for key, values in stats.items()}
    assert list(run.opt.stats_for(0)) == list(AndersonAcceleration(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)).stats.as_dict())
    with pytest.raises(IndexError, match="seed 3 out of range"):
        run.opt.stats_for(3)


def test_memory_estimate_is_what_is_allocated():
    run = _trained(steps=1)
    opt = run.opt
    tensors = [*opt._pool, opt._history.X, opt._history.dR, opt._history.gram, opt._history.stored_dots]
    average = opt._average
    tensors += [average.buffer, average._deviations, average._squares, average.mean]
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    assert allocated == batched_memory_bytes(3, opt.n, torch.float32, opt.settings)


def test_scheduler_and_param_groups_are_the_base_optimizers():
    run = StackedRun(SEEDS, "adam", torch.float32, history=3)
    assert run.opt.param_groups is run.opt.optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(run.opt, step_size=1, gamma=0.5)
    run.train(2, scheduler=scheduler)
    assert run.opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert repr(run.opt).startswith("BatchedAndersonAcceleration(Adam, seeds=3, n=49,")


def test_usage_with_vmap_trains_every_seed():
    """The docs' recipe: stack_module_state + functional_call + vmap for the forward. Its
    gradients differ from the single models' by rounding (batched matrix products), so
    the runs agree to rounding over a few steps, not bit for bit."""
    dtype, steps = torch.float64, 8
    models = [make_model(s, dtype) for s in SEEDS]
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0]).to("meta")
    base = torch.optim.Adam(list(params.values()), lr=0.02)
    opt = BatchedAndersonAcceleration(base, seeds=3, history=4, relaxation=0.5)

    def seed_loss(p, b, x, y):
        return torch.nn.functional.mse_loss(functional_call(template, (p, b), (x,)), y)

    for k in range(steps):
        data = [minibatch(s, k, dtype) for s in SEEDS]
        x, y = torch.stack([d[0] for d in data]), torch.stack([d[1] for d in data])
        loss_fn = lambda: vmap(seed_loss)(params, buffers, x, y)  # noqa: E731
        opt.zero_grad()
        loss_fn().sum().backward()
        opt.step(loss_fn)
    flat = torch.cat([p.detach().reshape(3, -1) for p in params.values()], dim=1)
    for i, seed in enumerate(SEEDS):
        single, _, _ = run_single(seed, "adam", dtype, steps, history=4, relaxation=0.5)
        assert float((single[-1] - flat[i]).norm() / single[-1].norm()) < 1e-8
