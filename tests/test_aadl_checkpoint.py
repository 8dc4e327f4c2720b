"""state_dict / load_state_dict: bit-identical resumption, and bad checkpoints."""

import copy
import io

import numpy as np
import pytest
import torch

from aadl import AndersonAcceleration
from aadl_problems import LogisticProblem, flat, run_wrapper
from aadl_reference import reference_aadl


def make_run(settings, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    base = torch.optim.Adam(model.parameters(), lr=0.02)
    opt = AndersonAcceleration(base, **settings)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    return model, opt, scheduler


def train(model, opt, scheduler, steps, start):
    for k in range(start, start + steps):
        gen = torch.Generator().manual_seed(k)  # the k-th minibatch, whoever runs it
        x = torch.randn(32, 5, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss_fn().backward()
        opt.step(loss_fn)
        scheduler.step()


CHECKPOINT_SETTINGS = {
    "adam p1 q1 average": dict(history=5, average=True, average_threshold=1e-3),
    "p3 q2 beta0.5 qr unguarded": dict(
        history=4, frequency=3, store_every=2, relaxation=0.5, solver="qr", safeguard="none"
    ),
    "reference_code average t3": dict(
        history=3, average=True, average_window=3, average_criterion="reference_code",
        average_threshold=0.01, regularization=1e-6,
    ),
}


@pytest.mark.parametrize("settings", CHECKPOINT_SETTINGS.values(), ids=CHECKPOINT_SETTINGS.keys())
def test_resumed_run_is_bit_identical(settings):
    n = 7  # mid-history: fewer steps than (history + average window) fill
    straight = make_run(settings)
    train(*straight, steps=2 * n, start=0)

    first = make_run(settings)
    train(*first, steps=n, start=0)
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    first_stats = first[1].stats.as_dict()

    resumed = make_run(settings, seed=123)  # different initial weights, overwritten below
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    assert resumed[1].stats.as_dict() == first_stats
    train(*resumed, steps=n, start=n)

    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    assert straight[1].stats.as_dict() == resumed[1].stats.as_dict()
    stats = straight[1].stats
    assert stats.aa_attempts > 0 and stats.aa_accepted > 0
    if settings.get("average"):
        assert stats.averages_applied > 0


def test_state_dict_carries_every_part():
    model, opt, scheduler = make_run(CHECKPOINT_SETTINGS["adam p1 q1 average"])
    train(model, opt, scheduler, steps=3, start=0)
    state = opt.state_dict()
    assert set(state) == {"base", "anderson"}
    assert state["base"]["state"]  # Adam's moments
    anderson = state["anderson"]
    assert anderson["history"]["count"] == 2 and anderson["history"]["dR"].shape[0] == 2
    assert anderson["stored"] is not None
    assert anderson["average"]["count"] == 3
    assert anderson["stats"]["steps"] == 3
    assert anderson["settings"]["history"] == 5


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    ta, tb = a["anderson"], b["anderson"]
    assert ta["stats"] == tb["stats"]
    assert torch.equal(ta["history"]["dR"], tb["history"]["dR"])
    assert ta["history"]["count"] == tb["history"]["count"]


def test_checkpoint_for_another_model_is_rejected_and_changes_nothing():
    model, opt, scheduler = make_run(dict(history=3))
    train(model, opt, scheduler, steps=4, start=0)
    before = _snapshot(opt)
    other = torch.nn.Linear(3, 2)
    other_opt = AndersonAcceleration(torch.optim.Adam(other.parameters()), history=3)
    with pytest.raises(ValueError, match=r"n=8 .*n=113|n=113.*n=8"):
        opt.load_state_dict(other_opt.state_dict())
    _assert_same_state(before, opt.state_dict())


def test_history_too_long_for_this_optimizer_is_rejected_and_changes_nothing():
    model, opt, scheduler = make_run(dict(history=5))
    train(model, opt, scheduler, steps=6, start=0)
    small_model, small_opt, _ = make_run(dict(history=2))
    before = _snapshot(small_opt)
    with pytest.raises(ValueError, match="history=2"):
        small_opt.load_state_dict(opt.state_dict())
    _assert_same_state(before, small_opt.state_dict())


@pytest.mark.parametrize(
    "state, message",
    [
        ({"state": {}, "param_groups": []}, "keys 'base' and 'anderson'"),
        ("not a dict", "keys 'base' and 'anderson'"),
    ],
)
def test_plain_optimizer_state_is_rejected_with_a_hint(state, message):
    _, opt, _ = make_run(dict(history=3))
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)


def test_resuming_with_another_relaxation_matches_the_contract():
    """dW and dR do not depend on beta; resuming with another beta must mix the saved
    history with the new beta, as the reference does when beta changes at step 9."""
    problem = LogisticProblem(seed=5)
    _, first = run_wrapper(problem, 8, history=4, relaxation=0.5)
    params = problem.parameters()
    with torch.no_grad():
        for p, q in zip(params, [p for g in first.param_groups for p in g["params"]]):
            p.copy_(q)
    second = AndersonAcceleration(torch.optim.SGD(params, lr=problem.lr), history=4, relaxation=0.9)
    second.load_state_dict(first.state_dict())
    for _ in range(8):
        second.zero_grad()
        problem.loss(params).backward()
        second.step(lambda: problem.loss(params))
    expected, _ = reference_aadl(
        problem.w0, problem.base_step_np, problem.loss_np, 16, history=4,
        relaxation=lambda k: 0.5 if k <= 8 else 0.9,
    )
    np.testing.assert_allclose(flat(params), expected[-1], rtol=1e-8)


# -- incomplete checkpoints and settings whose state cannot be carried over ----------


def _assert_unchanged(before, opt):
    """Every tensor and number of the optimizer's state dict is as it was."""

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
            assert torch.equal(a, b), path
        else:
            assert a == b or (a != a and b != b), path  # NaN counters compare equal

    same(before, opt.state_dict(), "state")


def _trained(settings=None, steps=5):
    model, opt, scheduler = make_run(settings or dict(history=3, average=True, average_threshold=1e-3))
    train(model, opt, scheduler, steps=steps, start=0)
    return model, opt


def _without(state, path):
    state = copy.deepcopy(state)
    *parents, last = path.split(".")
    part = state
    for key in parents:
        part = part[key]
    del part[last]
    return state


@pytest.mark.parametrize(
    "path",
    [
        "anderson.stored",
        "anderson.history.dR",
        "anderson.average.buffer",
        "anderson.stats.qr_fallbacks",
        "anderson.settings.relaxation",
        "anderson.base_optimizer",
        "base.param_groups",
    ],
)
def test_checkpoint_missing_a_key_names_it_and_changes_nothing(path):
    _, source = _trained()
    _, opt = _trained(steps=2)
    before = _snapshot(opt)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(_without(source.state_dict(), path))
    message = str(error.value)
    assert message.startswith("AndersonAcceleration.load_state_dict: the checkpoint is incomplete")
    assert path in message and "\n" not in message
    _assert_unchanged(before, opt)


def test_checkpoint_missing_several_keys_names_them_all():
    _, opt = _trained()
    state = _without(_without(opt.state_dict(), "anderson.stored"), "anderson.history.gram")
    with pytest.raises(ValueError, match=r"missing anderson\.stored, anderson\.history\.gram"):
        opt.load_state_dict(state)


def test_checkpoint_of_the_previous_format_gets_a_clear_message():
    _, opt = _trained()
    state = opt.state_dict()
    state["anderson"]["format"] = 1
    del state["anderson"]["base_optimizer"]
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"state format 1.*older aadl.*optimizer\.load_state_dict"):
        opt.load_state_dict(state)
    _assert_unchanged(before, opt)


