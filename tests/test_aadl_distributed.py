"""Two real processes on gloo: replicated and sharded AA equal one full-batch process."""

import faulthandler
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aadl import AndersonAcceleration, estimate_memory_bytes

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 12
CASES = {
    "replicated average": dict(distributed="replicated", average=True, average_threshold=1e-4),
    "sharded average": dict(distributed="sharded", average=True, average_threshold=1e-4),
    "sharded qr beta0.5": dict(distributed="sharded", solver="qr", relaxation=0.5),
}


def full_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    y[32:] += 2.0 * x[32:, :1]  # the two halves differ, so ranks see different losses
    return x, y


def run(settings, rank=0, world=1):
    """Train on this rank's half of the batch (the whole batch when world == 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)
    ).double()  # n = 92: odd shard boundaries inside a weight matrix
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    x, y = full_batch()
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    x, y = x[rows], y[rows]
    opt = AndersonAcceleration(
        torch.optim.Adam(model.parameters(), lr=0.05), history=4, **settings
    )
    accepted, local_losses = [], []
    for _ in range(STEPS):
        loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
        calls = []

        def closure():
            value = loss_fn()
            calls.append(float(value))
            return value

        opt.zero_grad()
        loss_fn().backward()
        before = opt.stats.aa_accepted
        opt.step(closure)
        accepted.append(opt.stats.aa_accepted > before)
        local_losses.append(calls)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "params": params,
        "accepted": accepted,
        "local_losses": local_losses,
        "stats": opt.stats.as_dict(),
        "history_rows": opt._history.X.shape[1],
        "allocated_bytes": _allocated_bytes(opt),
        "estimated_bytes": estimate_memory_bytes(92, 8, opt.settings, world_size=world),
    }


def _allocated_bytes(opt):
    history = opt._history
    tensors = [*opt._pool, history.X, history.dR, history.gram, history.stored_dots]
    tensors += [t for t in (opt._full, opt._average and opt._average.buffer) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


class CandidateFailure(Exception):
    pass


def run_failing_candidate(mode, rank=0, world=1):
    """Three steps, then one whose closure fails at the AA point on the ranks in ``mode``
    ("all", "rank1") or returns +inf there ("reject": every rank rejects), then two more.
    Returns the parameters after the failing step and at the end."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)).double()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    x, y = full_batch()
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    x, y = x[rows], y[rows]
    # Averaging too: its max-reduction over shards is a collective the failing ranks must join.
    opt = AndersonAcceleration(
        torch.optim.Adam(model.parameters(), lr=0.05), history=4, distributed="sharded",
        average=True, average_window=2, average_threshold=1e-6,
    )
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    fails = mode == "all" or (mode == "rank1" and rank == 1)
    params, raised = [], False
    for k in range(6):
        calls = []

        def closure():
            calls.append(1)
            if k == 3 and len(calls) == 2:
                if fails:
                    raise CandidateFailure
                return torch.tensor(math.inf, dtype=torch.float64)
            return loss_fn()

        opt.zero_grad()
        loss_fn().backward()
        try:
            opt.step(closure)
        except CandidateFailure:
            raised = True
        if k in (3, 5):
            params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return {"params": params, "raised": raised, "stats": opt.stats.as_dict()}


FAILURES = ("reject", "all", "rank1")


def _worker(rank, init_file, out_dir):
    # Everything this rank prints, C++ aborts and fatal-signal tracebacks included, goes to
    # its own log, so that a crash in CI says where it happened.
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    # Loopback for gloo's pairs: the rendezvous must not depend on what the host name
    # resolves to on the test machine.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {name: run(settings, rank, WORLD) for name, settings in CASES.items()}
        results["failures"] = {mode: run_failing_candidate(mode, rank, WORLD) for mode in FAILURES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        print(f"rank {rank}: results written", flush=True)
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)
    # Skip interpreter finalisation: gloo's threads can still hold tensors then, and
    # tearing them down without the GIL aborts the process (pytorch/pytorch#179291).
    # Everything the test needs is on disk by now.
    log.flush()
    os._exit(0)


def _logs(out_dir: Path) -> str:
    parts = []
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log written)"
        parts.append(f"--- rank {rank} log (last 3000 characters) ---\n{text[-3000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    context = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):  # a rank stuck in a collective must not hang CI
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                pytest.fail(f"distributed workers did not finish within 180 s (a collective mismatch?)\n{_logs(tmp)}")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as error:
        pytest.fail(f"a distributed worker failed: {error}\n{_logs(tmp)}")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_ranks_match_a_single_full_batch_process(distributed_results, case):
    single = run(CASES[case])
    for rank_results in distributed_results:
        got = rank_results[case]
        assert torch.allclose(got["params"], single["params"], rtol=1e-6, atol=1e-9)
        assert got["accepted"] == single["accepted"]
        assert got["stats"]["aa_attempts"] == single["stats"]["aa_attempts"] == STEPS - 1
    assert single["stats"]["aa_accepted"] > 0
    # DDP never re-synchronises parameters, so AA must leave them identical on all ranks.
    assert torch.equal(distributed_results[0][case]["params"], distributed_results[1][case]["params"])


def test_sharded_ranks_hold_half_of_the_history(distributed_results):
    n = 92
    assert distributed_results[0]["sharded average"]["history_rows"] == math.ceil(n / WORLD)
    assert distributed_results[0]["replicated average"]["history_rows"] == n


@pytest.mark.parametrize("case", CASES)
def test_safeguard_decides_alike_on_all_ranks_where_local_losses_disagree(distributed_results, case):
    r0, r1 = (results[case] for results in distributed_results)
    assert r0["accepted"] == r1["accepted"]
    local_votes = [
        [losses[1] < losses[0] if len(losses) == 2 else None for losses in r["local_losses"]]
        for r in (r0, r1)
    ]
    # The test has teeth: on some step the ranks' own losses pointed different ways.
    assert any(a != b for a, b in zip(*local_votes))


@pytest.mark.parametrize("case", CASES)
def test_estimate_matches_the_buffers_of_each_rank(distributed_results, case):
    for rank_results in distributed_results:
        got = rank_results[case]
        assert got["allocated_bytes"] == got["estimated_bytes"]


@pytest.mark.parametrize("mode", ["all", "rank1"])
def test_closure_failing_at_the_aa_point_restores_the_plain_step_on_every_rank(distributed_results, mode):
    """The failing ranks join the others' collectives for a rejected candidate: no rank
    hangs, and every rank ends where a rejection would have left it."""
    rejected = [results["failures"]["reject"] for results in distributed_results]
    failed = [results["failures"][mode] for results in distributed_results]
    assert [r["raised"] for r in failed] == ([True, True] if mode == "all" else [False, True])
    for rank in range(WORLD):
        for got, expected in zip(failed[rank]["params"], rejected[rank]["params"]):
            assert torch.equal(got, expected)
        assert failed[rank]["stats"] == rejected[rank]["stats"]
    assert torch.equal(failed[0]["params"][-1], failed[1]["params"][-1])
    assert failed[0]["stats"]["averages_applied"] > 0
