"""Triton twin of a low-precision store of :mod:`tigeropt._lowp`: stochastic rounding of fp32 to bf16
with the counter-based ``lowbias32`` hash, bit for bit the torch code (and the C code).

On CUDA the step kernels round inside their one pass (their low-precision variants); this store
serves the working-copy step the optimizer base keeps for what they do not take (DTensor shards
with 8-bit state, fp64 math, ``foreach=True``/``False`` are torch's).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import _element_bits

__all__ = ["sr_bf16"]

_BLOCK = 1024


@triton.jit(do_not_specialize=["n", "key"])
def _sr_bf16_kernel(src_ptr, dst_ptr, n, key, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask, other=0.0)
    u = x.to(tl.uint32, bitcast=True)
    k = tl.full((), key, tl.int64).to(tl.uint32)
    r = (_element_bits(k, start, tl.arange(0, BLOCK)) >> SHIFT) & 0xFFFF
    bits = (u + r) >> 16
    bits = tl.where(x != x, tl.full(offs.shape, 0x7FC0, tl.uint32), bits)
    tl.store(dst_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


def sr_bf16(src: Tensor, dst: Tensor, key: int) -> bool:
    """``dst.copy_(tigeropt._lowp.round_bf16(src, key))`` (``key``: a rounding key, _lowp.sr_key); False
    (nothing done) if it cannot take them."""
    if not (src.dtype == torch.float32 and dst.dtype == torch.bfloat16 and src.is_contiguous()
            and dst.is_contiguous() and src.numel() == dst.numel() and src.device == dst.device):
        return False
    n = src.numel()
    if n:
        _sr_bf16_kernel[(triton.cdiv(n, _BLOCK),)](src, dst.view(torch.int16), n, key & 0xFFFFFFFF,
                                                   SHIFT=0 if key >> 32 else 16, BLOCK=_BLOCK)
    return True
