"""Fused Triton step of Lion (Chen et al. 2023), one launch for a whole list of tensors.

Per element, in float32 whatever the parameter dtype (state ``m`` is float32):

    g = -g                                  (maximize)
    c = b1*m + (1-b1)*g
    p = p*(1 - lr*wd) - lr*sign(c)          (decoupled weight decay; sign(0) = 0)
    m = b2*m + (1-b2)*g

The parameter is rounded once, at the store.  Launch design and table caching:
:mod:`tigeropt.kernels._common`.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._ops import compiling, join_lr, split_lr
from ._common import _ld, _lr_value, _sign, _st, _tensor_ptr, _work_item, lr_argument, prepare

__all__ = ["fused_lion"]


@triton.jit
def _lion_block(pp, gp, mp, offs, n, lr, beta1, omb1, beta2, omb2, wd,
                MAXIMIZE: tl.constexpr, ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld(mp, offs, n, MASKED)
    if MAXIMIZE:
        g = -g
    c = m * beta1 + g * omb1
    p = p * (1.0 - lr * wd) - lr * _sign(c)
    m = m * beta2 + g * omb2
    _st(mp, offs, m, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _lion_kernel(table, work, gtab, p_base, g_base, m_base, lr, beta1, omb1, beta2, omb2, wd,
                 NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_M: tl.constexpr,
                 MAXIMIZE: tl.constexpr, LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    mp = _tensor_ptr(m_base, tl.load(row + 2), U_M, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    lr_v = _lr_value(lr, LR_PTR)
    n_full = n // BLOCK
    for i in range(n_full):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        _lion_block(pp, gp, mp, offs, n, lr_v, beta1, omb1, beta2, omb2, wd, MAXIMIZE, ROUND_BF16, False)
    if n_full * BLOCK < n:
        offs = n_full * BLOCK + tl.arange(0, BLOCK)
        _lion_block(pp, gp, mp, offs, n, lr_v, beta1, omb1, beta2, omb2, wd, MAXIMIZE, ROUND_BF16, True)


@torch.no_grad()
def fused_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float,
               weight_decay: float, maximize: bool) -> None:
    """Lion over whole tensor lists in one Triton launch (same arguments as the foreach function
    ``tigeropt.lion._multi_tensor_lion``; ``state_steps`` is not used)."""
    if compiling():
        torch.ops.tigeropt.triton_lion(params, grads, exp_avgs, state_steps, *split_lr(lr), beta1, beta2,
                                       weight_decay, maximize)
        return
    launch = prepare(params, grads, [exp_avgs])
    if launch is None:
        return
    lr_arg, lr_ptr = lr_argument(lr, params[0].device)
    cfg = launch.config
    u_p, u_g, u_m = launch.units
    b1, b2 = float(beta1), float(beta2)
    _lion_kernel[launch.grid](
        launch.table, launch.work, launch.gtab, *launch.bases, lr_arg, b1, 1.0 - b1, b2, 1.0 - b2,
        float(weight_decay),
        NCOLS=3, U_P=u_p, U_G=u_g, U_M=u_m, MAXIMIZE=bool(maximize), LR_PTR=lr_ptr,
        ROUND_BF16=launch.round_bf16, BLOCK=cfg.block, CHUNK=cfg.chunk, num_warps=cfg.num_warps)
    launch.finish()


@torch.library.custom_op("tigeropt::triton_lion", mutates_args=("params", "exp_avgs"))
def _triton_lion_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None, beta1: float,
                    beta2: float, weight_decay: float, maximize: bool) -> None:
    fused_lion(params, grads, exp_avgs, state_steps, lr=join_lr(lr, lr_tensor), beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, maximize=maximize)


_triton_lion_op.register_fake(lambda *args, **kwargs: None)  # in-place updates only
