"""The wrapper as a torch.optim citizen: base optimizers, groups, schedulers, dtypes,
argument validation."""

import math
import warnings

import pytest
import torch

from aadl import SETTING_NAMES, AndersonAcceleration, validate_settings

NEVER = 10**9


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.unused = torch.nn.Parameter(torch.ones(3))  # never in the forward: grad None
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.to(dtype)

    def forward(self, x):
        return self.body(x) + self.frozen.sum()


def data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen, dtype=dtype)
    return x, (x**2).sum(dim=1, keepdim=True)


def build_base(kind, model):
    body = list(model.body.parameters())
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    if kind == "sgd_nesterov":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    if kind == "groups":  # weights and biases at different learning rates
        weights = [p for p in body if p.ndim == 2]
        others = [p for p in model.parameters() if not any(p is w for w in weights)]
        return torch.optim.Adam([{"params": weights, "lr": 0.01}, {"params": others, "lr": 0.003}])
    raise ValueError(kind)


def train(opt, model, steps, x, y):
    losses = []
    for _ in range(steps):
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss_fn)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["adam", "sgd_nesterov", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wrapper_without_acceleration_is_the_base_optimizer(kind, dtype):
    """Before any acceleration the wrapper must be invisible: bit-identical iterates."""
    x, y = data(dtype)
    runs = []
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = Net(dtype)
        base = build_base(kind, model)
        opt = AndersonAcceleration(base, frequency=NEVER, average=False) if wrapped else base
        train(opt, model, 10, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["adam", "sgd_nesterov", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_acceleration_runs_with_every_base_optimizer(kind, dtype):
    """Full batch with the loss safeguard: AA never ends worse than the base optimizer
    here, and with Adam it is accepted (with Nesterov momentum AA on w alone often is
    not, which the safeguard handles)."""
    x, y = data(dtype)
    finals = {}
    for wrapped in (False, True):
        torch.manual_seed(0)
        model = Net(dtype)
        base = build_base(kind, model)
        opt = AndersonAcceleration(base, history=5, relaxation=0.5) if wrapped else base
        losses = train(opt, model, 30, x, y)
        finals[wrapped] = losses[-1]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert finals[True] <= finals[False] * (1 + 1e-6)
    assert opt.stats.aa_attempts == 29
    if kind != "sgd_nesterov":
        assert opt.stats.aa_accepted > 0
    assert opt._history.X.dtype == dtype
    assert opt._whole.n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert torch.equal(model.unused.detach(), torch.ones(3, dtype=dtype))  # no grad: r = 0
    assert torch.equal(model.frozen.detach(), torch.ones(2, dtype=dtype))  # not in w


@pytest.mark.parametrize("attach_to", ["wrapper", "base"])
def test_lr_scheduler_works_on_either_object(attach_to):
    x, y = data()
    model = Net()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = AndersonAcceleration(base, history=3)
    assert opt.param_groups is base.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt if attach_to == "wrapper" else base, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(4):
            train(opt, model, 1, x, y)
            scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_param_groups_stay_shared_after_the_base_reloads_its_state():
    model = Net()
    base = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = AndersonAcceleration(base)
    base.load_state_dict(base.state_dict())  # torch rebinds base.param_groups here
    assert opt.param_groups is base.param_groups
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5


def test_step_hooks_and_repr():
    model = Net()
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.1), history=7, relaxation=0.3)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o.stats.steps))
    x, y = data()
    train(opt, model, 2, x, y)
    assert seen == [1, 2]
    text = repr(opt)
    assert text.startswith("AndersonAcceleration(SGD, n=")
    assert "history=7" in text and "relaxation=0.3" in text


def test_mixed_dtypes_are_rejected_with_a_clear_message():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="share one dtype and device"):
        AndersonAcceleration(torch.optim.SGD([a, b], lr=0.1))


def test_not_an_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AndersonAcceleration([torch.nn.Parameter(torch.ones(2))])


def test_parameter_set_change_resets_the_history_with_a_warning():
    x, y = data()
    model = Net()
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.01), history=3)
    train(opt, model, 3, x, y)
    model.body[0].weight.requires_grad_(False)  # freeze a layer mid-run
    with pytest.warns(UserWarning, match="history and moving average are reset"):
        train(opt, model, 1, x, y)
    assert len(opt._history) == 0
    assert opt._whole.n == sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- validation -----------------------------------------------------------------------

INVALID = [
    ("history", 0, ">= 1"),
    ("history", 2.5, ">= 1"),
    ("history", True, ">= 1"),
    ("frequency", 0, ">= 1"),
    ("store_every", -1, ">= 1"),
    ("relaxation", 0.0, "0 < relaxation <= 1"),
    ("relaxation", 1.5, "0 < relaxation <= 1"),
    ("relaxation", math.nan, "0 < relaxation <= 1"),
    ("relaxation", "1", "0 < relaxation <= 1"),
    ("regularization", -1e-3, ">= 0"),
    ("regularization", math.inf, ">= 0"),
    ("warmup", -1, ">= 0"),
    ("average", "yes", "True or False"),
    ("average_window", 1, ">= 2"),
    ("average_threshold", 0.0, "> 0"),
    ("average_threshold", -0.1, "> 0"),
    ("average_criterion", "eq16", "'residual', 'reference_code'"),
    ("safeguard", "always", "'loss', 'none'"),
    ("solver", "svd", "'gram', 'qr'"),
    ("mixing", "eq8", "'walker_ni', 'paper_eq6'"),
    ("distributed", "fsdp", "'replicated', 'sharded'"),
    ("history_device", "gpu7", "torch device"),
]


@pytest.mark.parametrize("name, value, valid", INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_argument_names_parameter_value_and_range(name, value, valid):
    weight = torch.nn.Parameter(torch.ones(1000))
    # history=10**9 would need terabytes: a ValueError proves validation comes first.
    settings = {"history": 10**9, name: value}
    with pytest.raises(ValueError) as error:
        AndersonAcceleration(torch.optim.SGD([weight], lr=0.1), **settings)
    message = str(error.value)
    assert f"{name}={value!r}" in message or f"{name}={float(value)!r}" in message
    assert valid in message


def test_average_window_defaulting_to_a_history_of_one_is_rejected():
    with pytest.raises(ValueError, match="average_window.*defaults to history"):
        validate_settings(history=1, average=True)


def test_unknown_setting_is_a_type_error_listing_the_valid_names():
    with pytest.raises(TypeError, match="histroy"):
        validate_settings(histroy=3)
    assert "history" in SETTING_NAMES and len(SETTING_NAMES) == 16


# -- parameter dtypes ---------------------------------------------------------------


def test_float16_parameters_are_refused_with_the_alternatives():
    model = Net(torch.float16)
    with pytest.raises(ValueError) as error:
        AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.01))
    message = str(error.value)
    assert message.startswith("AndersonAcceleration: float16 parameters are not supported")
    assert "float32 master weights" in message and "torch.autocast" in message and "bfloat16" in message
    assert "\n" not in message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["adam", "sgd_nesterov"])
def test_bfloat16_and_float64_parameters_train_with_acceleration(dtype, kind):
    x, y = data(dtype)
    torch.manual_seed(0)
    model = Net(dtype)
    opt = AndersonAcceleration(build_base(kind, model), history=5, relaxation=0.5)
    losses = train(opt, model, 30, x, y)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.stats.aa_attempts == 29 and opt._history.X.dtype == dtype
