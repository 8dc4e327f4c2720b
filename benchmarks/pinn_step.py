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

The limit, per preset (``--limit-only`` prints only this): the FLOPs of one iteration
(``torch.utils.flop_counter``'s formulas), the project's iteration in its default derivative
mode, in forward mode (the earlier default) and a plain autograd PINN written here on the
same points and weights (DeepXDE's is not run: it is not a dependency), alternated round by
round in this invocation; each one's achieved GFLOP/s, the machine's GEMM rate measured now
at the iteration's own shapes and at large shapes, and the ratios. Then, per preset, a
seed-batched iteration per lane (S lanes stacked, ``--lanes``) against one run's, and the
AADL iteration at the preset's settings with the safeguard's kept forward reused
(experiments.step.KeptForward) against evaluating again.
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


# -- the limit: FLOPs, achieved rate, GEMM rate, peers ------------------------------------------


def plain_autograd_pinn(model: torch.nn.Module) -> torch.nn.Sequential:
    """``model``'s weights copied into an nn.Sequential of nn.Linear and activations."""
    activation = torch.nn.Tanh if model.activation.name == "tanh" else torch.nn.ReLU
    layers: list[torch.nn.Module] = []
    for linear in model.linears:
        layers += [torch.nn.Linear(linear.in_features, linear.out_features), activation()]
    net = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for mine, theirs in zip(net[::2], model.linears, strict=True):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    return net


def plain_autograd_loss(problem: BurgersProblem, net: torch.nn.Sequential, batch, curvature: bool) -> Tensor:
    """The PINN loss as a user writes it: u, one autograd.grad for (u_x..., u_t), one more
    per Laplacian coordinate when the activation has curvature, then MSE_u + MSE_f."""
    d = problem.spatial_dims
    x = batch.collocation_points.clone().requires_grad_(True)
    u = net(x)[:, 0]
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    laplacian = torch.zeros_like(u)
    if curvature:
        for i in range(d):
            laplacian = laplacian + torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i]
    residual = grad[:, d] + u * grad[:, :d].sum(1) - problem.cfg.nu * laplacian - batch.forcing
    misfit = net(batch.data_points)[:, 0] - batch.data_values
    return misfit.square().mean() + residual.square().mean()


def plain_autograd_iteration(problem: BurgersProblem, model: torch.nn.Module, batch) -> Callable[[], None]:
    """One plain autograd PINN iteration (loss, backward, Adam) on ``model``'s weights."""
    net = plain_autograd_pinn(model)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    curvature = model.activation.has_curvature

    def step():
        optimizer.zero_grad()
        plain_autograd_loss(problem, net, batch, curvature).backward()
        optimizer.step()

    return step


def gemm_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of (m, k) @ (k, n) in float32 on CPU, median of ``repeats``."""
    a, b = torch.rand(m, k), torch.rand(k, n)
    calls = max(1, int(2e8 // (2 * m * k * n)))  # about 0.2 GFLOP per sample

    def run():
        for _ in range(calls):
            torch.mm(a, b)

    return 2 * m * k * n * calls / median_seconds(run, torch.device("cpu"), repeats) / 1e9


def alternated(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn round after round (one warm-up round)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def report_limit(presets: list[Preset], repeats: int) -> None:
    from experiments.problems.burgers.pinn import counted_flops

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nthe limit per preset (1 thread, alternated over {repeats} rounds, medians; load average {load})")
    large = gemm_gflops(1024, 1024, 1024, 5)
    for preset in presets:
        problem = make(preset.problem, torch.device("cpu"), activation=preset.activation)
        forward = make(preset.problem, torch.device("cpu"), activation=preset.activation, derivatives="forward")
        model = problem.build_model()
        (batch,) = problem.batches(1)
        iterations = {}
        for name, p in ((f"project ({problem.derivative_method})", problem), ("project (forward, before)", forward)):
            copy = p.build_model()
            copy.load_state_dict(model.state_dict())
            optimizer = torch.optim.Adam(copy.parameters(), lr=1e-3)

            def step(p=p, copy=copy, optimizer=optimizer):
                optimizer.zero_grad()
                p.loss(copy, batch).backward()
                optimizer.step()

            iterations[name] = step
        iterations["plain autograd PINN"] = plain_autograd_iteration(problem, model, batch)
        flops = {}
        for name, step in iterations.items():
            flops[name] = counted_flops(step)
        seconds = alternated(iterations, repeats)
        points = batch.collocation_points.shape[0] + batch.data_points.shape[0]
        own = gemm_gflops(points, problem.cfg.width, problem.cfg.width, 5)
        print(f"{preset.figure} ({preset.problem.name}, {preset.activation}): GEMM {own:.1f} GFLOP/s at "
              f"({points} x {problem.cfg.width}) @ ({problem.cfg.width} x {problem.cfg.width}), {large:.1f} at 1024^3")
        print(f"  {'iteration':<28} {'MFLOP':>8} {'ms':>8} {'GFLOP/s':>8} {'/GEMM here':>10} {'/GEMM large':>11} {'time / project':>15}")
        reference = seconds[next(iter(iterations))]
        for name in iterations:
            rate = flops[name] / seconds[name] / 1e9
            print(f"  {name:<28} {flops[name] / 1e6:>8.1f} {seconds[name] * 1e3:>8.2f} {rate:>8.2f} "
                  f"{rate / own:>10.0%} {rate / large:>11.0%} {seconds[name] / reference:>14.2f}x")


def report_seed_batching(presets: list[Preset], lanes: int, repeats: int) -> None:
    """One seed-batched iteration per lane (the stacked loss, backward, Adam over the stacked
    parameters) against one run's iteration in the default and in forward mode."""
    from experiments.batching import SeedStack, stack_batches

    print(f"\nseed-batched iteration per lane, {lanes} lanes, against one run's (medians of {repeats} alternated rounds)")
    for preset in presets:
        problems = [preset.problem(preset.problem.Config(activation=preset.activation), data_root=Path("."), seed=s, device="cpu") for s in range(lanes)]
        models = []
        for seed, p in enumerate(problems):
            torch.manual_seed(seed)
            models.append(p.build_model())
        stack = SeedStack(models)
        batch = stack_batches([p.batches(1)[0] for p in problems])
        stacked_optimizer = torch.optim.Adam(stack.parameters(), lr=1e-3)

        def batched():
            stacked_optimizer.zero_grad()
            problems[0].batched_loss(models[0], stack.tensors(), batch).sum().backward()
            stacked_optimizer.step()

        forward = make(preset.problem, torch.device("cpu"), activation=preset.activation, derivatives="forward")
        calls = {"batched": batched, "single": training_iteration(problems[0])[0], "single forward": training_iteration(forward)[0]}
        seconds = alternated(calls, repeats)
        per_lane = seconds["batched"] / lanes
        print(f"{preset.figure}: batched {per_lane * 1e3:.2f} ms per lane, single {seconds['single'] * 1e3:.2f} ms "
              f"({seconds['single'] / per_lane:.2f}x), single forward mode {seconds['single forward'] * 1e3:.2f} ms "
              f"({seconds['single forward'] / per_lane:.2f}x)")


def report_safeguard_reuse(presets: list[Preset], steps: int) -> None:
    """The AADL iteration at the preset's settings (the harness's step: backward, then the
    safeguard's closure) with the kept candidate's forward reused and without, alternated
    step by step on two copies (their trajectories are identical bit for bit)."""
    from experiments.compose import compose as compose_config
    from experiments.step import KeptForward, StepContext
    from experiments.training import build_state
    from experiments.parallel import DataParallel
    from experiments.validation import validate

    print(f"\nAADL iteration with the safeguard's kept forward reused, {steps} steps alternated (medians)")
    for preset in presets:
        run = validate(compose_config(f"+paper={preset.name}", "method=aadl"))
        variants = {}
        for reuse in (True, False):
            problem = run.problem_class(run.problem_config, data_root=Path("."), seed=0, device=torch.device("cpu"))
            state = build_state(problem, run)
            variants[reuse] = (problem, state, KeptForward() if reuse else None)
        samples = {True: [], False: []}
        for step in range(1, steps + 1):
            for reuse, (problem, state, kept) in variants.items():
                (batch,) = problem.batches(step)
                context = StepContext(problem=problem, net=state.model, model=state.model, optimizer=state.optimizer,
                                      parallel=DataParallel(), batch=batch, unit=step, index=0, unit_data_state=None, kept=kept)
                start = time.perf_counter()
                run.method.step(state.optimizer, context)
                samples[reuse].append(time.perf_counter() - start)
        accepted = variants[True][1].optimizer.stats.aa_accepted
        with_reuse, without = (statistics.median(samples[r][2:]) for r in (True, False))
        print(f"{preset.figure} (p={preset.frequency}): {with_reuse * 1e3:.2f} ms with reuse, {without * 1e3:.2f} without "
              f"({without / with_reuse:.2f}x); {accepted} of {steps} steps kept the AA candidate")


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
    parser.add_argument("--limit-only", action="store_true", help="print only the limit, batching and reuse tables")
    parser.add_argument("--lanes", type=int, default=10, help="seeds per batched iteration (default: 10)")
    parser.add_argument("--reuse-steps", type=int, default=60, help="AADL steps timed with and without reuse (default: 60)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    presets = [replace(p, budget=getattr(args, f"budget_{p.name}")) for p in presets]
    cores = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
        report_limit(presets, args.repeats)
        report_seed_batching(presets, args.lanes, max(5, args.repeats // 2))
        report_safeguard_reuse(presets, args.reuse_steps)
        print()
    if args.limit_only:
        return

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
