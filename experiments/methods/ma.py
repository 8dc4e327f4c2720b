"""The averaging-only control (``method=ma``, variant "<base>+MA"): AADL+MA with AA never firing.

It answers the question a reader of the paper asks first: is AADL+MA's gain over the base
optimizer due to Anderson acceleration, or to the moving average alone? The control is the
AADL wrapper itself with the moving average on and its warm-up beyond any budget, so the
moving average, its window and its criterion (Eqs. 15-16, or the authors' code's under
``variant=reference_code``) are AADL+MA's exactly, from the same residual r_k = w_after - w_k,
and no column is ever stored or mixed (``aadl.AndersonAcceleration.step``: storage and
acceleration start after ``warmup``; the authors' variant stores iterates but accelerates only
after it). Its settings are AADL's (``configs/method/ma.yaml`` points ``method.ma`` at
``method.aadl``, where each experiment sets the paper's values), so the control cannot drift
from the runs it controls; ``average`` and ``warmup`` are fixed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from experiments.methods.aadl import AADL

#: A warm-up no budget reaches: AA never stores a column nor fires (2**62 steps).
NEVER = 2**62


class MovingAverageOnly(AADL):
    name = "ma"

    @classmethod
    def from_config(cls, section: Mapping[str, Any], prefix: str) -> "MovingAverageOnly":
        built = super().from_config(section, prefix)
        return cls(dataclasses.replace(built.settings, average=True, warmup=NEVER))

    @property
    def legend_order(self) -> int:
        return 5

    def label(self, base_label: str) -> str:
        return base_label + ("+MA(ref)" if self.settings.variant == "reference_code" else "+MA")
