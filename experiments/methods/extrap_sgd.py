"""Extrapolated SGD (``method=extrap_sgd``): Lin, Kong, Stich and Jaggi, "Extrapolation for
large-batch training in deep learning" (ICML 2020).

Each step, every worker moves from the current parameters w to an extrapolated point
u = w - gamma~ * eps of its own, takes the gradient at u, the gradients at u are averaged
over the workers, w is put back and the base optimizer (SGD with Nesterov momentum in the
paper) takes its usual step from w with that averaged gradient. gamma~ = rho * the current
learning rate of each parameter group. ``perturbation`` says what eps is:

- "gradient": the worker's own gradient at w on its part of the batch (EXTRAP-SGD, a local
  extragradient step; one more gradient per step, taken without the all-reduce);
- "previous": the previous step's averaged gradient (extrapolation from the past; no extra
  gradient; zero at the first step);
- "gaussian": Gaussian noise of standard deviation ``noise_std``, drawn from a generator of
  the optimizer's own (seeded from the run's seed and the rank, checkpointed with it).

The extrapolation only moves the parameters for the gradient at u: the base optimizer's
state (momentum buffers) sees nothing but that gradient, so rho = 0 is the base optimizer
bit for bit. docs/methods.md ("EXTRAP-SGD") explains the defaults and what is this
project's choice rather than the paper's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import Optimizer

from aadl.wrapper import OptimizerWrapper
from experiments.errors import require
from experiments.methods.base import Method
from experiments.ranges import check_reals

PERTURBATIONS = ("gradient", "previous", "gaussian")
STATE_FORMAT = 1


@dataclass
class ExtrapolationSettings:
    """``method.extrap_sgd``: what eps is and how far the extrapolation goes."""

    perturbation: str = "gradient"  # one of PERTURBATIONS
    # gamma~ = rho x the current learning rate. 1.0: the extragradient method's equal step
    # sizes (docs/methods.md says why this is the default).
    rho: float = 1.0
    # Standard deviation of the "gaussian" perturbation, per coordinate, before the
    # gamma~ factor; of the order of a gradient entry of the suite's small networks.
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        require(self.perturbation in PERTURBATIONS, "perturbation", f"must be one of {list(PERTURBATIONS)}", self.perturbation)
        check_reals(self, "method.extrap_sgd.")  # rho, noise_std: experiments.ranges


class ExtrapolatedOptimizer(OptimizerWrapper):
    """A base ``torch.optim`` optimizer whose gradient is taken at an extrapolated point.

    The caller (:func:`extrapolated_step`) computes the gradients; this object moves the
    parameters to u (:meth:`extrapolate`), puts them back (:meth:`restore`) and steps the
    base optimizer (:meth:`step`), and holds what must survive a checkpoint: the previous
    gradient, the noise generator and the gradient count.

    Args:
        optimizer: the base optimizer; its ``param_groups`` and ``state`` are shared.
        perturbation, rho, noise_std: as in :class:`ExtrapolationSettings`.
        seed: seeds the "gaussian" perturbation's generator.
    """

    def __init__(self, optimizer: Optimizer, *, perturbation: str = "gradient", rho: float = 1.0,
                 noise_std: float = 0.01, seed: int = 0):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"ExtrapolatedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.settings = ExtrapolationSettings(perturbation, float(rho), float(noise_std))
        self._wrap(optimizer)  # param_groups, state and defaults stay the base optimizer's
        self.gradients = 0  # gradient evaluations so far (extrapolated_step counts them)
        self._saved: Optional[list[torch.Tensor]] = None  # w while the parameters are at u
        self._previous: Optional[list[torch.Tensor]] = None  # last step's gradient ("previous")
        self._generator: Optional[torch.Generator] = None
        if self.settings.perturbation == "gaussian":
            device = self._parameters()[0].device
            self._generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def perturbation(self) -> str:
        return self.settings.perturbation

    def _parameters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # -- the step ------------------------------------------------------------------------

    @torch.no_grad()
    def extrapolate(self) -> None:
        """Move every parameter from w to u = w - rho * lr * eps, remembering w. For
        "gradient", eps is the gradient the parameters hold now (the caller's local one)."""
        if self._saved is not None:
            raise RuntimeError("ExtrapolatedOptimizer.extrapolate: already extrapolated; restore() first")
        params = self._parameters()
        self._saved = [p.detach().clone() for p in params]
        perturbations = self._perturbations(params)
        position = 0
        for group in self.param_groups:
            gamma = self.settings.rho * group["lr"]
            for p in group["params"]:
                eps = perturbations[position]
                position += 1
                # gamma~ = 0 leaves w as it is (w - 0 * eps would be NaN where eps is not finite).
                if eps is not None and gamma != 0:
                    p.add_(eps, alpha=-gamma)

    def _perturbations(self, params: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        kind = self.settings.perturbation
        if kind == "gradient":
            return [None if p.grad is None else p.grad.detach() for p in params]
        if kind == "previous":
            return self._previous if self._previous is not None else [None] * len(params)
        return [
            torch.randn(p.shape, generator=self._generator, device=p.device, dtype=p.dtype).mul_(self.settings.noise_std)
            for p in params
        ]

    @torch.no_grad()
    def restore(self) -> None:
        """Put the parameters back at w (nothing to do when they are there)."""
        if self._saved is None:
            return
        for p, w in zip(self._parameters(), self._saved):
            p.copy_(w)
        self._saved = None

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """The base optimizer's step from w with the gradients the parameters hold (those
        at u); "previous" keeps them for the next extrapolation."""
        self.restore()
        loss = self.optimizer.step(closure)
        if self.settings.perturbation == "previous":
            self._remember_gradients()
        return loss

    @torch.no_grad()
    def _remember_gradients(self) -> None:
        params = self._parameters()
        if self._previous is None:
            self._previous = [torch.zeros_like(p) for p in params]
        for p, previous in zip(params, self._previous):
            if p.grad is None:
                previous.zero_()  # no gradient this step: no direction to extrapolate along
            else:
                previous.copy_(p.grad)

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the wrapper's: previous gradient, generator state
        and gradient count (tensors are references, as in ``torch.optim``)."""
        if self._saved is not None:
            raise RuntimeError("ExtrapolatedOptimizer.state_dict: the parameters are at the extrapolated point; restore() first")
        return {
            "base": self.optimizer.state_dict(),
            "extrapolation": {
                "format": STATE_FORMAT,
                "perturbation": self.settings.perturbation,
                "gradients": self.gradients,
                "previous": self._previous,
                "generator": None if self._generator is None else self._generator.get_state(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, checked before anything is changed."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "extrapolation"}:
            raise ValueError("ExtrapolatedOptimizer.load_state_dict expects the dict of ExtrapolatedOptimizer.state_dict() (keys 'base', 'extrapolation')")
        saved = state_dict["extrapolation"]
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"ExtrapolatedOptimizer.load_state_dict: state format {saved.get('format')!r}, expected {STATE_FORMAT}")
        if saved["perturbation"] != self.settings.perturbation:
            raise ValueError(
                f"ExtrapolatedOptimizer.load_state_dict: saved with perturbation={saved['perturbation']!r}, "
                f"this optimizer has {self.settings.perturbation!r}"
            )
        params = self._parameters()
        previous = saved["previous"]
        if previous is not None and [tuple(t.shape) for t in previous] != [tuple(p.shape) for p in params]:
            raise ValueError("ExtrapolatedOptimizer.load_state_dict: the saved previous gradient does not match the parameters' shapes")
        self.optimizer.load_state_dict(state_dict["base"])
        self.gradients = int(saved["gradients"])
        self._previous = None if previous is None else [t.to(p.device, p.dtype).clone() for t, p in zip(previous, params)]
        if self._generator is not None:
            self._generator.set_state(saved["generator"])


def extrapolated_step(
    optimizer: ExtrapolatedOptimizer,
    *,
    local_gradient: Callable[[], Any],
    gradient: Callable[[], Any],
    step: Callable[[], Any],
) -> Any:
    """One extrapolated step, the same for the training loop and for any field of
    directions (the tests' bilinear game):

    1. for "gradient": ``local_gradient()`` leaves this worker's own gradient at w in the
       parameters' ``.grad`` (no averaging over workers);
    2. the parameters move to u = w - gamma~ * eps;
    3. ``gradient()`` leaves the gradient at u, averaged over workers, in ``.grad``;
    4. the parameters go back to w, and ``step()`` takes the base optimizer's step.

    Returns the loss ``local_gradient`` returned (the batch's loss at w), or, where there
    is no local gradient, the one ``gradient`` returned (at u, which is w when rho = 0)."""
    loss = None
    if optimizer.perturbation == "gradient":
        loss = local_gradient()
        optimizer.gradients += 1
    optimizer.extrapolate()
    at_u = gradient()
    optimizer.gradients += 1
    optimizer.restore()  # also when step() is skipped (fp16 loss scaling with inf gradients)
    step()
    return at_u if loss is None else loss


@contextlib.contextmanager
def same_random_draws(device: torch.device) -> Iterator[None]:
    """Run a block and put torch's random state (CPU, and ``device`` where it is a GPU) back
    as it was, so that the next forward pass draws what the block drew (dropout masks)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def noise_seed(run_seed: int, rank: int) -> int:
    """The "gaussian" generator's seed: one stream per run seed and rank, so that workers
    perturb independently, as each extrapolates locally."""
    import numpy as np

    return int(np.random.SeedSequence([run_seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ExtrapSGD(Method):
    name = "extrap_sgd"
    counters = ("gradients",)  # gradient evaluations per worker, cumulative
    Settings = ExtrapolationSettings

    @property
    def legend_order(self) -> int:
        return 4

    def label(self, base_label: str) -> str:
        return base_label + "+EXTRAP"

    def wrap(self, base: Any, model: Any) -> ExtrapolatedOptimizer:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        s = self.settings
        # experiments.training.build_state seeds torch with the run's seed just before wrap.
        return ExtrapolatedOptimizer(base, perturbation=s.perturbation, rho=s.rho, noise_std=s.noise_std,
                                     seed=noise_seed(torch.initial_seed(), rank))

    def step(self, optimizer: ExtrapolatedOptimizer, context: Any) -> Any:
        model = context.model
        device = next(model.parameters()).device

        def local_gradient() -> torch.Tensor:
            # The gradient at w is only a direction: it leaves BatchNorm statistics and the
            # random state as they were, so the step's one counted forward pass is the one at u.
            from aadl.closure import frozen_buffers

            with frozen_buffers(model), same_random_draws(device):
                loss = context.backward(sync=False)
            scaler = context.precision.scaler
            if scaler is not None:  # fp16: .grad holds the scaled gradient
                scale = scaler.get_scale()
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(scale)
            return loss

        return extrapolated_step(
            optimizer, local_gradient=local_gradient, gradient=context.backward, step=context.optimizer_step
        )

    def counter_values(self, optimizer: ExtrapolatedOptimizer) -> dict[str, int]:
        return {"gradients": optimizer.gradients}
