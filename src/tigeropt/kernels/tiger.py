"""Fused Triton step of Tiger (Su 2023), one launch for a whole list of tensors.

Per element, in float32 whatever the parameter dtype (state ``m`` is float32):

    g = -g                                  (maximize)
    m = beta*m + (1-beta)*g
    p = p - lr*(sign(m) + wd*p)             (sign(0) = 0, as torch.sign)

rounded as the reference's torch ops round (``add_(x, alpha=a)`` is one fused multiply-add):
``m = fma(g, 1-beta, m*beta)``, ``p = fma(fma(p, wd, sign(m)), -lr, p)``, so that the kernel
equals the reference bit for bit (under the interpreter; on a GPU where torch's ops fuse alike).

The parameter is rounded once, at the store.  Only the plain rule runs here: the original's
extras (lr_scaling, accumulation_steps, nan_guard) take the reference path.  Launch design and
table caching: :mod:`tigeropt.kernels._common`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._ops import compiling, join_lr, split_lr
from ._common import (
    _absmax_ptr,
    _ld,
    _ld_state,
    _lowp_item,
    _lr_value,
    _q8_offsets,
    _sign,
    _st,
    _st_lowp,
    _st_state,
    _tensor_ptr,
    _work_item,
    low_precision,
    lr_argument,
    prepare,
)

__all__ = ["fused_tiger"]


@triton.jit
def _tiger_update(p, g, m, lr, beta, omb, wd, MAXIMIZE: tl.constexpr):
    if MAXIMIZE:
        g = -g
    m = tl.fma(g, omb, m * beta)
    p = tl.fma(tl.fma(p, wd, _sign(m)), -lr, p)
    return p, m


@triton.jit
def _tiger_block(pp, gp, mp, offs, n, lr, beta, omb, wd,
                 MAXIMIZE: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One block with float state (the row kernels' step)."""
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld(mp, offs, n, MASKED)
    p, m = _tiger_update(p, g, m, lr, beta, omb, wd, MAXIMIZE)
    _st(mp, offs, m, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _tiger_step(pp, gp, mp, ma, offs, rows, n, lr, beta, omb, wd, kt, e0,
                MAXIMIZE: tl.constexpr, SR: tl.constexpr, Q8_M: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld_state(mp, ma, offs, rows, n, Q8_M, MASKED)
    p, m = _tiger_update(p, g, m, lr, beta, omb, wd, MAXIMIZE)
    _st_lowp(pp, offs, p, n, kt, 0, e0, SR, MASKED)  # first: fewer live registers
    _st_state(mp, ma, offs, rows, m, n, kt, 1, e0, SR, Q8_M, MASKED)


@triton.jit(do_not_specialize=["k1"])
def _tiger_kernel(table, work, gtab, p_base, g_base, m_base, a_base, ktab, lr, beta, omb, wd, k1,
                  NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_M: tl.constexpr,
                  MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr,
                  SR: tl.constexpr, Q8_M: tl.constexpr, KEY_TABLE: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    mp = _tensor_ptr(m_base, tl.load(row + 2), U_M, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    lr_v = _lr_value(lr, LR_PTR)
    e0, kt = _lowp_item(ktab, k1, t, row, start, 1, SR, KEY_TABLE, SR or Q8_M)
    ma = _absmax_ptr(a_base, row, 5, start, Q8_M)
    n_full = n // BLOCK
    for i in range(n_full):
        offs, rows = _q8_offsets(i, BLOCK, Q8_M)
        _tiger_step(pp, gp, mp, ma, offs, rows, n, lr_v, beta, omb, wd, kt, e0, MAXIMIZE, SR, Q8_M, False)
    if n_full * BLOCK < n:
        offs, rows = _q8_offsets(n_full, BLOCK, Q8_M)
        _tiger_step(pp, gp, mp, ma, offs, rows, n, lr_v, beta, omb, wd, kt, e0, MAXIMIZE, SR, Q8_M, True)


@torch.no_grad()
def fused_tiger(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                state_steps: list[Tensor], *, lr: float | Tensor, beta: float,
                weight_decay: float, maximize: bool, lr_scaling: bool = False,
                accumulation_steps: int = 1, nan_guard: bool = False, shrink_ratio: float = 0.99,
                kind: str = "auto", sr_seed: int | None = None, param_indices: list[int] | None = None,
                absmax: list[list[Tensor] | None] | None = None, element_offset: int | list[int] = 0) -> None:
    """Tiger's plain rule over whole tensor lists in one Triton launch (same arguments as the
    foreach function ``tigeropt.tiger._multi_tensor_tiger``; ``state_steps`` already incremented).

    Low precision (:mod:`tigeropt._lowp`, bit for bit): bf16 ``exp_avgs`` are stored rounded to
    nearest, or stochastically with ``sr_seed`` (which also rounds bf16 parameters stochastically);
    ``absmax=[exp_avg_absmaxs]`` makes ``exp_avgs`` 8-bit codes; ``param_indices`` (the hash's
    parameter indices, default 0, 1, ...) and ``element_offset`` (added to the element indices):
    :func:`tigeropt.kernels._common.low_precision`.
    """
    if lr_scaling or accumulation_steps != 1 or nan_guard:
        raise ValueError("fused_tiger runs the plain Tiger rule only: lr_scaling=False, accumulation_steps=1 "
                         f"and nan_guard=False (got {lr_scaling!r}, {accumulation_steps!r}, {nan_guard!r})")
    lowp = low_precision(params, state_steps, 1, sr_seed=sr_seed, param_indices=param_indices, absmax=absmax,
                         element_offset=element_offset)
    if compiling() and lowp is None:
        torch.ops.tigeropt.triton_tiger(params, grads, exp_avgs, state_steps, *split_lr(lr), beta,
                                        weight_decay, maximize)
        return
    launch = prepare(params, grads, [exp_avgs], lowp)
    if launch is None:
        return
    lr_arg, lr_ptr = lr_argument(lr, params[0].device)
    b = float(beta)
    _tiger_kernel[launch.grid](*launch.pointers(), lr_arg, b, 1.0 - b, float(weight_decay), launch.k1,
                               MAXIMIZE=bool(maximize), LR_PTR=lr_ptr, **launch.meta("M"))
    launch.finish()


@torch.library.custom_op("tigeropt::triton_tiger", mutates_args=("params", "exp_avgs"))
def _triton_tiger_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None, beta: float,
                     weight_decay: float, maximize: bool) -> None:
    fused_tiger(params, grads, exp_avgs, state_steps, lr=join_lr(lr, lr_tensor), beta=beta,
                weight_decay=weight_decay, maximize=maximize)


_triton_tiger_op.register_fake(lambda *args, **kwargs: None)  # in-place updates only
