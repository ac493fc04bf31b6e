"""Fused Triton step of AdaX / AdaX-W (Li et al. 2020), one launch for a whole list of tensors.

The overflow-free form of :mod:`tigeropt.adax` (state ``m`` and ``vhat``, float32), per element:

    g    = -g                                     (maximize)
    g    = g + wd*p                               (L2, unless decoupled)
    m    = b1*m + (1-b1)*g
    vhat = bhat*vhat + (1-bhat)*g^2
    p    = p*(1 - lr*wd)                          (AdaX-W, decoupled)
    p    = p - lr * m / (sqrt(vhat) + eps_t)

rounded as the reference's torch ops round (``add_(x, alpha=a)`` and ``addcmul_`` are fused
multiply-adds, ``addcdiv_(m, d, value=-lr)`` is ``p + (-lr*m)/d``, ``1 - lr*wd`` is float64 on the
host for a float lr), with the per-tensor scalars
``(bhat, 1-bhat, eps_t) = tigeropt._math.adax_scalars(t, b2, eps)``
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
    _absmax_ptr,
    _decay_value,
    _ld,
    _ld_state,
    _lowp_item,
    _lr_value,
    _q8_offsets,
    _st,
    _st_lowp,
    _st_state,
    _tensor_ptr,
    _work_item,
    check_not_capturing_host_steps,
    low_precision,
    lr_argument,
    per_tensor_table,
    prepare,
    step_values,
)

__all__ = ["fused_adax"]


@triton.jit
def _adax_update(p, g, m, v, lr, beta1, omb1, bhat, omb2, eps_t, wd, decay,
                 MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr):
    if MAXIMIZE:
        g = -g
    if not DECOUPLED:
        g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)  # skipped at wd = 0 like the reference (inf params)
    m = tl.fma(g, omb1, m * beta1)
    v = tl.fma(omb2 * g, g, v * bhat)
    if DECOUPLED:
        p = p * decay
    p = p + tl.div_rn(-lr * m, tl.sqrt_rn(v) + eps_t)
    return p, m, v


@triton.jit
def _adax_block(pp, gp, mp, vp, offs, n, lr, beta1, omb1, bhat, omb2, eps_t, wd,
                MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, ROUND_BF16: tl.constexpr,
                MASKED: tl.constexpr):
    """One block with float state (the row kernels' step; decay 1 - lr*wd in float32)."""
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld(mp, offs, n, MASKED)
    v = _ld(vp, offs, n, MASKED)
    p, m, v = _adax_update(p, g, m, v, lr, beta1, omb1, bhat, omb2, eps_t, wd, 1.0 - lr * wd, MAXIMIZE,
                           DECOUPLED)
    _st(mp, offs, m, n, MASKED, False)
    _st(vp, offs, v, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _adax_step(pp, gp, mp, vp, ma, va, offs, rows, n, lr, beta1, omb1, bhat, omb2, eps_t, wd, decay, kt, e0,
               MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, SR: tl.constexpr, Q8_M: tl.constexpr,
               Q8_V: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    m = _ld_state(mp, ma, offs, rows, n, Q8_M, MASKED)
    v = _ld_state(vp, va, offs, rows, n, Q8_V, MASKED)
    p, m, v = _adax_update(p, g, m, v, lr, beta1, omb1, bhat, omb2, eps_t, wd, decay, MAXIMIZE, DECOUPLED)
    # the store order is ptxas's register budget on sm_90 (no spills with either flag set): with
    # stochastic rounding the parameter first (its registers free before the 8-bit encoding's)
    if SR:
        _st_lowp(pp, offs, p, n, kt, 0, e0, SR, MASKED)
        _st_state(vp, va, offs, rows, v, n, kt, 2, e0, SR, Q8_V, MASKED)
        _st_state(mp, ma, offs, rows, m, n, kt, 1, e0, SR, Q8_M, MASKED)
    else:
        _st_state(mp, ma, offs, rows, m, n, kt, 1, e0, SR, Q8_M, MASKED)
        _st_state(vp, va, offs, rows, v, n, kt, 2, e0, SR, Q8_V, MASKED)
        _st_lowp(pp, offs, p, n, kt, 0, e0, SR, MASKED)


@triton.jit(do_not_specialize=["k1"])
def _adax_kernel(table, work, gtab, p_base, g_base, m_base, v_base, a_base, ktab, scal, lr, beta1, omb1, bhat,
                 omb2, eps_t, wd, decay, k1,
                 NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_M: tl.constexpr,
                 U_V: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                 PER_TENSOR: tl.constexpr, LR_PTR: tl.constexpr, SR: tl.constexpr, Q8_M: tl.constexpr,
                 Q8_V: tl.constexpr, KEY_TABLE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    mp = _tensor_ptr(m_base, tl.load(row + 2), U_M, start)
    vp = _tensor_ptr(v_base, tl.load(row + 3), U_V, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    lr_v = _lr_value(lr, LR_PTR)
    decay_v = _decay_value(lr_v, wd, decay, LR_PTR)
    if PER_TENSOR:
        bhat_t = tl.load(scal + 3 * t)
        omb2_t = tl.load(scal + 3 * t + 1)
        eps_tt = tl.load(scal + 3 * t + 2)
    else:
        bhat_t = bhat
        omb2_t = omb2
        eps_tt = eps_t
    e0, kt = _lowp_item(ktab, k1, t, row, start, 2, SR, KEY_TABLE, SR or Q8_M or Q8_V)
    ma = _absmax_ptr(a_base, row, 6, start, Q8_M)
    va = _absmax_ptr(a_base, row, 7, start, Q8_V)
    Q8: tl.constexpr = Q8_M or Q8_V
    n_full = n // BLOCK
    for i in range(n_full):
        offs, rows = _q8_offsets(i, BLOCK, Q8)
        _adax_step(pp, gp, mp, vp, ma, va, offs, rows, n, lr_v, beta1, omb1, bhat_t, omb2_t, eps_tt, wd,
                   decay_v, kt, e0, MAXIMIZE, DECOUPLED, SR, Q8_M, Q8_V, False)
    if n_full * BLOCK < n:
        offs, rows = _q8_offsets(n_full, BLOCK, Q8)
        _adax_step(pp, gp, mp, vp, ma, va, offs, rows, n, lr_v, beta1, omb1, bhat_t, omb2_t, eps_tt, wd,
                   decay_v, kt, e0, MAXIMIZE, DECOUPLED, SR, Q8_M, Q8_V, True)


def _device_scalars(state_steps: list[Tensor], beta2: float, eps: float) -> Tensor:
    """[n, 3] float32 (bhat, 1-bhat, eps/sqrt(bc)) from step counts kept on the device (float64 math)."""
    t = torch.stack([s.reshape(()) for s in state_steps])
    return adax_scalars_tensor(t, beta2, eps).to(torch.float32)


@torch.no_grad()
def fused_adax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], state_steps: list[Tensor], *, lr: float | Tensor,
               beta1: float, beta2: float, eps: float, weight_decay: float,
               decoupled_weight_decay: bool, maximize: bool, sr_seed: int | None = None,
               param_indices: list[int] | None = None, absmax: list[list[Tensor] | None] | None = None,
               element_offset: int | list[int] = 0) -> None:
    """AdaX over whole tensor lists in one Triton launch (same arguments as the foreach function
    ``tigeropt.adax._multi_tensor_adax``; ``state_steps`` already incremented).

    Low precision (:mod:`tigeropt._lowp`, bit for bit): bf16 state is stored rounded to nearest, or
    stochastically with ``sr_seed`` (which also rounds bf16 parameters stochastically); ``absmax``
    (per state tensor list, None for a float one) makes a state list 8-bit codes; ``param_indices``
    (the hash's parameter indices, default 0, 1, ...) and ``element_offset`` (added to the element
    indices): :func:`tigeropt.kernels._common.low_precision`.
    """
    lowp = low_precision(params, state_steps, 2, sr_seed=sr_seed, param_indices=param_indices, absmax=absmax,
                         element_offset=element_offset)
    if compiling() and lowp is None:
        torch.ops.tigeropt.triton_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *split_lr(lr),
                                       beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize)
        return
    launch = prepare(params, grads, [exp_avgs, exp_avg_sqs], lowp)
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
    b1 = float(beta1)
    _adax_kernel[launch.grid](
        *launch.pointers(), scal, lr_arg, b1, 1.0 - b1, float(bhat), float(omb2), float(eps_t),
        float(weight_decay), 0.0 if lr_ptr else 1.0 - float(lr_arg) * float(weight_decay), launch.k1,
        MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled_weight_decay), PER_TENSOR=per_tensor, LR_PTR=lr_ptr,
        **launch.meta("M", "V"))
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
