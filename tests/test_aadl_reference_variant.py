"""variant="reference_code": the authors' AADL (ORNL/AADL), checked against a transcription.

The 1e-10 agreement is measured where the problem lets it mean something: on these cases
a 1e-15 relative change of the starting point moves the transcription's own iterates by
less than a quarter of that tolerance (``test_cases_are_well_conditioned``), so a larger
difference would be the implementation's, not rounding amplified by the run. (Unguarded AA
with longer histories can amplify 1e-15 to 1e-9 in 50 steps on this problem; there no two
implementations agree to 1e-10, and the library's difference stays at that same level.)
"""

import copy
import faulthandler
import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aadl import AndersonAcceleration, validate_settings
from aadl_problems import LogisticProblem, flat
from aadl_reference import reference_aadl
from aadl_reference_code import NumpyAdam, reference_code_aadl

STEPS = 50
TOLERANCE = 1e-10
P1 = dict(history=5)
P3Q2 = dict(history=5, frequency=3, store_every=2, relaxation=0.5)  # AA on steps that store nothing
TWO_GROUPS = dict(history=3, relaxation=0.7, groups=True)

# (base optimizer, closure, settings): with and without a closure and averaging, on both
# base optimizers; the solver is the authors' examples' ("anderson": QR least squares).
CASES = {
    "sgd": ("sgd", False, dict(P1)),
    "sgd average": ("sgd", False, dict(P1, average=True)),
    "sgd closure": ("sgd", True, dict(P1)),
    "sgd closure average": ("sgd", True, dict(P1, average=True)),
    "sgd closure p3 q2 beta0.5": ("sgd", True, dict(P3Q2)),
    "sgd closure average p3 q2 beta0.5": ("sgd", True, dict(P3Q2, average=True)),
    "sgd closure two groups": ("sgd", True, dict(TWO_GROUPS)),
    "sgd closure gram": ("sgd", True, dict(P1, solver="gram")),
    "sgd closure warmup 9": ("sgd", True, dict(P1, warmup=9)),
    "sgd safeguard none": ("sgd", True, dict(P1, safeguard="none")),
    "adam p3 q2 beta0.5": ("adam", False, dict(P3Q2)),
    "adam average p3 q2 beta0.5": ("adam", False, dict(P3Q2, average=True)),
    "adam closure": ("adam", True, dict(P1)),
    "adam closure average": ("adam", True, dict(P1, average=True)),
    "adam two groups": ("adam", False, dict(TWO_GROUPS)),
}
LEARNING_RATES = {"sgd": 2.0, "adam": 0.05}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: a second intra-op thread only contends (20x slower on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settings(settings):
    return {"solver": "qr", "regularization": 1e-8, **{k: v for k, v in settings.items() if k != "groups"}}


def run_library(base, closure, settings, steps=STEPS):
    problem = LogisticProblem(lr=LEARNING_RATES[base])
    params = problem.parameters()
    groups = [{"params": [p]} for p in params] if settings.get("groups") else params
    optimizer = torch.optim.SGD if base == "sgd" else torch.optim.Adam
    opt = AndersonAcceleration(optimizer(groups, lr=problem.lr), variant="reference_code", **_settings(settings))
    trajectory = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-closure warning
        for _ in range(steps):
            opt.zero_grad()
            problem.loss(params).backward()
            opt.step((lambda: problem.loss(params)) if closure else None)
            trajectory.append(flat(params))
    return trajectory, opt


def run_transcription(base, closure, settings, w0_scale=None):
    problem = LogisticProblem(lr=LEARNING_RATES[base])
    if w0_scale is not None:
        problem.w0 = problem.w0 * w0_scale
    step = problem.base_step_np if base == "sgd" else NumpyAdam(problem.grad_np, problem.lr)
    options = _settings(settings)
    safeguard = options.pop("safeguard", "loss")
    loss = problem.loss_np if closure and safeguard == "loss" else None  # "none": as without one
    groups = [(0, 12), (12, 20)] if settings.get("groups") else None
    return reference_code_aadl(problem.w0, step, loss, STEPS, groups=groups, **options)


def largest_relative_difference(a, b):
    return max(np.linalg.norm(x - y) / np.linalg.norm(y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", CASES)
def test_iterates_match_the_transcription(case):
    base, closure, settings = CASES[case]
    got, opt = run_library(base, closure, settings)
    expected, counts = run_transcription(base, closure, settings)
    assert largest_relative_difference(got, expected) < TOLERANCE
    stats = opt.stats.as_dict()
    assert {name: stats[name] for name in counts} == counts
    # Each case exercises what it names: acceleration, and rejections where checked.
    assert counts["aa_attempts"] > 0
    if closure and settings.get("safeguard") != "none" and "p3" not in case:
        assert 0 < counts["aa_accepted"] < counts["aa_attempts"]
    if settings.get("average"):
        assert counts["averages_applied"] > 0


def test_cases_are_well_conditioned():
    rng = np.random.default_rng(0)
    for base, closure, settings in CASES.values():
        expected, _ = run_transcription(base, closure, settings)
        scale = 1 + 1e-15 * rng.standard_normal(20)
        perturbed, _ = run_transcription(base, closure, settings, w0_scale=scale)
        assert largest_relative_difference(perturbed, expected) < TOLERANCE / 4


def test_first_acceleration_is_at_the_third_stored_vector():
    # Stored on steps 2, 4, 6: the authors' code needs three vectors (one column), the
    # contract one column, i.e. two stored pairs (steps 2 and 4).
    settings = dict(history=5, store_every=2)
    _, opt = run_library("sgd", True, settings, steps=5)
    assert opt.stats.aa_attempts == 0
    _, opt = run_library("sgd", True, settings, steps=6)
    assert opt.stats.aa_attempts == 1
    problem = LogisticProblem()
    params = problem.parameters()
    contract = AndersonAcceleration(torch.optim.SGD(params, lr=problem.lr), store_every=2, solver="qr")
    for _ in range(4):
        contract.zero_grad()
        problem.loss(params).backward()
        contract.step(lambda: problem.loss(params))
    assert contract.stats.aa_attempts == 1


def test_only_an_accepted_point_enters_the_stored_vectors():
    problem = LogisticProblem()
    for closure in (False, True):
        params = problem.parameters()
        opt = AndersonAcceleration(
            torch.optim.SGD(params, lr=problem.lr), variant="reference_code", history=5,
            safeguard="loss" if closure else "none",
        )
        seen = set()
        for _ in range(12):
            attempts, accepted = opt.stats.aa_attempts, opt.stats.aa_accepted
            opt.zero_grad()
            problem.loss(params).backward()
            opt.step((lambda: problem.loss(params)) if closure else None)
            now, newest = torch.cat([p.detach().reshape(-1) for p in params]), opt._stored.newest()
            if opt.stats.aa_accepted > accepted and not closure:
                assert not torch.equal(now, newest)  # w_AA applied, the plain point stored
            else:
                assert torch.equal(now, newest)  # the plain point, or the accepted w_AA, in both
            if opt.stats.aa_attempts > attempts:
                seen.add(opt.stats.aa_accepted > accepted)
        assert seen == ({True, False} if closure else {True})


def test_closure_failing_at_the_aa_point_leaves_the_plain_point_and_raises():
    problem = LogisticProblem()
    params = problem.parameters()
    opt = AndersonAcceleration(torch.optim.SGD(params, lr=problem.lr), variant="reference_code", history=5)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the AA point of the first acceleration (step 3)
            raise RuntimeError("closure failed")
        return problem.loss(params)

    for step in range(1, 4):
        opt.zero_grad()
        problem.loss(params).backward()
        if step < 3:
            opt.step(closure)
    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(closure)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params]), opt._stored.newest())
    assert (opt.stats.aa_attempts, opt.stats.aa_accepted) == (1, 0)


