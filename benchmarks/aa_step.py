"""Cost of one AADL step against its memory-bound floor.

    python benchmarks/aa_step.py                 # n in {1e6, 25.6e6}, m in {10, 20}, CPU
    python benchmarks/aa_step.py --quick         # n = 1e6, m = 10: seconds, for a smoke run
    python benchmarks/aa_step.py --device cuda   # on a GPU machine

For each (n, m), float32, it times (median of --repeats, after the history is full):
  adam        one step of torch.optim.Adam(fused=True) alone (the base optimizer)
  read        a plain read of the history buffers (a sum over X and dR): the floor for
              anything that must touch the history once
  p1 gram/qr  one AndersonAcceleration(Adam) step accelerating every step (p = q = 1)
  p5 gram/qr  the same amortised over p = 5 (q = 1)
and prints the ratios to `read` (timed between the variant's own steps; the table's read
column is the one timed with p1 gram) and to `adam`, and the peak memory of each variant against
the target 2 m n + 6 n floats + Adam's state (2 n): parameters, gradients, the four
n-vectors the wrapper keeps, and the history. The safeguard's closure is left out (it
costs forward passes of the user's model, not AA work): safeguard="none". The header says
whether the CPU passes ran as numba loops or torch operations (AADL_CPU_KERNELS=torch
forces the latter, for comparison).

Targets on a 2-core CPU at n = 25.6e6, m = 20: p1 gram <= 2.5 x read; peak within target
with either solver.

    python benchmarks/aa_step.py --small         # the small-n rows (Fig. 1 MLP), see below

Small-n rows: one training step on the Fig. 1 MLP (experiments/problems/graduate_admissions:
7 features, 3 hidden layers of 64 ReLU units, one output, MSE, batch 40, n = 8,897) with
Adam (lr 0.02, fused) wrapped at the paper's Fig. 1 settings (m = 10, p = q = 1, beta = 0.1;
+MA: average=True), the safeguard's closure being the loss (a forward pass). Each is timed
against the floor, forward + backward + the Adam step + the safeguard's two forward passes,
in the same process, alternating step and floor (medians of --repeats pairs, after a
warm-up), so that load on a shared machine hits both alike. `lean off` runs the same step
with the lean path disabled (aadl.optimizer.LEAN_MAX_N = 0), for comparison. Target: the
AADL step within 1.5x the floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

FLOAT_BYTES = 4
VARIANTS = {
    "adam": None,
    "p1 gram": dict(frequency=1, solver="gram"),
    "p1 qr": dict(frequency=1, solver="qr"),
    "p5 gram": dict(frequency=5, solver="gram"),
    "p5 qr": dict(frequency=5, solver="qr"),
}


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _adam(torch, params):
    """The fastest torch Adam: fused (one kernel per tensor; CPU support since torch 2.4).
    The default foreach Adam is ~8x slower on CPU and would hide AA's cost behind its own."""
    try:
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=1e-3)


