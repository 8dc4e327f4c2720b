"""Seconds per PINN training iteration for burgers2d and burgers100d, the 100d Laplacian's
exact methods side by side, and the time the Fig. 2 / Fig. 3 presets would take here (their
variants, seeds, budgets and p are read from configs/paper/fig2.yaml and fig3.yaml).

    .venv/bin/python benchmarks/pinn_step.py                      # CPU, 1 and 2 threads
    .venv/bin/python benchmarks/pinn_step.py --device cuda --threads 1

One iteration = the PINN loss on one batch (400 initial/boundary + 4,000 collocation points),
its backward pass and an Adam step. "eval" is one loss evaluation under torch.no_grad(), which
is what the AA safeguard costs twice per acceleration. Times are medians over --repeats.

On CPU it also profiles one iteration at each preset's settings and prints the share spent
in matrix products (aten::mm, addmm, bmm, baddbmm) and what those products alone would cost
for the whole preset: a floor that neither seed batching nor a leaner optimizer step can go
below without changing the PINN's arithmetic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from experiments.analysis.figures import FIGURES
from experiments.compose import compose, preset_sweep
from experiments.problems import PROBLEMS
from experiments.problems.burgers.problem import Burgers2D, Burgers100D, BurgersProblem


@dataclass(frozen=True)
class Preset:
    """What a paper preset runs, read from configs/paper/<name>.yaml and its experiment."""

    name: str  # fig2, fig3
    problem: type[BurgersProblem]
    budget: int  # train.iterations
    frequency: int  # AA every p iterations, each with 2 safeguard loss evaluations
    seeds: int
    accelerated: int  # variants with AA (the others run the base optimizer alone)
    plain: int
    activation: str  # problem.activation

    @classmethod
    def load(cls, name: str) -> Preset:
        cfg = compose(f"+paper={name}")
        sweep = preset_sweep(name)
        accelerated = sum(variant != "none" for variant in sweep["method"])
        return cls(
            name=name,
            problem=PROBLEMS.get(cfg.experiment),
            budget=cfg.train.iterations,
            frequency=cfg.method.aadl.frequency,
            seeds=len(sweep["seed"]),
            accelerated=accelerated,
            plain=len(sweep["method"]) - accelerated,
            activation=cfg.problem.activation,
        )

    @property
    def figure(self) -> str:
        return f"Fig. {self.name.removeprefix('fig')}"


#: The paper figures of the Burgers problems (their presets: experiments.analysis.figures).
PRESET_NAMES = tuple(name for name, spec in FIGURES.items() if spec.experiment.startswith("burgers"))


def median_seconds(
    call: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        call()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def training_iteration(problem: BurgersProblem) -> tuple[Callable[[], None], Callable[[], Tensor]]:
    """(one training iteration: loss, backward, Adam step; one loss on the same batch) for
    a fresh model of ``problem``."""
    model = problem.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    (batch,) = problem.batches(1)

    def step():
        optimizer.zero_grad()
        problem.loss(model, batch).backward()
        optimizer.step()

    return step, lambda: problem.loss(model, batch)


def step_and_eval_seconds(
    problem: BurgersProblem, device: torch.device, repeats: int
) -> tuple[float, float]:
    step, loss = training_iteration(problem)

    def evaluate():
        with torch.no_grad():
            loss()

    return median_seconds(step, device, repeats), median_seconds(evaluate, device, repeats)


def make(problem_class, device, **overrides) -> BurgersProblem:
    cfg = problem_class.Config(**overrides)
    return problem_class(cfg, data_root=Path("."), seed=0, device=device)


def report_iterations(device, repeats) -> dict[tuple[str, str], tuple[float, float]]:
    print(f"{'problem':<12} {'activation':<10} {'s/iteration':>12} {'s/eval':>10}")
    timings = {}
    for problem_class in (Burgers2D, Burgers100D):
        for activation in ("relu", "tanh"):
            problem = make(problem_class, device, activation=activation)
            timings[problem_class.name, activation] = step_and_eval_seconds(
                problem, device, repeats
            )
            step, evaluation = timings[problem_class.name, activation]
            print(f"{problem_class.name:<12} {activation:<10} {step:>12.4f} {evaluation:>10.4f}")
    return timings


def report_laplacian_methods(device, repeats) -> None:
    """The 99-dimensional Laplacian with tanh (with ReLU it is identically zero)."""
    print("\nburgers100d tanh, 4,000 collocation points: input derivatives by method")
    print(
        f"{'method':<10} {'s/iteration':>12} {'s/eval':>10} {'loop/method (iteration, eval)':>32}"
    )
    seconds = {}
    for method in ("loop", "func", "forward"):
        problem = make(Burgers100D, device, activation="tanh", derivatives=method)
        few = repeats if method == "forward" else max(1, repeats // 5)  # seconds per call
        seconds[method] = step_and_eval_seconds(problem, device, few)
        step, evaluation = seconds[method]
        loop_step, loop_eval = seconds["loop"]
        speedups = f"{loop_step / step:>20.1f}x {loop_eval / evaluation:>8.1f}x"
        print(f"{method:<10} {step:>12.4f} {evaluation:>10.4f} {speedups}")


#: The kernels of matrix products: what the PINN's forward Laplacian and its backward are
#: made of, and what batching the lanes could not make cheaper.
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matrix_product_seconds(problem: BurgersProblem, steps: int) -> tuple[float, float]:
    """(seconds per iteration, seconds of it in matrix products), from the profiler's self
    CPU times over ``steps`` iterations (after one untimed)."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = training_iteration(problem)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS)
    return total / steps / 1e6, products / steps / 1e6


