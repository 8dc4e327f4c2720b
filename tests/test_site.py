"""experiments.site: the site files, their checks and the shell form batch scripts eval."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.errors import ConfigError
from experiments.site import Site, load_site, site_names

REPO = Path(__file__).resolve().parent.parent


def test_every_site_file_loads_with_its_documented_geometry():
    assert {"local", "generic_slurm", "frontier", "perlmutter", "summit"} <= set(site_names())
    frontier, perlmutter, summit = load_site("frontier"), load_site("perlmutter"), load_site("summit")
    assert (frontier.scheduler, frontier.gpus_per_node, frontier.cpus_per_task, frontier.gpu_bind) == ("slurm", 8, 7, "closest")
    assert (perlmutter.scheduler, perlmutter.gpus_per_node, perlmutter.gpu_bind) == ("slurm", 4, "closest")
    assert "--constraint=gpu" in perlmutter.extra
    assert (summit.scheduler, summit.gpus_per_node, summit.cpus_per_node) == ("lsf", 6, 42)
    assert load_site("local").scratch is None


def test_name_from_argument_then_environment_then_local(monkeypatch):
    monkeypatch.delenv("AADL_SITE", raising=False)
    assert load_site().name == "local"
    monkeypatch.setenv("AADL_SITE", "summit")
    assert load_site().name == "summit"
    assert load_site("frontier").name == "frontier"


@pytest.mark.parametrize("text, key", [
    ("scheduler: pbs\n", "scheduler"),
    ("gpus_per_node: -1\n", "gpus_per_node"),
    ("cpus_per_task: 0\n", "cpus_per_task"),
    ("time: 2:00:00\n", "time"),           # unquoted: YAML 1.1 reads 7200
    ("time: '2h'\n", "time"),
    ("partitoin: gpu\n", "partitoin"),
    ("setup: module load x\n", "setup"),
])
def test_bad_site_values_are_one_line_errors_naming_the_key(tmp_path, monkeypatch, text, key):
    monkeypatch.setattr("experiments.site.SITE_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_site("bad")
    message = str(error.value)
    assert "\n" not in message and key in message, message


def test_unknown_site_names_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'frontier'"):
        load_site("frontir")


def test_shell_form_round_trips_through_bash(tmp_path):
    env = {**os.environ, "SCRATCH": str(tmp_path / "scratch dir")}
    script = ('eval "$("$0" -m experiments.site perlmutter --shell)"; eval "extra=($SITE_EXTRA)"; '
              'printf "%s|" "$SITE_SCRATCH" "$SITE_GPUS_PER_NODE" "$SITE_QOS" "${extra[0]}" "$SITE_TIME_MINUTES" "$SITE_SETUP"')
    out = subprocess.run(["bash", "-c", script, sys.executable], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("|")[:6] == [str(tmp_path / "scratch dir" / "aadl"), "4", "regular", "--constraint=gpu", "120", "module load pytorch"]


def test_unset_scratch_variable_is_refused_not_created(monkeypatch):
    monkeypatch.delenv("SCRATCH", raising=False)
    result = subprocess.run([sys.executable, "-m", "experiments.site", "perlmutter", "--shell"], cwd=REPO,
                            env={k: v for k, v in os.environ.items() if k != "SCRATCH"}, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "$SCRATCH" in result.stderr


def test_time_helpers():
    site = Site(name="x", time="1:30:01")
    assert (site.time_seconds, site.time_minutes) == (5401, 91)


def launcher(monkeypatch, name: str, site: str):
    from omegaconf import OmegaConf

    from experiments.compose import compose

    monkeypatch.setenv("AADL_SITE", site)
    cfg = compose(f"hydra/launcher={name}", return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_submitit_presets_read_the_site_not_srun_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    monkeypatch.setenv("SLURM_PARTITION", "ignored")  # srun's own input variable: not read any more
    gpu = launcher(monkeypatch, "slurm_gpu", "perlmutter")
    assert (gpu["partition"], gpu["qos"], gpu["timeout_min"], gpu["gpus_per_node"], gpu["tasks_per_node"], gpu["cpus_per_task"]) == \
        (None, "regular", 120, 4, 4, 32)
    assert gpu["setup"] == ["module load pytorch"]
    assert gpu["additional_parameters"] == {"constraint": "gpu", "gpu_bind": "closest"}
    cpu = launcher(monkeypatch, "slurm_cpu", "local")
    assert (cpu["partition"], cpu["account"], cpu["timeout_min"], cpu["cpus_per_task"]) == (None, None, 60, 1)
    frontier = launcher(monkeypatch, "slurm_gpu", "frontier")
    assert (frontier["partition"], frontier["gpus_per_node"], frontier["cpus_per_task"]) == ("batch", 8, 7)
