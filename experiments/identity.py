"""Run identity: which config keys define an experiment, its digest, and its directory.

``config_id`` is a digest of the resolved config minus where-and-how keys (seed, paths,
progress bar, threads, seed batching) and minus the settings of methods the run does not use, plus the
checksums of its input data. Rerunning the same command on the same data finds the same
directory; any change that can change the numbers gives a new one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Keys that say where or how a run is stored or shown, not what it computes; they are left
#: out of the run's identity, so changing them does not make it a different experiment.
#: Seed batching is one of them: a seed trained batched equals its single run (to rounding),
#: so aggregation cannot tell the two apart.
NON_IDENTITY_KEYS = (
    "seed", "data.root", "output.", "checkpoint.", "train.progress", "train.threads",
    "train.batch_seeds", "train.seed_group",
)


#: Settings added after runs were made, at the default that reproduces what those runs
#: computed: left out of the identity at that default, so adding a setting does not orphan
#: the finished runs of every earlier config (any other value is part of the identity).
NEUTRAL_DEFAULTS = {
    "train.precision": "fp32",
    "optimizer.decay_norm_and_bias": True,
    "method.aadl.variant": "contract",
}


def run_identity(resolved: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """The flattened config minus :data:`NON_IDENTITY_KEYS` and the unused methods'
    sections, plus ``data`` (e.g. ``{"data.graduate_admissions.sha256": "..."}``)."""
    method = resolved["method"]["name"]
    flat = flatten(resolved)
    identity = {
        key: value
        for key, value in flat.items()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NON_IDENTITY_KEYS)
        and (not key.startswith("method.") or key == "method.name" or key.startswith(f"method.{method}."))
        and not (key in NEUTRAL_DEFAULTS and value == NEUTRAL_DEFAULTS[key])
    }
    return {**identity, **data}


def config_digest(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def run_path(output_root: str | Path, experiment: str, name: str, variant: str, config_id: str, seed: int) -> Path:
    """``<output.root>/<experiment>/<output.name>/<variant>-<config_id>/seed=<seed>``."""
    return Path(output_root) / experiment / name / f"{variant}-{config_id}" / f"seed={seed}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
