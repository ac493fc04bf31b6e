"""Triton row kernels: lazy rows, sparse gradients and row-wise Adagrad, one launch per parameter.

The twin of :mod:`tigeropt._cpu.rows` for the Triton path (CUDA; CPU under ``TRITON_INTERPRET=1``).
One program per candidate row: a sparse gradient's rows (coalesced by torch, so the indices are
sorted and unique) or every row of a dense gradient.  A program first scans its gradient row; a
row whose gradient is all zero is left alone ("touched" means a non-zero gradient; with
``all_rows`` every row is updated: row-wise Adagrad's dense step).  A touched row runs the very
``_<name>_block`` functions of the dense kernels over its elements, so it gets the dense update.
Row-wise Adagrad reduces the row's mean square in float32 first (the reference sums in float64:
equal within float32 rounding).

:func:`fused_rows` returns False (changing nothing) when the kernels cannot take the call
(dtype, layout, options); the caller then runs the reference update.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._math import adax_scalars
from ._common import SUPPORTED_DTYPES, _lr_value, _st, lr_argument
from .adagrad import _adagrad_block
from .adax import _adax_block
from .lion import _lion_block
from .tiger import _tiger_block

__all__ = ["fused_rows", "NAMES", "ROW_BLOCK", "ROW_WARPS", "row_block"]

NAMES = ("tiger", "lion", "adax", "adagrad")
#: Tile of the row kernels, every dtype: one warp per row, 256 elements a step (8 per thread: 128-bit
#: accesses of the 16-bit streams, two of each fp32 stream).  One warp keeps the row reductions (the
#: touched scan, row-wise Adagrad's mean square) in shuffles: no shared memory, no barrier.  With 4
#: warps and 128 elements (one per thread) every access was 32-bit and each scan block went through
#: shared memory (``tigeropt.kernels._aot_rows`` checks this for sm_80/sm_90).
ROW_BLOCK = 256
ROW_WARPS = 1


def row_block(D: int) -> int:
    """Elements a program takes per step for rows of ``D`` elements: ``ROW_BLOCK``, or half of it when
    ``D`` is not a multiple of 16 (the row starts are then not 16-byte aligned: scalar accesses, whose
    eight addresses per thread and stream would take Adagrad's kernels past 64 registers)."""
    return ROW_BLOCK if D % 16 == 0 else ROW_BLOCK // 2


@triton.jit
def _row_of(idx, k, HAS_IDX: tl.constexpr):
    if HAS_IDX:
        r = tl.load(idx + k)
    else:
        r = k
    return r


@triton.jit
def _touched(gp, D, ALL_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Whether the gradient row at ``gp`` holds a non-zero (NaN counts; -0.0 does not)."""
    if ALL_ROWS:
        hit = 1
    else:
        hit = 0
        for i in range(0, D, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            x = tl.load(gp + offs, mask=offs < D, other=0.0).to(tl.float32)
            hit += tl.sum((x != 0.0).to(tl.int32))
    return hit > 0


@triton.jit
def _tiger_rows(p, g, m, idx, D, lr, beta, omb, wd, HAS_IDX: tl.constexpr, ALL_ROWS: tl.constexpr,
                MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr,
                BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    r = _row_of(idx, k, HAS_IDX)
    gp = g + k * D
    if _touched(gp, D, ALL_ROWS, BLOCK):
        lr_v = _lr_value(lr, LR_PTR)
        for i in range(0, D, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            _tiger_block(p + r * D, gp, m + r * D, offs, D, lr_v, beta, omb, wd, MAXIMIZE, ROUND_BF16, True)


@triton.jit
def _lion_rows(p, g, m, idx, D, lr, beta1, omb1, beta2, omb2, wd, HAS_IDX: tl.constexpr,
               ALL_ROWS: tl.constexpr, MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr,
               ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    r = _row_of(idx, k, HAS_IDX)
    gp = g + k * D
    if _touched(gp, D, ALL_ROWS, BLOCK):
        lr_v = _lr_value(lr, LR_PTR)
        for i in range(0, D, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            _lion_block(p + r * D, gp, m + r * D, offs, D, lr_v, beta1, omb1, beta2, omb2, wd, MAXIMIZE,
                        ROUND_BF16, True)


@triton.jit
def _adax_rows(p, g, m, v, idx, D, lr, beta1, omb1, bhat, omb2, eps_t, wd, HAS_IDX: tl.constexpr,
               ALL_ROWS: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
               LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    r = _row_of(idx, k, HAS_IDX)
    gp = g + k * D
    if _touched(gp, D, ALL_ROWS, BLOCK):
        lr_v = _lr_value(lr, LR_PTR)
        for i in range(0, D, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            _adax_block(p + r * D, gp, m + r * D, v + r * D, offs, D, lr_v, beta1, omb1, bhat, omb2, eps_t,
                        wd, MAXIMIZE, DECOUPLED, ROUND_BF16, True)


@triton.jit
def _l2_grad(gp, pp, offs, D, wd, MAXIMIZE: tl.constexpr):
    """(g with L2 decay, p) of one block of a row, in fp32 (0 past the row's end)."""
    mask = offs < D
    gv = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        gv = -gv
    pv = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    return tl.where(wd != 0.0, gv + wd * pv, gv), pv


@triton.jit
def _adagrad_rows(p, g, s, idx, D, lr, factor, wd, eps, clip, HAS_IDX: tl.constexpr,
                  ALL_ROWS: tl.constexpr, MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr,
                  ROWWISE: tl.constexpr, LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr,
                  BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    r = _row_of(idx, k, HAS_IDX)
    gp = g + k * D
    pp = p + r * D
    if _touched(gp, D, ALL_ROWS, BLOCK):
        clr = _lr_value(lr, LR_PTR) * factor
        if ROWWISE:  # G_r += mean(g^2) (g with L2 decay); p -= clr*g/(sqrt(G_r) + eps)
            ss = 0.0
            for i in range(0, D, BLOCK):
                offs = i + tl.arange(0, BLOCK)
                gv, pv = _l2_grad(gp, pp, offs, D, wd, MAXIMIZE)
                ss += tl.sum(gv * gv)
            acc = tl.load(s + r) + ss / D
            tl.store(s + r, acc)
            d = tl.sqrt_rn(acc) + eps
            for i in range(0, D, BLOCK):
                offs = i + tl.arange(0, BLOCK)
                gv, pv = _l2_grad(gp, pp, offs, D, wd, MAXIMIZE)
                _st(pp, offs, pv + tl.div_rn(-clr * gv, d), D, True, ROUND_BF16)
        else:
            for i in range(0, D, BLOCK):
                offs = i + tl.arange(0, BLOCK)
                _adagrad_block(pp, gp, s + r * D, offs, D, clr, wd, eps, clip, MAXIMIZE, GLOVE, CLIP,
                               ROUND_BF16, True)


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _ok(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> bool:
    return (t.layout is torch.strided and t.dtype is dtype and tuple(t.shape) == shape and t.device == device
            and t.is_contiguous() and not hasattr(t, "to_local"))


@torch.no_grad()
def fused_rows(name: str, p: Tensor, g: Tensor, states: list[Tensor], step: Tensor | float,
               hyper: dict[str, Any], all_rows: bool = False) -> bool:
    """Same contract as :func:`tigeropt._cpu.rows.fused_rows`, on the Triton path."""
    if name not in NAMES or p.dim() == 0 or p.dtype not in SUPPORTED_DTYPES:
        return False
    device, dtype, shape = p.device, p.dtype, tuple(p.shape)
    rows = shape[0]
    rowwise = name == "adagrad" and bool(hyper.get("rowwise"))
    if not _ok(p, dtype, shape, device):
        return False
    state_shape = (rows,) if rowwise else shape
    if not all(_ok(s, torch.float32, state_shape, device) for s in states):
        return False
    if name == "tiger" and (hyper.get("lr_scaling") or hyper.get("accumulation_steps", 1) > 1
                            or hyper.get("nan_guard")):
        return False
    if name == "adagrad" and hyper["glove"] and hyper["skip_nonfinite_rows"]:
        return False
    if g.is_sparse:
        if all_rows or g.sparse_dim() != 1 or tuple(g.shape) != shape or g.dtype is not dtype:
            return False
        if g._nnz():  # before the coalesce, which an index out of range makes write outside its buffers
            lo, hi = torch.stack(torch.aminmax(g._indices()[0])).tolist()
            if lo < 0 or hi >= rows:
                raise IndexError(f"sparse gradient row index {lo if lo < 0 else hi} out of range for {rows} "
                                 "rows")
        g = g.coalesce()
        idx = g.indices()[0].contiguous()
        gdata = g.values().contiguous()
        n = idx.numel()
        has_idx = True
    else:
        if not _ok(g, dtype, shape, device):
            return False
        idx, gdata, n, has_idx = p, g, rows, False  # idx unused
    if n == 0 or p.numel() == 0:
        return True
    D = p.numel() // rows
    lr_arg, lr_ptr = lr_argument(hyper["lr"], device)
    common = dict(HAS_IDX=has_idx, ALL_ROWS=bool(all_rows), MAXIMIZE=bool(hyper.get("maximize")),
                  LR_PTR=lr_ptr, ROUND_BF16=dtype == torch.bfloat16, BLOCK=row_block(D),
                  num_warps=ROW_WARPS)
    grid = (n,)
    wd = float(hyper.get("weight_decay", 0.0))
    if name == "tiger":
        b = float(hyper["beta"])
        _tiger_rows[grid](p, gdata, states[0], idx, D, lr_arg, b, 1.0 - b, wd, **common)
    elif name == "lion":
        b1, b2 = float(hyper["beta1"]), float(hyper["beta2"])
        _lion_rows[grid](p, gdata, states[0], idx, D, lr_arg, b1, 1.0 - b1, b2, 1.0 - b2, wd, **common)
    elif name == "adax":
        b1 = float(hyper["beta1"])
        bhat, omb2, eps_t = adax_scalars(_scalar(step), hyper["beta2"], hyper["eps"])
        _adax_rows[grid](p, gdata, states[0], states[1], idx, D, lr_arg, b1, 1.0 - b1, float(bhat),
                         float(omb2), float(eps_t), wd, DECOUPLED=bool(hyper["decoupled_weight_decay"]),
                         **common)
    else:
        lr_decay = hyper["lr_decay"]
        factor = 1.0 if lr_decay == 0.0 else 1.0 / (1.0 + (_scalar(step) - 1.0) * lr_decay)
        clip = hyper["grad_clip_value"]
        glove = bool(hyper["glove"])
        _adagrad_rows[grid](p, gdata, states[0], idx, D, lr_arg, float(factor), wd, float(hyper["eps"]),
                            float(clip) if clip is not None and glove else 0.0, GLOVE=glove,
                            CLIP=clip is not None and glove, ROWWISE=rowwise, **common)
    return True