def report_matrix_product_floor(presets: list[Preset], parallel_runs, repeats) -> None:
    print(f"\nmatrix products per iteration at the presets' settings and the preset's floor, {parallel_runs} run(s) at a time")
    print(f"{'preset':<8} {'s/iteration':>12} {'products':>10} {'share':>7} {'products alone, whole preset':>30}")
    for preset in presets:
        problem = make(preset.problem, torch.device("cpu"), activation=preset.activation)
        step, products = matrix_product_seconds(problem, repeats)
        runs = preset.seeds * (preset.plain + preset.accelerated)
        floor_minutes = runs * preset.budget * products / parallel_runs / 60
        print(f"{preset.name:<8} {step:>12.4f} {products:>10.4f} {products / step:>6.0%} {floor_minutes:>25.1f} min")


def report_presets(timings, presets: list[Preset], parallel_runs) -> None:
    print(f"\npreset estimates: variants x seeds x budget, {parallel_runs} run(s) at a time")
    for preset in presets:
        for activation in ("relu", "tanh"):
            step, evaluation = timings[preset.problem.name, activation]
            accelerated = step + 2 * evaluation / preset.frequency  # + the safeguard's two losses
            per_seed = preset.budget * (preset.plain * step + preset.accelerated * accelerated)
            seconds = preset.seeds * per_seed / parallel_runs
            print(
                f"{preset.figure} ({preset.problem.name}, {activation}, "
                f"{preset.plain + preset.accelerated} variants x {preset.seeds} seeds x "
                f"{preset.budget} iterations): {seconds / 3600:6.2f} h"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument(
        "--threads", default="1,2", help="torch intra-op thread counts to measure (default: 1,2)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed iterations per measurement")
    presets = [Preset.load(name) for name in PRESET_NAMES]
    for preset in presets:
        parser.add_argument(
            f"--budget-{preset.name}",
            type=int,
            default=preset.budget,
            help=f"{preset.figure} iterations (default: the preset's, {preset.budget})",
        )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    presets = [replace(p, budget=getattr(args, f"budget_{p.name}")) for p in presets]
    cores = torch.get_num_threads()

    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"=== device {device}, {threads} thread(s), torch {torch.__version__}, ", end="")
        print(f"load average {load} ===")
        timings = report_iterations(device, args.repeats)
        report_laplacian_methods(device, args.repeats)
        # On CPU, independent single-thread runs fill the cores (the harness's multirun
        # workers use 1 thread each); a GPU runs one at a time.
        parallel = max(1, cores // threads) if device.type == "cpu" else 1
        report_presets(timings, presets, parallel)
        if device.type == "cpu":  # the profiler's CPU times are kernel times on CPU only
            report_matrix_product_floor(presets, parallel, args.repeats)
        print()


if __name__ == "__main__":
    main()
