"""PDE operators for physics-informed networks (PINNs): input derivatives of a network.

A PINN residual needs, at every collocation point, the network's value, a few first
derivatives (along given directions of the input) and a Laplacian (the sum of second
derivatives over some input coordinates). :func:`input_derivatives` computes all three,
exactly, by one of four methods:

``reverse``
    Plain autograd, the way a PINN is usually written: one reverse pass over the input gives
    every first derivative, and one more reverse pass per Laplacian coordinate gives the
    Laplacian, which is skipped where the network has no curvature (ReLU: every second
    derivative is zero). Cheapest where the Laplacian is absent or over few coordinates.
``forward``
    Forward-mode propagation of (value, tangents, Laplacian) through a :class:`PinnMLP`
    ("forward Laplacian"): one pass, no autograd over the input, no per-direction loop. The
    Laplacian over ``n`` coordinates needs only ``min(n, width)`` tangents, because it depends
    on the first layer's weights for those coordinates only through their Gram matrix (see
    :func:`_laplacian_tangents`). Cheapest for a Laplacian over many coordinates (Burgers
    100d with tanh); only for :class:`PinnMLP` models.
``func``
    ``torch.func`` forward-over-reverse: Hessian-vector products ``jvp(grad(u), e_i)`` for all
    Laplacian basis directions at once under ``vmap``. Works for any model whose rows are
    independent samples (no batch statistics).
``loop``
    The textbook reference: one reverse pass for the gradient, then one more reverse pass per
    Laplacian coordinate. Kept for tests and for the benchmark's baseline.

``auto`` picks, for a :class:`PinnMLP`, whichever of ``reverse`` and ``forward`` does fewer
floating-point operations in one training iteration at its architecture
(:func:`cheapest_method`, counted with ``torch.utils.flop_counter``), and ``func`` otherwise.

Every method works with grad mode on (the result is differentiable with respect to the
model's parameters, for training) and off (the AA safeguard evaluates the loss under
``torch.no_grad()``; then no graph through the parameters is built).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

DERIVATIVE_METHODS = ("auto", "reverse", "forward", "func", "loop")


# --------------------------------------------------------------------------------------------
# Activations with their first two derivatives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activation:
    """An elementwise activation and its derivatives, for the forward Laplacian."""

    name: str
    function: Callable[[Tensor], Tensor]
    # (sigma(h), sigma'(h), sigma''(h)); sigma'' is None when it is zero almost everywhere.
    with_derivatives: Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]
    # False when sigma'' = 0 almost everywhere (ReLU): every second derivative of the network
    # is then zero, whichever method computes it.
    has_curvature: bool = True


def _relu_with_derivatives(h: Tensor) -> tuple[Tensor, Tensor, None]:
    return torch.relu(h), (h > 0).to(h.dtype), None


def _tanh_with_derivatives(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.tanh(h)
    ds = 1 - s * s
    return s, ds, -2 * s * ds


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", torch.relu, _relu_with_derivatives, has_curvature=False),
    "tanh": Activation("tanh", torch.tanh, _tanh_with_derivatives),
}


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class PinnMLP(nn.Module):
    """Fully connected network ``in_features -> depth x width -> 1``.

    Initialisation follows the authors' PINN code: Xavier-normal weights, zero biases. Pass a
    ``generator`` to make the weights a function of it alone (independent of the global RNG).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        activation: str,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [in_features] + [width] * depth + [1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.activation = ACTIVATIONS[activation]
        for linear in self.linears:
            nn.init.xavier_normal_(linear.weight, generator=generator)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        for linear in self.linears[:-1]:
            x = self.activation.function(linear(x))
        return self.linears[-1](x)

    def extra_repr(self) -> str:
        return f"activation={self.activation.name}"


class StackedPinnMLP:
    """S networks of one :class:`PinnMLP`'s architecture as one function of (S, N, in) points
    -> (S, N, 1): lane s uses the weights ``tensors[name][s]`` (``name`` as in the network's
    ``named_parameters``). Each hidden layer is one batched product over the lanes; the
    output layer runs lane by lane, because its single-lane product is a matrix-vector one,
    which no batched product reproduces (on the CPU kernels measured, the lanes' values and
    parameter gradients are then bit for bit their single runs'). Reverse-mode input
    derivatives work on it as on one network (:func:`reverse_derivatives`), so S seeds'
    PINN losses are one pass."""

    def __init__(self, mlp: PinnMLP, tensors: dict[str, Tensor]):
        self.activation = mlp.activation
        self.layers = [
            (tensors[f"linears.{i}.weight"], tensors[f"linears.{i}.bias"]) for i in range(len(mlp.linears))
        ]

    def __call__(self, x: Tensor) -> Tensor:
        *hidden, (weight, bias) = self.layers
        for w, b in hidden:
            x = self.activation.function(torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)))
        lanes = zip(x.unbind(0), weight.unbind(0), bias.unbind(0), strict=True)
        return torch.stack([nn.functional.linear(a, w, b) for a, w, b in lanes])


