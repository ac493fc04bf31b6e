"""Fused Triton step of Adagrad, standard and GloVe-style, one launch for a whole list of tensors.

Per element, in float32 whatever the parameter dtype (accumulator ``G`` is float32), with the
per-tensor ``clr = lr / (1 + (t-1)*lr_decay)``:

    g = -g                                    (maximize)
    g = g + wd*p                              (weight decay, L2)
    standard (== torch.optim.Adagrad):   G = G + g^2;  p = p - clr * g / (sqrt(G) + eps)
    GloVe-style (glove.c):               g = clip(g, -c, c) (optional);  u = clr*g;
                                         p = p - u / sqrt(G);  G = G + u^2

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

__all__ = ["fused_adagrad"]


@triton.jit
def _adagrad_block(pp, gp, sp, offs, n, clr, wd, eps, clip,
                   MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr,
                   ROUND_BF16: tl.constexpr, MASKED: tl.constexpr):
    p = _ld(pp, offs, n, MASKED)
    g = _ld(gp, offs, n, MASKED)
    acc = _ld(sp, offs, n, MASKED)
    if MAXIMIZE:
        g = -g
    g = tl.where(wd != 0.0, g + wd * p, g)  # skipped at wd = 0 like the reference (inf params)
    if GLOVE:
        if CLIP:
            g = tl.where(g < -clip, -clip, tl.where(g > clip, clip, g))
        u = clr * g
        p = p - tl.div_rn(u, tl.sqrt_rn(acc))
        acc = acc + u * u
    else:
        acc = acc + g * g
        p = p - clr * tl.div_rn(g, tl.sqrt_rn(acc) + eps)
    _st(sp, offs, acc, n, MASKED, False)
    _st(pp, offs, p, n, MASKED, ROUND_BF16)


@triton.jit
def _adagrad_kernel(table, work, gtab, p_base, g_base, s_base, scal, lr, factor, wd, eps, clip,
                    NCOLS: tl.constexpr, U_P: tl.constexpr, U_G: tl.constexpr, U_S: tl.constexpr,
                    MAXIMIZE: tl.constexpr, GLOVE: tl.constexpr, CLIP: tl.constexpr,
                    PER_TENSOR: tl.constexpr, LR_PTR: tl.constexpr, ROUND_BF16: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, row, start, n = _work_item(work, table, NCOLS, CHUNK)
    pp = _tensor_ptr(p_base, tl.load(row + 1), U_P, start)
    sp = _tensor_ptr(s_base, tl.load(row + 2), U_S, start)
    gp = _tensor_ptr(g_base, tl.load(gtab + t), U_G, start)
    if PER_TENSOR:
        clr = _lr_value(lr, LR_PTR) * tl.load(scal + t)
    else:
        clr = _lr_value(lr, LR_PTR) * factor
    n_full = n // BLOCK
    for i in range(n_full):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        _adagrad_block(pp, gp, sp, offs, n, clr, wd, eps, clip, MAXIMIZE, GLOVE, CLIP, ROUND_BF16, False)
    if n_full * BLOCK < n:
        offs = n_full * BLOCK + tl.arange(0, BLOCK)
        _adagrad_block(pp, gp, sp, offs, n, clr, wd, eps, clip, MAXIMIZE, GLOVE, CLIP, ROUND_BF16, True)


@torch.no_grad()
def fused_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                  state_steps: list[Tensor], *, lr: float | Tensor, lr_decay: float,
                  weight_decay: float, eps: float, glove: bool, grad_clip_value: float | None,
                  skip_nonfinite_rows: bool, maximize: bool) -> None:
    """Adagrad (standard or ``glove=True``) over whole tensor lists in one Triton launch (same
    arguments as the foreach function ``tigeropt.adagrad._multi_tensor_adagrad``)."""
    if skip_nonfinite_rows:
        raise ValueError("fused_adagrad does not implement skip_nonfinite_rows=True (a per-row reduction); "
                         "use the reference path")
    if compiling():
        torch.ops.tigeropt.triton_adagrad(params, grads, state_sums, state_steps, *split_lr(lr), lr_decay,
                                          weight_decay, eps, glove, grad_clip_value, maximize)
        return
    launch = prepare(params, grads, [state_sums])
    if launch is None:
        return
    device = params[0].device
    scal: Tensor = launch.table
    per_tensor = False
    factor = 1.0
    if lr_decay != 0.0:
        steps = step_values(state_steps)
        if steps is None:
            t = torch.stack([s.reshape(()) for s in state_steps]).to(torch.float64)
            scal = (1.0 / (1.0 + (t - 1.0) * lr_decay)).to(device=device, dtype=torch.float32)
            per_tensor = True
        else:
            check_not_capturing_host_steps(device, "fused_adagrad with lr_decay")
            if steps.count(steps[0]) == len(steps):
                factor = 1.0 / (1.0 + (steps[0] - 1.0) * lr_decay)
            else:
                scal = per_tensor_table([1.0 / (1.0 + (s - 1.0) * lr_decay) for s in steps], device)
                per_tensor = True
    lr_arg, lr_ptr = lr_argument(lr, device)
    cfg = launch.config
    u_p, u_g, u_s = launch.units
    clip = grad_clip_value is not None and bool(glove)
    _adagrad_kernel[launch.grid](
        launch.table, launch.work, launch.gtab, *launch.bases, scal, lr_arg, float(factor),
        float(weight_decay), float(eps), float(grad_clip_value) if clip else 0.0,
        NCOLS=3, U_P=u_p, U_G=u_g, U_S=u_s, MAXIMIZE=bool(maximize), GLOVE=bool(glove), CLIP=clip,
        PER_TENSOR=per_tensor, LR_PTR=lr_ptr, ROUND_BF16=launch.round_bf16, BLOCK=cfg.block,
        CHUNK=cfg.chunk, num_warps=cfg.num_warps)
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
