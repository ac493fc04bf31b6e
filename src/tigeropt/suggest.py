"""Settings for Tiger and Lion from a tuned AdamW's, as found by ``benchmarks/bench_quality.py``.

The study (README, "Setting Tiger and Lion"; raw runs in ``benchmarks/results/``) tuned
lr x weight decay x momentum for AdamW, Tiger and Lion on a character-level transformer.
What carried over from AdamW's best setting:

* **lr / wd**: the sign optimizers' best lr was AdamW's best lr / 3 with the *same*
  decay per step lr*wd, so wd = AdamW's wd x 3 (the Lion paper's coupling).
* **momentum**: the originals' defaults (Tiger beta 0.965, Lion (0.9, 0.99)) are made for
  long runs; in a short run a sign step keeps pushing a full lr for about 1/(1-beta)
  steps after its gradient turns, and lower momentum won by a wide margin.  The
  momentum horizon 1/(1-beta) suggested here is 5 steps (beta 0.8) up to 1,000 optimizer
  steps, what the study measured (at 300 and 600 steps); beyond, it grows with sqrt(steps) up
  to the default's 28.6 steps (0.965), an extrapolation.

The defaults of :class:`~tigeropt.Tiger` and :class:`~tigeropt.Lion` stay the originals'.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["suggest_hparams"]

#: lr(sign optimizer) = AdamW's lr / LR_RATIO; wd = AdamW's wd x LR_RATIO (same lr*wd).
LR_RATIO = 3.0
#: Momentum horizon 1/(1-beta) in optimizer steps: HORIZON_MIN up to SHORT_RUN steps, then growing
#: as sqrt(steps), capped at the original default's horizon (Tiger 0.965: 28.6 steps).
HORIZON_MIN = 5.0
SHORT_RUN = 1000
HORIZON_MAX = 1 / (1 - 0.965)


def _horizon(steps: int) -> float:
    return min(HORIZON_MAX, HORIZON_MIN * math.sqrt(max(steps, SHORT_RUN) / SHORT_RUN))


def suggest_hparams(optimizer: str, *, adamw_lr: float, adamw_weight_decay: float, steps: int,
                    batch_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``optimizer`` ("tiger" or "lion") from a tuned AdamW's.

    Args:
        optimizer: "tiger" or "lion".
        adamw_lr: AdamW's tuned (peak) learning rate.
        adamw_weight_decay: AdamW's decoupled weight decay (``torch.optim.AdamW``'s).
        steps: the run's length in optimizer steps (after gradient accumulation).
        batch_size: samples per optimizer step.  Accepted for the record; it changes nothing.
            At a fixed number of samples the study's best lr ratio AdamW/Tiger fell from about
            4 (batch 32) to 2 (128) and 1 (512), but where that happens depends on the task's
            gradient noise, not on a batch size in samples, so the rule keeps the ratio 3 (the
            Lion paper's range is 3-10); far above the batch AdamW was tuned at, also try
            AdamW's lr / 1.5.

    Returns:
        ``{"lr", "weight_decay", "beta"}`` for Tiger, ``{"lr", "weight_decay", "betas"}`` for
        Lion, ready for ``Tiger(model.parameters(), **kwargs)``.

    Example::

        kw = tigeropt.suggest_hparams("tiger", adamw_lr=3e-3, adamw_weight_decay=0.1, steps=600)
        # {'lr': 0.001, 'weight_decay': 0.3, 'beta': 0.8}
    """
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a str, got {type(optimizer).__name__}")
    name = optimizer.lower()
    if name not in ("tiger", "lion"):
        raise ValueError(f"Invalid optimizer: {optimizer!r} (one of 'tiger', 'lion')")
    for arg, value in (("adamw_lr", adamw_lr), ("adamw_weight_decay", adamw_weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{arg} must be a float, got {type(value).__name__}")
    if not (math.isfinite(adamw_lr) and adamw_lr > 0):
        raise ValueError(f"Invalid adamw_lr: {adamw_lr!r} (must be > 0)")
    if not (math.isfinite(adamw_weight_decay) and adamw_weight_decay >= 0):
        raise ValueError(f"Invalid adamw_weight_decay: {adamw_weight_decay!r} (must be >= 0)")
    for arg, value in (("steps", steps), ("batch_size", batch_size)):
        if value is None and arg == "batch_size":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"Invalid {arg}: {value!r} (must be >= 1)")
    lr = float(f"{adamw_lr / LR_RATIO:.3g}")
    wd = float(f"{adamw_weight_decay * LR_RATIO:.3g}")
    beta = round(1 - 1 / _horizon(steps), 3)
    if name == "tiger":
        return dict(lr=lr, weight_decay=wd, beta=beta)
    # Lion: the update interpolates with beta1 and the momentum decays with beta2; the study's best
    # pairs had beta1 = beta (Tiger's) and beta2 one ladder step above it.
    return dict(lr=lr, weight_decay=wd, betas=(beta, round(min(0.99, 1 - (1 - beta) / 2), 3)))