def _other_base(model):
    return torch.optim.SGD(model.parameters(), lr=0.02)


BINDING = {
    # name: (saved settings, resumed settings, change, expected text)
    "average on -> off": (
        dict(history=3, average=True), dict(history=3), None, "average=True in the checkpoint, average=False here"
    ),
    "average off -> on": (
        dict(history=3), dict(history=3, average=True), None, "average=False in the checkpoint, average=True here"
    ),
    "history": (dict(history=3), dict(history=4), None, "history=3 in the checkpoint, history=4 here"),
    "average_window": (
        dict(history=3, average=True),  # t defaults to m = 3
        dict(history=3, average=True, average_window=4),
        None,
        "average_window=3 in the checkpoint, average_window=4 here",
    ),
    "base optimizer": (
        dict(history=3), dict(history=3), "sgd",
        "base_optimizer='torch.optim.adam.Adam' in the checkpoint, base_optimizer='torch.optim.sgd.SGD' here",
    ),
    "dtype": (
        dict(history=3), dict(history=3), "float64",
        "dtype='torch.float32' in the checkpoint, dtype='torch.float64' here",
    ),
}


@pytest.mark.parametrize("case", BINDING.values(), ids=BINDING.keys())
def test_checkpoint_with_binding_settings_that_differ_is_refused_and_changes_nothing(case):
    saved_settings, settings, change, expected = case
    _, source = _trained(saved_settings, steps=6)
    model, opt, _ = make_run(settings)
    if change == "sgd":
        opt = AndersonAcceleration(_other_base(model), **settings)
    elif change == "float64":
        model.double()
        opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.02), **settings)
    before = _snapshot(opt)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(source.state_dict())
    message = str(error.value)
    assert message.startswith("AndersonAcceleration.load_state_dict: the checkpoint's state cannot be carried over")
    assert expected in message and "\n" not in message
    _assert_unchanged(before, opt)


def test_several_differing_settings_are_all_named():
    _, source = _trained(dict(history=3, average=True), steps=6)
    model, _, _ = make_run(dict(history=4))
    opt = AndersonAcceleration(_other_base(model), history=4)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(source.state_dict())
    for name in ("base_optimizer=", "history=3", "average=True"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    "change",
    [
        dict(safeguard="none"), dict(solver="qr"), dict(frequency=2, store_every=2),
        dict(regularization=1e-6), dict(warmup=3), dict(average_threshold=0.5),
        dict(average_criterion="reference_code"), dict(relaxation=0.5), dict(mixing="paper_eq6"),
    ],
    ids=lambda change: ",".join(change),
)
def test_settings_that_hold_no_state_may_change_on_resume(change):
    saved = dict(history=3, average=True, average_threshold=1e-3)
    model, source = _trained(saved, steps=6)
    resumed_model, opt, scheduler = make_run({**saved, **change}, seed=1)
    resumed_model.load_state_dict(model.state_dict())
    opt.load_state_dict(source.state_dict())
    assert opt.stats.as_dict() == source.stats.as_dict()
    train(resumed_model, opt, scheduler, steps=4, start=6)
    assert all(torch.isfinite(p).all() for p in resumed_model.parameters())
