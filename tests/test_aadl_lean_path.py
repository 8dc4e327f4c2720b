"""The lean small-n path of AndersonAcceleration and the fused storage pass.

The lean path (n <= aadl.optimizer.LEAN_MAX_N, one CPU process) changes only how the
step's operations are dispatched (numpy views instead of torch calls, the compiled loops
called directly), never which IEEE operations run on which entries: a run must be bitwise
the general path's. The fused storage pass (aadl.cpu_kernels.block_store) replaces four
passes over n by one and must agree with them to rounding.
"""

import copy

import pytest
import torch

from aadl import AndersonAcceleration, kernels
from aadl import optimizer as aadl_optimizer

FIG1 = dict(history=10, frequency=1, store_every=1, relaxation=0.1)
SETTINGS = [
    FIG1,
    dict(FIG1, average=True),
    dict(history=4, frequency=2, store_every=1, relaxation=0.5, mixing="paper_eq6", regularization=1e-6),
    dict(history=3, frequency=3, store_every=2, warmup=2, relaxation=1.0),  # p not a multiple of q
    dict(FIG1, solver="qr"),
]


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    ).to(dtype)


def _run(dtype, steps, lean_max_n, monkeypatch, **settings):
    """Parameters after every step and the final counters, of an Adam + AADL run on a small
    MLP with mini-batches and the loss safeguard."""
    monkeypatch.setattr(aadl_optimizer, "LEAN_MAX_N", lean_max_n)
    model = _mlp(dtype)
    opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.02), **settings)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(steps, 20, 7, generator=generator, dtype=dtype)
    targets = torch.randn(steps, 20, generator=generator, dtype=dtype)
    iterates = []
    for k in range(steps):

        def loss():
            return torch.nn.functional.mse_loss(model(features[k]).squeeze(-1), targets[k])

        opt.zero_grad()
        loss().backward()
        opt.step(loss)
        iterates.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return opt, iterates


@pytest.fixture(params=["numba", "torch"])
def cpu_passes(request, monkeypatch):
    if request.param == "numba" and kernels._compiled is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("AADL_CPU_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_lean_path_gives_the_general_paths_iterates_bitwise(settings, dtype, cpu_passes, monkeypatch):
    lean, lean_iterates = _run(dtype, 40, aadl_optimizer.LEAN_MAX_N, monkeypatch, **settings)
    general, general_iterates = _run(dtype, 40, 0, monkeypatch, **settings)
    assert lean._lean and not general._lean
    for k, (a, b) in enumerate(zip(lean_iterates, general_iterates)):
        assert torch.equal(a, b), f"step {k + 1}: the lean and general paths differ"
    assert lean.stats.as_dict() == pytest.approx(general.stats.as_dict(), nan_ok=True)
    assert lean.stats.aa_attempts > 0


def test_the_lean_path_is_chosen_by_n_device_and_dtype():
    def lean(n, dtype=torch.float32):
        param = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        return AndersonAcceleration(torch.optim.SGD([param], lr=0.1), history=2)._lean

    assert lean(aadl_optimizer.LEAN_MAX_N)
    assert lean(1000, torch.float64)
    assert not lean(aadl_optimizer.LEAN_MAX_N + 1)
    assert not lean(1000, torch.bfloat16)  # numpy has no bfloat16: the torch dispatch serves


def test_repointed_parameter_storage_is_followed(monkeypatch):
    """``p.data = ...`` between steps moves the parameter to new memory; the lean path's
    numpy views must follow it rather than read the old storage."""
    model = _mlp(torch.float32)
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.1), history=3, safeguard="none")
    assert opt._lean
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 7)).sum().backward()
        opt.step()
    weight = model[0].weight
    weight.data = torch.full_like(weight, 0.25)
    out = torch.empty(opt._whole.n)
    opt._gather(out)
    assert torch.equal(out[: weight.numel()], torch.full((weight.numel(),), 0.25))
    opt._write_parameters(torch.zeros(opt._whole.n))
    assert torch.equal(weight.detach(), torch.zeros_like(weight))


def test_a_deep_copy_steps_like_the_original():
    """The numpy views (parameters, Gram matrix, history) are of the copy's own tensors."""
    model = _mlp(torch.float64)
    opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.02), **FIG1)
    batch = torch.randn(20, 7, dtype=torch.float64), torch.randn(20, dtype=torch.float64)

    def train(net, optimizer, steps):
        for _ in range(steps):
            loss = lambda: torch.nn.functional.mse_loss(net(batch[0]).squeeze(-1), batch[1])  # noqa: E731
            optimizer.zero_grad()
            loss().backward()
            optimizer.step(loss)

    train(model, opt, 5)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    train(model, opt, 5)
    train(model_copy, opt_copy, 5)
    for a, b in zip(model.parameters(), model_copy.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt._history.gram, opt_copy._history.gram)
    assert opt_copy._history._gram_array.ctypes.data == opt_copy._history.gram.data_ptr()


@pytest.mark.skipif(kernels._compiled is None, reason="numba is not installed")
@pytest.mark.parametrize("lean_max_n", [aadl_optimizer.LEAN_MAX_N, 0])
@pytest.mark.parametrize(
    "settings", [FIG1, dict(history=5, relaxation=1.0), dict(history=4, mixing="paper_eq6", relaxation=0.3)]
)
def test_the_fused_storage_pass_agrees_with_the_separate_passes(settings, lean_max_n, monkeypatch):
    """float64, no safeguard (so a rounding difference cannot flip a decision): the history,
    its Gram matrix and the iterates to 1e-12 of the separate torch passes."""
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(AndersonAcceleration, "_fused_passes", lambda self: False)
        opt, iterates = _run(torch.float64, 20, lean_max_n, monkeypatch, safeguard="none", **settings)
        runs.append((opt, iterates))
    (fused_opt, fused_iterates), (plain_opt, plain_iterates) = runs
    for a, b in zip(fused_iterates, plain_iterates):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused_opt._history.gram, plain_opt._history.gram, rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(fused_opt._history.X, plain_opt._history.X, rtol=1e-10, atol=1e-16)
    torch.testing.assert_close(fused_opt._history.dR, plain_opt._history.dR, rtol=1e-10, atol=1e-16)
