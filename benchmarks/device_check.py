"""One command that checks the suite on one accelerator and writes one markdown table.

    .venv/bin/python benchmarks/device_check.py                       # on a GPU machine: ~5-8 minutes
    .venv/bin/python benchmarks/device_check.py --quick --device cpu  # smoke run (the test suite's)

Rows, each with its wall time (docs/library.md, "One GPU check"):
  experiment X           every experiment for a few steps of method=aadl_ma on the device, one
                         process (python -m experiments.run); one whose data is not on this
                         machine is reported as skipped with the harness's one-line reason
  experiment X, torchrun the same under torchrun with one rank: the process group is NCCL on
                         a CUDA device (gloo on the CPU), so the collectives' path runs
  AA step                one AndersonAcceleration(Adam) step at n = 25.6e6, m = 20, p = q = 1
                         (safeguard off), history on the device and on the host
                         (history_device="cpu"), each against Adam's step alone
  ResNet-50              one training iteration (forward, backward, SGD step) without and with
                         AADL at Fig. 4's p = q = 5, m = 20, beta = 0.5 (the safeguard's two
                         forwards included), as a ratio; synthetic 224x224 images, batch 32
  Fig. 1 / Fig. 2 preset the seed-batched presets (+paper=fig1, +paper=fig2: 20 seeds, four
                         methods) on the device: each method's seed group run for k budget
                         units, the first (slowest) also for 2k, whose difference gives the
                         start-up; extrapolated to the preset's budget (stated as such)

``--quick`` shrinks every check (Burgers-2d alone, single and under torchrun; n = 2e5, m = 5;
a ResNet-18 on 2 images of 32x32; the Fig. 2 preset alone, one method, two seeds, one
iteration, not extrapolated) so that ``--device cpu`` runs in about a minute: the test suite
runs it so that this script cannot rot. The CUDA path has not
been run where it was written (no GPU was lent); a failing row is reported in the table with
its error's last line rather than stopping the others.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

#: experiment -> (budget key, a few units of it). ImageNet's unit is an epoch of hours:
#: its model is the ResNet-50 row, its launch the cluster scripts (docs/clusters.md).
EXPERIMENTS = {
    "graduate_admissions": ("train.epochs", 1),
    "burgers2d": ("train.iterations", 5),
    "burgers100d": ("train.iterations", 5),
    "mean_estimation": ("train.iterations", 5),
    "fashion_resnet": ("train.epochs", 1),
}
QUICK_EXPERIMENTS = ("burgers2d",)  # needs no data file
#: preset -> (experiment's budget key, its full budget, methods, units timed in full mode)
PRESETS = {
    "fig1": ("train.epochs", 1500, ("aadl_ma", "aadl", "ma", "none"), 10),
    "fig2": ("train.iterations", 2000, ("aadl_ma", "aadl", "ma", "none"), 50),
}


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, setting: str, result: str, seconds: float) -> None:
        self.rows.append((check, setting, result, f"{seconds:.1f}"))
        print(f"  {check} | {setting} | {result} | {seconds:.1f} s", flush=True)

    def markdown(self, header: list[str]) -> str:
        lines = [*header, "", "| check | setting | result | wall s |", "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output").replace("|", "/")[:200]


def _run(command: list[str], timeout: float) -> tuple[bool, float, str]:
    """(succeeded, wall seconds, the last line of its output) of a subprocess in the repo."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    return done.returncode == 0, seconds, _last_line(done.stderr + "\n" + done.stdout)


