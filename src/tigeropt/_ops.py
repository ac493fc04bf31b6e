"""Helpers for the fused steps as ``torch.library`` custom ops (below the kernels and the optimizers).

The fused C step and the Triton launches reach tensors through raw pointers and pointer tables,
which ``torch.compile`` cannot trace.  Each fused step is therefore also registered as an *opaque*
custom op (namespace ``tigeropt``) that takes the tensor lists, declares every list it mutates
(``mutates_args``) and has a fake implementation (it returns nothing, so the fake does nothing).
Eager calls skip the dispatcher and run the launcher directly (no per-call dispatch cost); while
Dynamo traces, the launchers call the op instead, so a compiled step holds one node per fused
launch and no graph breaks.

The learning rate reaches the ops as ``(lr: float, lr_tensor: Tensor | None)``: a tensor lr stays
a graph input (changing its value never recompiles); a float lr is passed as a float64 0-d tensor
while tracing, so after its first change Dynamo makes it a graph input too (one recompile).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compiling", "split_lr", "join_lr", "to_float"]


def compiling() -> bool:
    """True while Dynamo traces (the launchers then call their custom op)."""
    return torch.compiler.is_compiling()


def split_lr(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """``lr`` as the ops' two arguments: (float, None) or (0.0, tensor).

    While Dynamo traces, a float lr goes in as a float64 0-d tensor (the same value): passed as a
    ``float`` argument it would be guarded as a constant and every new value would recompile,
    whereas as a tensor Dynamo makes it a graph input after the first change (one recompile).
    """
    if isinstance(lr, Tensor):
        return 0.0, lr
    if compiling():  # (1.0 * lr is exact; unlike torch.tensor(lr), a product keeps lr symbolic)
        return 0.0, torch.ones((), dtype=torch.float64).mul(lr)
    return lr, None


def join_lr(lr: float, lr_tensor: Tensor | None) -> float | Tensor:
    """The inverse of :func:`split_lr` (inside an op implementation)."""
    return lr if lr_tensor is None else lr_tensor


def to_float(x: float | Tensor) -> float:
    """A Python float from a number or a one-element tensor (lr may be a tensor)."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)
