"""Composing the harness's config outside the command line (the demo, benchmarks, tests).

``compose(*overrides)`` gives the config ``python -m experiments.run <overrides>`` would
run; :func:`expand_sweep` lists the jobs a multirun would launch, so a whole sweep can be
checked before any of it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

import experiments.schema  # noqa: F401  (registers run_schema with Hydra's ConfigStore)
from experiments.site import register_resolver as register_site_resolver

register_site_resolver()  # ${site:...} in configs/hydra/launcher/ (the site file's values)

#: The Hydra config tree of ``python -m experiments.run``.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAME = "config"


def register_settings_nodes() -> None:
    """Store the methods' and problems' settings nodes in Hydra's ConfigStore (what
    ``configs/config.yaml`` composes into ``method`` and ``problem``), including any
    registered since the last call."""
    from experiments.methods import register_settings_node
    from experiments.problems import register_settings_nodes as register_problem_nodes

    register_settings_node()
    register_problem_nodes()


def compose(*overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The config of one job. A sweep (``a=1,2``) is not expanded here: see :func:`expand_sweep`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_settings_nodes()
    if GlobalHydra.instance().is_initialized():  # inside a running Hydra app (a callback)
        return hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)


def sweep_overrides(overrides: Sequence[str]) -> list[list[str]]:
    """The override lists of the jobs ``python -m experiments.run -m <overrides>`` runs, in
    launch order: the command line's sweeps and those of its presets (``hydra.sweeper.params``,
    e.g. ``+paper=fig1``'s variants and seeds), the command line winning, as Hydra's basic
    sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(list(overrides))
    fixed = [override.input_line for override in given if not override.is_sweep_override()]
    params = compose(*fixed, return_hydra_config=True).hydra.sweeper.params or {}
    given_keys = {override.key_or_group for override in given}
    preset = [f"{key}={value}" for key, value in params.items() if key not in given_keys]
    parsed = parser.parse_overrides(preset) + given
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job for batch in batches for job in batch]


def expand_sweep(overrides: Sequence[str]) -> list[DictConfig]:
    """The composed config of every job of the multirun ``overrides`` describe."""
    return [compose(*job) for job in sweep_overrides(overrides)]


def preset_sweep(preset: str) -> dict[str, list[str]]:
    """The values a paper preset (``configs/paper/<preset>.yaml``) sweeps, in its order:
    ``preset_sweep("fig2")["method"] == ["aadl_ma", "aadl", "none"]``, ``["seed"]`` the
    seeds as text."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose(f"+paper={preset}", return_hydra_config=True).hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    return {o.key_or_group: list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()] for o in parsed}
