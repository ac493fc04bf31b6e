"""Fused Triton step of Adagrad, standard and GloVe-style, one launch for a whole list of tensors.

Per element, in float32 whatever the parameter dtype (accumulator ``G`` is float32), with the
per-tensor ``clr = lr / (1 + (t-1)*lr_decay)``:

    g = -g                                    (maximize)
    g = g + wd*p                              (weight decay, L2)
    standard (== torch.optim.Adagrad):   G = G + g^2;  p = p + (-clr * g) / (sqrt(G) + eps)
    GloVe-style (glove.c):               g = clip(g, -c, c) (optional);  u = clr*g;
                                         p = p - u / sqrt(G);  G = G + u^2

rounded as the reference's torch ops round (``add_(x, alpha=a)`` and ``addcmul_`` are fused
multiply-adds; for a float lr, clr is computed in float64 on the host).
``skip_nonfinite_rows`` (a per-row reduction) is not done here; the optimizer routes it to the
reference path.  The lr-decay factor ``1/(1 + (t-1)*lr_decay)`` is one kernel argument when all
tensors share a step (or lr_decay is 0), else one entry per tensor in a small device table;
step counts kept on the GPU are turned into that table by device ops (capturable).
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

__all__ = ["fused_adagrad"]


@triton.jit
def _adagrad_update(p, g, acc, clr, wd, eps, clip, MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr,
                    CLIP: tl.constexpr):
    if MAXIMIZE:
        g = -g
    g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)  # skipped at wd = 0 like the reference (inf params)
    if GLOVE:
        if CLIP:
            g = tl.where(g < -clip, -clip, tl.where(g > clip, clip, g))
        u = g * clr
        p = p - tl.div_rn(u, tl.sqrt_rn(acc))
        acc = tl.fma(u, u, acc)
    else:
        acc = tl.fma(g, g, acc)
        p = p + tl.div_rn(-clr * g, tl.sqrt_rn(acc) + eps)
    return p, acc


@triton.jit
def _adagrad_block(pp, gp, sp, offs, n, clr, wd, eps, clip,
                   MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr,
                   ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One block with float state (the row kernels' step)."""
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    acc = _ld(sp, offs, n, MASKED)
    p, acc = _adagrad_update(p, g, acc, clr, wd, eps, clip, MAXIMIZE, GLOVE, CLIP)
    _st(sp, offs, acc, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _adagrad_step(pp, gp, sp, sa, offs, rows, n, clr, wd, eps, clip, kt, e0,
                  MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr, SR: tl.constexpr,
                  Q8_S: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    acc = _ld_state(sp, sa, offs, rows, n, Q8_S, MASKED)
    p, acc = _adagrad_update(p, g, acc, clr, wd, eps, clip, MAXIMIZE, GLOVE, CLIP)
    _st_lowp(pp, offs, p, n, kt, 0, e0, SR, MASKED)  # first: fewer live registers
    _st_state(sp, sa, offs, rows, acc, n, kt, 1, e0, SR, Q8_S, MASKED)


@triton.jit(do_not_specialize=["k1"])
def _adagrad_kernel(table, work, gtab, p_base, g_base, s_base, a_base, ktab, scal, lr, factor, wd, eps, clip,
                    k1,
                    NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_S: tl.constexpr,
                    MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr,
                    PER_TENSOR: tl.constexpr, LR_PTR: tl.constexpr, SR: tl.constexpr, Q8_S: tl.constexpr,
                    KEY_TABLE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    sp = _tensor_ptr(s_base, tl.load(row + 2), U_S, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    # a float lr: the host passes clr = lr/(1 + (t-1)*lr_decay) itself (float64, as the reference),
    # as ``factor`` or per tensor in ``scal``; an lr tensor: the kernel multiplies lr by them
    if PER_TENSOR:
        clr = tl.load(scal + t)
    else:
        clr = factor
    if LR_PTR:
        clr = _lr_value(lr, LR_PTR) * clr
    e0, kt = _lowp_item(ktab, k1, t, row, start, 1, SR, KEY_TABLE, SR or Q8_S)
    sa = _absmax_ptr(a_base, row, 5, start, Q8_S)
    n_full = n // BLOCK
    for i in range(n_full):
        offs, rows = _q8_offsets(i, BLOCK, Q8_S)
        _adagrad_step(pp, gp, sp, sa, offs, rows, n, clr, wd, eps, clip, kt, e0, MAXIMIZE, GLOVE, CLIP, SR,
                      Q8_S, False)
    if n_full * BLOCK < n:
        offs, rows = _q8_offsets(n_full, BLOCK, Q8_S)
        _adagrad_step(pp, gp, sp, sa, offs, rows, n, clr, wd, eps, clip, kt, e0, MAXIMIZE, GLOVE, CLIP, SR,
                      Q8_S, True)


@torch.no_grad()
def fused_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                  state_steps: list[Tensor], *, lr: float | Tensor, lr_decay: float,
                  weight_decay: float, eps: float, glove: bool, grad_clip_value: float | None,
                  skip_nonfinite_rows: bool, maximize: bool, sr_seed: int | None = None,
                  param_indices: list[int] | None = None, absmax: list[list[Tensor] | None] | None = None,
                  element_offset: int | list[int] = 0) -> None:
    """Adagrad (standard or ``glove=True``) over whole tensor lists in one Triton launch (same
    arguments as the foreach function ``tigeropt.adagrad._multi_tensor_adagrad``).

    Low precision (:mod:`tigeropt._lowp`, bit for bit): bf16 ``state_sums`` are stored rounded to
    nearest, or stochastically with ``sr_seed`` (which also rounds bf16 parameters stochastically);
    ``absmax=[sum_absmaxs]`` makes ``state_sums`` 8-bit codes (the optimizer keeps its sum in bf16
    under "8bit"); ``param_indices``, ``element_offset``:
    :func:`tigeropt.kernels._common.low_precision`.
    """
    if skip_nonfinite_rows:
        raise ValueError("fused_adagrad does not implement skip_nonfinite_rows=True (a per-row reduction); "
                         "use the reference path")
    lowp = low_precision(params, state_steps, 1, sr_seed=sr_seed, param_indices=param_indices, absmax=absmax,
                         element_offset=element_offset)
    if compiling() and lowp is None:
        torch.ops.tigeropt.triton_adagrad(params, grads, state_sums, state_steps, *split_lr(lr), lr_decay,
                                          weight_decay, eps, glove, grad_clip_value, maximize)
        return
    launch = prepare(params, grads, [state_sums], lowp)
    if launch is None:
        return
    device = params[0].device
    scal: Tensor = launch.table
    per_tensor = False
    lr_arg, lr_ptr = lr_argument(lr, device)
    # lr*factor for a float lr (clr, float64 as the reference computes it), else factor
    lr_f = 1.0 if lr_ptr else float(lr_arg)
    factor = lr_f
    if lr_decay != 0.0:
        steps = step_values(state_steps)
        if steps is None:
            t = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float64)
            scal = (lr_f / (1.0 + (t - 1.0) * lr_decay)).to(device=device, dtype=torch.float32)
            per_tensor = True
        else:
            check_not_capturing_host_steps(device, "fused_adagrad with lr_decay")
            if steps.count(steps[0]) == len(steps):
                factor = lr_f / (1 + (steps[0] - 1) * lr_decay)
            else:
                scal = per_tensor_table([lr_f / (1 + (s - 1) * lr_decay) for s in steps], device)
                per_tensor = True
    clip = grad_clip_value is not None and bool(glove)
    _adagrad_kernel[launch.grid](
        *launch.pointers(), scal, lr_arg, float(factor), float(weight_decay), float(eps),
        float(grad_clip_value) if clip else 0.0, launch.k1, MAXIMIZE=bool(maximize), GLOVE=bool(glove),
        CLIP=clip, PER_TENSOR=per_tensor, LR_PTR=lr_ptr, **launch.meta("S"))
    launch.finish()


@torch.library.custom_op("tigeropt::triton_adagrad", mutates_args=("params", "state_sums"))
def _triton_adagrad_op(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                       state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None, lr_decay: float,
                       weight_decay: float, eps: float, glove: bool, grad_clip_value: float | None,
                       maximize: bool) -> None:
    fused_adagrad(params, grads, state_sums, state_steps, lr=join_lr(lr, lr_tensor), lr_decay=lr_decay,
                  weight_decay=weight_decay, eps=eps, glove=glove, grad_clip_value=grad_clip_value,
                  skip_nonfinite_rows=False, maximize=maximize)


_triton_adagrad_op.register_fake(lambda *args, **kwargs: None)  # in-place updates only
