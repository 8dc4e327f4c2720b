"""Physics-informed networks for Burgers' equation: ``burgers2d`` (Fig. 2) and ``burgers100d``
(Fig. 3) of the paper. See docs/burgers.md for the equations and the choices made.

Both problems solve, on [-1, 1]^d x [0, 1] with homogeneous Dirichlet boundary data,

    u_t + u * sum_i u_{x_i} - nu * sum_i u_{x_i x_i} = f,

with d = 1 and f = 0 for burgers2d, and d = 99 with a manufactured f for burgers100d. The loss
is the paper's MSE_u + MSE_f (Eqs. 19-21): the squared misfit at initial and boundary points
plus the squared PDE residual at collocation points. Everything random (weights, training
points, validation points) comes from generators seeded by (seed, stream, index), so a run is
a function of its seed alone.
"""

from __future__ import annotations

import abc
import enum
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from experiments.problems.burgers.exact import (
    MIN_QUADRATURE_NODES,
    NU_PAPER,
    SOLUTION_EXPONENTS,
    ProductSolution,
    burgers2d_on_grid,
)
from experiments.errors import require
from experiments.problems.burgers.pinn import (
    ACTIVATIONS,
    DERIVATIVE_METHODS,
    PinnMLP,
    StackedPinnMLP,
    cheapest_method,
    input_derivatives,
    iteration_flops,
    lanes_per_pass,
)
from experiments.problems.base import Problem

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _require(ok: bool, field_name: str, rule: str, value: Any) -> None:
    # ConfigError (a ValueError) is what the driver reports as "error: problem.<field>: ...".
    require(ok, f"problem.{field_name}", rule, value)


@dataclass
class BurgersConfig:
    """Fields shared by both Burgers problems; defaults are the paper's setup."""

    activation: str = "relu"  # the paper's; its second derivative is 0 a.e. (see notes())
    width: int = 20
    depth: int = 8
    nu: float = NU_PAPER
    n_boundary: int = 400  # initial + boundary points per batch
    n_collocation: int = 4000  # PDE residual points per batch
    initial_fraction: float = 0.5  # share of the n_boundary points on the initial face t = 0
    val_fraction: float = 0.2  # validation set size relative to a batch
    resample_every: int = 500  # iterations between redraws of the points; 0: never redraw
    # Input derivatives: reverse (plain autograd), forward (forward Laplacian), func, loop, or
    # auto: whichever of reverse and forward does fewer FLOPs per iteration here (pinn.py).
    derivatives: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _require(
            self.activation in ACTIVATIONS,
            "activation",
            f"must be one of {sorted(ACTIVATIONS)}",
            self.activation,
        )
        _require(self.width >= 1, "width", "must be an integer >= 1", self.width)
        _require(self.depth >= 1, "depth", "must be an integer >= 1", self.depth)
        _require(
            math.isfinite(self.nu) and self.nu > 0, "nu", "must be a finite number > 0", self.nu
        )
        _require(self.n_boundary >= 1, "n_boundary", "must be an integer >= 1", self.n_boundary)
        _require(
            self.n_collocation >= 1, "n_collocation", "must be an integer >= 1", self.n_collocation
        )
        _require(
            0 <= self.initial_fraction <= 1,
            "initial_fraction",
            "must be in [0, 1]",
            self.initial_fraction,
        )
        smallest = min(self.n_boundary, self.n_collocation)
        _require(
            0 < self.val_fraction <= 1 and self.val_fraction * smallest >= 1,
            "val_fraction",
            f"must be in (0, 1] and leave at least one validation point of each kind "
            f"(val_fraction * {smallest} >= 1)",
            self.val_fraction,
        )
        _require(
            self.resample_every >= 0,
            "resample_every",
            "must be an integer >= 0 (0: never redraw)",
            self.resample_every,
        )
        _require(
            self.derivatives in DERIVATIVE_METHODS,
            "derivatives",
            f"must be one of {list(DERIVATIVE_METHODS)}",
            self.derivatives,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> BurgersConfig:
        """An instance from ``cfg``: an instance already, or anything with the fields as
        attributes (an omegaconf DictConfig); missing fields take their defaults."""
        if isinstance(cfg, cls):
            return cfg
        missing = object()
        values = {f.name: getattr(cfg, f.name, missing) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not missing})


