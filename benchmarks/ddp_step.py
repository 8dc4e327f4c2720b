"""What P = 2 processes cost and buy: training iterations at P = 1 and 2, and the AA step
replicated vs sharded (time, bytes communicated, peak memory per rank).

    .venv/bin/python benchmarks/ddp_step.py               # full: about 4 minutes on 2 cores
    .venv/bin/python benchmarks/ddp_step.py --quick       # about a minute, a smoke run
    .venv/bin/python benchmarks/ddp_step.py --device cuda # NCCL, one GPU per rank (needs 2)

It starts the ranks itself: P subprocesses of this file per launch, rendezvous by env://
on 127.0.0.1 at a free port chosen for that launch (never a fixed one), gloo on CPU with
GLOO_SOCKET_IFNAME=lo, one torch thread per rank (--threads; OMP_NUM_THREADS likewise), so
that P = 1 runs on one core and P = 2 on two, as one rank per GPU would.
The process group is started by the harness's own ``experiments.world.init_distributed``.

1. Training: seconds per iteration of graduate_admissions, burgers2d and burgers100d for
   Adam, Adam+AADL and Adam+AADL+MA at P = 1 and 2 (and, at P = 2, the AADL variants with
   ``method.aadl.distributed=sharded``). Each is built as the harness builds it: compose +
   validate, the problem class, ``experiments.training.build_state``,
   ``experiments.parallel.DataParallel`` (DDP, or one gradient all-reduce for the PINNs),
   and timed through a copy of the training loop's step body (``experiments.training.train``,
   including its per-step stop agreement and periodic divergence check; no evaluations, no
   learning-rate schedule). Torch threads per rank: ``train.threads`` where the experiment
   sets it (graduate_admissions: 1), else --threads. Time: median over
   blocks of 10 iterations (a multiple of every preset's p, so AA steps are amortised as
   in a run), each block the slowest rank's, after a warm-up that fills the history;
   the variants of one experiment alternate block by block in one launch per experiment
   (one experiment per process, as in a run); P = 1 and P = 2 launches alternate (twice
   each in full mode).
2. The AA step alone at P = 2: AndersonAcceleration(Adam fused) on a flat model of n
   parameters (four tensors of unequal size), m = 20, p = q = 1, safeguard="none" (as in
   benchmarks/aa_step.py: the safeguard's forward passes are the user's model, not AA
   work), float32; replicated and sharded held side by side and stepped alternately (ABBA),
   each step the slowest rank's time. Bytes per AA step are counted by wrapping the
   torch.distributed collectives while ``step()`` runs (see CollectiveCounter).
   A second, small run (safeguard="loss" with a closure, moving average on) checks the
   counted bytes of every step against the cost model of docs/distributed.md.
3. Peak memory per rank at P = 2: resident-set high-water mark growth while the wrapper is
   built and stepped (CUDA: max_memory_allocated growth), measured in a fresh pair of
   processes per layout, against ``aadl.estimate_memory_bytes`` (2 m ceil(n/P) + 4 ceil(n/P)
   + n floats when sharded). Target: sharded within 5% of that estimate.

Target: at P = 2 the sharded AA step no slower than replicated (sharded/replicated <= 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

EXPERIMENTS = ("graduate_admissions", "burgers2d", "burgers100d")
METHODS = (("Adam", "none"), ("Adam+AADL", "aadl"), ("Adam+AADL+MA", "aadl_ma"))
BLOCK = 10  # iterations per timed block: a multiple of p = 1 and of burgers2d's p = 10
FLOAT_BYTES = 4
MEMORY_TOLERANCE = 0.05
#: For the memory launches only: glibc serves every allocation of 128 KiB or more by its
#: own mmap and returns it on free. Its default raises that threshold after the first large
#: free, after which n-vectors come from heap memory freed earlier (by the warm-up) and the
#: high-water mark undercounts them (by 13 MB of 168 at n = 1e6, replicated).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


# -- counting what the collectives carry ------------------------------------------------


class CollectiveCounter:
    """Calls and tensor bytes of torch.distributed collectives issued from Python while
    ``active``. aadl calls them as ``dist.<name>`` at call time, so replacing the module's
    attributes sees every one; a collective that calls another (all_gather_single may go
    through all_gather_into_tensor) is counted once, as the outermost call.

    Bytes are the payload each rank holds after the call: the reduced tensor (all_reduce),
    the broadcast tensor, the whole gathered output (all-gathers; on the wire a ring moves
    (P-1)/P of it into each rank). DDP's gradient all-reduce runs in C++ and is not seen:
    nothing here counts it."""

    #: name -> index of the tensor (or list of tensors) whose size is the payload
    PAYLOAD = {
        "all_reduce": 0,
        "broadcast": 0,
        "reduce": 0,
        "all_gather": 0,  # the output list
        "all_gather_into_tensor": 0,  # output
        "all_gather_single": 0,  # output
        "reduce_scatter_tensor": 1,  # input
        "all_to_all_single": 0,
        "all_gather_object": None,
        "broadcast_object_list": None,
        "barrier": None,
    }

    def __init__(self):
        self.active = False
        self.depth = 0
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}

    def install(self) -> None:
        import torch.distributed as dist

        for name, index in self.PAYLOAD.items():
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, index, original))

    def _wrap(self, name, index, original):
        def counted(*args, **kwargs):
            if self.active and self.depth == 0:
                self.calls[name] = self.calls.get(name, 0) + 1
                if index is not None and len(args) > index:
                    self.bytes[name] = self.bytes.get(name, 0) + _tensor_bytes(args[index])
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1

        counted.__wrapped__ = original
        return counted

    def take(self) -> dict[str, dict[str, int]]:
        """Counts since the last take, then reset."""
        out = {"calls": dict(self.calls), "bytes": dict(self.bytes)}
        self.calls.clear()
        self.bytes.clear()
        return out


def _tensor_bytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return value.numel() * value.element_size() if hasattr(value, "element_size") else 0


COUNTER = CollectiveCounter()


# -- memory -----------------------------------------------------------------------------


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS (Linux >= 4.0)


class Peak:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            _reset_rss_peak()
            self.start = _rss_peak_bytes()

    def growth(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) - self.start
        return _rss_peak_bytes() - self.start


# -- the worker side (one process per rank) ---------------------------------------------


class Rank:
    """This rank's place, its device and the few collectives the benchmark itself issues
    (outside the counted windows)."""

    def __init__(self, context, torch):
        self.torch = torch
        self.context = context
        self.world, self.rank = context.world_size, context.rank
        self.device = torch.device(context.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        self.sync()

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise max of equally long lists over ranks."""
        if self.world == 1 or not values:
            return list(values)
        import torch.distributed as dist

        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()


