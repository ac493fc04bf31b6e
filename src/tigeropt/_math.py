"""Scalar math shared by an optimizer module and its kernels (Triton and C).

This module sits below both: it imports nothing from tigeropt, so ``kernels/`` and ``_cpu/``
can use it without reaching up into the optimizer modules.
"""

from __future__ import annotations

import math

__all__ = ["adax_scalars", "TINY"]

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
