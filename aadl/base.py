"""What every Anderson acceleration wrapper of this library shares.

The contract's wrapper (``aadl.optimizer``), the authors' variant (``aadl.reference_variant``)
and the seed-batched wrapper (``aadl.batched``) are siblings under :class:`AccelerationBase`:
each owns its buffers, its step and its state format, and this module owns what must not
differ between them: which base optimizers can be wrapped (checked before anything is
allocated), the validation of the settings, the shared parameter groups, the counters, and
the first checks of ``load_state_dict`` (keys, format, variant, every parameter's shape).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from .checkpoint import format_error, shape_mismatch
from .hyperparameters import AndersonSettings, validate_settings, variant_of
from .wrapper import OptimizerWrapper


@dataclasses.dataclass
class AccelerationStats:
    """Counters for logging; ``as_dict()`` is what the experiment harness writes."""

    steps: int = 0
    aa_attempts: int = 0
    aa_accepted: int = 0
    averages_applied: int = 0
    qr_fallbacks: int = 0  # gram systems too ill-conditioned, solved by QR instead
    last_g_norm: float = math.nan
    last_condition: float = math.nan  # 2-norm condition number of [dR; sqrt(lam) I]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STATS_FIELDS = tuple(f.name for f in dataclasses.fields(AccelerationStats))

# Base optimizer -> the live wrapper stepping it. Weak on both sides, so that a wrapper that
# is gone (deleted, or a failed experiment's) never blocks wrapping its base again.
_WRAPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _needs_closure(optimizer: Optimizer) -> bool:
    """Whether the optimizer's ``step`` cannot be called without a closure (LBFGS)."""
    try:
        parameter = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def check_base_optimizer(optimizer: Any, wrapper: str) -> None:
    """Refuse, in one line, a base optimizer that ``wrapper`` cannot step: not an optimizer,
    another AA wrapper, one whose step needs a closure, or one a live wrapper already steps."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{wrapper} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, AccelerationBase):
        raise TypeError(f"{wrapper} cannot wrap another Anderson acceleration wrapper ({type(optimizer).__name__})")
    name = type(optimizer).__name__
    if _needs_closure(optimizer):
        raise TypeError(
            f"{wrapper}: {name} cannot be wrapped: its step() needs a closure that re-evaluates the "
            f"loss and its gradient (a line search), while {wrapper} takes the base step without "
            "one and calls its own closure for the loss only, under torch.no_grad(); use a "
            "first-order optimizer (SGD, Adam, AdamW, ...)"
        )
    holder = _WRAPPED.get(optimizer)
    other = holder() if holder is not None else None
    if other is not None:
        raise ValueError(
            f"{wrapper}: this {name} is already wrapped by a live {type(other).__name__}; two "
            "wrappers would each take its step and keep two histories of the same parameters: "
            "wrap a base optimizer once (or delete the other wrapper first)"
        )


class AccelerationBase(OptimizerWrapper):
    """The shared part of the library's AA wrappers (module docstring).

    A subclass's constructor calls :meth:`_start` first (checks, validation, the shared
    groups), allocates its buffers, then calls :meth:`_claim` (from then on the base
    optimizer counts as wrapped)."""

    _name: ClassVar[str] = "AndersonAcceleration"  # how messages name the wrapper
    settings: AndersonSettings

    def _start(self, optimizer: Optimizer, settings: dict[str, Any]) -> None:
        """Check the base optimizer and the settings before a single buffer exists."""
        check_base_optimizer(optimizer, self._name)
        self.settings = validate_settings(**settings)
        unsupported = self._unsupported(self.settings)
        if unsupported:
            raise ValueError(f"{self._name}: {unsupported}")
        self._wrap(optimizer)  # param_groups, state and defaults stay the base optimizer's
        self._warned_no_closure = False
        self._closure_error: BaseException | None = None  # raised once the step is complete

    def _claim(self) -> None:
        _WRAPPED[self.optimizer] = weakref.ref(self)

    @staticmethod
    def _unsupported(settings: AndersonSettings) -> str | None:
        """Why this wrapper cannot run these (valid) settings, or None."""
        return None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_closure_error", None)  # pickled by an older aadl

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._sync_parameters()

    def _sync_parameters(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def _trainable_parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def parameter_shapes(self) -> list[list[int]]:
        """Every trainable parameter's shape, in order: saved with the state and compared
        on load, since equal total sizes do not make equal layouts."""
        return [list(p.shape) for p in self._trainable_parameters()]

    @property
    def _dr_weight(self) -> float:
        """The weight c of dR in X = dW + c dR (see aadl.history)."""
        return self.settings.relaxation if self.settings.mixing == "walker_ni" else 1.0

    def _mean_over_ranks(self, *losses: Any) -> list[float]:
        layout = self._layout
        if layout.world_size == 1:
            return [float(loss) for loss in losses]
        values = torch.tensor([float(loss) for loss in losses], dtype=torch.float64, device=layout.device)
        layout.sum_over_ranks(values)
        values /= layout.world_size
        return values.tolist()

    # -- checkpointing -----------------------------------------------------------------

    def _saved_part(self, state_dict: Any, key: str = "anderson") -> dict:
        """The wrapper's part of a checkpoint after the checks every single-process wrapper
        shares (top-level keys, format, variant); ValueError naming what is wrong."""
        where = f"{self._name}.load_state_dict"
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", key}:
            got = f"; got keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else ""
            raise ValueError(
                f"{where} expects a dict with keys 'base' and '{key}' (from {self._name}.state_dict()); "
                f"to load a plain optimizer's state use .optimizer.load_state_dict(){got}"
            )
        saved = state_dict[key]
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: '{key}' is not a dict")
        unreadable = format_error(saved)
        if unreadable:
            raise ValueError(unreadable)
        saved_variant = variant_of(saved.get("settings"))
        if saved_variant != self.settings.variant:
            raise ValueError(
                f"{where}: the checkpoint was saved with variant={saved_variant!r}, this optimizer "
                f"has variant={self.settings.variant!r}"
            )
        return saved

    def _check_shapes(self, saved: dict) -> None:
        """Refuse a checkpoint whose parameters have other shapes than these (a state of
        the same total size loaded into permuted parameters would fail later, in the base
        optimizer, or train on silently misplaced moments)."""
        mismatch = shape_mismatch(self.parameter_shapes(), saved.get("shapes"))
        if mismatch:
            raise ValueError(f"{self._name}.load_state_dict: {mismatch}")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.as_dict().items())
        layout = self._layout
        where = f", ranks={layout.world_size}" if layout.world_size > 1 else ""
        return f"{self._name}({type(self.optimizer).__name__}, n={layout.n}{where}, {settings})"
