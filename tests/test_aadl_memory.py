"""estimate_memory_bytes against the buffers the optimizer really allocates, and the
one-line MemoryError for buffers that cannot fit."""

import warnings

import numpy as np
import pytest
import torch

import aadl.optimizer
from aadl import AndersonAcceleration, estimate_memory_bytes, validate_settings


def allocated_bytes(opt):
    """Bytes of every buffer the wrapper holds (the base optimizer's state excluded)."""
    tensors = list(opt._pool)
    if opt._full is not None:
        tensors.append(opt._full)
    history = opt._history
    tensors += [history.X, history.dR, history.gram, history.stored_dots]
    if opt._average is not None:
        tensors.append(opt._average.buffer)
    assert len({t.data_ptr() for t in tensors}) == len(tensors)  # no buffer counted twice
    return sum(t.numel() * t.element_size() for t in tensors)


def train(opt, model, steps):
    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    x = torch.randn(32, 6, generator=gen, dtype=dtype)
    y = x.sum(dim=1, keepdim=True).sin()
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step(loss_fn)


SETTINGS = {
    "defaults": dict(),
    "average": dict(history=4, average=True),
    "average t7": dict(history=3, average=True, average_window=7),
    "p3 q2 (five n-vectors)": dict(history=5, frequency=3, store_every=2, relaxation=0.5),
    "m1": dict(history=1),
    "sharded on one process": dict(history=6, distributed="sharded"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_estimate_matches_the_allocated_buffers(settings, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 1)).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.01), **settings)
    expected = estimate_memory_bytes(n, dtype.itemsize, validate_settings(**settings))
    assert allocated_bytes(opt) == expected
    assert estimate_memory_bytes(n, dtype, validate_settings(**settings)) == expected
    # Everything is allocated up front: training grows nothing.
    train(opt, model, 12)
    assert opt.stats.aa_attempts > 0
    assert allocated_bytes(opt) == expected


def test_estimate_formula():
    n, m, t, size = 1000, 10, 4, 4
    s = validate_settings(history=m, average=True, average_window=t)
    assert estimate_memory_bytes(n, size, s) == (2 * m * n + t * n + 4 * n) * size + 8 * (m * m + m)
    assert estimate_memory_bytes(n, size) == estimate_memory_bytes(n, size, validate_settings())
    # A dict of hyperparameters and numpy integers serve as well.
    assert estimate_memory_bytes(np.int64(n), size, dict(history=m, average=True, average_window=t)) == (
        estimate_memory_bytes(n, size, s)
    )
    # Sharded: each of P ranks holds ceil(n / P) rows, plus the all-gather's full buffer.
    sharded = validate_settings(history=m, distributed="sharded")
    rows = -(-n // 3)
    assert estimate_memory_bytes(n, size, sharded, world_size=3) == (2 * m + 4 + 3) * rows * size + 8 * (m * m + m)
    # Replicated ranks hold everything whatever the world size.
    assert estimate_memory_bytes(n, size, validate_settings(history=m), world_size=3) == estimate_memory_bytes(
        n, size, validate_settings(history=m)
    )


@pytest.mark.parametrize("n, size", [(0, 4), (10, 0), (2.5, 4), (10, "4")])
def test_estimate_rejects_bad_arguments(n, size):
    with pytest.raises(ValueError, match="AndersonAcceleration: .* is invalid"):
        estimate_memory_bytes(n, size)


def test_a_history_too_large_for_the_machine_fails_fast_in_one_line():
    model = torch.nn.Linear(300, 300)  # n = 90,300: 7.2 TB of float32 history at m = 1e7,
    # and 800 TB for the float64 m x m Gram matrix
    with pytest.raises(MemoryError) as error:
        AndersonAcceleration(torch.optim.Adam(model.parameters()), history=10_000_000)
    message = str(error.value)
    expected = estimate_memory_bytes(90_300, 4, validate_settings(history=10_000_000))
    assert message.startswith(f"AndersonAcceleration: the AA buffers for n=90300 float32 parameters need {expected} bytes")
    assert "lower history (m=10000000)" in message and "\n" not in message


def test_a_window_too_large_names_average_window():
    weight = torch.nn.Parameter(torch.ones(100_000))
    with pytest.raises(MemoryError, match=r"lower average_window \(t=1000000000\)"):
        AndersonAcceleration(torch.optim.SGD([weight], lr=0.1), history=2, average=True, average_window=10**9)


class FailingHistory:
    error: BaseException

    def __init__(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 800 bytes"),
    ],
    ids=["cuda", "cpu"],
)
def test_allocation_failure_becomes_a_memory_error_naming_the_bytes(monkeypatch, error):
    FailingHistory.error = error
    monkeypatch.setattr(aadl.optimizer, "AndersonHistory", FailingHistory)
    model = torch.nn.Linear(10, 10)
    with pytest.raises(MemoryError) as raised:
        AndersonAcceleration(torch.optim.Adam(model.parameters()), history=7)
    expected = estimate_memory_bytes(110, 4, validate_settings(history=7))
    assert f"need {expected} bytes" in str(raised.value)
    assert "lower history (m=7)" in str(raised.value)
    assert raised.value.__cause__ is error


def test_other_errors_while_building_pass_through(monkeypatch):
    FailingHistory.error = RuntimeError("CUDA error: invalid device ordinal")
    monkeypatch.setattr(aadl.optimizer, "AndersonHistory", FailingHistory)
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        AndersonAcceleration(torch.optim.Adam(torch.nn.Linear(2, 2).parameters()))


def test_a_failed_rebuild_leaves_the_optimizer_as_it_was(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 1))
    opt = AndersonAcceleration(torch.optim.SGD(model.parameters(), lr=0.01), history=3)
    train(opt, model, 4)
    history, pool = opt._history, opt._pool
    FailingHistory.error = torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(aadl.optimizer, "AndersonHistory", FailingHistory)
    with pytest.raises(MemoryError), warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "history reset" warning: it was not
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(5))]})
    assert opt._history is history and opt._pool is pool and len(history) == 3


REFERENCE_CODE_SETTINGS = {
    "reference defaults": dict(variant="reference_code"),
    "reference m5 averaging": dict(variant="reference_code", history=5, average=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", REFERENCE_CODE_SETTINGS.values(), ids=REFERENCE_CODE_SETTINGS.keys())
def test_estimate_counts_the_reference_code_variants_buffers(settings, dtype):
    """variant='reference_code' allocates its own buffers (aadl.reference_variant): the
    estimate is their size, before and after training, and the variant's own sum."""
    from aadl.reference_variant import memory_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 1)).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    opt = AndersonAcceleration(torch.optim.Adam(model.parameters(), lr=0.01), **settings)
    checked = validate_settings(**settings)
    expected = estimate_memory_bytes(n, dtype, checked)

    def held():
        tensors = [opt._stored.buffer, opt._scratch_rows, opt._vectors]
        if opt._average is not None:
            tensors.append(opt._average.buffer)
        return sum(t.numel() * t.element_size() for t in tensors)

    assert held() == expected == memory_bytes(n, dtype, checked)
    assert estimate_memory_bytes(n, dtype.itemsize, settings) == expected
    m = checked.history
    assert expected == ((m + 2) * (2 if checked.average else 1) + m + 3) * n * dtype.itemsize
    train(opt, model, 12)
    assert opt.stats.aa_attempts > 0 and held() == expected
