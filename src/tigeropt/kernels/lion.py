"""Fused Triton step of Lion (Chen et al. 2023), one launch for a whole list of tensors.

Per element, in float32 whatever the parameter dtype (state ``m`` is float32):

    g = -g                                  (maximize)
    c = b1*m + (1-b1)*g
    p = p*(1 - lr*wd) - lr*sign(c)          (decoupled weight decay; sign(0) = 0)
    m = b2*m + (1-b2)*g

rounded as the reference's torch ops round (``add_(x, alpha=a)`` is one fused multiply-add, and
``1 - lr*wd`` is computed in float64 on the host for a float lr): bit for bit the reference.

The parameter is rounded once, at the store.  Launch design and table caching:
:mod:`tigeropt.kernels._common`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._ops import compiling, join_lr, split_lr
from ._common import (
    _absmax_ptr,
    _decay_value,
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

__all__ = ["fused_lion"]


@triton.jit
def _lion_update(p, g, m, lr, beta1, omb1, beta2, omb2, decay, MAXIMIZE: tl.constexpr):
    if MAXIMIZE:
        g = -g
    c = tl.fma(g, omb1, m * beta1)
    p = tl.fma(_sign(c), -lr, p * decay)
    m = tl.fma(g, omb2, m * beta2)
    return p, m


@triton.jit
def _lion_block(pp, gp, mp, offs, n, lr, beta1, omb1, beta2, omb2, wd,
                MAXIMIZE: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One block with float state (the row kernels' step; decay 1 - lr*wd in float32)."""
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld(mp, offs, n, MASKED)
    p, m = _lion_update(p, g, m, lr, beta1, omb1, beta2, omb2, 1.0 - lr * wd, MAXIMIZE)
    _st(mp, offs, m, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _lion_step(pp, gp, mp, ma, offs, rows, n, lr, beta1, omb1, beta2, omb2, decay, kt, e0,
               MAXIMIZE: tl.constexpr, SR: tl.constexpr, Q8_M: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld_state(mp, ma, offs, rows, n, Q8_M, MASKED)
    p, m = _lion_update(p, g, m, lr, beta1, omb1, beta2, omb2, decay, MAXIMIZE)
    _st_lowp(pp, offs, p, n, kt, 0, e0, SR, MASKED)  # first: fewer live registers
    _st_state(mp, ma, offs, rows, m, n, kt, 1, e0, SR, Q8_M, MASKED)


@triton.jit(do_not_specialize=["k1"])
def _lion_kernel(table, work, gtab, p_base, g_base, m_base, a_base, ktab, lr, beta1, omb1, beta2, omb2, wd,
                 decay, k1,
                 NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_M: tl.constexpr,
                 MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr, SR: tl.constexpr, Q8_M: tl.constexpr,
                 KEY_TABLE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    mp = _tensor_ptr(m_base, tl.load(row + 2), U_M, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    lr_v = _lr_value(lr, LR_PTR)
    decay_v = _decay_value(lr_v, wd, decay, LR_PTR)
    e0, kt = _lowp_item(ktab, k1, t, row, start, 1, SR, KEY_TABLE, SR or Q8_M)
    ma = _absmax_ptr(a_base, row, 5, start, Q8_M)
    n_full = n // BLOCK
    for i in range(n_full):
        offs, rows = _q8_offsets(i, BLOCK, Q8_M)
        _lion_step(pp, gp, mp, ma, offs, rows, n, lr_v, beta1, omb1, beta2, omb2, decay_v, kt, e0,
                   MAXIMIZE, SR, Q8_M, False)
    if n_full * BLOCK < n:
        offs, rows = _q8_offsets(n_full, BLOCK, Q8_M)
        _lion_step(pp, gp, mp, ma, offs, rows, n, lr_v, beta1, omb1, beta2, omb2, decay_v, kt, e0,
                   MAXIMIZE, SR, Q8_M, True)


@torch.no_grad()
def fused_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
               weight_decay: float, maximize: bool, sr_seed: int | None = None,
               param_indices: list[int] | None = None, absmax: list[list[Tensor] | None] | None = None,
               element_offset: int | list[int] = 0) -> None:
    """Lion over whole tensor lists in one Triton launch (same arguments as the foreach function
    ``tigeropt.lion._multi_tensor_lion``; ``state_steps`` already incremented).

    Low precision (:mod:`tigeropt._lowp`, bit for bit): bf16 state is stored rounded to nearest, or
    stochastically with ``sr_seed`` (which also rounds bf16 parameters stochastically); ``absmax``
    (per state tensor list, None for a float one) makes a state list 8-bit codes; ``param_indices``
    (the hash's parameter indices, default 0, 1, ...) and ``element_offset`` (added to the element
    indices): :func:`tigeropt.kernels._common.low_precision`.
    """
    lowp = low_precision(params, state_steps, 1, sr_seed=sr_seed, param_indices=param_indices, absmax=absmax,
                         element_offset=element_offset)
    if compiling() and lowp is None:
        torch.ops.tigeropt.triton_lion(params, grads, exp_avgs, state_steps, *split_lr(lr), beta1, beta2,
                                       weight_decay, maximize)
        return
    launch = prepare(params, grads, [exp_avgs], lowp)
    if launch is None:
        return
    lr_arg, lr_ptr = lr_argument(lr, params[0].device)
    b1, b2 = float(beta1), float(beta2)
    decay = 0.0 if lr_ptr else 1.0 - float(lr_arg) * float(weight_decay)
    _lion_kernel[launch.grid](*launch.pointers(), lr_arg, b1, 1.0 - b1, b2, 1.0 - b2, float(weight_decay),
                              decay, launch.k1, MAXIMIZE=bool(maximize), LR_PTR=lr_ptr, **launch.meta("M"))
    launch.finish()


@torch.library.custom_op("tigeropt::triton_lion", mutates_args=("params", "exp_avgs"))
def _triton_lion_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None, beta1: float,
                    beta2: float, weight_decay: float, maximize: bool) -> None:
    fused_lion(params, grads, exp_avgs, state_steps, lr=join_lr(lr, lr_tensor), beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, maximize=maximize)


_triton_lion_op.register_fake(lambda *args, **kwargs: None)  # in-place updates only
