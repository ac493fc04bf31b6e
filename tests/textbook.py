"""Textbook float64 references, written straight from SPEC.md, kept apart from the library.

Each function takes a parameter value (float64 tensor), a list of gradients and the
hyperparameters, and returns the parameter (and state) after each step.  Only plain
tensor arithmetic, element by element where the original code is a C loop.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sign(x: Tensor) -> Tensor:
    return (x > 0).double() - (x < 0).double()


def tiger(p: Tensor, grads: list[Tensor], *, lr: float, beta: float,
          wd: float) -> list[tuple[Tensor, Tensor]]:
    p, m, out = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), []
    for g in grads:
        m = beta * m + (1 - beta) * g.double()
        p = p - lr * (sign(m) + wd * p)
        out.append((p.clone(), m.clone()))
    return out


def lion(p: Tensor, grads: list[Tensor], *, lr: float, b1: float, b2: float,
         wd: float) -> list[tuple[Tensor, Tensor]]:
    p, m, out = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), []
    for g in grads:
        g = g.double()
        c = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd) - lr * sign(c)
        m = b2 * m + (1 - b2) * g
        out.append((p.clone(), m.clone()))
    return out


def adax_official(p: Tensor, grads: list[Tensor], *, lr: float, b1: float, b2: float, eps: float,
                  wd: float, decoupled: bool = False) -> list[Tensor]:
    """The official AdaX code's form: v grows like (1+b2)^t, bias correction on the step size."""
    p = p.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if wd and not decoupled:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = (1 + b2) * v + b2 * g * g
        bc = (1 + b2) ** t - 1
        if wd and decoupled:
            p = p * (1 - lr * wd)
        p = p - lr * math.sqrt(bc) * m / (v.sqrt() + eps)
        out.append(p.clone())
    return out


def adagrad(p: Tensor, grads: list[Tensor], *, lr: float, lr_decay: float = 0.0, wd: float = 0.0,
            acc0: float = 0.0, eps: float = 1e-10) -> list[Tensor]:
    p = p.double().clone()
    G = torch.full_like(p, acc0)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.double() + wd * p
        clr = lr / (1 + (t - 1) * lr_decay)
        G = G + g * g
        p = p - clr * g / (G.sqrt() + eps)
        out.append(p.clone())
    return out


def glove_c(W: list[float], gradsq: list[float], grads: list[list[float]], *, eta: float,
            grad_clip_value: float | None = None) -> list[list[float]]:
    """Line-by-line transcription of glove.c's update loop for one vector, over several steps."""
    W, gradsq, out = list(W), list(gradsq), []
    for grad in grads:
        updates = [0.0] * len(W)
        for b in range(len(W)):
            gb = grad[b]
            if grad_clip_value is not None:
                gb = min(max(gb, -grad_clip_value), grad_clip_value)
            temp = gb * eta
            updates[b] = temp / math.sqrt(gradsq[b])
            gradsq[b] += temp * temp
        for b in range(len(W)):
            W[b] -= updates[b]
        out.append(list(W))
    return out
