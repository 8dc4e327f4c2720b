"""Learning rates that depend on the global batch, which is known only once the launcher
has said how many ranks there are.

The configs write them as OmegaConf resolvers, resolved when a run is validated (on every
rank, with the launcher's world size, experiments.world), so the number itself is what
the run's config.yaml and identity hold:

    optimizer.lr: ${scaled_lr:0.1,128,${problem.local_batch}}   # linear scaling rule
    optimizer.lr: ${fig4_lr:${problem.local_batch}}              # the paper's Fig. 4 rule

``scaled_lr`` is Goyal et al.'s linear scaling rule: ``base_lr`` at ``base_batch``, times
global batch / ``base_batch``. ``fig4_lr`` is this project's rule for ResNet-50 on
ImageNet: the paper gives only two post-warm-up rates, 0.98 at 384 ranks and 1.96 at
1,536 (local batch 64, global batches 24,576 and 98,304); other global batches get the
straight line through those two points (docs/images.md).

Only the standard library and omegaconf are imported: schema and validation code load this.
"""

from __future__ import annotations

from omegaconf import OmegaConf

#: The paper's Fig. 4 post-warm-up rates by global batch (384 and 1,536 ranks of 64).
FIG4_POINTS = ((384 * 64, 0.98), (1536 * 64, 1.96))


def world_size() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    from experiments.world import world_info_from_env

    return world_info_from_env().world_size


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return value


def scaled_lr(base_lr: float, base_batch: int, local_batch: int, ranks: int | None = None) -> float:
    """``base_lr * global batch / base_batch``, the global batch being ``local_batch`` times
    the world size (``ranks``, default: the launcher's)."""
    ranks = world_size() if ranks is None else ranks
    # local_batch is not checked here: problem.<...> checks it and names its key.
    _positive("base_lr", base_lr), _positive("base_batch", base_batch)
    return float(base_lr) * local_batch * ranks / base_batch


def fig4_lr(local_batch: int, ranks: int | None = None) -> float:
    """The post-warm-up rate of the paper's Fig. 4 at this global batch: the paper's own
    value at 384 and 1,536 ranks of 64 images, the line through them elsewhere."""
    ranks = world_size() if ranks is None else ranks
    (b0, lr0), (b1, lr1) = FIG4_POINTS
    batch = local_batch * ranks
    return lr0 + (lr1 - lr0) * (batch - b0) / (b1 - b0)


RESOLVERS = {"scaled_lr": scaled_lr, "fig4_lr": fig4_lr}


def register_resolvers() -> None:
    """Make ``${scaled_lr:...}`` and ``${fig4_lr:...}`` resolvable (idempotent). Not
    cached: the world size is read each time a config is resolved."""
    for name, rule in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, rule, use_cache=False)