def _endless_batches(problem):
    unit = 0
    while True:
        unit += 1
        yield from problem.batches(unit)


def task_train(task: dict, rank: Rank) -> dict:
    """Section 1: seconds per training iteration of every experiment and variant."""
    import torch

    from experiments.compose import compose
    from experiments.parallel import DataParallel
    from experiments.training import DIVERGENCE_CHECK_STEPS, build_state
    from experiments.validation import validate

    parallel = DataParallel(rank.world, rank.rank)
    device = rank.device
    default_threads = task["threads"]
    results = []
    for experiment in task["experiments"]:
        variants = [(label, [f"method={choice}"]) for label, choice in METHODS]
        if rank.world > 1:
            variants += [
                (f"{label} sharded", [f"method={choice}", "method.aadl.distributed=sharded"])
                for label, choice in METHODS if choice != "none"
            ]
        cases = []
        for label, overrides in variants:
            cfg = compose(
                f"experiment={experiment}", *overrides, f"data.root={task['data_root']}",
                f"train.device={device.type}",
            )
            run = validate(cfg)
            threads = run.config.train.threads or default_threads
            torch.set_num_threads(threads)
            problem = run.problem_class(
                run.problem_config, data_root=Path(task["data_root"]), seed=run.config.seed, device=device
            )
            state = build_state(problem, run)
            net = parallel.wrap(state.model, problem)
            n = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
            cases.append(dict(label=label, run=run, problem=problem, state=state, net=net,
                              batches=_endless_batches(problem), threads=threads, n=n, times=[]))

        def iterate(case, count):
            """The step body of experiments.training.train, ``count`` times."""
            run, problem, state, net = case["run"], case["problem"], case["state"], case["net"]
            optimizer, method = state.optimizer, run.method
            for _ in range(count):
                batch = parallel.local_batch(next(case["batches"]), problem)
                loss = problem.loss(net, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                parallel.after_backward(net)
                closure = (lambda: problem.loss(net, batch)) if method.closure == "loss" else None
                optimizer.step(closure) if closure is not None else optimizer.step()
                state.record_loss(loss)
                state.step += 1
                if parallel.active:  # should_stop() agreement, every step
                    parallel.max_int(False, device)
                if state.step % DIVERGENCE_CHECK_STEPS == 0:
                    parallel.max_int(int(state.first_nonfinite_step), device)

        for case in cases:  # fill the history (burgers2d: q = 5, m = 5 needs 30 steps)
            torch.set_num_threads(case["threads"])
            iterate(case, task["warmup"])
        for round_index in range(task["rounds"]):
            order = cases if round_index % 2 == 0 else cases[::-1]
            for case in order:
                torch.set_num_threads(case["threads"])
                rank.barrier()
                start = time.perf_counter()
                iterate(case, BLOCK)
                rank.sync()
                case["times"].append((time.perf_counter() - start) / BLOCK)
        for case in cases:
            times = rank.max_over_ranks(case["times"])
            finite = all(bool(torch.isfinite(p).all()) for p in case["state"].model.parameters())
            results.append(dict(experiment=experiment, label=case["label"], n=case["n"],
                                threads=case["threads"], times=times, finite=finite))
    return {"cases": results}


def _flat_model(torch, n: int, device, seed: int = 0):
    """Four parameters of unequal size, like a network's layers, with their gradients and
    a fused Adam whose state exists already (it is not AA's memory)."""
    torch.manual_seed(seed)
    sizes = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    params = [torch.nn.Parameter(torch.randn(s, device=device).mul_(0.1)) for s in sizes]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        base = torch.optim.Adam(params, lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError):
        base = torch.optim.Adam(params, lr=1e-3)
    _set_gradients(torch, params)
    base.step()  # Adam's state exists before any AA buffer
    return params, base


def _set_gradients(torch, params) -> None:
    """Gradient of 0.5e-2 |w + 1e-3|^2 (see _closure)."""
    with torch.no_grad():
        for p in params:
            torch.add(p, 1e-3, alpha=1.0, out=p.grad).mul_(1e-2)


def _closure(torch, params):
    return lambda: sum(0.5e-2 * (p + 1e-3).pow(2).sum() for p in params)


def _wrapper(n, m, layout, device, **settings):
    import torch

    from aadl import AndersonAcceleration

    params, base = _flat_model(torch, n, device)
    opt = AndersonAcceleration(
        base, history=m, frequency=1, store_every=1, distributed=layout,
        **{"safeguard": "none", **settings},
    )
    return params, opt


def _warm_up(rank: Rank, m: int) -> None:
    """Pay one-time costs (numba compilation, gloo's connections, thread pools, the block
    passes' per-thread scratch, which grows with the columns held) on a small problem,
    for both layouts and both solvers, with the history filled to m columns."""
    import torch

    for layout in ("replicated", "sharded"):
        for solver in ("gram", "qr"):
            params, opt = _wrapper(4 * 32768 + 3, m, layout, rank.device, solver=solver)
            for _ in range(m + 2):
                _set_gradients(torch, params)
                opt.step()
            del params, opt
    rank.barrier()


def task_aa_memory(task: dict, rank: Rank) -> dict:
    """Section 3, one layout in a fresh pair of processes: peak growth per rank. The
    replicated launch, which never all-gathers n-vectors, then also measures what one bare
    all-gather of n floats costs the backend beyond its input and output tensors."""
    import torch

    from aadl import AndersonAcceleration

    n, m, layout = task["n"], task["m"], task["layout"]
    _warm_up(rank, m)
    params, base = _flat_model(torch, n, rank.device)
    peak = Peak(torch, rank.device)
    opt = AndersonAcceleration(base, history=m, frequency=1, store_every=1, distributed=layout, safeguard="none")
    for _ in range(m + 4):  # the history full, a few steps more
        _set_gradients(torch, params)
        opt.step()
    rank.sync()
    grown = peak.growth()
    transient = 0
    if layout == "replicated" and rank.world > 1:
        import torch.distributed as dist

        shard = -(-n // rank.world)
        local = torch.zeros(shard, device=rank.device)
        full = torch.zeros(shard * rank.world, device=rank.device)
        gathered = Peak(torch, rank.device)
        flat_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        flat_all_gather(full, local)
        rank.sync()
        transient = gathered.growth()
    grown, transient = rank.max_over_ranks([float(grown), float(transient)])
    return {"peak_bytes": int(grown), "gather_transient_bytes": int(transient),
            "qr_fallbacks": opt.stats.qr_fallbacks, "settings": opt.settings.as_dict()}


def task_aa_time(task: dict, rank: Rank) -> dict:
    """Section 2: the AA step, replicated and sharded side by side, with bytes counted."""
    import torch

    n, m = task["n"], task["m"]
    _warm_up(rank, m)
    layouts = ("replicated", "sharded")
    held = {layout: _wrapper(n, m, layout, rank.device) for layout in layouts}

    def one_step(layout, counted):
        params, opt = held[layout]
        _set_gradients(torch, params)
        rank.barrier()
        COUNTER.active = counted
        start = time.perf_counter()
        opt.step()
        rank.sync()
        elapsed = time.perf_counter() - start
        COUNTER.active = False
        return elapsed

    for _ in range(m + 2):
        for layout in layouts:
            one_step(layout, False)
    times = {layout: [] for layout in layouts}
    counts = {}
    attempts_before = {layout: held[layout][1].stats.aa_attempts for layout in layouts}
    applied_before = {layout: held[layout][1].stats.aa_accepted for layout in layouts}
    fallbacks_before = {layout: held[layout][1].stats.qr_fallbacks for layout in layouts}
    COUNTER.take()
    for index in range(task["repeats"]):
        order = layouts if index % 2 == 0 else layouts[::-1]  # ABBA
        for layout in order:
            times[layout].append(one_step(layout, True))
            got = COUNTER.take()
            total = counts.setdefault(layout, {"calls": {}, "bytes": {}})
            for kind in ("calls", "bytes"):
                for name, value in got[kind].items():
                    total[kind][name] = total[kind].get(name, 0) + value
    out = {}
    for layout in layouts:
        opt = held[layout][1]
        out[layout] = {
            "times": rank.max_over_ranks(times[layout]),
            "counts": counts.get(layout, {"calls": {}, "bytes": {}}),
            "aa_attempts": opt.stats.aa_attempts - attempts_before[layout],
            "aa_applied": opt.stats.aa_accepted - applied_before[layout],
            "qr_fallbacks": opt.stats.qr_fallbacks - fallbacks_before[layout],
            "padded_length": opt._layout.padded_length,
        }
    return out


def predicted_bytes(layout: str, world: int, h: int, padded: int, attempted: bool, fallback: bool,
                    accepted: bool, finite: bool, safeguard: bool, average_full: bool,
                    averaged: bool) -> dict[str, int]:
    """The cost model of docs/distributed.md for one step of AndersonAcceleration (gram
    solver, float32 parameters, P ranks, h columns held): payload bytes per collective."""
    sharded = layout == "sharded" and world > 1
    reduce = gather = small = 0
    if attempted:
        if sharded:
            reduce += 8 * (h * h + h)  # Gram matrix and dR^T r_k, float64, one all-reduce
            if fallback:  # Gram system too ill-conditioned: each rank's (h+1)^2 R factor
                small += world * 8 * (h + 1) ** 2
            reduce += 8  # number of shards with a non-finite candidate entry
        if finite:
            if sharded:
                gather += FLOAT_BYTES * padded  # the candidate's rows to every rank
            if safeguard and world > 1:
                reduce += 16  # the two losses, averaged over ranks (both layouts)
                if not accepted and sharded:
                    gather += FLOAT_BYTES * padded  # back to w_k + r_k
    if average_full and sharded:
        reduce += 24  # max of (spread, reference, max |r_k|), float64
        if averaged:
            gather += FLOAT_BYTES * padded  # the mean's rows to every rank
    return {"all_reduce": reduce, "all_gather_single": gather, "all_gather": small}


def task_aa_model_check(task: dict, rank: Rank) -> dict:
    """Every step's counted bytes against ``predicted_bytes``, with the safeguard (and its
    closure) and the moving average on, so that every term of the model occurs."""
    import torch

    n, m, steps = task["n"], task["m"], task["steps"]
    out = {}
    for layout in ("replicated", "sharded"):
        params, opt = _wrapper(n, m, layout, rank.device, safeguard="loss", average=True,
                               average_threshold=task["threshold"])
        closure = _closure(torch, params)
        measured = {"all_reduce": 0, "all_gather_single": 0, "all_gather": 0}
        predicted = dict(measured)
        other = {}
        before = opt.stats.as_dict()
        for _ in range(steps):
            _set_gradients(torch, params)
            s0 = opt.stats.as_dict()
            COUNTER.take()
            COUNTER.active = True
            opt.step(closure)
            COUNTER.active = False
            got = COUNTER.take()
            s1 = opt.stats.as_dict()
            attempted = s1["aa_attempts"] > s0["aa_attempts"]
            accepted = s1["aa_accepted"] > s0["aa_accepted"]
            finite = not attempted or math.isfinite(s1["last_g_norm"])
            average = opt._average
            step_model = predicted_bytes(
                layout, rank.world, len(opt._history), opt._layout.padded_length, attempted,
                s1["qr_fallbacks"] > s0["qr_fallbacks"], accepted, finite, True, average.full,
                s1["averages_applied"] > s0["averages_applied"],
            )
            for name in predicted:
                predicted[name] += step_model[name]
            for name, value in got["bytes"].items():
                if name in measured:
                    measured[name] += value
                else:
                    other[name] = other.get(name, 0) + value
        after = opt.stats.as_dict()
        out[layout] = {
            "steps": steps,
            "aa_attempts": after["aa_attempts"] - before["aa_attempts"],
            "aa_accepted": after["aa_accepted"] - before["aa_accepted"],
            "averages_applied": after["averages_applied"] - before["averages_applied"],
            "qr_fallbacks": after["qr_fallbacks"] - before["qr_fallbacks"],
            "measured": measured,
            "predicted": predicted,
            "other": other,
        }
        del params, opt
    return out


TASKS = {"train": task_train, "aa_memory": task_aa_memory, "aa_time": task_aa_time, "aa_model": task_aa_model_check}


def worker(task: dict, result_path: str) -> None:
    import torch

    from experiments.world import init_distributed, world_info_from_env

    COUNTER.install()
    torch.set_num_threads(task["threads"])
    context = init_distributed(world_info_from_env(), device=task["device"], timeout_s=120)
    try:
        rank = Rank(context, torch)
        result = TASKS[task["kind"]](task, rank)
        rank.barrier()
    finally:
        context.close()
    if context.rank == 0:
        Path(result_path).write_text(json.dumps(result))


# -- the launcher side --------------------------------------------------------------------


class LaunchError(RuntimeError):
    pass


def launch(task: dict, world: int, threads: int, timeout_s: float, attempts: int = 2,
           env: dict[str, str] | None = None) -> dict:
    """Run ``task`` on ``world`` fresh processes; rank 0's result. A rendezvous that fails
    (another process took the free port in between) is retried once on a new port."""
    from experiments.world import free_port

    for attempt in range(attempts):
        try:
            return _launch_once(task, world, threads, timeout_s, free_port(), env or {})
        except LaunchError as error:
            if attempt + 1 == attempts or "rendezvous" not in str(error):
                raise
            print(f"  (rendezvous failed, retrying on another port: {str(error).splitlines()[0][:160]})")
    raise AssertionError("unreachable")


#: The 1-minute load average at the start of each launch (it still counts the previous
#: launch's ranks for a while): other work on the machine shows up here.
LOADS: list[float] = []


def _load_range() -> str:
    text = f"{min(LOADS):.1f}-{max(LOADS):.1f}" if LOADS else "?"
    LOADS.clear()
    return text


def _launch_once(task: dict, world: int, threads: int, timeout_s: float, port: int, extra_env: dict) -> dict:
    task = dict(task, threads=threads)
    LOADS.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="ddp_step.") as tmp:
        result = Path(tmp) / "result.json"
        procs, logs = [], []
        for rank in range(world):
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo", **extra_env)
            if world > 1:
                env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            log = open(Path(tmp) / f"rank{rank}.log", "w+")
            logs.append(log)
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task), "--result", str(result)]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + timeout_s
        failed = False
        try:
            while True:
                codes = [p.poll() for p in procs]
                if all(code == 0 for code in codes):
                    break
                if any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
                    failed = True  # a rank that failed leaves the others waiting in a collective
                    break
                time.sleep(0.05)
        finally:
            for p in procs:  # only the processes this launch started
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed or not result.is_file():
            texts = []
            for rank, log in enumerate(logs):
                log.seek(0)
                tail = log.read()[-2500:]
                texts.append(f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{tail}")
            raise LaunchError(f"{task['kind']} on {world} process(es) failed:\n" + "\n".join(texts))
        for log in logs:
            log.close()
        return json.loads(result.read_text())


# -- reporting ------------------------------------------------------------------------------


def _median(values) -> float:
    return statistics.median(values) if values else math.nan


def report_training(args) -> None:
    worlds = [1, 2] if args.world2 else [1]
    by_world = {world: {} for world in worlds}
    task = dict(kind="train", device=args.device, data_root=str(args.data_root),
                experiments=args.experiments, warmup=args.warmup, rounds=args.rounds)
    for experiment in args.experiments:  # one experiment per process, as in a run
        for _ in range(args.launches):
            for world in worlds:  # P = 1 and P = 2 launches alternate
                got = launch(dict(task, experiments=[experiment]), world, args.threads, args.timeout)
                for case in got["cases"]:
                    entry = by_world[world].setdefault((case["experiment"], case["label"]), dict(case, times=[]))
                    entry["times"] += case["times"]
                    entry["finite"] = entry["finite"] and case["finite"]

    print(f"\n1. Training iteration, ms (median of {args.rounds * args.launches} blocks of {BLOCK} "
          f"iterations, each the slowest rank's; threads per rank in brackets; load average at "
          f"launch starts {_load_range()})")
    header = (f"{'experiment':<20} {'variant':<14} {'n':>6} | {'P=1':>12} {'P=2':>12} {'P=2/P=1':>8} | "
              f"{'/Adam P=1':>9} {'/Adam P=2':>9} | {'P=2 sharded':>12} {'sh/rep':>7}")
    print(header)
    print("-" * len(header))
    for experiment in args.experiments:
        adam = {w: _median(by_world[w].get((experiment, "Adam"), {}).get("times", [])) for w in worlds}
        for label, _ in METHODS:
            cells = {w: by_world[w].get((experiment, label)) for w in worlds}
            if cells[1] is None:
                continue
            t = {w: _median(cells[w]["times"]) if cells[w] else math.nan for w in worlds}
            t1, t2 = t[1], t.get(2, math.nan)
            sharded = by_world.get(2, {}).get((experiment, f"{label} sharded"))
            ts = _median(sharded["times"]) if sharded else math.nan
            th = {w: cells[w]["threads"] if cells[w] else "-" for w in worlds}

            def ms(value, threads=None):
                text = "-" if math.isnan(value) else f"{value * 1e3:.2f}"
                return f"{text} [{threads}]" if threads is not None and not math.isnan(value) else text

            ratio = lambda a, b: "-" if math.isnan(a) or math.isnan(b) else f"{a / b:.2f}"  # noqa: E731
            flags = "" if all(c is None or c["finite"] for c in cells.values()) else "  (parameters not finite)"
            print(
                f"{experiment:<20} {label:<14} {cells[1]['n']:>6} | {ms(t1, th[1]):>12} "
                f"{ms(t2, th.get(2)):>12} {ratio(t2, t1):>8} | {ratio(t1, adam[1]):>9} "
                f"{ratio(t2, adam.get(2, math.nan)):>9} | {ms(ts):>12} {ratio(ts, t2):>7}{flags}"
            )
    print("P=2/P=1 < 1: two ranks finish an iteration of the same global batch sooner; "
          "sh/rep: sharded over replicated AADL at P=2")


def report_aa(args) -> None:
    import torch

    from aadl import estimate_memory_bytes

    world, m = 2, args.history
    threads = args.threads
    rows = []
    for n in args.sizes:
        timing = launch(dict(kind="aa_time", device=args.device, n=n, m=m, repeats=args.repeats),
                        world, threads, args.timeout)
        memory = {
            layout: launch(dict(kind="aa_memory", device=args.device, n=n, m=m, layout=layout),
                           world, threads, args.timeout, env=MEMORY_ENV)
            for layout in ("replicated", "sharded")
        }
        rows.append((n, timing, memory))

    print(f"\n2. AA step alone at P={world} (AndersonAcceleration(Adam fused), m={m}, p=q=1, "
          f"safeguard none, float32; median of {args.repeats} steps, each the slowest rank's; "
          f"{threads} thread(s) per rank; load average at launch starts {_load_range()})")
    header = (f"{'n':>9} | {'replicated':>10} {'sharded':>10} {'sh/rep':>6} | bytes per AA step: {'replicated':>10} | "
              f"{'sharded: all_reduce':>19} {'all_gather n':>12} {'all_gather R':>12} | {'model':>9} | calls per AA step")
    print(header)
    print("-" * len(header))
    verdicts = []
    for n, timing, _ in rows:
        t = {layout: _median(timing[layout]["times"]) for layout in timing}
        per_step = {}
        for layout, got in timing.items():
            attempts = max(1, got["aa_attempts"])
            per_step[layout] = {
                "bytes": {name: value / attempts for name, value in got["counts"]["bytes"].items()},
                "calls": {name: value / attempts for name, value in got["counts"]["calls"].items()},
            }
        sh = per_step["sharded"]
        padded = timing["sharded"]["padded_length"]
        model = predicted_bytes("sharded", world, m, padded, True, False, True, True, False, False, False)
        calls = ", ".join(f"{name} {value:g}" for name, value in sorted(sh["calls"].items()))
        ratio = t["sharded"] / t["replicated"]
        print(
            f"{n:>9.3g} | {t['replicated'] * 1e3:>8.2f}ms {t['sharded'] * 1e3:>8.2f}ms {ratio:>5.2f}x | "
            f"{'':>19}{sum(per_step['replicated']['bytes'].values()):>10.0f} | "
            f"{sh['bytes'].get('all_reduce', 0):>19.0f} {sh['bytes'].get('all_gather_single', 0):>12.0f} "
            f"{sh['bytes'].get('all_gather', 0):>12.0f} | {model['all_reduce'] + model['all_gather_single']:>9} | {calls}"
        )
        verdicts.append(f"target at P={world}, n={n:.3g}: sharded AA step no slower than replicated: "
                        f"{ratio:.2f}x " + ("met" if ratio <= 1.0 else "NOT met"))
        verdicts.append(f"  ({timing['sharded']['aa_applied']} of {timing['sharded']['aa_attempts']} sharded AA "
                        f"steps applied, {timing['sharded']['qr_fallbacks']} by the QR fallback)")
    print("\n".join(verdicts))
    print(f"model: 8 (m^2 + m) + 8 bytes all-reduced + 4 ceil(n/P) P bytes all-gathered per applied AA step "
          f"(m = h = {m} columns, gram solver); all_gather R: the QR fallback's R factors, when it ran")

    print(f"\n3. Peak memory per rank at P={world} (growth of the resident-set high-water mark, "
          f"max over ranks, one fresh pair of processes per layout; MB = 2^20 bytes)")
    header = (f"{'n':>9} | {'replicated':>10} {'estimate':>9} {'ratio':>6} | {'sharded':>8} {'estimate':>9} "
              f"{'ratio':>6} | {'sh/rep':>6} | {'2mn/P floats':>12} | {'gather transient':>16}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for n, _, memory in rows:
        settings = memory["sharded"]["settings"]
        est = {layout: estimate_memory_bytes(n, torch.float32, settings | {"distributed": layout}, world_size=world)
               for layout in memory}
        peak = {layout: memory[layout]["peak_bytes"] for layout in memory}
        transient = memory["replicated"]["gather_transient_bytes"]
        mb = lambda b: b / 2**20  # noqa: E731
        print(
            f"{n:>9.3g} | {mb(peak['replicated']):>10.1f} {mb(est['replicated']):>9.1f} "
            f"{peak['replicated'] / est['replicated']:>6.3f} | {mb(peak['sharded']):>8.1f} {mb(est['sharded']):>9.1f} "
            f"{peak['sharded'] / est['sharded']:>6.3f} | {peak['sharded'] / peak['replicated']:>6.3f} | "
            f"{mb(2 * m * n / world * FLOAT_BYTES):>12.1f} | {mb(transient):>9.1f} = {transient / (FLOAT_BYTES * n):.2f} n"
        )
        ratio = peak["sharded"] / est["sharded"]
        verdicts.append(
            f"target n={n:.3g}: sharded peak within {MEMORY_TOLERANCE:.0%} of estimate_memory_bytes "
            f"(2m ceil(n/P) + 4 ceil(n/P) + n floats + Gram): {ratio:.3f} "
            + ("met" if ratio <= 1 + MEMORY_TOLERANCE else "NOT met")
            + f"; with the backend's all-gather transient added to the estimate: "
            f"{peak['sharded'] / (est['sharded'] + transient):.3f}"
        )
    print("\n".join(verdicts))
    print("gather transient: peak growth of one bare all-gather of n floats beyond its input and output "
          f"tensors ({'NCCL' if args.device == 'cuda' else 'gloo'}), measured after the replicated run")
    print("estimate: aadl.estimate_memory_bytes(n, float32, settings, world_size=2); "
          "Adam's state and the parameters are not in either column")


def report_model_check(args) -> None:
    world = 2
    n, m = args.check_n, args.history
    got = launch(dict(kind="aa_model", device=args.device, n=n, m=m, steps=args.check_steps, threshold=1e-6),
                 world, args.threads, args.timeout)
    print(f"\nCost-model check at P={world}: counted payload bytes vs docs/distributed.md's formula, "
          f"every step (n={n}, m={m}, p=q=1, safeguard loss with a closure, moving average on)")
    header = (f"{'layout':<10} {'steps':>5} {'AA':>4} {'kept':>4} {'avg':>4} {'qr':>3} | "
              f"{'all_reduce':>10} {'model':>10} | {'all_gather n':>12} {'model':>12} | "
              f"{'all_gather R':>12} {'model':>8} | match")
    print(header)
    print("-" * len(header))
    for layout, r in got.items():
        counted, model = r["measured"], r["predicted"]
        match = counted == model and not r["other"]
        print(
            f"{layout:<10} {r['steps']:>5} {r['aa_attempts']:>4} {r['aa_accepted']:>4} {r['averages_applied']:>4} "
            f"{r['qr_fallbacks']:>3} | {counted['all_reduce']:>10} {model['all_reduce']:>10} | "
            f"{counted['all_gather_single']:>12} {model['all_gather_single']:>12} | "
            f"{counted['all_gather']:>12} {model['all_gather']:>8} | "
            + ("yes" if match else f"NO {r['other'] or ''}")
        )
    print("AA: steps that attempted AA; kept: accepted by the safeguard; avg: moving averages applied; "
          "qr: Gram systems solved by the QR fallback (all_gather R: their R factors)")


def default_data_root() -> Path:
    from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS

    if os.environ.get("AADL_DATA_ROOT"):
        return Path(os.environ["AADL_DATA_ROOT"])
    beside = REPO.parent / "shared" / "data"  # where the tests read it
    return beside if GRADUATE_ADMISSIONS.path(beside).is_file() else REPO / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, n = 1e6 only: under a minute")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 4e6], help="n of the AA-step sections")
    parser.add_argument("--history", type=int, default=20, help="m of the AA-step sections")
    parser.add_argument("--repeats", type=int, default=15, help="timed AA steps per layout")
    parser.add_argument("--rounds", type=int, default=10, help="timed blocks per variant and launch")
    parser.add_argument("--launches", type=int, default=2, help="launches per P in section 1")
    parser.add_argument("--warmup", type=int, default=30, help="training iterations before timing")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument("--data-root", type=Path, default=None, help="default: $AADL_DATA_ROOT, ../shared/data, ./data")
    parser.add_argument("--sections", default="train,aa,check", help="comma-separated: train, aa, check")
    parser.add_argument("--check-n", type=int, default=100_003, help="n of the cost-model check (odd: padding)")
    parser.add_argument("--check-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank where the experiment sets no train.threads (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.result)
        return
    if args.quick:
        args.sizes, args.repeats, args.rounds, args.launches, args.warmup, args.check_steps = [1e6], 5, 2, 1, 20, 25
    args.sizes = [int(n) for n in args.sizes]
    sections = set(args.sections.split(","))

    import torch

    from aadl import kernels
    from experiments.problems.graduate_admissions.data import GRADUATE_ADMISSIONS

    args.data_root = args.data_root or default_data_root()
    if "graduate_admissions" in args.experiments and not GRADUATE_ADMISSIONS.path(args.data_root).is_file():
        print(f"(graduate_admissions left out: no {GRADUATE_ADMISSIONS.path(args.data_root)}; "
              "python -m experiments.data download graduate_admissions, or --data-root)")
        args.experiments = [e for e in args.experiments if e != "graduate_admissions"]
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    args.world2 = True
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 2:
            print(f"(P=2 left out: NCCL needs one GPU per rank and torch sees {gpus})")
            args.world2 = False
            sections -= {"aa", "check"}
    if args.device == "cpu" and 2 * args.threads > cores:
        print(f"(warning: 2 ranks x {args.threads} threads oversubscribe {cores} cores)")
    backend = "nccl" if args.device == "cuda" else "gloo"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    cpu_passes = "numba loops" if kernels.compiled_loops_enabled() else "torch operations"
    print(f"DDP/AA distributed benchmark: torch {torch.__version__}, device {args.device}, backend {backend}, "
          f"{cores} cores, load average {load}, CPU passes: {cpu_passes}" + (", quick" if args.quick else ""))
    started = time.perf_counter()
    if "train" in sections:
        report_training(args)
    if "aa" in sections:
        report_aa(args)
    if "check" in sections:
        report_model_check(args)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n({time.perf_counter() - started:.0f} s; load average now {load})")


if __name__ == "__main__":
    main()
