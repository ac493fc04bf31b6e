"""Lion: EvoLved Sign Momentum (Chen et al. 2023, arXiv 2302.06675).

    c = b1*m + (1-b1)*g
    p = p*(1 - lr*wd) - lr*sign(c)        (decoupled weight decay)
    m = b2*m + (1-b2)*g

Defaults from the paper: betas=(0.9, 0.99), weight_decay=0.  Use an lr 3-10x
smaller than AdamW's and a weight decay 3-10x larger.  State: ``exp_avg`` (m),
one tensor the size of the parameter.  ``sign(0) = 0`` on every path; the sign of an
inf/NaN c is NaN, so a non-finite gradient reaches the parameter visibly (as with AdamW).

LR schedulers that cycle momentum (``OneCycleLR``/``CyclicLR``, ``cycle_momentum=True``)
cycle ``betas[0]`` = b1, torch's convention for every ``betas`` optimizer.  For Lion that
is the right knob: b1 weighs the momentum against the new gradient in the update
direction (Adam's b1 plays that role), and its default 0.9 lies inside the schedulers'
default ranges (0.85-0.95, 0.8-0.9); b2, the decay of the stored momentum, stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import TigerOptimizer, nan_sign, to_float, working, write_back
from ._validate import check_betas, check_lr, check_number

__all__ = ["Lion"]


def _single_tensor_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
                        weight_decay: float, maximize: bool) -> None:
    lr = to_float(lr)
    for param, grad, m, _ in zip(params, grads, exp_avgs, state_steps):
        p = param.to(m.dtype)
        g = grad.to(m.dtype)
        if maximize:
            g = -g
        c = m.mul(beta1).add_(g, alpha=1 - beta1)
        p.mul_(1 - lr * weight_decay).add_(nan_sign(c), alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1 - beta2)
        if p is not param:
            param.copy_(p)


def _multi_tensor_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
                       weight_decay: float, maximize: bool) -> None:
    if not params:
        return
    lr = to_float(lr)
    dtype = exp_avgs[0].dtype
    ps, gs = working(params, dtype), working(grads, dtype)
    if maximize:
        gs = torch._foreach_neg(gs)
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, gs, alpha=1 - beta1)
    sign_c = torch._foreach_sign(c)
    torch._foreach_add_(sign_c, c, alpha=0.0)  # nan_sign: NaN for a non-finite c
    torch._foreach_mul_(ps, 1 - lr * weight_decay)
    torch._foreach_add_(ps, sign_c, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, gs, alpha=1 - beta2)
    write_back(params, ps)


class Lion(TigerOptimizer):
    """Lion (Chen et al. 2023).  See the module docstring for the update rule.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 1e-4, as in the paper's recommendation of 3-10x below AdamW).
        betas: (b1, b2) — b1 interpolates the update direction, b2 is the momentum decay.
        weight_decay: decoupled weight decay (``p *= 1 - lr*wd``).
        maximize, foreach, fused, on_nonfinite, capturable: see :mod:`tigeropt._base`.
        state_precision, stochastic_rounding, sr_seed: low-precision state and bf16 stochastic
            rounding, see :mod:`tigeropt._base`.
        lazy: per-group; only rows (dim 0) with gradient change (sparse gradients allowed).

    Setting Tiger and Lion (``benchmarks/bench_quality.py``; README "Setting Tiger and Lion"):
    start from a tuned AdamW: lr = AdamW's lr / 3 and weight_decay = AdamW's x 3 (the same
    decay per step, lr*wd).  The default betas=(0.9, 0.99) are made for long runs: b2 sets the
    momentum's memory, 1/(1-b2) = 100 steps.  In a run of about a thousand optimizer steps or
    fewer use about (0.8, 0.9).  On the study's 600-step char-LM, (0.9, 0.99) ended 18% above
    AdamW's best held-out loss, (0.8, 0.9) 2.5% (seed 0) and (0.7, 0.9) 1.6% (mean of 3 seeds).
    :func:`tigeropt.suggest_hparams` ("lion", adamw_lr=..., adamw_weight_decay=..., steps=...)
    returns these as keyword arguments.
    """

    state_keys = ("exp_avg",)
    reference_impl = staticmethod(_single_tensor_lion)
    foreach_impl = staticmethod(_multi_tensor_lion)
    kernel = "lion"

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 lazy: bool = False, on_nonfinite: str = "ignore", capturable: bool = False,
                 state_precision: str | None = None, stochastic_rounding: bool = False,
                 sr_seed: int = 0) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, lazy=lazy)
        super().__init__(params, defaults, maximize=maximize, foreach=foreach, fused=fused,
                         on_nonfinite=on_nonfinite, capturable=capturable,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding,
                         sr_seed=sr_seed)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas("betas", group["betas"], [(0.0, 1.0, False, True), (0.0, 1.0, False, True)])
        check_number("weight_decay", group["weight_decay"], 0.0)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        b1, b2 = group["betas"]
        return dict(lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                    maximize=group["maximize"])
