"""What AADL adds to a ResNet-50 training iteration (the paper's Fig. 4 setting).

    .venv/bin/python benchmarks/resnet50_step.py                     # CPU: batch 8 of 112x112
    .venv/bin/python benchmarks/resnet50_step.py --quick             # CPU smoke run, ~2 minutes
    .venv/bin/python benchmarks/resnet50_step.py --device cuda       # GPU: batch 64 of 224x224
    .venv/bin/python benchmarks/resnet50_step.py --device cuda --precision bf16 --channels-last
    torchrun --nproc-per-node=2 benchmarks/resnet50_step.py ...     # DDP: sharded is then real

One iteration is what the harness's step does for ImageNet (experiments/step.py): zero the
gradients, cross-entropy of torchvision's ResNet-50 (1,000 classes, train mode) on a batch
held on the device (no data loading: that is the loader's cost, not AADL's), backward, then
``optimizer.step`` with the safeguard's loss-only closure (two forward passes under
``aadl.closure.frozen_buffers`` at each AA step). The base optimizer is SGD with Nesterov
momentum 0.9 and weight decay 1e-4; AADL runs at Fig. 4's settings p = q = 5, m = 20,
beta = 0.5, float32 history.

Variants (each against the baseline, SGD alone, measured in the same run):
  aadl replicated device   history beside the parameters, every rank holding all of it
  aadl replicated host     history in host memory (history_device="cpu"), as in the paper;
                           on --device cpu this is the same as the previous one: skipped
  aadl sharded             each rank holds 1/P of the history (P = 1 without torchrun:
                           the same arithmetic as replicated, through the sharded code)
Timing: the history is first filled with synthetic gradients (100 steps of m = 20 columns
stored every q = 5 steps cost a minute of real iterations on a CPU, and an AA step's cost
depends only on how full the history is); then windows of p = 5 iterations (one AA step
each, as amortised in a run) alternate between the baseline and the variant, and the
medians are taken. Columns, per iteration (an AA step amortised over its p iterations):
images per second per rank, seconds, and the ratio to the baseline's; seconds inside
``optimizer.step`` (the base optimizer included), of them inside the safeguard's closure
(forward passes of the model), and the rest over the baseline's step ("AA s": the wrapper's
own arithmetic and copies); the step's share of the iteration; and "x SGD by step", 1 +
(step - the baseline's step) / the baseline's iteration: the same ratio with the forward
and backward passes, identical code in both, taken from the baseline (steadier on a shared
machine, where their time drifts more than the step's). One variant is held at a time (each AADL history is 2 m n floats, 4.1 GB
at m = 20), so the baseline is rebuilt beside each.

Target on a GPU: AADL at p = 5, m = 20 adds at most 5% to the average iteration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

FREQUENCY = 5  # p
STORE_EVERY = 5  # q
HISTORY = 20  # m
RELAXATION = 0.5  # beta


def build(torch, variant: dict | None, device, channels_last: bool, ddp: bool):
    """(model, net, optimizer) of one variant: the same initial weights for every variant."""
    import torchvision

    from aadl import AndersonAcceleration

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if variant is None:
        return model, net, base
    optimizer = AndersonAcceleration(
        base, history=HISTORY, frequency=FREQUENCY, store_every=STORE_EVERY, relaxation=RELAXATION, **variant
    )
    return model, net, optimizer


def fill_history(torch, model, optimizer, sync) -> None:
    """Enough steps on synthetic gradients to fill the history (m columns stored every q)."""
    for step in range(HISTORY * STORE_EVERY + FREQUENCY):
        for p in model.parameters():
            p.grad = torch.randn_like(p).mul_(1e-3)
        optimizer.step(lambda: torch.tensor(1.0 + 1e-3 * step))
    sync()


class Iterations:
    """Times p iterations of one variant on a fixed batch."""

    def __init__(self, torch, model, net, optimizer, batch, precision: str, sync):
        from aadl.closure import frozen_buffers

        self.torch, self.model, self.net, self.optimizer = torch, model, net, optimizer
        self.images, self.labels = batch
        self.sync = sync
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        device_type = self.images.device.type
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else (lambda: _null())
        self.frozen = frozen_buffers
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None

    def loss(self):
        with self.autocast():
            return self.torch.nn.functional.cross_entropy(self.net(self.images), self.labels)

    def window(self) -> tuple[float, float, float]:
        """Seconds of the p iterations, of them inside optimizer.step, and of those inside
        the safeguard's closure (forward passes of the model, not AA arithmetic)."""
        sync = self.sync
        total = stepping = closing = 0.0

        def closure():
            nonlocal closing
            sync()
            start = time.perf_counter()
            with self.frozen(self.model):
                loss = self.loss()
            sync()
            closing += time.perf_counter() - start
            return loss

        for _ in range(FREQUENCY):
            sync()
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss()
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            sync()
            before_step = time.perf_counter()
            args = (closure,) if hasattr(self.optimizer, "stats") else ()
            if self.scaler:
                self.scaler.step(self.optimizer, *args)
                self.scaler.update()
            else:
                self.optimizer.step(*args)
            sync()
            end = time.perf_counter()
            total += end - start
            stepping += end - before_step
        return total, stepping, closing


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def variants(device_type: str, world: int) -> dict[str, dict]:
    out = {"aadl replicated device": dict(distributed="replicated", history_device=None)}
    if device_type == "cuda":
        out["aadl replicated host"] = dict(distributed="replicated", history_device="cpu")
    out["aadl sharded" + ("" if world > 1 else " (P=1)")] = dict(distributed="sharded", history_device=None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="images per rank (default: 8 on cpu, 64 on cuda, the paper's)")
    parser.add_argument("--image-size", type=int, help="side of the images (default: 112 on cpu, 224 on cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="windows of p iterations per variant")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", nargs="+", help="variants to measure (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 windows, replicated only: a smoke run")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        sync = torch.cuda.synchronize
    else:
        device, sync = torch.device("cpu"), (lambda: None)
    context = None
    if world > 1:
        from experiments.world import init_distributed

        context = init_distributed(device=args.device)
    batch_size = args.batch or (64 if device.type == "cuda" else 8)
    size = args.image_size or (224 if device.type == "cuda" else 112)
    repeats = 3 if args.quick else args.repeats
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)

    chosen = variants(device.type, world)
    if args.quick:
        chosen = {k: v for k, v in chosen.items() if k == "aadl replicated device"}
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"ResNet-50 iteration: torch {torch.__version__}, device {device}, P = {world}, "
        f"{torch.get_num_threads()} threads, batch {batch_size} x {size}x{size} per rank, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}; AADL p = {FREQUENCY}, q = {STORE_EVERY}, "
        f"m = {HISTORY}; median of {repeats} windows of {FREQUENCY} iterations, alternating with SGD"
    )
    header = (
        f"{'variant':<28} {'img/s':>7} {'s/iter':>7} {'x SGD':>6} | {'step s':>7} {'closure s':>9} "
        f"{'AA s':>6} {'step share':>10} | {'x SGD by step':>13}"
    )
    say(header)
    say("-" * len(header))
    rows = []
    for name, settings in chosen.items():
        built = {}
        for key, variant in (("sgd", None), (name, settings)):
            model, net, optimizer = build(torch, variant, device, args.channels_last, world > 1)
            if variant is not None:
                fill_history(torch, model, optimizer, sync)
            timer = Iterations(torch, model, net, optimizer, (images, labels), args.precision, sync)
            timer.window()  # warm-up: cudnn autotuning, allocator, first AA step after filling
            built[key] = timer
        times = {key: [] for key in built}
        for _ in range(repeats):
            for key, timer in built.items():  # A, B, A, B, ...
                times[key].append(timer.window())
        # Per iteration: whole iteration, inside optimizer.step, inside the closure.
        medians = {key: [statistics.median(w[i] for w in times[key]) / FREQUENCY for i in range(3)] for key in built}
        (base_t, base_step, _), (var_t, var_step, var_closure) = medians["sgd"], medians[name]
        # The forward and backward passes are the same code in both: on a shared machine
        # their time drifts more than the step's, so the step's extra time over the
        # baseline's iteration is the steadier estimate of what AADL adds.
        by_step = 1 + (var_step - base_step) / base_t
        if not rows:
            say(
                f"{'sgd (Nesterov)':<28} {batch_size / base_t:>7.1f} {base_t:>7.3f} {1.0:>6.2f} | {base_step:>7.3f} "
                f"{0.0:>9.3f} {0.0:>6.3f} {base_step / base_t:>10.1%} | {1.0:>13.3f}"
            )
        say(
            f"{name:<28} {batch_size / var_t:>7.1f} {var_t:>7.3f} {var_t / base_t:>6.2f} | {var_step:>7.3f} "
            f"{var_closure:>9.3f} {var_step - var_closure - base_step:>6.3f} {var_step / var_t:>10.1%} | {by_step:>13.3f}"
        )
        rows.append((name, by_step))
        del built, times
        if device.type == "cuda":
            torch.cuda.empty_cache()
    verdicts = [f"{name}: +{ratio - 1:.1%} ({'meets' if ratio <= 1.05 else 'misses'} the GPU target of +5%)" for name, ratio in rows]
    say("per iteration over SGD alone: " + "; ".join(verdicts))
    if context is not None:
        context.close()


if __name__ == "__main__":
    main()