def test_default_variant_is_the_contract_unchanged():
    problem = LogisticProblem()
    runs = []
    for variant in ({}, {"variant": "contract"}):
        params = problem.parameters()
        opt = AndersonAcceleration(torch.optim.SGD(params, lr=problem.lr), history=5, regularization=1e-8, **variant)
        assert type(opt) is AndersonAcceleration and opt.settings.variant == "contract"
        trajectory = []
        for _ in range(20):
            opt.zero_grad()
            problem.loss(params).backward()
            opt.step(lambda: problem.loss(params))
            trajectory.append(flat(params))
        runs.append(trajectory)
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    expected, _ = reference_aadl(problem.w0, problem.base_step_np, problem.loss_np, 20, history=5, regularization=1e-8)
    assert largest_relative_difference(runs[0], expected) < 1e-10
    assert validate_settings().variant == "contract"


# -- checkpoints ---------------------------------------------------------------------------

CHECKPOINT_SETTINGS = {
    "average closure": (dict(history=4, average=True, regularization=1e-6), True),
    "p3 q2 qr no closure": (dict(history=4, frequency=3, store_every=2, relaxation=0.5, solver="qr"), False),
}


def make_run(settings, variant="reference_code"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.02), variant=variant, **settings)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, scheduler


def train(model, opt, scheduler, steps, start, closure=True):
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(k)
        x = torch.randn(32, 5, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss_fn().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(loss_fn if closure else None)
        scheduler.step()


def saved(run):
    buffer = io.BytesIO()
    torch.save({"model": run[0].state_dict(), "opt": run[1].state_dict(), "sched": run[2].state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", CHECKPOINT_SETTINGS)
def test_resumed_run_is_bit_identical(case):
    settings, closure = CHECKPOINT_SETTINGS[case]
    n = 9  # past the ring's depth (m + 2 = 6): the resumed ring starts mid-buffer
    straight = make_run(settings)
    train(*straight, steps=2 * n, start=0, closure=closure)
    first = make_run(settings)
    train(*first, steps=n, start=0, closure=closure)
    state = saved(first)
    resumed = make_run(settings)
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["opt"])
    resumed[2].load_state_dict(state["sched"])
    assert resumed[1].stats.as_dict() == first[1].stats.as_dict()
    train(*resumed, steps=n, start=n, closure=closure)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert resumed[1].stats.as_dict() == straight[1].stats.as_dict()
    assert straight[1].stats.aa_attempts > 0


@pytest.mark.parametrize("saved_variant, loading_variant", [("contract", "reference_code"), ("reference_code", "contract")])
def test_checkpoint_of_the_other_variant_is_refused_and_changes_nothing(saved_variant, loading_variant):
    settings = dict(history=4)
    source = make_run(settings, saved_variant)
    train(*source, steps=5, start=0)
    target = make_run(settings, loading_variant)
    train(*target, steps=3, start=0)
    before = copy.deepcopy(target[1].state_dict())
    with pytest.raises(ValueError, match=f"saved with variant='{saved_variant}'") as error:
        target[1].load_state_dict(saved(source)["opt"])
    assert "\n" not in str(error.value)
    assert same_state(target[1].state_dict(), before)


def test_checkpoint_for_another_model_is_refused_naming_n_and_changes_nothing():
    source = make_run(dict(history=3))
    train(*source, steps=5, start=0)
    other = torch.nn.Linear(3, 2)  # 8 parameters against the run's 113
    target = AndersonAcceleration(torch.optim.Adam(other.parameters()), variant="reference_code", history=3)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"saved for n=113 but this optimizer has n=8$"):
        target.load_state_dict(saved(source)["opt"])
    assert same_state(target.state_dict(), before)


def same_state(a, b):
    """Equal nested state dicts, tensors compared exactly (copies: state_dict holds references)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b or (a != a and b != b)  # nan counters


def test_checkpoint_with_another_history_is_refused():
    source = make_run(dict(history=4))
    train(*source, steps=5, start=0)
    target = make_run(dict(history=3))
    with pytest.raises(ValueError, match="history=4 in the checkpoint, history=3 here"):
        target[1].load_state_dict(saved(source)["opt"])


# -- settings --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(variant="bogus"), "variant='bogus' is invalid; valid: one of 'contract', 'reference_code'"),
        (dict(variant="reference_code", distributed="sharded"), "distributed='sharded' is invalid"),
        (dict(variant="reference_code", mixing="paper_eq6"), "mixing='paper_eq6' is invalid"),
        (dict(variant="reference_code", average_window=5), "average_window=5 is invalid"),
        (dict(variant="reference_code", average_threshold=0.2), "average_threshold=0.2 is invalid"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, named):
    with pytest.raises(ValueError) as error:
        validate_settings(**settings)
    assert named in str(error.value) and "\n" not in str(error.value)
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError):
        AndersonAcceleration(torch.optim.SGD(params, lr=0.1), **settings)


def test_the_window_is_the_history_depth():
    assert validate_settings(variant="reference_code", history=4, average_window=6).window == 6
    assert validate_settings(variant="reference_code", history=4).window == 6


def test_method_config_takes_the_variant_and_names_a_bad_one():
    from experiments.errors import ConfigError
    from experiments.methods.aadl import AADL

    assert AADL.from_config({"variant": "reference_code"}, "method.aadl.").settings.variant == "reference_code"
    with pytest.raises(ConfigError) as error:
        AADL.from_config({"variant": "authors"}, "method.aadl.")
    assert error.value.key == "method.aadl.variant"


# -- two ranks -------------------------------------------------------------------------

WORLD = 2


def ddp_run(rank=0, world=1, steps=12):
    """Adam on this rank's half of a fixed batch (all of it when world == 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)).double()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    y[32:] += 2.0 * x[32:, :1]  # the halves differ, so the ranks' local losses disagree
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    x, y = x[rows], y[rows]
    opt = AndersonAcceleration(
        torch.optim.Adam(model.parameters(), lr=0.05), variant="reference_code", history=3, average=True
    )
    accepted = []
    for _ in range(steps):
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss_fn().backward()
        before = opt.stats.aa_accepted
        opt.step(loss_fn)
        accepted.append(opt.stats.aa_accepted > before)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"params": params, "accepted": accepted, "stats": opt.stats.as_dict()}


def _ddp_worker(rank, init_file, out_dir):
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.save(ddp_run(rank, WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    log.flush()
    os._exit(0)  # gloo's threads and interpreter teardown (see test_aadl_distributed)


@pytest.mark.distributed
def test_replicated_ranks_match_one_full_batch_process(tmp_path: Path):
    context = mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            logs = [(tmp_path / f"rank{r}.log").read_text(errors="replace")[-2000:] for r in range(WORLD)]
            pytest.fail(f"workers did not finish within 180 s\n{logs}")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = ddp_run()
    assert True in single["accepted"] and False in single["accepted"]
    for got in ranks:
        assert got["accepted"] == single["accepted"]
        assert torch.allclose(got["params"], single["params"], rtol=1e-9, atol=1e-12)
    # DDP never re-synchronises parameters: the variant must leave them identical.
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
