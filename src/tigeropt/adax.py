"""AdaX: Adaptive gradient descent with eXponential long-term memory (Li et al. 2020, arXiv 2004.09740).

The official code (github.com/switchablenorms/AdaX) computes

    m  = b1*m + (1-b1)*g                      (no bias correction on m)
    v  = (1+b2)*v + b2*g^2
    bc = (1+b2)^t - 1
    p  = p - lr*sqrt(bc) * m / (sqrt(v) + eps)

v grows like (1+b2)^t and overflows float32 near t = 887k, so this module
stores vhat = v/bc instead (Su, seed 002), which is the same update:

    vhat = bhat*vhat + (1-bhat)*g^2,   1 - bhat = b2 / bc,   bc = expm1(t*log1p(b2))
    p    = p - lr * m / (sqrt(vhat) + eps/sqrt(bc))

bc is computed in float64 on the host.  With b2 = 1e-4, 1-bhat falls below float32's
smallest normal number, 2^-126, from about t = 781k and is flushed to 0; eps/sqrt(bc)
(eps = 1e-12) reaches 2^-126 at about t = 1.19M and is held there, on every path and
dtype.  So an element that never had a gradient (a padding row) gets a zero update at
any step count, as in the official form, instead of 0/(0+0) (eps/sqrt(bc) would
underflow near t = 1.5M); elsewhere the floor changes nothing where sqrt(vhat) >= 2^-102
(about 2e-31).

Defaults are the official AdaX's: lr=1.5e-3, betas=(0.9, 1e-4), eps=1e-12 and
weight_decay=5e-4 as L2 (added to the gradient).  ``decoupled_weight_decay=True``
gives AdaX-W (``p *= 1 - lr*wd`` before the update; the authors recommend
lr=5e-3, wd=5e-2 there).  State: ``exp_avg`` (m) and ``exp_avg_sq`` (vhat).

LR schedulers that cycle momentum (``OneCycleLR``/``CyclicLR``, ``cycle_momentum=True``)
cycle ``betas[0]``, the decay of m, as for Adam; b2 stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import TigerOptimizer, to_float, working, write_back
from ._math import adax_scalars, adax_scalars_tensor, foreach_sqrt_rn, sqrt_rn
from ._ops import compiling
from ._validate import check_betas, check_bool, check_lr, check_number

__all__ = ["AdaX", "adax_scalars"]


def _scalars(state_steps: list[Tensor], beta2: float, eps: float) -> list[tuple[Any, Any, Any]]:
    """Per-tensor (bhat, 1-bhat, eps_t): floats, or float64 0-d tensors while torch.compile traces."""
    if compiling():  # no .item() in a graph: the same float64 math on tensors
        table = adax_scalars_tensor(torch.stack([s.reshape(()) for s in state_steps]), beta2, eps)
        return [tuple(row.unbind()) for row in table.unbind()]
    return [adax_scalars(s.item(), beta2, eps) for s in state_steps]


def _single_tensor_adax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, maximize: bool) -> None:
    lr = to_float(lr)
    for param, grad, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps):
        p = param.to(m.dtype)
        g = grad.to(m.dtype)
        if maximize:
            g = -g
        if weight_decay != 0.0 and not decoupled_weight_decay:
            g = g.add(p, alpha=weight_decay)
        bhat, one_minus_bhat, eps_t = _scalars([step_t], beta2, eps)[0]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        if isinstance(one_minus_bhat, Tensor):  # traced by torch.compile
            v.mul_(bhat).add_(g * g * one_minus_bhat)
        else:
            v.mul_(bhat).addcmul_(g, g, value=one_minus_bhat)
        if weight_decay != 0.0 and decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m, sqrt_rn(v).add_(eps_t), value=-lr)
        if p is not param:
            param.copy_(p)


def _multi_tensor_adax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor,
                       beta1: float, beta2: float, eps: float, weight_decay: float,
                       decoupled_weight_decay: bool, maximize: bool) -> None:
    if not params:
        return
    lr = to_float(lr)
    dtype = exp_avgs[0].dtype
    ps, gs = working(params, dtype), working(grads, dtype)
    if maximize:
        gs = torch._foreach_neg(gs)
    if weight_decay != 0.0 and not decoupled_weight_decay:
        gs = torch._foreach_add(gs, ps, alpha=weight_decay)
    scalars = _scalars(state_steps, beta2, eps)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, gs, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, [s[0] for s in scalars])
    if compiling():  # 0-d tensor scalars
        squares = torch._foreach_mul(gs, gs)
        torch._foreach_add_(exp_avg_sqs, torch._foreach_mul(squares, [s[1] for s in scalars]))
    else:
        torch._foreach_addcmul_(exp_avg_sqs, gs, gs, [s[1] for s in scalars])
    denom = foreach_sqrt_rn(exp_avg_sqs)
    torch._foreach_add_(denom, [s[2] for s in scalars])
    if weight_decay != 0.0 and decoupled_weight_decay:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(ps, exp_avgs, denom, value=-lr)
    write_back(params, ps)


class AdaX(TigerOptimizer):
    """AdaX and AdaX-W (Li et al. 2020), in the overflow-free form.  See the module docstring.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 1.5e-3, official AdaX; AdaX-W: 5e-3).
        betas: (b1, b2); b2 is the long-term memory rate (default 1e-4), must be > 0.
        eps: added to sqrt(v) in the official form (default 1e-12).
        weight_decay: L2 added to the gradient (default 5e-4), or decoupled with
            ``decoupled_weight_decay=True`` (AdaX-W).
        maximize, foreach, fused, on_nonfinite, capturable: see :mod:`tigeropt._base`.
        state_precision, stochastic_rounding, sr_seed: low-precision state and bf16 stochastic
            rounding, see :mod:`tigeropt._base`.
        lazy: per-group; only rows (dim 0) with gradient change (sparse gradients allowed).
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    state_8bit_keys = ("exp_avg",)  # exp_avg_sq (v >= 0) in bf16: an 8-bit v flushed to 0 blows the update up
    reference_impl = staticmethod(_single_tensor_adax)
    foreach_impl = staticmethod(_multi_tensor_adax)
    kernel = "adax"

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1.5e-3,
                 betas: tuple[float, float] = (0.9, 1e-4), eps: float = 1e-12, weight_decay: float = 5e-4,
                 *, decoupled_weight_decay: bool = False, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, lazy: bool = False,
                 on_nonfinite: str = "ignore", capturable: bool = False,
                 state_precision: str | None = None, stochastic_rounding: bool = False,
                 sr_seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, lazy=lazy)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, fused=fused,
                         on_nonfinite=on_nonfinite, capturable=capturable,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                         sr_seed=sr_seed)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas("betas", group["betas"], [(0.0, 1.0, False, True), (0.0, 1.0, True, True)])
        check_number("eps", group["eps"], 0.0)
        check_number("weight_decay", group["weight_decay"], 0.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        b1, b2 = group["betas"]
        return dict(lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], maximize=group["maximize"])