@dataclass
class Burgers2DConfig(BurgersConfig):
    grid_x: int = 256  # the rel-L2 grid: x = linspace(-1, 1, grid_x) ...
    grid_t: int = 101  # ... times t = linspace(0, 1, grid_t)
    quadrature_nodes: int = MIN_QUADRATURE_NODES  # Gauss-Hermite nodes of the exact solution

    def validate(self) -> None:
        super().validate()
        _require(self.grid_x >= 2, "grid_x", "must be an integer >= 2", self.grid_x)
        _require(self.grid_t >= 2, "grid_t", "must be an integer >= 2", self.grid_t)
        _require(
            self.quadrature_nodes >= MIN_QUADRATURE_NODES,
            "quadrature_nodes",
            f"must be an integer >= {MIN_QUADRATURE_NODES} (fewer are inaccurate near the shock)",
            self.quadrature_nodes,
        )


@dataclass
class Burgers100DConfig(BurgersConfig):
    width: int = 50
    depth: int = 4
    spatial_dims: int = 99
    solution_scale: str = "paper"  # paper: Eq. 22, |u| ~ 1e-27; unit: an order-one variant
    n_eval: int = 4000  # fixed random points (the same for every seed) for val_rel_l2

    def validate(self) -> None:
        super().validate()
        _require(
            self.spatial_dims >= 1, "spatial_dims", "must be an integer >= 1", self.spatial_dims
        )
        _require(
            self.solution_scale in SOLUTION_EXPONENTS,
            "solution_scale",
            f"must be one of {sorted(SOLUTION_EXPONENTS)}",
            self.solution_scale,
        )
        _require(self.n_eval >= 1, "n_eval", "must be an integer >= 1", self.n_eval)


# --------------------------------------------------------------------------------------------
# Random points
# --------------------------------------------------------------------------------------------


class _Stream(enum.IntEnum):
    """Independent random streams: changing one setting (e.g. resample_every) does not move
    the points or weights drawn from another."""

    MODEL = 0
    TRAINING = 1
    VALIDATION = 2
    EVALUATION = 3