def lanes_per_pass(points: Tensor, floats_per_point: int) -> int:
    """How many lanes of a :class:`StackedPinnMLP` to take in one pass over ``points`` (S, N,
    d), each point holding ``floats_per_point`` activations: on CPU as many as fit in
    ``_CPU_BLOCK_FLOATS`` (at least one; larger stacks spill out of cache and are slower per
    lane than one lane at a time at the presets' 4,000 points), on a GPU all of them."""
    lanes, n = points.shape[0], points.shape[1]
    if points.device.type != "cpu":
        return lanes
    return max(1, min(lanes, _CPU_BLOCK_FLOATS // max(1, n * floats_per_point)))


# --------------------------------------------------------------------------------------------
# Input derivatives
# --------------------------------------------------------------------------------------------


class InputDerivatives(NamedTuple):
    """Derivatives of a scalar network output at N points."""

    value: Tensor  # (N,)
    directional: Tensor  # (N, k): derivative along each of the k given directions
    laplacian: Tensor  # (N,): sum of the second derivatives over the given coordinates


def input_derivatives(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    directions: Tensor,
    laplacian_dims: Sequence[int],
    method: str = "auto",
) -> InputDerivatives:
    """Value, directional derivatives and partial Laplacian of ``model`` at the rows of ``x``.

    Args:
        model: maps (N, d) to (N, 1); row i of the output depends on row i of the input only.
        x: (N, d) points.
        directions: (d, k); column j is a direction of the input space.
        laplacian_dims: input coordinates whose second derivatives are summed.
        method: "reverse", "forward", "func", "loop", or "auto" (for a :class:`PinnMLP` the
            one of reverse and forward with fewer FLOPs, :func:`cheapest_method`; func
            otherwise).
    """
    method = resolve_method(model, method, directions.shape[1], laplacian_dims)
    if method == "forward":
        if not isinstance(model, PinnMLP):
            raise ValueError(f"method='forward' needs a PinnMLP, got {type(model).__name__}")
        return forward_laplacian(model, x, directions, laplacian_dims)
    if method == "reverse":
        return reverse_derivatives(model, x, directions, laplacian_dims)
    if method == "func":
        return func_derivatives(model, x, directions, laplacian_dims)
    return loop_derivatives(model, x, directions, laplacian_dims)


def resolve_method(
    model: Callable[[Tensor], Tensor], method: str, n_directions: int, laplacian_dims: Sequence[int]
) -> str:
    """``method`` with "auto" replaced by what it picks for ``model``."""
    if method not in DERIVATIVE_METHODS:
        raise ValueError(f"method must be one of {list(DERIVATIVE_METHODS)}, got {method!r}")
    if method != "auto":
        return method
    if not isinstance(model, PinnMLP):
        return "func"
    sizes = tuple(linear.in_features for linear in model.linears)
    return cheapest_method(sizes, model.activation.name, n_directions, tuple(laplacian_dims))


#: Points at which :func:`iteration_flops` counts; every count is linear in the points.
_COUNTED_POINTS = 64


@functools.lru_cache(maxsize=None)
def iteration_flops(
    sizes: tuple[int, ...], activation: str, n_directions: int, laplacian_dims: tuple[int, ...], method: str
) -> int:
    """Floating-point operations of one training iteration's input derivatives by ``method``
    (a residual-like loss of all three outputs and its backward to the parameters), per
    point, for a :class:`PinnMLP` whose layers take ``sizes`` inputs (the last is the width
    of the layer before the output). Counted by ``torch.utils.flop_counter`` (matrix
    products, which are what grows with the layers) on a network of that architecture."""
    generator = torch.Generator().manual_seed(0)
    mlp = PinnMLP(sizes[0], sizes[1], len(sizes) - 1, activation, generator=generator)
    x = torch.rand(_COUNTED_POINTS, sizes[0], generator=generator)
    directions = torch.zeros(sizes[0], n_directions)
    directions[:n_directions, :].fill_diagonal_(1)

    def iteration() -> None:
        with torch.enable_grad():  # counted for training, also when first asked under no_grad
            d = input_derivatives(mlp, x, directions, laplacian_dims, method)
            (d.value.square().sum() + d.directional.square().sum() + d.laplacian.square().sum()).backward()

    return counted_flops(iteration) // _COUNTED_POINTS


class _FlopCount(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s formulas over the operators it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted_flops(call: Callable[[], object]) -> int:
    """Floating-point operations of ``call()`` by ``torch.utils.flop_counter``'s formulas
    (matrix products and convolutions). FlopCounterMode itself cannot count reverse-mode
    input derivatives: the backward hooks of its module tracker make ``autograd.grad``
    with respect to an input fail, so its formulas are applied here without the tracker."""
    with _FlopCount() as counter:
        call()
    return counter.total


def cheapest_method(
    sizes: tuple[int, ...], activation: str, n_directions: int, laplacian_dims: tuple[int, ...]
) -> str:
    """"reverse" or "forward", whichever :func:`iteration_flops` counts fewer of (reverse on a
    tie: it is plain autograd, with the fewest kernels)."""
    flops = {m: iteration_flops(sizes, activation, n_directions, laplacian_dims, m) for m in ("reverse", "forward")}
    return "reverse" if flops["reverse"] <= flops["forward"] else "forward"


def forward_laplacian(
    mlp: PinnMLP, x: Tensor, directions: Tensor, laplacian_dims: Sequence[int]
) -> InputDerivatives:
    """Propagate value, tangents and Laplacian through the layers of ``mlp`` (one pass).

    With a hidden pre-activation ``h``, its tangents ``T`` (one row per tangent direction)
    and its Laplacian ``L``, an activation maps them to ``sigma(h)``, ``sigma'(h) T`` and
    ``sigma'(h) L + sigma''(h) * sum over Laplacian tangent rows of T**2``; a linear layer
    maps value, tangents and Laplacian linearly (bias on the value only). Tangents are
    stored as (N, rows, width) so every layer is one large matrix product.
    """
    first = mlp.linears[0]
    # The first layer is linear in x, so its tangents are the same at every point.
    tangent_rows = (first.weight @ directions.to(first.weight.dtype)).T
    if mlp.activation.has_curvature:
        laplacian_rows = _laplacian_tangents(first.weight[:, list(laplacian_dims)])
        tangent_rows = torch.cat([tangent_rows, laplacian_rows])
    widest = max(linear.out_features for linear in mlp.linears)
    block = _points_per_block(x, floats_per_point=tangent_rows.shape[0] * widest)
    parts = [_propagate(mlp, part, tangent_rows, directions.shape[1]) for part in x.split(block)]
    return InputDerivatives(*(torch.cat(column) for column in zip(*parts, strict=True)))


# The tangents of one point take (rows x width) floats per layer: 2,600 in Burgers 100d. On
# CPU, blocks of points whose tangents fit in cache beat one pass over 4,000 points (the
# elementwise products are memory-bound otherwise; docs/burgers.md, "Input derivatives and
# the fast Laplacian"); on a GPU one pass is best.
_CPU_BLOCK_FLOATS = 1 << 19


def _points_per_block(x: Tensor, *, floats_per_point: int) -> int:
    if x.device.type != "cpu":
        return max(1, x.shape[0])
    return max(1, _CPU_BLOCK_FLOATS // floats_per_point)


def _propagate(
    mlp: PinnMLP, x: Tensor, tangent_rows: Tensor, n_directions: int
) -> InputDerivatives:
    first, rest = mlp.linears[0], mlp.linears[1:]
    activation = mlp.activation
    h = first(x)
    tangents = tangent_rows.expand(h.shape[0], *tangent_rows.shape)
    laplacian = torch.zeros_like(h) if activation.has_curvature else None
    for linear in rest:
        value, slope, curvature = activation.with_derivatives(h)
        if laplacian is not None:
            curvature_term = tangents[:, n_directions:, :].square().sum(dim=1)
            laplacian = (slope * laplacian + curvature * curvature_term) @ linear.weight.T
        tangents = (slope.unsqueeze(1) * tangents) @ linear.weight.T
        h = linear(value)
    return InputDerivatives(
        value=h[:, 0],
        directional=tangents[:, :n_directions, 0],
        laplacian=laplacian[:, 0] if laplacian is not None else torch.zeros_like(h[:, 0]),
    )


def _laplacian_tangents(weight_columns: Tensor) -> Tensor:
    """Tangent rows ``R`` (r, width) with ``R.T @ R == S @ S.T`` for ``S = weight_columns``.

    Every later sensitivity ``M`` of the network to the first pre-activation enters the
    Laplacian only through ``sum_k (M S e_k)**2 = diag(M S S^T M^T)``; any ``R`` with the same
    Gram matrix gives the same Laplacian exactly. When the Laplacian runs over more
    coordinates than the layer is wide (99 > 50 in Burgers 100d), the triangular factor of
    ``S^T = Q R`` halves the number of tangents to propagate.
    """
    n_coordinates, width = weight_columns.shape[1], weight_columns.shape[0]
    if n_coordinates <= width:
        return weight_columns.T
    return torch.linalg.qr(weight_columns.T, mode="reduced").R


def func_derivatives(
    model: Callable[[Tensor], Tensor], x: Tensor, directions: Tensor, laplacian_dims: Sequence[int]
) -> InputDerivatives:
    """Forward-over-reverse with ``torch.func``: all Hessian-vector products in one ``vmap``.

    Because the rows are independent samples, the gradient of ``sum(model(x))`` with respect to
    ``x`` is the per-sample gradient, and its directional derivative along the basis vector
    ``e_i`` (the same for every row) holds every row's Hessian column ``i``.
    """
    dims = torch.as_tensor(list(laplacian_dims), device=x.device)
    x = x.detach()

    def input_gradient(points: Tensor) -> Tensor:
        return torch.func.grad(lambda p: model(p).sum())(points)

    def gradient_and_hessian_column(tangent: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(input_gradient, (x,), (tangent,))

    basis = torch.zeros(len(dims), *x.shape, dtype=x.dtype, device=x.device)
    basis[torch.arange(len(dims)), :, dims] = 1
    gradients, hessian_columns = torch.func.vmap(gradient_and_hessian_column)(basis)
    hessian_diagonal = hessian_columns[torch.arange(len(dims)), :, dims]  # (n_dims, N)
    return InputDerivatives(
        value=model(x)[:, 0],
        directional=gradients[0] @ directions.to(x.dtype),
        laplacian=hessian_diagonal.sum(dim=0),
    )


def reverse_derivatives(
    model: Callable[[Tensor], Tensor], x: Tensor, directions: Tensor, laplacian_dims: Sequence[int]
) -> InputDerivatives:
    """Plain autograd: one reverse pass for the gradient (every directional derivative), then
    one reverse pass per Laplacian coordinate, none where the network has no curvature
    (a :class:`PinnMLP` or :class:`StackedPinnMLP` with ReLU, whose Laplacian is zero almost
    everywhere). ``x`` may carry leading lane dimensions (S, N, d) for a stacked model."""
    activation = getattr(model, "activation", None)
    if isinstance(activation, Activation) and not activation.has_curvature:
        laplacian_dims = ()
    if laplacian_dims:
        return loop_derivatives(model, x, directions, laplacian_dims)
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():  # input derivatives need autograd even under no_grad
        x = x.detach().requires_grad_(True)
        value = model(x)[..., 0]
        (gradient,) = torch.autograd.grad(value.sum(), x, create_graph=keep_graph)
    derivatives = InputDerivatives(value, gradient @ directions.to(x.dtype), torch.zeros_like(value))
    if keep_graph:
        return derivatives
    return InputDerivatives(*(t.detach() for t in derivatives))


def loop_derivatives(
    model: Callable[[Tensor], Tensor], x: Tensor, directions: Tensor, laplacian_dims: Sequence[int]
) -> InputDerivatives:
    """Reference implementation: one reverse-mode pass per Laplacian coordinate (``x`` may
    carry leading lane dimensions, as in :func:`reverse_derivatives`)."""
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():  # input derivatives need autograd even under no_grad
        x = x.detach().requires_grad_(True)
        value = model(x)[..., 0]
        (gradient,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        laplacian = torch.zeros_like(value)
        for i in laplacian_dims:
            (row,) = torch.autograd.grad(
                gradient[..., i].sum(), x, create_graph=keep_graph, retain_graph=True
            )
            laplacian = laplacian + row[..., i]
    derivatives = InputDerivatives(value, gradient @ directions.to(x.dtype), laplacian)
    if keep_graph:
        return derivatives
    return InputDerivatives(*(t.detach() for t in derivatives))
