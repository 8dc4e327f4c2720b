"""The seed-batched step skips the (S, n) selects and copies a per-seed decision does not
need when every seed decided alike, with the same values as without the shortcut."""

from __future__ import annotations

import torch

from aadl import BatchedAndersonAcceleration
from aadl.batched import SeedRows

SEEDS, STEPS = 4, 30


def _run(lean: bool, monkeypatch, **settings):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(SEEDS, 6, 3))
    bias = torch.nn.Parameter(torch.randn(SEEDS, 1, 3))
    x = torch.randn(SEEDS, 10, 6)
    y = torch.randn(SEEDS, 10, 3)
    opt = BatchedAndersonAcceleration(torch.optim.Adam([weight, bias], lr=0.05), seeds=SEEDS, **settings)
    opt.lean_selects = lean
    passes = []  # (S, n) selects and copies into the parameters
    original, where = SeedRows.scatter, torch.where
    monkeypatch.setattr(SeedRows, "scatter", lambda self, block: (passes.append(1), original(self, block))[1])
    monkeypatch.setattr(torch, "where", lambda *a, **k: (passes.append(1), where(*a, **k))[1])

    def losses():
        return ((torch.baddbmm(bias, x, weight) - y) ** 2).mean(dim=(1, 2))

    for _ in range(STEPS):
        opt.zero_grad()
        losses().sum().backward()
        opt.step(losses)
    monkeypatch.setattr(SeedRows, "scatter", original)
    monkeypatch.setattr(torch, "where", where)
    return [weight.detach().clone(), bias.detach().clone()], len(passes), opt


def test_uniform_decisions_skip_copies_with_the_same_values(monkeypatch):
    for settings in (dict(history=4, relaxation=0.5), dict(history=4, relaxation=0.5, average=True, average_threshold=0.05)):
        lean_params, lean_scatters, lean_opt = _run(True, monkeypatch, **settings)
        full_params, full_scatters, full_opt = _run(False, monkeypatch, **settings)
        assert all(torch.equal(a, b) for a, b in zip(lean_params, full_params))
        assert lean_opt.stats.aa_accepted.tolist() == full_opt.stats.aa_accepted.tolist()
        assert lean_opt.stats.averages_applied.tolist() == full_opt.stats.averages_applied.tolist()
        # Every seed's AA point is finite on every step here: its select is skipped at least.
        assert lean_scatters <= full_scatters - (STEPS - 1), (settings, lean_scatters, full_scatters)
