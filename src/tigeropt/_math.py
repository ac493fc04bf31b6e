"""Scalar math shared by an optimizer module and its kernels (Triton and C).

This module sits below both: it imports nothing from tigeropt, so ``kernels/`` and ``_cpu/``
can use it without reaching up into the optimizer modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adax_scalars", "adax_scalars_tensor", "TINY", "sqrt_rn", "foreach_sqrt_rn"]

#: float32's smallest normal number: the floor of AdaX's eps/sqrt(bc), below which 1-bhat is flushed to 0.
TINY = 2.0 ** -126


def adax_scalars(step: float, beta2: float, eps: float) -> tuple[float, float, float]:
    """(bhat, 1 - bhat, eps/sqrt(bc)) at step t, computed stably in float64.

    1-bhat below 2^-126 is flushed to 0 and eps/sqrt(bc) never goes below 2^-126, so the
    denominator sqrt(vhat) + eps_t stays positive (a zero-history element moves by 0/eps_t = 0)
    and every scalar is a float32 normal number or 0 (what the fp32 kernels take exactly).
    """
    try:
        bc = math.expm1(step * math.log1p(beta2))
    except OverflowError:
        bc = math.inf
    one_minus_bhat = beta2 / bc
    if one_minus_bhat < TINY:
        one_minus_bhat = 0.0
    return 1.0 - one_minus_bhat, one_minus_bhat, max(eps / math.sqrt(bc), TINY)


def adax_scalars_tensor(steps: Tensor, beta2: float, eps: float) -> Tensor:
    """:func:`adax_scalars` for a 1-D tensor of step counts: [n, 3] float64 (bhat, 1-bhat, eps_t).

    Device math, no host synchronization: used for step counts kept on a GPU (capturable) and
    while torch.compile traces a step (where a step's ``.item()`` would be a graph break).
    """
    t = steps.to(torch.float64)
    bc = torch.expm1(t * math.log1p(beta2))
    one_minus_bhat = beta2 / bc
    one_minus_bhat = torch.where(one_minus_bhat < TINY, 0.0, one_minus_bhat)  # as adax_scalars
    eps_t = (eps / bc.sqrt()).clamp_min(TINY)
    return torch.stack([1.0 - one_minus_bhat, one_minus_bhat, eps_t], dim=1)


def sqrt_rn(t: Tensor) -> Tensor:
    """``t.sqrt()`` correctly rounded, as C's ``sqrtf``, CUDA's ``sqrt`` and Triton's ``sqrt_rn`` are.

    torch's CPU float32 sqrt is not: its vectorized loop leaves about 17% of the elements one unit in
    the last place off (torch 2.13, every CPU capability; a tensor's tail shorter than a vector is
    exact), which would make the reference differ from the fused paths by more than the rounding of
    low-precision storage hides.  float32 on the CPU is therefore taken through float64 (whose sqrt
    is within an ulp of float64, so the rounding to float32 is the correctly rounded float32 sqrt:
    a float32 square root is never within 2^-50 relative of a float32 rounding midpoint).
    """
    if t.dtype == torch.float32 and t.device.type == "cpu":
        return t.double().sqrt_().float()
    return t.sqrt()


def foreach_sqrt_rn(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`sqrt_rn` of each tensor (``torch._foreach_sqrt`` where torch's sqrt is correctly rounded)."""
    if tensors and tensors[0].dtype == torch.float32 and tensors[0].device.type == "cpu":
        return [sqrt_rn(t) for t in tensors]
    return torch._foreach_sqrt(tensors)
