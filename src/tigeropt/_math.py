"""Scalar math shared by an optimizer module and its kernels (Triton and C).

This module sits below both: it imports nothing from tigeropt, so ``kernels/`` and ``_cpu/``
can use it without reaching up into the optimizer modules.
"""

from __future__ import annotations

import math

__all__ = ["adax_scalars"]


def adax_scalars(step: float, beta2: float, eps: float) -> tuple[float, float, float]:
    """(bhat, 1 - bhat, eps/sqrt(bc)) at step t, computed stably in float64."""
    try:
        bc = math.expm1(step * math.log1p(beta2))
    except OverflowError:
        bc = math.inf
    one_minus_bhat = beta2 / bc
    return 1.0 - one_minus_bhat, one_minus_bhat, eps / math.sqrt(bc)
