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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
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
