"""One description of the cluster a campaign runs on: ``configs/site/<name>.yaml``.

Account, partition, qos, module loads, GPUs per node, the scratch root and the default time
limit are properties of a site, not of a script: the batch scripts (``slurm/``, ``lsf/``),
the submitit launcher configs (``configs/hydra/launcher/``) and the workflow profiles all
read them here, so they cannot disagree and a user edits one file per cluster.

The site's name comes from the argument, else ``$AADL_SITE``, else ``local``. A batch
script takes the values as shell variables::

    eval "$(python -m experiments.site "$SITE" --shell)"   # SITE_PARTITION=... SITE_TIME=...

Only the standard library, PyYAML (which omegaconf brings) and experiments.errors are
imported: a submitter on a login node calls this before anything heavy.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import string
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from experiments.errors import ConfigError, did_you_mean

SITE_DIR = Path(__file__).resolve().parent.parent / "configs" / "site"
DEFAULT_SITE = "local"
SCHEDULERS = ("local", "slurm", "lsf")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")


@dataclass(frozen=True)
class Site:
    """A cluster's settings; every field is one key of the site file (the table in
    docs/clusters.md says what each one feeds)."""

    name: str
    scheduler: str = "local"              # local | slurm | lsf
    account: str | None = None            # sbatch --account / bsub -P
    partition: str | None = None          # sbatch --partition (LSF: bsub -q)
    qos: str | None = None                # sbatch --qos
    setup: tuple[str, ...] = ()           # shell lines a batch script runs first (module load ...)
    gpus_per_node: int = 0                # GPUs (GPU dies, GCDs) per node
    cpus_per_task: int = 1                # CPUs per task: a seed-array element's workers, a DDP rank's threads
    cpus_per_node: int | None = None      # usable cores per node (LSF packing; checks)
    gpu_bind: str | None = None           # srun/sbatch --gpu-bind (e.g. closest)
    scratch: str | None = None            # root of logs and runs ($VARS expanded), else the repo
    time: str = "01:00:00"                # default time limit, HH:MM:SS
    extra: tuple[str, ...] = ()           # raw scheduler options (-C gpu, -alloc_flags smt4, ...)

    def __post_init__(self) -> None:
        key = f"site {self.name!r}"
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"{key}: scheduler", f"one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        for name in ("gpus_per_node", "cpus_per_task", "cpus_per_node"):
            value = getattr(self, name)
            low = 0 if name == "gpus_per_node" else 1
            if value is None and name == "cpus_per_node":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key}: {name}", f"an integer >= {low}, got {value!r}")
        if not _TIME.match(str(self.time)):
            raise ConfigError(f"{key}: time", f"a limit as HH:MM:SS (e.g. 02:00:00), got {self.time!r}")
        for name in ("account", "partition", "qos", "gpu_bind", "scratch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{key}: {name}", f"a non-empty string or null, got {value!r}")

    @property
    def time_seconds(self) -> int:
        hours, minutes, seconds = (int(part) for part in _TIME.match(self.time).groups())
        return hours * 3600 + minutes * 60 + seconds

    @property
    def time_minutes(self) -> int:
        """The limit in whole minutes, rounded up (bsub -W, submitit's timeout_min)."""
        return -(-self.time_seconds // 60)

    def scratch_path(self) -> Path | None:
        """The scratch root with its ``$VARS`` expanded; a one-line error names a variable
        that is not set (a literal ``$SCRATCH`` folder would be created otherwise)."""
        if self.scratch is None:
            return None
        unset = [name for name in _variables(self.scratch) if name not in os.environ]
        if unset:
            raise ConfigError(f"site {self.name!r}: scratch",
                              f"{self.scratch!r} uses ${unset[0]}, which is not set here; set it, or edit scratch in configs/site/{self.name}.yaml")
        return Path(os.path.expanduser(os.path.expandvars(self.scratch)))

    def shell(self) -> str:
        """``SITE_<FIELD>=value`` lines, shell-quoted, for a batch script to ``eval``. Lists
        become one value: setup's lines joined by newlines; extra's words each shell-quoted
        and joined by spaces (``eval "extra=($SITE_EXTRA)"`` splits them back). Null is
        empty; scratch is expanded; SITE_TIME_MINUTES is the limit for ``bsub -W``."""
        values: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "setup":
                value = "\n".join(value)
            elif field.name == "extra":
                value = " ".join(shlex.quote(word) for word in value)
            elif field.name == "scratch":
                scratch = self.scratch_path()
                value = "" if scratch is None else str(scratch)
            values[field.name] = "" if value is None else str(value)
        values["time_minutes"] = str(self.time_minutes)
        return "\n".join(f"SITE_{name.upper()}={shlex.quote(value)}" for name, value in values.items())


def _variables(text: str) -> list[str]:
    names = []
    for _, named, braced, _ in string.Template.pattern.findall(text.replace("$$", "")):
        if named or braced:
            names.append(named or braced)
    return names


def site_names() -> list[str]:
    return sorted(path.stem for path in SITE_DIR.glob("*.yaml"))


def site_path(name: str) -> Path:
    if not _NAME.match(name):
        raise ConfigError("site", f"a name of letters, digits, '_', '-', '.' (a file configs/site/<name>.yaml), got {name!r}")
    path = SITE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = site_names()
        raise ConfigError("site", f"no configs/site/{name}.yaml{did_you_mean(name, known)}; known sites: {', '.join(known)}")
    return path


def load_site(name: str | None = None) -> Site:
    """The site ``name`` (else ``$AADL_SITE``, else ``local``) from configs/site/<name>.yaml;
    a bad file or value raises a one-line :class:`ConfigError` naming the key."""
    name = name or os.environ.get("AADL_SITE") or DEFAULT_SITE
    path = site_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"site {name!r}", f"configs/site/{name}.yaml is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site {name!r}", f"configs/site/{name}.yaml must be a mapping of keys, got {type(data).__name__}")
    known = [field.name for field in fields(Site) if field.name != "name"]
    for key in data:
        if key not in known:
            raise ConfigError(f"site {name!r}: {key}", f"unknown key{did_you_mean(str(key), known)}; valid keys: {', '.join(known)}")
    for key in ("setup", "extra"):
        value = data.get(key)
        if value is None:
            data[key] = ()
        elif isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
            data[key] = tuple(str(item) for item in value)
        else:
            raise ConfigError(f"site {name!r}: {key}", f"a list of strings, got {value!r}")
    if "time" in data and not isinstance(data["time"], str):
        # YAML reads 02:00:00 unquoted as sexagesimal 7200: say how to write it.
        raise ConfigError(f"site {name!r}: time", f"a quoted \"HH:MM:SS\" string, got {data['time']!r}")
    return Site(name=name, **data)


def sbatch_parameters(site: Site) -> dict[str, str]:
    """The site's raw options (``--constraint=gpu``) and ``gpu_bind`` as submitit's
    ``additional_parameters`` ({"constraint": "gpu", "gpu_bind": "closest"})."""
    found: dict[str, str] = {}
    for word in site.extra:
        key, _, value = word.lstrip("-").partition("=")
        if not word.startswith("--") or not key:
            raise ConfigError(f"site {site.name!r}: extra", f"submitit takes --key=value options only, got {word!r}")
        found[key.replace("-", "_")] = value or True
    if site.gpu_bind:
        found["gpu_bind"] = site.gpu_bind
    return found


def site_value(key: str) -> Any:
    """``${site:<key>}`` in a config: a field of the site ``$AADL_SITE`` names (the Hydra
    launcher presets read partition, account, time and GPUs here); ``time_minutes``,
    ``setup`` (a list, submitit's) and ``sbatch_parameters`` are derived."""
    site = load_site()
    if key == "time_minutes":
        return site.time_minutes
    if key == "sbatch_parameters":
        return sbatch_parameters(site)
    if key in ("setup", "extra"):
        return list(getattr(site, key))
    if key not in {field.name for field in fields(Site)}:
        raise ConfigError(f"${{site:{key}}}", f"one of {', '.join(field.name for field in fields(Site))}, time_minutes, sbatch_parameters")
    return getattr(site, key)


def register_resolver() -> None:
    """Make ``${site:<key>}`` resolvable (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("site"):
        OmegaConf.register_new_resolver("site", site_value, use_cache=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help=f"a site of configs/site/ (default: $AADL_SITE, else {DEFAULT_SITE})")
    parser.add_argument("--shell", action="store_true", help="print SITE_<FIELD>=value lines for eval")
    parser.add_argument("--list", action="store_true", help="list the known sites")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(site_names()))
        return 0
    try:
        site = load_site(args.name)
        text = site.shell()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.shell:
        print(text)
    else:
        for field in fields(site):
            print(f"{field.name}: {getattr(site, field.name)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
