# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""The calibrated integer merge: integer codes and zero points whose layer outputs match the adapter model's.

Rounding the folded zeros ``z - D / s`` to integers discards a trained adapter (merge.py): it moves them by a few
thousandths of a step. What a standard GPTQ checkpoint can still hold is a change of whole codes and whole zero
points, chosen for what the layer computes rather than weight by weight. For one layer with calibration inputs
``X`` (tokens x in), ``H = X^T X``, base weight ``W`` and adapter change ``dW`` (constant in each group), the merge
picks integer code changes ``dq`` and zero changes ``dz`` on the base's grid (scales, group size, ``g_idx`` unchanged)
to minimise, for every output row ``n``,

    || X (W'_n - W_n - dW_n) ||^2 = e_n^T H e_n,    e_n = W'_n - W_n - dW_n,

the error of the merged layer's output on the calibration inputs against the adapter model's. This is GPTQ's
problem with the adapted weight ``W + dW`` as target, starting from the codes the base already has. Everything is
computed in differences from the base (value changes of a few thousandths of a step), so fp32 loses nothing to
cancellation. The methods (``calibration_method``), measured in docs/design.md ("Calibrated integer merge"):

* ``"sequential"`` (default): the greedy solver below on the sequential calibration's objective
  (:mod:`peft_qalora.sequential_calibration`): block by block, each layer on the merged model's own inputs against
  the adapter model's outputs, so later layers make up for what earlier ones could not keep. It keeps the most
  (SmolLM2-135M 4-bit: 96% of the held-out gain, greedy 72%) and holds one block's statistics at a time, but runs
  the calibration data through each block several times (about 2x greedy's time).
* ``"greedy"``: coordinate descent, the best single move (one code or one group's zero point, one step)
  of each row at a time. It finds the few moves whose combined effect on the outputs matches a change far smaller
  than one step per weight, which error feedback mostly misses (below).
* ``"codes"``: GPTQ's error feedback (Frantar et al., arXiv 2210.17323) over the columns of each row, on the codes:
  round one column, push the rounding error onto the columns not yet rounded through the Cholesky factor of
  ``H^-1`` (Babai's nearest plane). A code moves only once the error pushed onto it reaches half a step, which a
  trained adapter's thousandths of a step rarely make happen (SmolLM2 4-bit: 46% kept on the outputs, greedy 64%).
* ``"zeros"``: error feedback over the groups of each row, on the zero points, with the group-pooled Hessian
  ``P = M^T H M`` (``M`` the channel-to-group map);
* ``"both"``: zeros first, then codes on what is left.

A row whose result would be worse on the calibration inputs than leaving it as it is keeps its base codes, so no row
loses to the plain base. The per-layer report says what share of the adapter's effect on the calibration outputs,
``1 - ||X e^T|| / ||X dW^T||``, the merged layer keeps, and how many codes and zero points changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import LayerRounding, MergeReport

SOLVERS = ("greedy", "codes", "zeros", "both")  # how solve_layer picks one layer's codes and zeros
METHODS = (
    "sequential",
) + SOLVERS  # calibration_method: "sequential" is greedy on the sequential calibration's targets
DEFAULT_SOLVER = "greedy"  # solve_layer's default
# calibration_method's default: the only one that keeps >= 90% of the held-out gain at 4 bits (docs/design.md)
DEFAULT_METHOD = "sequential"
DEFAULT_DAMPING = 0.01  # GPTQ's damp_percent: share of the mean diagonal added to H before inverting it
_BLOCK = 128  # columns per lazy-update block, as GPTQ


@dataclass
class CalibratedLayer(LayerRounding):
    """What the calibrated integer merge does to one layer, measured on the calibration inputs.

    ``delta_sq`` is the energy of the adapter's effect on the layer's calibration outputs, ``||X dW^T||^2``, and
    ``error_sq`` that of the merged layer's output error against the adapter model, ``||X (W' - W - dW)^T||^2``.
    With the sequential calibration (``sequential``), ``X`` are the merged model's inputs and the reference is
    the adapter model's output: ``delta_sq`` is the error the base codes leave, ``||X W^T - y_a||^2`` (the adapter's
    effect plus what the layers before missed), ``error_sq`` the error the new codes leave, ``||X W'^T - y_a||^2``.
    """

    codes_changed: int = 0
    zeros_changed: int = 0
    codes_total: int = 0
    zeros_total: int = 0
    rows_kept_as_base: int = 0  # rows whose calibrated result was no better than the base, left unchanged
    sequential: bool = False  # measured on the merged model's inputs against the adapter model's outputs


class CalibratedMergeReport(MergeReport):
    """Per-layer and total outcome of a calibrated integer merge (``kept`` is measured on layer outputs)."""

    refusal_hint = (
        "The calibrated merge can move codes and zero points only by whole quantization steps; what it could not "
        "express is lost."
    )

    @property
    def codes_changed(self) -> int:
        return sum(layer.codes_changed for layer in self.layers)

    @property
    def zeros_changed(self) -> int:
        return sum(layer.zeros_changed for layer in self.layers)

    @property
    def codes_total(self) -> int:
        return sum(layer.codes_total for layer in self.layers)

    @property
    def zeros_total(self) -> int:
        return sum(layer.zeros_total for layer in self.layers)

    def summary(self) -> str:
        what = (
            "of the layer-output error the base codes leave on the merged model's calibration inputs (sequential: "
            "the adapter's effect plus what earlier layers missed)"
            if self.layers and all(layer.sequential for layer in self.layers)
            else "of the adapter's effect on the calibration inputs' layer outputs"
        )
        return (
            f"calibrated integer merge keeps {self.kept:.1%} {what} over {len(self.layers)} layers "
            f"({self.codes_changed:,} of {self.codes_total:,} codes and {self.zeros_changed:,} of "
            f"{self.zeros_total:,} zero points changed)"
        )


@dataclass
class LayerSolution:
    """New integer codes ``q'[k, n]`` and zero points ``z'[g, n]`` of one layer, and what they keep."""

    codes: torch.Tensor  # (in_features, out_features) int64
    zeros: torch.Tensor  # (groups, out_features) int64
    report: CalibratedLayer


def damped(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``H + damping * mean(diag H) * I``, and dead inputs (zero diagonal) given a unit diagonal, as GPTQ does."""
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damping * float(diag.mean())
    return h


def error_feedback_round(
    target: torch.Tensor, hessian: torch.Tensor, step: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Integers ``m`` in ``[low, high]`` with ``step * m`` close to ``target`` in the metric of ``hessian``.

    Every row (output) is an independent problem over the columns: ``min (step*m - target) H (step*m - target)^T``.
    GPTQ's algorithm: round column ``i``, then move the remaining columns' targets by the rounding error times row
    ``i`` of the upper Cholesky factor of ``H^-1`` (lazily, one block of columns at a time).

    Args:
        target: (rows, columns) wanted value changes.
        hessian: (columns, columns) positive definite (damped).
        step, low, high: (rows, columns) grid step and bounds of ``m`` per entry.
    """
    columns = hessian.shape[0]
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    target = target.clone()
    m = torch.zeros_like(target)
    for i1 in range(0, columns, _BLOCK):
        i2 = min(i1 + _BLOCK, columns)
        block = target[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            chosen = torch.round(block[:, i] / step[:, c]).clamp_(low[:, c], high[:, c])
            m[:, c] = chosen
            error = (block[:, i] - step[:, c] * chosen) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            errors[:, i] = error
        target[:, i2:] -= errors @ upper[i1:i2, i2:]
    return m


def greedy_round(
    linear: torch.Tensor,
    hessian: torch.Tensor,
    step: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    threshold: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    zero_step: torch.Tensor | None = None,
    zero_low: torch.Tensor | None = None,
    zero_high: torch.Tensor | None = None,
    max_moves: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer code moves ``m`` (and group moves ``mz``) chosen one at a time, the best move of each row first.

    Minimises ``v H v^T - 2 v . b`` for every row, ``v = step * m + zero_step[g] * mz[g]`` the value change and
    ``b = linear`` (for a plain target ``t``: ``b = t H``, and the objective is ``(v - t) H (v - t)^T`` up to a
    constant), by coordinate descent from ``m = 0``: at each round every row takes the single move (one code, or one
    group's zero point, by one step) that lowers its objective the most. A row stops when its best move gains no
    more than ``threshold`` (per row), or after ``max_moves`` moves; rows are independent, so a stopped row never
    needs another look. Unlike error feedback, which rounds a column away from its code only once the error pushed
    onto it reaches half a step, this finds the few moves whose combined effect on the outputs matches a target far
    smaller than one step per weight.

    Args:
        linear: (rows, in) the objective's linear term ``b``.
        hessian: (in, in) ``X^T X`` (undamped: this is the objective itself).
        step, low, high: (rows, in) code step and bounds of ``m``.
        threshold: (rows,) smallest gain worth a move.
        g_idx: (in,) channel to group; with ``zero_step``/``zero_low``/``zero_high`` ((rows, groups)) zero moves are
            candidates too (a move by ``+1`` lowers the zero point, raising every weight of the group by one step).
    """
    m = torch.zeros_like(linear)
    gradient = -linear.clone()  # v H - b at v = 0
    diag = hessian.diagonal()
    with_zeros = zero_step is not None
    if with_zeros:
        groups = zero_step.shape[1]
        mz = torch.zeros_like(zero_step)
        pooled_rows = torch.zeros(groups, hessian.shape[1], dtype=hessian.dtype, device=hessian.device)
        pooled_rows.index_add_(0, g_idx, hessian)  # M^T H
        pooled_diag = torch.zeros(groups, groups, dtype=hessian.dtype, device=hessian.device)
        pooled_diag = pooled_diag.index_add_(1, g_idx, pooled_rows).diagonal().clone()  # diag(M^T H M)
    else:
        mz = torch.zeros(linear.shape[0], 0, dtype=linear.dtype, device=linear.device)
    active = torch.arange(linear.shape[0], device=linear.device)
    for _ in range(max_moves):
        grad, st = gradient[active], step[active]
        direction = -torch.sign(grad)
        moved = m[active] + direction
        gain = 2 * st * grad.abs() - st.square() * diag
        gain = torch.where((moved >= low[active]) & (moved <= high[active]) & (direction != 0), gain, -1.0)
        best, where = gain.max(1)
        if with_zeros:
            zst = zero_step[active]
            group_gradient = torch.zeros_like(zst).index_add_(1, g_idx, grad)
            zero_direction = -torch.sign(group_gradient)
            zero_gain = 2 * zst * group_gradient.abs() - zst.square() * pooled_diag
            zero_moved = mz[active] + zero_direction
            feasible = (zero_moved >= zero_low[active]) & (zero_moved <= zero_high[active]) & (zero_direction != 0)
            zero_best, zero_where = torch.where(feasible, zero_gain, -1.0).max(1)
            take_zero = zero_best > best
            best = torch.maximum(best, zero_best)
        keep = best > threshold[active]
        if not bool(keep.any()):
            break
        if with_zeros:
            chosen = keep & take_zero
            n, g = active[chosen], zero_where[chosen]
            delta = zero_direction[chosen, g]
            mz[n, g] += delta
            gradient[n] += (delta * zero_step[n, g])[:, None] * pooled_rows[g]
            code = keep & ~take_zero
        else:
            code = keep
        n, k = active[code], where[code]
        delta = direction[code, k]
        m[n, k] += delta
        gradient[n] += (delta * step[n, k])[:, None] * hessian[k]
        active = active[keep]
    return m, mz


def row_energy(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``e_n^T H e_n`` for every row ``n`` of ``error`` (rows x columns), in fp64."""
    return ((error @ hessian) * error).sum(1, dtype=torch.float64)


def sparse_rows_times(values: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``values @ hessian`` for a mostly-zero ``values`` (a merge moves few codes): cost follows the moves."""
    if values.count_nonzero() * 10 > values.numel():
        return values @ hessian
    return torch.sparse.mm(values.to_sparse(), hessian)


def pooled_rows(hessian: torch.Tensor, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """``M^T H`` (groups x in): ``dW H`` of a group-constant ``dW`` is ``D @ M^T H``, out x groups x in, not in^2."""
    rows = torch.zeros(groups, hessian.shape[1], dtype=hessian.dtype, device=hessian.device)
    return rows.index_add_(0, g_idx, hessian)


def pooled_hessian(hessian: torch.Tensor, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """``M^T H M``: the Hessian of group-constant changes (``M[k, g] = 1`` if channel ``k`` is in group ``g``)."""
    rows = pooled_rows(hessian, g_idx, groups)
    pooled = torch.zeros(groups, groups, dtype=hessian.dtype, device=hessian.device)
    return pooled.index_add_(1, g_idx, rows)


@torch.no_grad()
def solve_layer(
    name: str,
    codes: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    delta: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    lowest_zero: int = 0,
    method: str = DEFAULT_SOLVER,
    damping: float = DEFAULT_DAMPING,
    act_order: bool = True,
    linear: torch.Tensor | None = None,
    start_energy: torch.Tensor | None = None,
    tolerance: float = 1e-3,
) -> LayerSolution:
    """The calibrated integer merge of one layer.

    Per output row ``n`` it minimises ``v_n H v_n^T - 2 v_n . b_n``, ``v`` the change of the dequantized weight.
    Without ``linear``, ``b = dW H`` (the adapter's weight change on this layer's inputs): the objective is then the
    layer-output error ``||X (W' - W - dW)^T||^2`` up to its constant ``dW H dW^T``. The sequential calibration
    (:mod:`peft_qalora.sequential_calibration`) passes ``b`` and the constant measured on the merged model's inputs
    instead.

    Args:
        name: The layer's name, for the report.
        codes: (in, out) integer codes ``q[k, n]`` of the base.
        zeros: (groups, out) integer zero points ``z[g, n]`` of the base.
        scales: (groups, out) scales ``s[g, n]``.
        g_idx: (in,) group of every input channel (any map: act-order, partial groups).
        delta: (groups, out) the adapter's change ``D[g, n]`` to every weight of a group.
        hessian: (in, in) ``X^T X`` of the layer's calibration inputs.
        bits: Code width; codes and zeros stay in ``[0, 2^bits - 1]``.
        lowest_zero: The smallest zero point the output format holds (1 for ``gptq`` v1, 0 for v2).
        method: One of :data:`METHODS` (module docstring).
        damping: Share of ``mean(diag H)`` added to the diagonal before inverting.
        act_order: Round the columns in order of decreasing ``diag(H)`` (GPTQ's act-order heuristic). The grid is
            the base's either way: only the order of the error feedback changes.
        linear: (out, in) the objective's linear term ``b`` (default ``dW H``).
        start_energy: (out,) the objective's constant: the output error of leaving the row as it is (default
            ``dW H dW^T``). Given with ``linear``.
        tolerance: Greedy stops a row when its best move gains less than this share of its ``start_energy``.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}.")
    if (linear is None) != (start_energy is None):
        raise ValueError("linear and start_energy go together: give both or neither.")
    maxq = (1 << bits) - 1
    device = hessian.device
    g = g_idx.to(device=device, dtype=torch.int64)
    groups = zeros.shape[0]
    h = hessian.to(torch.float32)
    s = scales.to(device=device, dtype=torch.float32).t().contiguous()  # (out, groups)
    d = delta.to(device=device, dtype=torch.float32).t().contiguous()  # (out, groups)
    q = codes.to(device=device, dtype=torch.int64).t().contiguous()  # (out, in)
    z = zeros.to(device=device, dtype=torch.int64).t().contiguous()  # (out, groups)
    wanted = d[:, g]  # dW (out, in): the adapter's change to every weight
    plain = linear is None
    if plain:
        linear = d @ pooled_rows(h, g, groups)  # dW H
        start_energy = (linear * wanted).sum(1, dtype=torch.float64)
    else:
        linear = linear.to(device=device, dtype=torch.float32)
        start_energy = start_energy.to(device=device, dtype=torch.float64)

    zero_steps = torch.zeros_like(d)  # m_z: the weight of group g moves by s * m_z, i.e. z' = z - m_z
    code_steps = torch.zeros_like(wanted)  # m_q: q' = q + m_q
    if method == "greedy":
        code_steps, zero_steps = greedy_round(
            linear,
            h,
            s[:, g],
            (-q).float(),
            (maxq - q).float(),
            (tolerance * start_energy).float(),
            g,
            s,
            (z - maxq).float(),
            (z - lowest_zero).float(),
        )
    else:
        # Error feedback rounds a target: the unconstrained minimiser b H^-1 (= dW when b = dW H).
        target = wanted
        if method in ("zeros", "both"):
            pooled = damped(pooled_hessian(h, g, groups), damping)
            group_target = d
            if not plain:
                pooled_linear = torch.zeros_like(d).index_add_(1, g, linear)  # b M
                group_target = torch.cholesky_solve(pooled_linear.t(), torch.linalg.cholesky(pooled)).t()
            zero_steps = error_feedback_round(group_target, pooled, s, (z - maxq).float(), (z - lowest_zero).float())
        if method in ("codes", "both"):
            if not plain:
                target = torch.cholesky_solve(linear.t(), torch.linalg.cholesky(damped(h, damping))).t()
            remaining = target - (s * zero_steps)[:, g]
            step = s[:, g]
            low, high = (-q).float(), (maxq - q).float()
            if act_order:
                order = torch.argsort(h.diagonal(), descending=True)
                h_ordered = damped(h[order][:, order], damping)
                m = error_feedback_round(remaining[:, order], h_ordered, step[:, order], low[:, order], high[:, order])
                code_steps = torch.empty_like(m).index_copy_(1, order, m)
            else:
                code_steps = error_feedback_round(remaining, damped(h, damping), step, low, high)

    # Rows where the result is no better on the calibration inputs than leaving them keep the base's codes and zeros.
    change = s[:, g] * (code_steps + zero_steps[:, g])
    gain = 2 * (change * linear).sum(1, dtype=torch.float64) - (sparse_rows_times(change, h) * change).sum(
        1, dtype=torch.float64
    )
    worse = gain < 0
    code_steps[worse] = 0
    zero_steps[worse] = 0
    change[worse] = 0
    gain[worse] = 0
    energy = (start_energy - gain).clamp(min=0)

    new_codes = (q + code_steps.to(torch.int64)).t().contiguous()
    new_zeros = (z - zero_steps.to(torch.int64)).t().contiguous()
    error = change - wanted
    report = CalibratedLayer(
        name=name,
        delta_sq=float(start_energy.sum()),
        error_sq=float(energy.sum()),
        max_error_steps=float((error / s[:, g]).abs().max()) if error.numel() else 0.0,
        clamped_groups=0,  # every candidate lies on the grid by construction
        codes_changed=int((code_steps != 0).sum()),
        zeros_changed=int((zero_steps != 0).sum()),
        codes_total=q.numel(),
        zeros_total=z.numel(),
        rows_kept_as_base=int(worse.sum()),
        sequential=not plain,
    )
    return LayerSolution(new_codes, new_zeros, report)
