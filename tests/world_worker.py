"""One rank of a real launch for tests/test_world.py (run by torchrun or mpirun).

    python tests/world_worker.py OUT_DIR [--no-mpi4py]

Starts the world with experiments.world.init_distributed (gloo, CPU), does one
all_reduce and all_gather, and writes what it saw to OUT_DIR/rank<R>.json; everything it
prints goes to OUT_DIR/rank<R>.log, so that a failed launch says which rank broke.
``--no-mpi4py`` makes mpi4py unimportable, to exercise the fallback without MPI.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    out_dir = Path(sys.argv[1])
    if "--no-mpi4py" in sys.argv[2:]:
        sys.modules["mpi4py"] = None  # `import mpi4py` now raises ImportError

    from experiments.world import default_threads, init_distributed, world_info_from_env

    info = world_info_from_env()
    log = open(out_dir / f"rank{info.rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(default_threads(info))
    with init_distributed(info, device="cpu", timeout_s=60) as ctx:
        total = torch.tensor([float(ctx.rank + 1)])
        dist.all_reduce(total)
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, ctx.rank)
        result = {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "local_rank": ctx.local_rank,
            "local_world_size": ctx.local_world_size,
            "launcher": ctx.launcher,
            "backend": ctx.backend,
            "device": str(ctx.device),
            "is_main": ctx.is_main,
            "master_addr": ctx.master_addr,
            "master_port": ctx.master_port,
            "addr_from": ctx.rendezvous.addr_from,
            "port_from": ctx.rendezvous.port_from,
            "hosts": list(ctx.hosts),
            "all_reduce": total.item(),
            "all_gather": ranks,
            "threads": torch.get_num_threads(),
            "mpi4py_loaded": sys.modules.get("mpi4py.MPI") is not None,
            "env": {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")},
        }
        print(f"rank {ctx.rank}: {result}", flush=True)
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result))
    print(f"rank {info.rank}: process group destroyed", flush=True)
    # Skip interpreter finalisation (gloo's threads can abort it, pytorch/pytorch#179291),
    # but finalise MPI first: mpirun fails a job whose ranks exit without MPI_Finalize.
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and not mpi.Is_finalized():
        mpi.Finalize()
    log.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
