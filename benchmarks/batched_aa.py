"""S single AndersonAcceleration runs stepped one after another vs one BatchedAndersonAcceleration.

    python benchmarks/batched_aa.py                  # Fig. 1 MLP, S = 20, 1 thread
    python benchmarks/batched_aa.py --seeds 4 --rounds 20 --threads 2

The model is the Fig. 1 MLP (experiments/problems/graduate_admissions: 7 -> 64 -> 64 -> 64
-> 1, ReLU, n = 8,897), batch 40, Adam lr 0.02 (fused, as the preset), the paper's AADL
settings (m = 10, p = q = 1, beta = 0.1; +MA: average with epsilon = 0.1). Side A is S
nn.Sequential models, each with its own Adam and AndersonAcceleration, stepped in turn;
side B is one batched model (layers with weights of shape (S, in, out), torch.baddbmm)
with one Adam and one BatchedAndersonAcceleration over the stacked parameters. Each seed
sees its own minibatch, the same on both sides.

For each variant it times (median over --rounds, A and B alternated so that a shared
machine's drift hits both alike, after a warm-up that fills the history):
  step      the optimizer step alone, the safeguard's two forward passes included
            (AADL: opt.step(closure)); for Adam the base step
  iteration forward, backward and step
and prints both sides' times per round (all S seeds) and the ratio A / B. Last, side B's
AADL iterations against their floor, what batching cannot remove: Adam's iteration (B) plus
the safeguard's two forward passes (B's no-grad forward, timed in the same rounds): the
part of an AADL group's time that is AADL's own work.

    python benchmarks/batched_aa.py --lean-selects   # side B with vs without the shortcut

``--lean-selects`` instead times side B's AADL step with BatchedAndersonAcceleration's
``lean_selects`` (skip the (S, n) selects and copies when every seed decided alike) on and
off, two wrappers alternated in one process, and checks that their parameters stay equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aadl import AndersonAcceleration, BatchedAndersonAcceleration  # noqa: E402

FEATURES, WIDTH, LAYERS, BATCH = 7, 64, 3, 40
VARIANTS = {
    "Adam": None,
    "Adam+AADL": dict(history=10, frequency=1, store_every=1, relaxation=0.1),
    "Adam+AADL+MA": dict(history=10, frequency=1, store_every=1, relaxation=0.1, average=True, average_threshold=0.1),
}


def _adam(params):
    try:
        return torch.optim.Adam(params, lr=0.02, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=0.02)


def single_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers, width_in = [], FEATURES
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(width_in, WIDTH), torch.nn.ReLU()]
        width_in = WIDTH
    layers.append(torch.nn.Linear(width_in, 1))
    return torch.nn.Sequential(*layers)


class BatchedMLP(torch.nn.Module):
    """S MLPs as one: layer l holds weights (S, in, out) and biases (S, 1, out), copied from
    the S single models, so both sides start from the same points."""

    def __init__(self, models):
        super().__init__()
        linears = [[m for m in model if isinstance(m, torch.nn.Linear)] for model in models]
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.stack([seed[i].weight.detach().T for seed in linears]).contiguous())
            for i in range(len(linears[0]))
        )
        self.biases = torch.nn.ParameterList(
            torch.nn.Parameter(torch.stack([seed[i].bias.detach()[None, :] for seed in linears]))
            for i in range(len(linears[0]))
        )

    def forward(self, x):  # x: (S, batch, features)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x


def _mse_per_seed(prediction, target):
    return ((prediction - target) ** 2).mean(dim=(1, 2))


def build(variant: str, seeds: int):
    settings = VARIANTS[variant]
    singles = [single_model(s) for s in range(seeds)]
    batched = BatchedMLP(singles)
    single_opts = [
        _adam(m.parameters()) if settings is None else AndersonAcceleration(_adam(m.parameters()), **settings)
        for m in singles
    ]
    base = _adam(list(batched.parameters()))
    batched_opt = base if settings is None else BatchedAndersonAcceleration(base, seeds=seeds, **settings)
    return singles, single_opts, batched, batched_opt, settings is not None


def minibatches(seeds: int, count: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(count, seeds, BATCH, FEATURES, generator=gen)
    y = torch.rand(count, seeds, BATCH, 1, generator=gen)
    return x, y


def measure(variant: str, seeds: int, rounds: int, warmup: int) -> dict[str, float]:
    singles, single_opts, batched, batched_opt, accelerated = build(variant, seeds)
    xs, ys = minibatches(seeds, warmup + rounds)

    def side_a(k: int) -> tuple[float, float]:
        step_time = 0.0
        start = time.perf_counter()
        for s, (model, opt) in enumerate(zip(singles, single_opts)):
            x, y = xs[k, s], ys[k, s]
            loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
            opt.zero_grad()
            loss_fn().backward()
            t = time.perf_counter()
            opt.step(loss_fn) if accelerated else opt.step()
            step_time += time.perf_counter() - t
        return step_time, time.perf_counter() - start

    def side_b(k: int) -> tuple[float, float, float]:
        x, y = xs[k], ys[k]
        loss_fn = lambda: _mse_per_seed(batched(x), y)  # noqa: E731
        with torch.no_grad():  # the safeguard's pass, at the point the step starts from
            t = time.perf_counter()
            loss_fn()
            forward_time = time.perf_counter() - t
        start = time.perf_counter()
        batched_opt.zero_grad()
        loss_fn().sum().backward()
        t = time.perf_counter()
        batched_opt.step(loss_fn) if accelerated else batched_opt.step()
        step_time = time.perf_counter() - t
        return step_time, time.perf_counter() - start, forward_time

    for k in range(warmup):
        side_a(k)
        side_b(k)
    a_steps, a_iterations, b_steps, b_iterations, b_forwards = [], [], [], [], []
    for k in range(warmup, warmup + rounds):
        first, second = (side_a, side_b) if k % 2 == 0 else (side_b, side_a)
        results = {first: first(k), second: second(k)}
        a_steps.append(results[side_a][0])
        a_iterations.append(results[side_a][1])
        b_steps.append(results[side_b][0])
        b_iterations.append(results[side_b][1])
        b_forwards.append(results[side_b][2])
    result = {
        "A step": statistics.median(a_steps),
        "B step": statistics.median(b_steps),
        "A iteration": statistics.median(a_iterations),
        "B iteration": statistics.median(b_iterations),
        "B forward": statistics.median(b_forwards),
    }
    if accelerated:  # how often each side kept AA (a check, not a timing)
        result["accepted A"] = sum(o.stats.aa_accepted for o in single_opts)
        result["accepted B"] = int(batched_opt.stats.aa_accepted.sum())
    return result


def compare_lean_selects(seeds: int, rounds: int, warmup: int) -> None:
    for variant in ("Adam+AADL", "Adam+AADL+MA"):
        sides = {}
        for lean in (True, False):
            _, _, batched, opt, _ = build(variant, seeds)
            opt.lean_selects = lean
            sides[lean] = (batched, opt)
        xs, ys = minibatches(seeds, warmup + rounds)

        def step(lean: bool, k: int) -> float:
            batched, opt = sides[lean]
            loss_fn = lambda: _mse_per_seed(batched(xs[k]), ys[k])  # noqa: E731
            opt.zero_grad()
            loss_fn().sum().backward()
            start = time.perf_counter()
            opt.step(loss_fn)
            return time.perf_counter() - start

        times = {True: [], False: []}
        for k in range(warmup + rounds):
            for lean in ((True, False) if k % 2 else (False, True)):
                elapsed = step(lean, k)
                if k >= warmup:
                    times[lean].append(elapsed)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        same = all(torch.equal(a, b) for a, b in zip(sides[True][0].parameters(), sides[False][0].parameters()))
        print(f"{variant:<14} B step lean_selects on {on * 1e3:.2f}ms, off {off * 1e3:.2f}ms: "
              f"{on / off:.3f}x; parameters equal: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the Fig. 1 preset runs 1)")
    parser.add_argument("--lean-selects", action="store_true", help="B's step with lean_selects on vs off")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from aadl import kernels

    passes = "numba loops" if kernels.compiled_loops_enabled() else "torch operations"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"Batched AA benchmark: torch {torch.__version__}, CPU, {args.threads} thread(s), Fig. 1 MLP "
        f"(n = 8,897), S = {args.seeds}, batch {BATCH}, median of {args.rounds} rounds, CPU passes: "
        f"{passes}, load average {load:.1f}"
    )
    header = (
        f"{'variant':<14} | {'A step':>9} {'B step':>9} {'A/B':>6} | {'A iter':>9} {'B iter':>9} {'A/B':>6} "
        f"| {'per seed: A iter':>16} {'B iter':>8} | {'AA accepted A / B':>17}"
    )
    if args.lean_selects:
        compare_lean_selects(args.seeds, args.rounds, args.warmup)
        return
    print(header)
    print("-" * len(header))
    measured = {}
    for variant in VARIANTS:
        r = measured[variant] = measure(variant, args.seeds, args.rounds, args.warmup)
        accepted = f"{r['accepted A']} / {r['accepted B']}" if "accepted A" in r else "-"
        print(
            f"{variant:<14} | {r['A step'] * 1e3:7.2f}ms {r['B step'] * 1e3:7.2f}ms {r['A step'] / r['B step']:5.1f}x "
            f"| {r['A iteration'] * 1e3:7.2f}ms {r['B iteration'] * 1e3:7.2f}ms "
            f"{r['A iteration'] / r['B iteration']:5.1f}x | {r['A iteration'] / args.seeds * 1e3:14.3f}ms "
            f"{r['B iteration'] / args.seeds * 1e3:6.3f}ms | {accepted:>17}"
        )
    print("A: S single models, optimizers and wrappers stepped in turn; B: one batched model and wrapper.")
    print("step: the optimizer step (AADL: with its safeguard closure); iter: forward + backward + step.")
    print(
        "AA accepted: over all rounds and seeds. A's forward (addmm) and B's (baddbmm) round differently, "
        "so the sides' decisions may part after many steps."
    )
    adam = measured["Adam"]["B iteration"]
    print(f"\nB against its floor (Adam's B iteration {adam * 1e3:.2f}ms + the safeguard's 2 forwards):")
    for variant, r in measured.items():
        if variant == "Adam":
            continue
        floor = adam + 2 * r["B forward"]
        print(
            f"{variant:<14} iteration {r['B iteration'] * 1e3:.2f}ms, floor {floor * 1e3:.2f}ms "
            f"(forward {r['B forward'] * 1e3:.3f}ms): {r['B iteration'] / floor:.2f}x, "
            f"AADL's own work {(r['B iteration'] - floor) * 1e3:.2f}ms per step"
        )


if __name__ == "__main__":
    main()
