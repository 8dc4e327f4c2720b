"""Anderson acceleration for deep learning (AADL) as a torch.optim wrapper.

>>> base = torch.optim.Adam(model.parameters(), lr=1e-3)
>>> opt = AndersonAcceleration(base, history=10, relaxation=0.5)
>>> loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward()
>>> opt.step(closure=lambda: loss_fn(model(x), y))

``BatchedAndersonAcceleration(base, seeds=S, ...)`` does the same for S independent copies
of a model stacked along a leading dimension (docs/library.md, "Batched seeds").
"""

from .batched import BatchedAccelerationStats, BatchedAndersonAcceleration
from .hyperparameters import SETTING_NAMES, AndersonSettings, validate_settings
from .memory import estimate_memory_bytes
from .optimizer import AccelerationStats, AndersonAcceleration

__all__ = [
    "AndersonAcceleration",
    "AndersonSettings",
    "AccelerationStats",
    "BatchedAndersonAcceleration",
    "BatchedAccelerationStats",
    "SETTING_NAMES",
    "validate_settings",
    "estimate_memory_bytes",
]
__version__ = "0.1.0"
