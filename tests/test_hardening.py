"""Regression tests for defects found by adversarial use (issue 10): each failed on tigeropt 0.1."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tigeropt import Adagrad, AdaX, Lion, Tiger, kernels

TRITON = kernels.triton_usable()  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)
PATHS: dict[str, dict[str, Any]] = {"reference": dict(foreach=False), "foreach": dict(foreach=True),
                                    "default": {}}
if TRITON:
    PATHS["fused"] = dict(fused=True)


def _paths_for(dtype: torch.dtype) -> list[str]:
    return [p for p in PATHS if not (p == "fused" and dtype == torch.float64)]


# ------------------------------------------------------------------ 1. AdaX at any step count
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adax_finite_at_any_step_count_with_zero_gradient_history(dtype: torch.dtype,
                                                                  decoupled: bool) -> None:
    """Element 0 never gets a gradient (a padding row); the official form gives it a zero update."""
    for t0 in (1e6, 1e7, 1e9):
        results = {}
        for path in _paths_for(dtype):
            p = torch.tensor([0.5, -0.25, 0.0], dtype=dtype, requires_grad=True)
            opt = AdaX([p], lr=1e-3, weight_decay=0.0 if not decoupled else 0.01,
                       decoupled_weight_decay=decoupled, **PATHS[path])
            p.grad = torch.tensor([0.0, 0.5, 0.0], dtype=dtype)
            opt.step()                                      # elements 0 and 2: all-zero history
            opt.state[p]["step"].fill_(t0)
            for k in range(3):
                p.grad = torch.tensor([0.0, -0.5 if k else 0.0, 0.0], dtype=dtype)
                opt.step()
            st = opt.state[p]
            assert torch.isfinite(p).all(), (path, t0, p)
            assert torch.isfinite(st["exp_avg"]).all() and torch.isfinite(st["exp_avg_sq"]).all()
            decay = (1 - 1e-3 * 0.01) ** 4 if decoupled else 1.0
            assert p[0].item() == pytest.approx(0.5 * decay, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
            assert p[2].item() == 0.0
            results[path] = (p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
        ref = results["reference"]
        for path, got in results.items():
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"{path} at t={t0}")


def test_adax_scalars_stay_positive_and_fp32_representable() -> None:
    from tigeropt.adax import adax_scalars

    for t in (1.0, 1e3, 8e5, 1.6e6, 7.2e6, 1e9, math.inf):
        bhat, omb, eps_t = adax_scalars(t, 1e-4, 1e-12)
        assert 0.0 < eps_t and math.isfinite(eps_t)
        assert torch.tensor(eps_t, dtype=torch.float32).item() > 0.0, t
        assert bhat + omb == pytest.approx(1.0)


# ------------------------------------------------------------------ 3. non-finite gradients, all paths alike
OPTS = [(Tiger, dict(lr=0.01, weight_decay=0.1)), (Lion, dict(lr=0.01, weight_decay=0.1)),
        (AdaX, dict(lr=0.01)), (Adagrad, dict(lr=0.1)), (Adagrad, dict(lr=0.05, glove=True))]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter, numpy
@pytest.mark.parametrize("cls,kw", OPTS, ids=["tiger", "lion", "adax", "adagrad", "glove"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nonfinite_gradient_same_on_every_path_and_visible(cls: type, kw: dict[str, Any],
                                                           dtype: torch.dtype) -> None:
    bad = [math.nan, math.inf, -math.inf]
    results = {}
    for path in _paths_for(dtype):
        p = torch.linspace(-1, 1, 8, dtype=dtype).requires_grad_()
        opt = cls([p], **kw, **PATHS[path])
        gen = torch.Generator().manual_seed(0)
        for k in range(4):
            g = torch.randn(8, generator=gen).to(dtype)
            if k == 1:
                g[:3] = torch.tensor(bad, dtype=dtype)
            p.grad = g
            opt.step()
        results[path] = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
        # AdamW's convention: the element that saw a non-finite gradient ends non-finite, never frozen
        assert not torch.isfinite(p[:3]).any(), (path, p)
        assert torch.isfinite(p[3:]).all(), (path, p)
    ref = results["reference"]
    for path, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=path)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), path
