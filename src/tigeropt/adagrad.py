"""Adagrad (Duchi et al. 2011), standard and GloVe-style (Pennington et al. 2014, seed 004).

Standard — numerically the same as ``torch.optim.Adagrad`` (state ``sum``):

    g   = g + wd*p                            (if weight_decay)
    lr_t = lr / (1 + (t-1)*lr_decay)
    G   = G + g^2
    p   = p - lr_t * g / (sqrt(G) + eps)

GloVe-style (``glove=True``), as GloVe's C code (src/glove.c) updates:

    u = lr_t * clip(g, -c, c)                 (clipping only with grad_clip_value=c)
    p = p - u / sqrt(G)                       (G *before* this step's term)
    G = G + u^2

The accumulator starts at 1.0 (``initial_accumulator_value`` defaults to 0.0
for standard and 1.0 for GloVe-style; a zero GloVe accumulator is an error).
Early steps are plain SGD with step lr*g, and unlike standard Adagrad the
update depends on the scale of the loss; eps is not used.
``skip_nonfinite_rows=True`` also copies newer glove.c: a row (slice along
dim 0; an element for 0/1-D tensors) whose update sum is inf/NaN is not
applied, while its accumulator is still updated.  GloVe's own lr is 0.05.

Row-wise (``rowwise=True``), FBGEMM's exact row-wise Adagrad (the workhorse
of torchrec/FBGEMM embedding tables): one accumulator per row r of a 2-D
parameter (row length d), so the state ``sum`` has shape ``(rows,)``:

    g   = g + wd*p                            (if weight_decay)
    G_r = G_r + (1/d) * sum_j g_rj^2          (the row's mean square, summed in fp64)
    p_r = p_r - lr_t * g_r / (sqrt(G_r) + eps)

Same ``lr_decay``, ``weight_decay`` (L2), ``initial_accumulator_value``, ``eps``
and ``maximize`` as the standard form; dense, sparse and lazy gradients (rows
without gradient keep G_r).  4 bytes of state per row instead of per element.
Only for real 2-D parameters; not combined with ``glove=True`` (GloVe's update
divides by the accumulator before adding to it, per element; use one or the
other).  The fused C step (CPU) has a row kernel for it; the Triton path
(``fused=True``) runs the reference update for row-wise groups.  FSDP2 (DTensor
parameters sharded along dim 0, or replicated): ``sum`` is a DTensor with the
parameter's placements, each rank holding its rows' accumulators, so the update
is local and checkpoints (``torch.distributed.checkpoint``) shard and reshard it
with the rows; other placements are refused (ValueError).

All forms accept sparse gradients (``nn.Embedding(sparse=True)``): only the
rows present with a non-zero gradient change (the step count is per
parameter, as in torch).

Adagrad has no momentum: with ``OneCycleLR``/``CyclicLR`` pass ``cycle_momentum=False``
(torch raises otherwise, as for ``torch.optim.Adagrad``); every other LR scheduler works.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import TigerOptimizer, to_float, working, write_back
from ._dtensor import is_dtensor, whole_rows
from ._math import foreach_sqrt_rn, sqrt_rn
from ._validate import check, check_bool, check_lr, check_number

__all__ = ["Adagrad"]


def _single_tensor_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                           state_steps: list[Tensor], *, lr: float | Tensor, lr_decay: float,
                           weight_decay: float, eps: float, glove: bool, grad_clip_value: float | None,
                           skip_nonfinite_rows: bool, maximize: bool, rowwise: bool = False) -> None:
    lr = to_float(lr)
    for param, grad, acc, step_t in zip(params, grads, state_sums, state_steps):
        p = param.to(acc.dtype)
        g = grad.to(acc.dtype)
        if maximize:
            g = -g
        if weight_decay != 0.0:
            g = g.add(p, alpha=weight_decay)
        clr = lr / (1 + (step_t.item() - 1) * lr_decay)
        if rowwise:
            acc.add_(row_mean_square(g))
            # (-clr*g) / (sqrt(G)+eps), one correctly rounded op each (addcdiv's rounding depends on
            # whether an operand is broadcast)
            p.add_(g.mul(-clr).div_(sqrt_rn(acc).add_(eps).unsqueeze(1)))
        elif not glove:
            acc.addcmul_(g, g, value=1)
            p.addcdiv_(g, sqrt_rn(acc).add_(eps), value=-clr)
        else:
            if grad_clip_value is not None:
                g = g.clamp(-grad_clip_value, grad_clip_value)
            u = g.mul(clr)
            delta = u.div(sqrt_rn(acc))
            if skip_nonfinite_rows:
                rows = delta.reshape(delta.shape[0], -1).sum(dim=1) if delta.dim() > 1 else delta
                ok = torch.isfinite(rows).reshape(rows.shape + (1,) * (delta.dim() - rows.dim()))
                delta = torch.where(ok, delta, torch.zeros_like(delta))
            p.sub_(delta)
            acc.addcmul_(u, u)
        if p is not param:
            param.copy_(p)


def _multi_tensor_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                          state_steps: list[Tensor], *, lr: float | Tensor, lr_decay: float,
                          weight_decay: float, eps: float, glove: bool, grad_clip_value: float | None,
                          skip_nonfinite_rows: bool, maximize: bool, rowwise: bool = False) -> None:
    if not params:
        return
    if (glove and skip_nonfinite_rows) or rowwise:  # per-row rules: the reference loop
        _single_tensor_adagrad(params, grads, state_sums, state_steps, lr=lr, lr_decay=lr_decay,
                               weight_decay=weight_decay, eps=eps, glove=glove,
                               grad_clip_value=grad_clip_value, skip_nonfinite_rows=skip_nonfinite_rows,
                               maximize=maximize, rowwise=rowwise)
        return
    lr = to_float(lr)
    dtype = state_sums[0].dtype
    ps, gs = working(params, dtype), working(grads, dtype)
    if maximize:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0.0:
        gs = torch._foreach_add(gs, ps, alpha=weight_decay)
    clrs = [lr / (1 + (s.item() - 1) * lr_decay) for s in state_steps]
    if not glove:
        torch._foreach_addcmul_(state_sums, gs, gs, value=1)
        std = foreach_sqrt_rn(state_sums)
        torch._foreach_add_(std, eps)
        torch._foreach_addcdiv_(ps, gs, std, [-c for c in clrs])
    else:
        if grad_clip_value is not None:
            gs = torch._foreach_clamp_max(torch._foreach_clamp_min(gs, -grad_clip_value), grad_clip_value)
        us = torch._foreach_mul(gs, clrs)
        delta = torch._foreach_div(us, foreach_sqrt_rn(state_sums))
        torch._foreach_sub_(ps, delta)
        torch._foreach_addcmul_(state_sums, us, us)
    write_back(params, ps)


def row_mean_square(g: Tensor) -> Tensor:
    """Mean of g^2 over each row of a 2-D ``g``, summed in float64 and rounded once to g's dtype (0 for
    rows of no element, as the fused kernels give, not 0/0)."""
    return g.to(torch.float64).square().sum(dim=1).div_(max(g.shape[1], 1)).to(g.dtype)


class Adagrad(TigerOptimizer):
    """Adagrad: standard (== torch.optim.Adagrad), GloVe-style (``glove``) or row-wise (``rowwise``).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 1e-2 as torch; GloVe uses 0.05).
        lr_decay: lr_t = lr / (1 + (t-1)*lr_decay).
        weight_decay: L2 added to the gradient.
        initial_accumulator_value: starting value of the accumulator ``sum``;
            None means 0.0 (standard) or 1.0 (GloVe-style).
        eps: added to sqrt(G) in the standard form (unused by GloVe-style).
        glove: the GloVe-style update of the module docstring.
        grad_clip_value: GloVe-style only: clip each gradient component to [-c, c].
        skip_nonfinite_rows: GloVe-style only: newer glove.c's skip of non-finite row updates.
        rowwise: FBGEMM's row-wise Adagrad: one accumulator per row of a 2-D parameter
            (state ``sum`` of shape ``(rows,)``); every parameter of the group must be 2-D and real.
        maximize, foreach, fused, on_nonfinite, capturable: see :mod:`tigeropt._base`.
        state_precision, stochastic_rounding, sr_seed: low-precision state and bf16 stochastic
            rounding, see :mod:`tigeropt._base`.
        lazy: per-group; with dense gradients only rows that have a non-zero change.
    """

    state_keys = ("sum",)
    state_8bit_keys = ()  # sum >= 0 in bf16 under "8bit": an 8-bit sum flushed to 0 blows the update up
    reference_impl = staticmethod(_single_tensor_adagrad)
    foreach_impl = staticmethod(_multi_tensor_adagrad)
    kernel = "adagrad"
    supports_sparse = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1e-2,
                 lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float | None = None, eps: float = 1e-10, *,
                 glove: bool = False, grad_clip_value: float | None = None,
                 skip_nonfinite_rows: bool = False, rowwise: bool = False, maximize: bool = False,
                 foreach: bool | None = None,
                 fused: bool | None = None, lazy: bool = False, on_nonfinite: str = "ignore",
                 capturable: bool = False, state_precision: str | None = None,
                 stochastic_rounding: bool = False, sr_seed: int = 0) -> None:
        if initial_accumulator_value is None:
            initial_accumulator_value = 1.0 if glove else 0.0
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, glove=glove,
                        grad_clip_value=grad_clip_value, skip_nonfinite_rows=skip_nonfinite_rows,
                        rowwise=rowwise, lazy=lazy)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, fused=fused,
                         on_nonfinite=on_nonfinite, capturable=capturable,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                         sr_seed=sr_seed)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_number("lr_decay", group["lr_decay"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_number("eps", group["eps"], 0.0)
        check_bool("glove", group["glove"])
        check_bool("skip_nonfinite_rows", group["skip_nonfinite_rows"])
        acc = group["initial_accumulator_value"]
        check_number("initial_accumulator_value", acc, 0.0)
        if group["glove"]:
            check(acc > 0.0, "initial_accumulator_value", acc,
                  "glove=True divides by sqrt(accumulator) before adding to it, so it must be > 0")
        clip = group["grad_clip_value"]
        if clip is not None:
            check_number("grad_clip_value", clip, 0.0, lo_open=True)
        if not group["glove"]:
            check(clip is None, "grad_clip_value", clip, "only used with glove=True")
            check(not group["skip_nonfinite_rows"], "skip_nonfinite_rows", True, "only used with glove=True")
        rowwise = group.setdefault("rowwise", False)
        check_bool("rowwise", rowwise)
        if rowwise:
            check(not group["glove"], "rowwise", rowwise,
                  "not combined with glove=True: choose GloVe-style or row-wise Adagrad")
            check(not group.get("capturable"), "rowwise", rowwise,
                  "not combined with capturable=True (row-wise runs no CUDA-graph kernel)")
            for i, p in enumerate(group["params"]):
                if p.dim() != 2 or p.is_complex():
                    raise ValueError(f"Invalid rowwise: True (row-wise Adagrad needs real 2-D parameters, "
                                     f"params[{i}] has shape {tuple(p.shape)} and dtype {p.dtype}; put other "
                                     "parameters in a group with rowwise=False)")
                if is_dtensor(p) and not whole_rows(p):  # FSDP2 shards rows: the (rows,) state with them
                    raise ValueError(f"Invalid rowwise: True (row-wise Adagrad needs DTensor parameters "
                                     f"sharded along dim 0 (FSDP2's default) or replicated, params[{i}] has "
                                     f"placements {p.placements})")

    def _state_shape(self, key: str, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return (p.shape[0],) if group.get("rowwise") else tuple(p.shape)

    def _path(self, group: dict[str, Any], device: torch.device, dtype: torch.dtype) -> str:
        path = super()._path(group, device, dtype)
        if path == "fused" and group.get("rowwise"):
            return "foreach"  # no Triton kernel for the per-row reduction yet: the reference loop
        return path

    def _initial_value(self, key: str, group: dict[str, Any]) -> float:
        return group["initial_accumulator_value"]

    def _unfused_options(self, group: dict[str, Any]) -> str:
        return "skip_nonfinite_rows" if group["skip_nonfinite_rows"] else ""

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        hyper = dict(lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"],
                     eps=group["eps"], glove=group["glove"], grad_clip_value=group["grad_clip_value"],
                     skip_nonfinite_rows=group["skip_nonfinite_rows"], maximize=group["maximize"])
        if group.get("rowwise"):  # only when on: the flag is new, older impl signatures lack it
            hyper["rowwise"] = True
        return hyper
