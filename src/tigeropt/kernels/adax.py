"""Fused Triton step of AdaX / AdaX-W (Li et al. 2020), one launch for a whole list of tensors.

The overflow-free form of :mod:`tigeropt.adax` (state ``m`` and ``vhat``, float32), per element:

    g    = -g                                     (maximize)
    g    = g + wd*p                               (L2, unless decoupled)
    m    = b1*m + (1-b1)*g
    vhat = bhat*vhat + (1-bhat)*g^2
    p    = p*(1 - lr*wd)                          (AdaX-W, decoupled)
    p    = p - lr * m / (sqrt(vhat) + eps_t)

with the per-tensor scalars ``(bhat, 1-bhat, eps_t) = tigeropt._math.adax_scalars(t, b2, eps)``
computed in float64: once on the host when every tensor has the same step (the usual case,
passed as kernel arguments), else one row per tensor in a small device table.  Step counts kept
on the GPU are turned into that table by device ops (no host synchronization; capturable).
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from .._math import adax_scalars, adax_scalars_tensor
from .._ops import compiling, join_lr, split_lr
from ._common import (
    _ld,
    _lr_value,
    _st,
    _tensor_ptr,
    _work_item,
    check_not_capturing_host_steps,
    lr_argument,
    per_tensor_table,
    prepare,
    step_values,
)

__all__ = ["fused_adax"]


@triton.jit
def _adax_block(pp, gp, mp, vp, offs, n, lr, beta1, omb1, bhat, omb2, eps_t, wd,
                MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, ROUND_BF16: tl.constexpr,
                MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld(mp, offs, n, MASKED)
    v = _ld(vp, offs, n, MASKED)
    if MAXIMIZE:
        g = -g
    if not DECOUPLED:
        g = tl.where(wd != 0.0, g + wd * p, g)  # skipped at wd = 0 like the reference (inf params)
    m = m * beta1 + g * omb1
    v = v * bhat + omb2 * g * g
    if DECOUPLED:
        p = p * (1.0 - lr * wd)
    p = p - lr * tl.div_rn(m, tl.sqrt_rn(v) + eps_t)
    _st(mp, offs, m, n, MASKED, False)
    _st(vp, offs, v, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _adax_kernel(table, work, gtab, p_base, g_base, m_base, v_base, scal, lr, beta1, omb1, bhat, omb2,
                 eps_t, wd,
                 NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_M: tl.constexpr,
                 U_V: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                 PER_TENSOR: tl.constexpr, LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    mp = _tensor_ptr(m_base, tl.load(row + 2), U_M, start)
    vp = _tensor_ptr(v_base, tl.load(row + 3), U_V, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    lr_v = _lr_value(lr, LR_PTR)
    if PER_TENSOR:
        bhat_t = tl.load(scal + 3 * t)
        omb2_t = tl.load(scal + 3 * t + 1)
        eps_tt = tl.load(scal + 3 * t + 2)
    else:
        bhat_t = bhat
        omb2_t = omb2
        eps_tt = eps_t
    n_full = n // BLOCK
    for i in range(n_full):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        _adax_block(pp, gp, mp, vp, offs, n, lr_v, beta1, omb1, bhat_t, omb2_t, eps_tt, wd,
                    MAXIMIZE, DECOUPLED, ROUND_BF16, False)
    if n_full * BLOCK < n:
        offs = n_full * BLOCK + tl.arange(0, BLOCK)
        _adax_block(pp, gp, mp, vp, offs, n, lr_v, beta1, omb1, bhat_t, omb2_t, eps_tt, wd,
                    MAXIMIZE, DECOUPLED, ROUND_BF16, True)


def _device_scalars(state_steps: list[Tensor], beta2: float, eps: float) -> Tensor:
    """[n, 3] float32 (bhat, 1-bhat, eps/sqrt(bc)) from step counts kept on the device (float64 math)."""
    t = torch.stack([s.reshape(()) for s in state_steps])
    return adax_scalars_tensor(t, beta2, eps).to(torch.float32)


@torch.no_grad()
def fused_adax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor,
               beta1: float, beta2: float, eps: float, weight_decay: float,
               decoupled_weight_decay: bool, maximize: bool) -> None:
    """AdaX over whole tensor lists in one Triton launch (same arguments as the foreach function
    ``tigeropt.adax._multi_tensor_adax``; ``state_steps`` already incremented)."""
    if compiling():
        torch.ops.tigeropt.triton_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *split_lr(lr),
                                       beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize)
        return
    launch = prepare(params, grads, [exp_avgs, exp_avg_sqs])
    if launch is None:
        return
    device = params[0].device
    steps = step_values(state_steps)
    scal: Tensor = launch.table
    per_tensor = True
    bhat = omb2 = eps_t = 0.0
    if steps is None:
        scal = _device_scalars(state_steps, beta2, eps).to(device)
    else:
        check_not_capturing_host_steps(device, "fused_adax")
        if steps.count(steps[0]) == len(steps):
            bhat, omb2, eps_t = adax_scalars(steps[0], beta2, eps)
            per_tensor = False
        else:
            scal = per_tensor_table([adax_scalars(s, beta2, eps) for s in steps], device)
    lr_arg, lr_ptr = lr_argument(lr, device)
    cfg = launch.config
    u_p, u_g, u_m, u_v = launch.units
    b1 = float(beta1)
    _adax_kernel[launch.grid](
        launch.table, launch.work, launch.gtab, *launch.bases, scal, lr_arg, b1, 1.0 - b1, float(bhat),
        float(omb2), float(eps_t), float(weight_decay),
        NCOLS=4, U_P=u_p, U_G=u_g, U_M=u_m, U_V=u_v, MAXIMIZE=bool(maximize),
        DECOUPLED=bool(decoupled_weight_decay), PER_TENSOR=per_tensor, LR_PTR=lr_ptr,
        ROUND_BF16=launch.round_bf16, BLOCK=cfg.block, CHUNK=cfg.chunk, num_warps=cfg.num_warps)
    launch.finish()


@torch.library.custom_op("tigeropt::triton_adax", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
def _triton_adax_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                    exp_avg_sqs: list[Tensor], state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None,
                    beta1: float, beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool,
                    maximize: bool) -> None:
    fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=join_lr(lr, lr_tensor), beta1=beta1,
               beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
               maximize=maximize)


_triton_adax_op.register_fake(lambda *args, **kwargs: None)  # in-place updates only