def _generator(seed: int, stream: _Stream, index: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, int(stream), index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # manual_seed takes < 2**63


def _uniform_cube(n: int, dims: int, generator: torch.Generator) -> Tensor:
    return 2 * torch.rand(n, dims, generator=generator) - 1


def sample_interior(n: int, spatial_dims: int, generator: torch.Generator) -> Tensor:
    """(n, d + 1) points uniform in [-1, 1]^d x [0, 1]."""
    x = _uniform_cube(n, spatial_dims, generator)
    return torch.cat([x, torch.rand(n, 1, generator=generator)], dim=1)


def sample_initial(n: int, spatial_dims: int, generator: torch.Generator) -> Tensor:
    """(n, d + 1) points uniform on the initial face t = 0."""
    return torch.cat([_uniform_cube(n, spatial_dims, generator), torch.zeros(n, 1)], dim=1)


def sample_lateral(n: int, spatial_dims: int, generator: torch.Generator) -> Tensor:
    """(n, d + 1) points uniform on the lateral boundary {x_i = +-1} x [0, 1] (every face
    has the same area, so a uniformly chosen face and side, then uniform elsewhere)."""
    points = sample_interior(n, spatial_dims, generator)
    face = torch.randint(spatial_dims, (n,), generator=generator)
    side = 2.0 * torch.randint(2, (n,), generator=generator) - 1
    points[torch.arange(n), face] = side
    return points


@dataclass(frozen=True)
class PinnBatch:
    data_points: Tensor  # (n_data, d + 1) initial and boundary points
    data_values: Tensor  # (n_data,) u there
    collocation_points: Tensor  # (n_collocation, d + 1)
    forcing: Tensor  # (n_collocation,) f there

    def to(self, device: torch.device) -> PinnBatch:
        return PinnBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


# --------------------------------------------------------------------------------------------
# The problems
# --------------------------------------------------------------------------------------------


class BurgersProblem(Problem):
    """Sampling, loss and evaluation shared by both problems; subclasses give the data."""

    budget_unit: ClassVar[str] = "iteration"
    Config: ClassVar[type[BurgersConfig]]
    ddp: ClassVar[bool] = False  # the forward-mode Laplacian runs through the layers, not forward()
    # One thread: the network is too small for a second to pay, and it contends with the
    # machine's other processes (docs/burgers.md, "Benchmark").
    threads: ClassVar[int] = 1
    # The loss is a function of the parameters and the batch alone (no random draws, no
    # buffers): a safeguard's evaluation can serve as the next step's forward (step.KeptForward).
    pure_loss: ClassVar[bool] = True

    def __init__(self, cfg: Any, *, data_root: Path, seed: int, device: torch.device):
        super().__init__(
            self.Config.from_config(cfg),
            data_root=data_root,
            seed=seed,
            device=torch.device(device),
        )
        d = self.spatial_dims
        directions = torch.zeros(d + 1, 2)
        directions[:d, 0] = 1  # advection: sum_i u_{x_i}
        directions[d, 1] = 1  # u_t
        self._directions = directions.to(self.device)
        self._validation = self._draw_batch(_Stream.VALIDATION, 0, self.cfg.val_fraction)
        self._training: tuple[int, PinnBatch] | None = None  # (draw index, batch)
        self._reference: tuple[Tensor, Tensor] | None = None  # (points, exact u), float64 u

    # -- what a subclass provides ------------------------------------------------------------

    @property
    @abc.abstractmethod
    def spatial_dims(self) -> int: ...

    @abc.abstractmethod
    def initial_condition(self, points: Tensor) -> Tensor:
        """u at points (n, d + 1) of the face t = 0."""

    @abc.abstractmethod
    def forcing(self, points: Tensor) -> Tensor:
        """f at points (n, d + 1)."""

    @abc.abstractmethod
    def reference_solution(self) -> tuple[Tensor, Tensor]:
        """Fixed points (n, d + 1) and the exact u there (float64), for val_rel_l2."""

    @functools.cached_property
    def derivative_method(self) -> str:
        """``problem.derivatives`` with auto resolved for this network (pinn.cheapest_method)."""
        if self.cfg.derivatives != "auto":
            return self.cfg.derivatives
        return cheapest_method(*self._derivative_shape())

    def _derivative_shape(self) -> tuple[tuple[int, ...], str, int, tuple[int, ...]]:
        """(layer input sizes, activation, directions, Laplacian coordinates): what the
        input derivatives' cost depends on."""
        cfg = self.cfg
        sizes = (self.spatial_dims + 1, *[cfg.width] * cfg.depth)
        return sizes, cfg.activation, self._directions.shape[1], tuple(range(self.spatial_dims))

    # -- the Problem interface ---------------------------------------------------------------

    def build_model(self) -> PinnMLP:
        cfg = self.cfg
        model = PinnMLP(
            self.spatial_dims + 1,
            cfg.width,
            cfg.depth,
            cfg.activation,
            generator=_generator(self.seed, _Stream.MODEL),
        )
        return model.to(self.device)

    def batches(self, unit: int) -> list[PinnBatch]:
        """The batch of iteration ``unit`` (1-based): iterations 1..resample_every share the
        first draw, and so on, so a redraw starts a learning-rate stage of the same length
        (the schedule's stage of iteration u is (u - 1) // every)."""
        if unit < 1:
            raise ValueError(f"iterations are numbered from 1, got {unit}")
        every = self.cfg.resample_every
        draw = (unit - 1) // every if every else 0
        if self._training is None or self._training[0] != draw:
            self._training = (draw, self._draw_batch(_Stream.TRAINING, draw))
        return [self._training[1]]

    def local_batch(self, batch: PinnBatch, rank: int, world_size: int) -> PinnBatch:
        # The data and the collocation points split separately: MSE_u and MSE_f are two means.
        return PinnBatch(*(torch.tensor_split(getattr(batch, f.name), world_size)[rank] for f in fields(batch)))

    def loss(self, model: torch.nn.Module, batch: PinnBatch) -> Tensor:
        mse_u, mse_f = self.loss_terms(model, batch)
        return mse_u + mse_f

    def batched_loss(self, model: torch.nn.Module, tensors: dict[str, Tensor], batch: PinnBatch) -> Tensor:
        """The (S,) losses of S stacked copies of the network (experiments/batching.py). In
        reverse mode one pass over the stacked network (:class:`StackedPinnMLP`: each layer
        one batched product over the lanes, each lane's derivatives, loss and gradient its
        own); in forward mode this loss lane by lane on views of the stacked parameters (its
        tangents make each product large already). The loss depends on the seed only through
        the batch, so one problem serves every lane."""
        from experiments.batching import lane_by_lane_loss

        if self.derivative_method != "reverse":
            return lane_by_lane_loss(self, model, tensors, batch)
        lanes = next(iter(tensors.values())).shape[0]
        size = lanes_per_pass(batch.collocation_points, self.cfg.width * (self.cfg.depth + 1))
        losses = []
        for start in range(0, lanes, size):
            part = slice(start, start + size)
            mse_u, mse_f = self.loss_terms(
                StackedPinnMLP(model, {name: tensor[part] for name, tensor in tensors.items()}),
                PinnBatch(*(getattr(batch, f.name)[part] for f in fields(batch))),
            )
            losses.append(mse_u + mse_f)
        return torch.cat(losses)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            mse_u, mse_f = self.loss_terms(model, self._validation)
            points, exact = self._reference_on_device()
            error = model(points)[:, 0].double() - exact
        return {
            "val_loss": float(mse_u + mse_f),
            "val_mse_u": float(mse_u),
            "val_mse_f": float(mse_f),
            "val_rel_l2": float(torch.linalg.vector_norm(error) / torch.linalg.vector_norm(exact)),
        }

    def notes(self) -> list[str]:
        lines = []
        if not ACTIVATIONS[self.cfg.activation].has_curvature:
            lines.append(
                f"activation={self.cfg.activation} (the paper as written): its second derivative "
                "is zero almost everywhere, so the network's second derivatives vanish and the "
                "viscous term nu*Laplacian(u) drops out of the PDE residual; the network is "
                "trained on the inviscid equation. activation=tanh is the usual PINN choice."
            )
        method, shape = self.derivative_method, self._derivative_shape()
        counts = {m: iteration_flops(*shape, m) for m in ("reverse", "forward")}
        lines.append(
            f"input derivatives: {method} mode (problem.derivatives={self.cfg.derivatives}); per "
            "collocation point and iteration reverse mode does "
            f"{counts['reverse'] / 1e3:.1f} kFLOP and forward mode {counts['forward'] / 1e3:.1f} kFLOP"
        )
        every = self.cfg.resample_every
        lines.append(
            f"points: {self.cfg.n_boundary} initial/boundary and {self.cfg.n_collocation} "
            "collocation points drawn uniformly, "
            + (f"redrawn every {every} iterations" if every else "drawn once")
            + f"; validation set of {self.cfg.val_fraction:g} of that size, fixed per seed"
        )
        return lines

    # -- the loss -------------------------------------------------------------------------------

    def loss_terms(self, model: torch.nn.Module, batch: PinnBatch) -> tuple[Tensor, Tensor]:
        """(MSE_u, MSE_f) of the paper's Eqs. 20-21; for a stacked model and batch (lanes
        first), each lane's."""
        data_misfit = model(batch.data_points)[..., 0] - batch.data_values
        residual = self.pde_operator(model, batch.collocation_points) - batch.forcing
        if data_misfit.ndim == 1:
            return data_misfit.square().mean(), residual.square().mean()
        return data_misfit.square().mean(-1), residual.square().mean(-1)

    def pde_operator(self, model, points: Tensor) -> Tensor:
        """u_t + u * sum_i u_{x_i} - nu * sum_i u_{x_i x_i} of ``model`` at ``points``.

        Works under torch.no_grad() too (the AA safeguard): the input derivatives are then
        computed without a graph through the parameters.
        """
        derivatives = input_derivatives(
            model,
            points,
            self._directions.to(points.dtype),
            range(self.spatial_dims),
            # auto is resolved for this problem's PinnMLP; other models (an exact solution in
            # the tests) keep input_derivatives' own choice
            self.derivative_method if isinstance(model, (PinnMLP, StackedPinnMLP)) else self.cfg.derivatives,
        )
        advection, u_t = derivatives.directional.unbind(dim=-1)
        return u_t + derivatives.value * advection - self.cfg.nu * derivatives.laplacian

    # -- data -------------------------------------------------------------------------------------

    def _draw_batch(self, stream: _Stream, index: int, fraction: float = 1.0) -> PinnBatch:
        cfg, d = self.cfg, self.spatial_dims
        generator = _generator(self.seed, stream, index)
        n_data = round(fraction * cfg.n_boundary)
        n_initial = round(cfg.initial_fraction * n_data)
        initial = sample_initial(n_initial, d, generator)
        lateral = sample_lateral(n_data - n_initial, d, generator)
        collocation = sample_interior(round(fraction * cfg.n_collocation), d, generator)
        batch = PinnBatch(
            data_points=torch.cat([initial, lateral]),
            # homogeneous Dirichlet data on the lateral boundary, in both problems
            data_values=torch.cat([self.initial_condition(initial), torch.zeros(len(lateral))]),
            collocation_points=collocation,
            forcing=self.forcing(collocation),
        )
        return batch.to(self.device)

    def _reference_on_device(self) -> tuple[Tensor, Tensor]:
        if self._reference is None:
            points, exact = self.reference_solution()
            self._reference = (points.to(self.device), exact.to(self.device))
        return self._reference


class Burgers2D(BurgersProblem):
    """u_t + u u_x - nu u_xx = 0, u(x, 0) = -sin(pi x), u(+-1, t) = 0; MLP 2 -> 8 x 20 -> 1."""

    name: ClassVar[str] = "burgers2d"
    Config: ClassVar[type[Burgers2DConfig]] = Burgers2DConfig

    @property
    def spatial_dims(self) -> int:
        return 1

    def initial_condition(self, points: Tensor) -> Tensor:
        return -torch.sin(math.pi * points[:, 0])

    def forcing(self, points: Tensor) -> Tensor:
        return torch.zeros(len(points))

    def reference_solution(self) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        x, t, u = burgers2d_on_grid(cfg.grid_x, cfg.grid_t, nu=cfg.nu, nodes=cfg.quadrature_nodes)
        tt, xx = np.meshgrid(t, x, indexing="ij")  # rows: times, like u
        points = torch.from_numpy(np.stack([xx.ravel(), tt.ravel()], axis=1)).float()
        return points, torch.from_numpy(u.ravel().copy())

    def notes(self) -> list[str]:
        return [
            f"PDE: u_t + u u_x - nu u_xx = 0 on [-1, 1] x [0, 1], nu = {self.cfg.nu:.6g}, "
            "u(x, 0) = -sin(pi x), u(+-1, t) = 0; val_rel_l2 against the Hopf-Cole solution "
            f"({self.cfg.quadrature_nodes}-node Gauss-Hermite) on a {self.cfg.grid_x} x "
            f"{self.cfg.grid_t} (x, t) grid",
            *super().notes(),
        ]


class Burgers100D(BurgersProblem):
    """The manufactured problem of Eq. 22 on [-1, 1]^99 x [0, 1]; MLP 100 -> 4 x 50 -> 1."""

    name: ClassVar[str] = "burgers100d"
    Config: ClassVar[type[Burgers100DConfig]] = Burgers100DConfig

    def __init__(self, cfg: Any, *, data_root: Path, seed: int, device: torch.device):
        config = Burgers100DConfig.from_config(cfg)
        self.solution = ProductSolution(SOLUTION_EXPONENTS[config.solution_scale])
        super().__init__(config, data_root=data_root, seed=seed, device=device)

    @property
    def spatial_dims(self) -> int:
        return self.cfg.spatial_dims

    def initial_condition(self, points: Tensor) -> Tensor:
        return self.solution.value(points)

    def forcing(self, points: Tensor) -> Tensor:
        return self.solution.forcing(points, self.cfg.nu)

    def reference_solution(self) -> tuple[Tensor, Tensor]:
        # The same points for every seed (seed 0 of the evaluation stream): every run of a
        # figure is scored on one set.
        points = sample_interior(
            self.cfg.n_eval, self.spatial_dims, _generator(0, _Stream.EVALUATION)
        )
        return points, self.solution.value(points.double())

    def notes(self) -> list[str]:
        cfg, m = self.cfg, self.solution.exponent
        lines = [
            "PDE: u_t + u * sum_i u_{x_i} - nu * sum_i u_{x_i x_i} = f on "
            f"[-1, 1]^{cfg.spatial_dims} x [0, 1], nu = {cfg.nu:.6g}, "
            f"exact u = e^-t prod_i (x_i^{m} - 1) (solution_scale={cfg.solution_scale}), "
            "f computed from it; zero Dirichlet data"
        ]
        if cfg.solution_scale == "paper":
            lines.append(
                "solution_scale=paper: |u| ~ 1e-27 at typical points of the 99-dimensional "
                "cube (a product of 99 factors x_i^2 - 1), so the data and forcing are ~0 and a "
                "network that outputs zero already has a tiny val_loss (in float32 these squares "
                "underflow to 0); val_rel_l2 shows whether the solution is learnt. "
                "solution_scale=unit solves an order-one variant."
            )
        return lines + super().notes()
