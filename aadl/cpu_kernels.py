"""Compiled CPU loops for the two passes every AA step makes over the history.

Torch has no single CPU operation for either: an exact-product float64 dot product of
float32 rows needs a float64 copy of each block (written to and read back from cache,
three times the traffic of the rows themselves), and the mixing plus its finiteness check
is three operations, each reading the block again. Here each is one loop nest compiled by
numba that reads every history entry once, converting in registers; at n = 25.6e6, m = 20
the two passes run at 1.1-1.4x the time of a plain read of the rows they touch, against
2-3.4x for the torch versions (``benchmarks/aa_step.py``).

The loops keep the properties of the torch versions in ``aadl.kernels``:

* dot products multiply in float64 (a product of two float32 numbers is exact there) and
  accumulate in float64;
* work is split into the same fixed row blocks, each block's partial result depends only
  on the block, and partials are summed in block order, so results are bitwise identical
  whatever the number of worker threads;
* nothing is allocated per block.

The loops are compiled with ``reassoc`` and ``contract`` only (so that reductions
vectorise): never with numba's full ``fastmath``, whose no-NaN/no-Inf assumptions would
let the compiler drop the finiteness checks the safeguard relies on. The compiled code is
cached on disk (numba's ``cache=True``); the first use in a fresh environment compiles for
about a second per dtype.

Used for contiguous float32/float64 tensors on CPU when numba is installed, unless
``AADL_CPU_KERNELS=torch`` (see ``aadl.kernels.compiled_loops_enabled``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FLAGS = {"reassoc", "contract"}


def _compiled(function):
    """``function`` compiled without the GIL, with the flags above, cached on disk where
    numba finds a writable cache directory (beside this file, else the user's cache); a
    read-only installation without one compiles in every process instead of failing."""
    try:
        return njit(nogil=True, fastmath=_FLAGS, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return njit(nogil=True, fastmath=_FLAGS, cache=False)(function)


@_compiled
def block_dots(rows, h, vector, starts, stops, square_row, partials):  # pragma: no cover - compiled
    """For each block b = [starts[b], stops[b]): partials[b, i] = rows[i] . vector over
    the block (i < h), and partials[b, h] = |rows[square_row]|^2 when square_row >= 0.

    Rows go four at a time: each loaded entry of ``vector`` serves four rows (1.3x a
    plain read of the rows at n = 25.6e6, m = 20, against 1.7x one row at a time)."""
    for b in range(starts.shape[0]):
        lo, hi = starts[b], stops[b]
        v = vector[lo:hi]
        if square_row >= 0:  # first, so that its group below reads the row from cache
            row = rows[square_row, lo:hi]
            acc = 0.0
            for j in range(row.shape[0]):
                x = np.float64(row[j])
                acc += x * x
            partials[b, h] = acc
        i = 0
        while i + 4 <= h:
            r0, r1, r2, r3 = rows[i, lo:hi], rows[i + 1, lo:hi], rows[i + 2, lo:hi], rows[i + 3, lo:hi]
            a0 = a1 = a2 = a3 = 0.0
            for j in range(v.shape[0]):
                x = np.float64(v[j])
                a0 += np.float64(r0[j]) * x
                a1 += np.float64(r1[j]) * x
                a2 += np.float64(r2[j]) * x
                a3 += np.float64(r3[j]) * x
            partials[b, i], partials[b, i + 1], partials[b, i + 2], partials[b, i + 3] = a0, a1, a2, a3
            i += 4
        while i < h:
            row = rows[i, lo:hi]
            acc = 0.0
            for j in range(v.shape[0]):
                acc += np.float64(row[j]) * np.float64(v[j])
            partials[b, i] = acc
            i += 1


@_compiled
def block_mix(out, base, rows, h, coefficients, shift, shift_weight, starts, stops, sums):  # pragma: no cover
    """For each block: out = base + shift_weight[0] * shift - rows[:h].T @ coefficients
    (in the arrays' dtype, as torch.addmv does), and sums[b] = the float64 sum of the
    block of out (for float32 entries finite exactly when every entry is; an overflow
    of float64 entries is told apart by ``aadl.kernels.mix``). Rows go four at a time, as in
    block_dots: a quarter of the loads and stores of ``out``."""
    use_shift = shift_weight[0] != 0
    for b in range(starts.shape[0]):
        lo, hi = starts[b], stops[b]
        o = out[lo:hi]
        w = base[lo:hi]
        if use_shift:
            s = shift[lo:hi]
            for j in range(o.shape[0]):
                o[j] = w[j] + shift_weight[0] * s[j]
        else:
            for j in range(o.shape[0]):
                o[j] = w[j]
        i = 0
        while i + 4 <= h:
            r0, r1, r2, r3 = rows[i, lo:hi], rows[i + 1, lo:hi], rows[i + 2, lo:hi], rows[i + 3, lo:hi]
            c0, c1, c2, c3 = coefficients[i], coefficients[i + 1], coefficients[i + 2], coefficients[i + 3]
            for j in range(o.shape[0]):
                o[j] -= c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j]
            i += 4
        while i < h:
            c = coefficients[i]
            row = rows[i, lo:hi]
            for j in range(o.shape[0]):
                o[j] -= c * row[j]
            i += 1
        total = 0.0
        for j in range(o.shape[0]):
            total += np.float64(o[j])
        sums[b] = total


@_compiled
def block_store(
    w_after, w_before, stored_r, stored_u, u_out, dr_weight_minus_one, rows_dr, rows_x, slot, held,
    starts, stops, partials,
):  # pragma: no cover - compiled
    """The storage step of ``AndersonAcceleration`` fused into one pass per block:

        r_k = w_after - w_before          (written over w_before)
        u_k = w_after + (c - 1) r_k       (written to u_out unless c = 1: u_k is w_after)
        dR[slot] = r_k - r_s,  X[slot] = u_k - u_s     (when slot >= 0: a stored pair exists)

    then, while the block is in cache, ``partials[b, :held] = dR[:held] . r_k`` and
    ``partials[b, held] = |dR[slot]|^2`` by ``block_dots`` on that block alone. Unfused,
    these are four passes over n-vectors (three differences and an add) before the dot
    products read the new column and r_k back from memory; here each entry is read once."""
    weight = dr_weight_minus_one[0]
    write_u = weight != 0
    for b in range(starts.shape[0]):
        lo, hi = starts[b], stops[b]
        wa, wb, uo = w_after[lo:hi], w_before[lo:hi], u_out[lo:hi]
        if slot >= 0:
            sr, su = stored_r[lo:hi], stored_u[lo:hi]
            dr, x = rows_dr[slot, lo:hi], rows_x[slot, lo:hi]
            for j in range(wa.shape[0]):
                # r_s and u_s are read before anything is written: u_out may be r_s's buffer.
                r = wa[j] - wb[j]
                dr[j] = r - sr[j]
                u = wa[j] + weight * r if write_u else wa[j]
                x[j] = u - su[j]
                wb[j] = r
                if write_u:
                    uo[j] = u
            # This block's dot products while it is in cache: block_dots on it alone.
            block_dots(rows_dr, held, w_before, starts[b : b + 1], stops[b : b + 1], slot, partials[b : b + 1])
        else:
            for j in range(wa.shape[0]):
                r = wa[j] - wb[j]
                wb[j] = r
                if write_u:
                    uo[j] = wa[j] + weight * r