def measure(n: int, m: int, device: str, repeats: int) -> dict:
    """Run in a fresh process: every variant for one (n, m); timings and peak memory."""
    import torch

    from aadl import AndersonAcceleration

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def peak_start():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        _reset_rss_peak()
        return _rss_peak_bytes()

    def peak_since(start):
        if dev.type == "cuda":
            return torch.cuda.max_memory_allocated() - start
        return _rss_peak_bytes() - start

    # One-time costs (thread pools, BLAS workspaces, lazy torch init) are not per-step
    # memory: pay them on a small problem first.
    warm = [torch.nn.Parameter(torch.zeros(4 * 32768, device=dev))]
    warm[0].grad = torch.ones_like(warm[0])
    for solver in ("gram", "qr"):
        warm_opt = AndersonAcceleration(_adam(torch, warm), history=2, solver=solver, safeguard="none")
        for _ in range(4):
            warm_opt.step()
    del warm, warm_opt

    baseline = peak_start()
    results = {}
    for name, settings in VARIANTS.items():
        # Four parameters of unequal size, like the layers of a network.
        sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
        params = [torch.nn.Parameter(torch.randn(s, device=dev).mul_(0.1)) for s in sizes]
        for p in params:
            p.grad = torch.zeros_like(p)
        base = _adam(torch, params)
        opt = base if settings is None else AndersonAcceleration(
            base, history=m, store_every=1, safeguard="none", **settings
        )

        def one_step():
            with torch.no_grad():
                for p in params:  # gradient of 0.5 * 0.01 * |w|^2 + a constant pull
                    torch.add(p, 1e-3, alpha=1.0, out=p.grad).mul_(1e-2)
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            return time.perf_counter() - start

        for _ in range(m + 2):  # fill the history (and Adam's state)
            one_step()
        period = settings["frequency"] if settings else 1
        history = None if settings is None else opt._history

        def read():
            sync()
            start = time.perf_counter()
            float(history.X.sum()) + float(history.dR.sum())
            sync()
            return time.perf_counter() - start

        # The read is timed between the steps, not once apart from them: a shared
        # machine's memory bandwidth drifts by up to 1.7x over minutes, and each ratio
        # should compare the two under the same conditions.
        timings, reads = [], []
        for _ in range(repeats):
            if history is not None:
                reads.append(read())
            timings.append(sum(one_step() for _ in range(period)) / period)
        results[name] = statistics.median(timings)
        if reads:
            results[f"{name} read"] = statistics.median(reads)
        del history, read  # the next variant's baseline must not hold this history
        results[f"{name} peak_bytes"] = peak_since(baseline)
        del opt, base, params
        baseline = peak_start()
    return results


SMALL_VARIANTS = {
    "+AADL": dict(average=False),
    "+AADL+MA": dict(average=True),
    "+AADL lean off": dict(average=False),
}


def measure_small(repeats: int) -> dict:
    """Small-n rows (see the module docstring): per variant, median step and floor (s)."""
    import torch

    from aadl import optimizer as aadl_optimizer
    from aadl import AndersonAcceleration

    torch.set_num_threads(1)  # the experiments' setting for this MLP (train.threads: 1)
    generator = torch.Generator().manual_seed(0)
    features, target = torch.randn(40, 7, generator=generator), torch.randn(40, generator=generator)

    def mlp():
        layers, width = [], 7
        for _ in range(3):
            layers += [torch.nn.Linear(width, 64), torch.nn.ReLU()]
            width = 64
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def trainer(settings):
        torch.manual_seed(0)
        model = mlp()
        base = torch.optim.Adam(model.parameters(), lr=0.02, fused=True)
        opt = base if settings is None else AndersonAcceleration(
            base, history=10, frequency=1, store_every=1, relaxation=0.1, average_threshold=0.1, **settings
        )

        def loss():
            return torch.nn.functional.mse_loss(model(features).squeeze(-1), target)

        def step():
            start = time.perf_counter()
            opt.zero_grad()
            loss().backward()
            if settings is None:  # the floor: the base step and the safeguard's two forwards
                opt.step()
                with torch.no_grad():
                    loss()
                    loss()
            else:
                opt.step(loss)
            return time.perf_counter() - start

        return step, opt

    results = {}
    default_lean = getattr(aadl_optimizer, "LEAN_MAX_N", None)  # None: a library without the lean path
    for name, settings in SMALL_VARIANTS.items():
        aadl_optimizer.LEAN_MAX_N = 0 if "lean off" in name else default_lean
        step, opt = trainer(settings)
        floor, _ = trainer(None)
        for _ in range(100):
            step(), floor()
        steps, floors = [], []
        for _ in range(repeats):
            steps.append(step())
            floors.append(floor())
        results[name] = {
            "step": statistics.median(steps),
            "floor": statistics.median(floors),
            "n": opt._whole.n,
            "lean": getattr(opt, "_lean", None),
            "accepted": opt.stats.aa_accepted / max(1, opt.stats.aa_attempts),
        }
    aadl_optimizer.LEAN_MAX_N = default_lean
    return results