def _harness(overrides: list[str], root: Path, device: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun else [sys.executable]
    return [*launcher, "-m", "experiments.run", *overrides, f"train.device={device}",
            f"output.root={root}", "train.progress=false"]


def check_experiments(table: Table, device: str, quick: bool, root: Path, timeout: float) -> None:
    names = QUICK_EXPERIMENTS if quick else tuple(EXPERIMENTS)
    for name in names:
        key, units = EXPERIMENTS[name]
        overrides = [f"experiment={name}", "method=aadl_ma", f"{key}={units}", f"output.name=check_{name}"]
        for torchrun in (False, True):
            label = f"experiment {name}" + (", torchrun 1 rank" if torchrun else "")
            where = root / ("torchrun" if torchrun else "single")
            ok, seconds, last = _run(_harness(overrides, where, device, torchrun), timeout)
            if ok:
                result = "ok"
            elif "does not exist" in last or "data" in last.lower():
                result = f"skipped: {last}"
            else:
                result = f"FAILED: {last}"
            table.add(label, f"{key}={units}, method=aadl_ma", result, seconds)


def _median_seconds(torch, device, work, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_aa_step(table: Table, device_name: str, quick: bool) -> None:
    import torch

    from aadl import AndersonAcceleration

    device = torch.device(device_name)
    n, m = (200_000, 5) if quick else (25_600_000, 20)
    places = [("device", None)] if device.type == "cpu" else [("device", None), ("host", "cpu")]
    for place, history_device in places:
        start = time.perf_counter()
        try:
            params = [torch.nn.Parameter(torch.randn(n, device=device).mul_(0.1))]
            params[0].grad = torch.zeros_like(params[0])
            adam = torch.optim.Adam(params, lr=1e-3)
            opt = AndersonAcceleration(
                torch.optim.Adam(params, lr=1e-3), history=m, safeguard="none", history_device=history_device
            )

            def step(optimizer):
                with torch.no_grad():
                    torch.add(params[0], 1e-3, out=params[0].grad).mul_(1e-2)
                optimizer.step()

            for _ in range(m + 2):  # fill the history and both Adams' state
                step(opt)
                step(adam)
            repeats = 3 if quick else 7
            ratios = []
            for _ in range(repeats):  # alternated, so drift hits both alike
                base = _median_seconds(torch, device, lambda: step(adam), 1)
                aa = _median_seconds(torch, device, lambda: step(opt), 1)
                ratios.append(aa / base)
            result = f"{statistics.median(ratios):.2f}x Adam's step (median of {repeats} alternated pairs)"
            del opt, adam, params
        except Exception as error:  # noqa: BLE001 - a failing row must not stop the others
            result = f"FAILED: {_last_line(f'{type(error).__name__}: {error}')}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        table.add(f"AA step, history on the {place}", f"n={n:,}, m={m}, p=q=1, float32", result,
                  time.perf_counter() - start)


def check_resnet50(table: Table, device_name: str, quick: bool) -> None:
    import torch
    import torchvision

    from aadl import AndersonAcceleration

    device = torch.device(device_name)
    batch, size, windows = (2, 32, 1) if quick else (32, 224, 4)
    architecture = torchvision.models.resnet18 if quick else torchvision.models.resnet50
    start = time.perf_counter()
    try:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        criterion = torch.nn.CrossEntropyLoss()
        results = {}
        models = {}
        for variant in ("sgd", "aadl"):
            torch.manual_seed(0)
            model = architecture().to(device).train()
            base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
            optimizer = base if variant == "sgd" else AndersonAcceleration(
                base, history=2 if quick else 20, frequency=5, store_every=5, relaxation=0.5
            )
            models[variant] = (model, optimizer)

        def iteration(variant):
            model, optimizer = models[variant]
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), labels).backward()
            if variant == "sgd":
                optimizer.step()
            else:
                optimizer.step(closure=lambda: criterion(model(images), labels))

        for variant in models:  # warm-up (cuDNN autotuning, allocator)
            for _ in range(1 if quick else 5):
                iteration(variant)
        for variant in models:
            results[variant] = []
        for _ in range(windows):  # windows of p = 5 iterations, alternated
            for variant in models:
                results[variant].append(
                    _median_seconds(torch, device, lambda v=variant: [iteration(v) for _ in range(5)], 1) / 5
                )
        ratio = statistics.median(results["aadl"]) / statistics.median(results["sgd"])
        result = (f"{ratio:.2f}x SGD's iteration ({statistics.median(results['sgd']) * 1e3:.0f} ms -> "
                  f"{statistics.median(results['aadl']) * 1e3:.0f} ms)")
        del models
    except Exception as error:  # noqa: BLE001
        result = f"FAILED: {_last_line(f'{type(error).__name__}: {error}')}"
    table.add(f"{architecture.__name__} iteration, AADL / SGD", f"batch {batch} of {size}x{size}, p=q=5, m={2 if quick else 20}",
              result, time.perf_counter() - start)


def check_presets(table: Table, device: str, quick: bool, root: Path, timeout: float) -> None:
    """Each method's seed group at k units; the slowest (the first) also at 2k, whose
    difference gives its time per unit and, with it, the start-up every run pays."""
    for preset, (key, budget, methods, units) in PRESETS.items():
        if quick and preset != "fig2":  # fig2 needs no data file
            continue
        chosen = methods[:1] if quick else methods
        start = time.perf_counter()
        measured, failure = {}, None
        for method, length in [(m, units if not quick else 1) for m in chosen] + ([] if quick else [(chosen[0], 2 * units)]):
            overrides = ["-m", f"+paper={preset}", f"method={method}", f"{key}={length}",
                         f"output.name=check_{preset}_{length}"]
            if quick:
                overrides += ["seed=range(0,2)", "train.batch_seeds=2"]
            ok, seconds, last = _run(_harness(overrides, root / "presets", device), timeout)
            if not ok:
                failure = f"FAILED ({method}, {key}={length}): {last}"
                break
            measured[method, length] = seconds
        if failure:
            result = failure
        elif quick:
            result = f"{measured[chosen[0], 1]:.1f} s measured for {key}=1, 2 seeds batched, {chosen[0]} (not extrapolated)"
        else:
            slowest = chosen[0]
            per_unit = max(measured[slowest, 2 * units] - measured[slowest, units], 0.0) / units
            startup = max(measured[slowest, units] - per_unit * units, 0.0)
            total = sum(startup + (measured[m, units] - startup) / units * budget for m in chosen)
            result = (f"{total / 60:.1f} min extrapolated to {key}={budget} x {len(chosen)} methods, 20 seeds "
                      f"batched (each method timed at {units} units, {slowest} also at {2 * units}; "
                      f"start-up {startup:.0f} s per run)")
        table.add(f"{preset} preset, seed-batched", f"+paper={preset}", result, time.perf_counter() - start)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"device_check: --device {device} but torch sees no CUDA device; valid: cpu or cuda[:N] on a GPU machine")
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every check")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per subprocess (default 240)")
    args = parser.parse_args(argv)
    name = device_name(args.device)
    import torch

    header = [
        f"Device check on **{name}** (`--device {args.device}`{', --quick' if args.quick else ''}), "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f} at start",
    ]
    print(header[0], flush=True)
    table = Table()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aadl-device-check-") as scratch:
        root = Path(scratch)
        check_experiments(table, args.device, args.quick, root, args.timeout)
        check_aa_step(table, args.device, args.quick)
        check_resnet50(table, args.device, args.quick)
        check_presets(table, args.device, args.quick, root, args.timeout)
    header.append(f"All checks took {time.perf_counter() - started:.0f} s.")
    text = table.markdown(header)
    print("\n" + text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if any(row[2].startswith("FAILED") for row in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
