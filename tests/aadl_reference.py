"""A direct, dense transcription of the AADL contract (shared/spec/aadl-algorithm.md).

Deliberately naive (Python lists of numpy columns, numpy least squares), written from the
contract's wording and nothing else, so that the library's optimised implementation
(ring buffers, incremental Gram matrix, X = dW + c dR, rotating buffers) can be checked
against it step by step.
"""

from __future__ import annotations

import numpy as np


def reference_aadl(
    w0: np.ndarray,
    base_step,
    loss,
    steps: int,
    *,
    history=10,
    frequency=1,
    store_every=1,
    relaxation=1.0,
    regularization=0.0,
    warmup=0,
    average=False,
    average_window=None,
    average_threshold=0.1,
    average_criterion="residual",
    safeguard="loss",
    mixing="walker_ni",
):
    """Iterates of AADL applied to the fixed-point map ``base_step`` (w -> w_after).

    ``loss`` is the safeguard's closure (None: no closure). ``relaxation`` may be a
    function of the step index k (a run resumed with another beta). Returns the list of
    parameters after every step and the counters.
    """
    beta_at = relaxation if callable(relaxation) else (lambda k: relaxation)
    w = np.array(w0, dtype=np.float64)
    dW, dR = [], []
    stored = None
    buffer = []
    window = history if average_window is None else average_window
    counts = {"aa_attempts": 0, "aa_accepted": 0, "averages_applied": 0}
    trajectory = []
    for k in range(1, steps + 1):
        w_k = w.copy()
        w_after = base_step(w_k)
        r_k = w_after - w_k
        w = w_after
        # 3. storage
        if k > warmup and k % store_every == 0:
            if stored is not None:
                dW.append(w_k - stored[0])
                dR.append(r_k - stored[1])
                if len(dW) > history:
                    dW.pop(0)
                    dR.pop(0)
            stored = (w_k, r_k)
        # 4. acceleration
        if k % frequency == 0 and dR:
            counts["aa_attempts"] += 1
            DR = np.stack(dR, axis=1)
            DW = np.stack(dW, axis=1)
            h = DR.shape[1]
            A = np.vstack([DR, np.sqrt(regularization) * np.eye(h)])
            rhs = np.concatenate([r_k, np.zeros(h)])
            g = np.linalg.lstsq(A, rhs, rcond=None)[0]
            relaxation_k = beta_at(k)
            if mixing == "walker_ni":
                w_aa = w_k + relaxation_k * r_k - (DW + relaxation_k * DR) @ g
            else:
                w_aa = w_k + relaxation_k * (r_k - (DW + DR) @ g)
            keep = bool(np.all(np.isfinite(w_aa)) and np.all(np.isfinite(g)))
            if keep and safeguard == "loss" and loss is not None:
                keep = loss(w_aa) < loss(w_after)
            if keep:
                w = w_aa
                counts["aa_accepted"] += 1
        # 5. moving average
        if average:
            buffer.append(w.copy())
            if len(buffer) > window:
                buffer.pop(0)
            if len(buffer) == window:
                B = np.stack(buffer)
                if average_criterion == "residual":
                    fire = np.sqrt(B.var(axis=0)).max() > average_threshold * np.abs(r_k).max()
                else:
                    fire = B.std(axis=0, ddof=1).max() / B.mean(axis=0).max() > average_threshold
                if fire:
                    w = B.mean(axis=0)
                    counts["averages_applied"] += 1
        trajectory.append(w.copy())
    return trajectory, counts