def small_rows(repeats: int) -> None:
    command = [sys.executable, __file__, "--child-small", str(repeats)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"AADL step on the Fig. 1 MLP (small-n rows): 1 thread, median of {repeats} alternating pairs, "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    header = f"{'variant':<16} {'n':>6} {'lean':>5} | {'step':>9} {'floor':>9} | {'step/floor':>10} | {'AA kept':>7}"
    print(header)
    print("-" * len(header))
    for name, row in r.items():
        print(
            f"{name:<16} {row['n']:>6} {str(row['lean']):>5} | {row['step'] * 1e3:>7.3f}ms {row['floor'] * 1e3:>7.3f}ms"
            f" | {row['step'] / row['floor']:>9.2f}x | {row['accepted']:>6.0%}"
        )
    ratio = r["+AADL"]["step"] / r["+AADL"]["floor"]
    print(f"target +AADL step <= 1.5 x floor: {ratio:.2f}x " + ("met" if ratio <= 1.5 else "NOT met"))


def _run_child(n: int, m: int, device: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps([n, m, device, repeats])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 25.6e6])
    parser.add_argument("--histories", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="n = 1e6, m = 10, 3 repeats")
    parser.add_argument("--small", action="store_true", help="only the small-n rows (Fig. 1 MLP vs its floor)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-small", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.child_small:
        print(json.dumps(measure_small(args.child_small)))
        return
    if args.small:
        small_rows(max(args.repeats, 1000) if args.repeats == 5 else args.repeats)
        return
    if args.quick:
        args.sizes, args.histories, args.repeats = [1e6], [10], 3

    import torch

    from aadl import kernels

    cpu_passes = "numba loops" if kernels.compiled_loops_enabled() else "torch operations"
    print(
        f"AADL step benchmark: torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} CPU threads, float32, median of {args.repeats}, "
        f"CPU passes: {cpu_passes}"
    )
    header = (
        f"{'n':>9} {'m':>3} | {'adam':>8} {'read':>8} | "
        + " ".join(f"{v:>8}" for v in VARIANTS if v != "adam")
        + " | " + " ".join(f"{v + '/read':>12}" for v in VARIANTS if v != "adam")
        + f" | {'p1 gram/adam':>12} | {'peak MB: gram   qr / target':>27}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for n_float in args.sizes:
        n = int(n_float)
        for m in args.histories:
            r = _run_child(n, m, args.device, args.repeats)
            target = (2 * m * n + 6 * n + 2 * n) * FLOAT_BYTES
            # Each solver's peak over its p = 1 and p = 5 runs.
            peaks = {
                solver: max(r[f"{v} peak_bytes"] for v in VARIANTS if v.endswith(solver))
                for solver in ("gram", "qr")
            }
            peak = max(peaks.values())
            accel = [v for v in VARIANTS if v != "adam"]
            print(
                f"{n:>9.3g} {m:>3} | {r['adam']:>7.4f}s {r['p1 gram read']:>7.4f}s | "
                + " ".join(f"{r[v]:>7.4f}s" for v in accel)
                + " | " + " ".join(f"{r[v] / r[f'{v} read']:>11.2f}x" for v in accel)
                + f" | {r['p1 gram'] / r['adam']:>11.1f}x"
                + f" | {peaks['gram'] / 2**20:>10.0f} {peaks['qr'] / 2**20:>5.0f} / {target / 2**20:<6.0f}"
                + ("ok" if peak <= target else "OVER")
            )
            if n == int(25.6e6) and m == 20:
                ratio = r["p1 gram"] / r["p1 gram read"]
                verdicts.append(f"target p1 gram <= 2.5 x read: {ratio:.2f}x " + ("met" if ratio <= 2.5 else "NOT met"))
                verdicts.append(
                    f"target peak <= 2mn + 6n + Adam state ({target / 2**20:.0f} MB), both solvers: "
                    f"{peak / 2**20:.0f} MB " + ("met" if peak <= target else "NOT met")
                )
    print("\n".join(verdicts))
    print(
        "peak: resident-set high-water mark above the process's state before the variant "
        "(parameters, gradients, optimizer state and every temporary)"
    )


if __name__ == "__main__":
    main()
