"""Low-precision storage: stochastic rounding to bf16 and block-scaled 8-bit (fp8 e4m3) state.

This module sits below the optimizers and the kernels (it imports nothing from tigeropt) and
is the one definition of the rounding that every path uses.

Random bits: a counter-based integer hash
-----------------------------------------
No generator state: the random bits of an element are a pure function of
(seed, step, parameter index, stream, element index), so any path, any order of evaluation and
a resumed checkpoint draw the same bits.  The mixing function is Chris Wellons' ``lowbias32``::

    h(x) = x ^ x>>16;  x *= 0x7feb352d;  x ^= x>>15;  x *= 0x846ca68b;  x ^= x>>16   (mod 2^32)

    key   = h(h(h(h(seed) ^ step) ^ param_index) ^ stream)           (all taken mod 2^32)
    H(e)  = h(e_lo ^ h(key ^ e_hi))     e = element index, e_lo/e_hi its low/high 32 bits

one ``lowbias32`` per element (``h(key ^ e_hi)`` is one number per 2^32 elements: per tensor in
practice).  ``param_index`` is the parameter's position in the optimizer (param_groups order, as
in the state_dict); ``stream`` is 0 for the parameter and 1 + i for state tensor
``state_keys[i]``; ``e`` is the element's logical (row-major) index in the tensor; ``step`` is the
parameter's step count after the increment.  In torch the hash runs in int64 with each product
split in 16-bit halves (no overflow), in C on ``uint32_t`` and in Triton on ``tl.uint32``.

Who draws which bits (:func:`sr_key`): a bf16 rounding takes 16 random bits, an 8-bit encoding
24, so one hash serves two bf16 roundings of an element:

* the bf16 parameter: the high 16 bits of stream 0's ``H(e)``;
* state 0 (stream 1) stored in bf16: the low 16 bits of stream 0's ``H(e)`` (the same hash);
* state ``i`` stored in bf16, ``i >= 1``: the high 16 bits of stream ``1 + i``'s ``H(e)``;
* state ``i`` stored in 8 bits: the high 24 bits of stream ``1 + i``'s ``H(e)``.

``lowbias32`` is a bijection of 32-bit words (over all inputs each pair of 16-bit halves occurs
once) with full avalanche; tests/test_low_precision.py checks that the two roundings' up/down
decisions are uncorrelated over 2^20 elements.  A rounding
key (:func:`sr_key`) is ``key`` with bit 32 set where the low 16 bits round (:data:`LOW16`).

Changed on 2026-11-30 (after benchmarks/results/precision-study-2026-11-30 was run): the rule was
``H(e) = h(h(e_lo ^ key) ^ e_hi)`` with a whole hash per rounded tensor, two ``lowbias32`` per
element and tensor; the new rule is statistically the same (uniform, independent bits per element,
tensor and step) with a quarter to a half of the multiplies.

Stochastic rounding to bf16
---------------------------
bf16 is the upper half of an fp32 bit pattern.  With ``u`` the fp32 bits of the exact result
and ``r`` its 16 random bits, uniform in [0, 2^16): ``bf16 bits = (u + r) >> 16``.  The result is the
next bf16 away from zero with probability ``(u & 0xffff) / 2^16`` (the discarded fraction of a
unit) and the truncated value otherwise, so its expected value is the fp32 value exactly.
inf stays inf; NaN becomes the canonical bf16 NaN 0x7fc0 (what torch's conversion gives);
a finite value above the largest bf16 rounds to inf with that probability.

8-bit state: block-scaled fp8 e4m3
----------------------------------
A state tensor (flattened row-major) is cut in blocks of 256 elements; each block stores one
fp32 ``absmax`` (largest finite magnitude, stored as ``fl(448 * fl(absmax/448))``, the value its
code decodes to: :func:`stored_absmax`) and 256 one-byte codes, the OCP fp8 e4m3 (``e4m3fn``:
4 exponent bits, 3 mantissa bits, largest 448, smallest subnormal 2^-9) bit patterns of
``x * 448/absmax``: 1 + 4/256 = 1.016 bytes per element.  The float map keeps small values: an
element is flushed to 0 only below absmax * 2^-10/448 (2.2e-6 of the block's largest), where
a linear absmax int8 map flushes everything below absmax/254.  Encoding rounds to nearest
(ties to even) or, with stochastic rounding, up with probability equal to the discarded
fraction (exactly unbiased: the fraction is a multiple of 2^-20, compared with 24 random bits,
``H(e) >> 8``).
Non-finite elements are stored as NaN codes (0x7f, sign kept) and decode to NaN.
Decoding: ``code_value * (absmax / 448)``.

Sharded tensors (DTensor, FSDP2)
--------------------------------
A shard holding elements ``o .. o+n-1`` of the whole (row-major flattened) tensor uses the global
indices ``o + i`` in the hash, and the whole tensor's 8-bit blocks: a block split between two
shards is encoded with the maximum of the shards' absmax (an all-reduce), so sharded rounding and
encoding equal the unsharded ones bit for bit.  The functions take the shard and ``offset=o``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["hash32", "key32", "key32_tensor", "sr_key", "LOW16", "element_bits", "round_bf16", "encode_8bit",
           "decode_8bit", "block_absmax", "stored_absmax", "covered_blocks", "BLOCK", "FP8_MAX", "nblocks",
           "hash32_int"]

M32 = 0xFFFFFFFF
BLOCK = 256
FP8_MAX = 448.0
_C1, _C2 = 0x7FEB352D, 0x846CA68B
#: Bit 32 of a rounding key (:func:`sr_key`): the bf16 rounding takes the low 16 bits of the hash.
LOW16 = 1 << 32


def hash32_int(x: int) -> int:
    """``lowbias32`` on a Python int (the scalar definition the tensor versions follow)."""
    x &= M32
    x ^= x >> 16
    x = (x * _C1) & M32
    x ^= x >> 15
    x = (x * _C2) & M32
    x ^= x >> 16
    return x


def key32(seed: int, step: int, param_index: int, stream: int) -> int:
    """The per-(seed, step, parameter, stream) key of the element hash (module docstring)."""
    k = hash32_int(seed)
    k = hash32_int(k ^ (step & M32))
    k = hash32_int(k ^ (param_index & M32))
    return hash32_int(k ^ (stream & M32))


def key32_tensor(seed: int, step: Tensor, param_index: int, stream: int) -> Tensor:
    """:func:`key32` with the step count a tensor (0-d, an integer value in any dtype): an int64 0-d
    tensor, the same number; for compiled steps, which cannot read the step on the host."""
    k = hash32((step.to(torch.int64) & M32) ^ hash32_int(seed))
    k = hash32(k ^ (param_index & M32))
    return hash32(k ^ (stream & M32))


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def hash32(x: Tensor) -> Tensor:
    """``lowbias32`` elementwise on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def sr_key(seed: int, step: int | Tensor, param_index: int, stream: int, eight_bit: bool = False) -> Any:
    """The rounding key of ``stream`` (0: the parameter, 1 + i: state i) for :func:`round_bf16`
    (``eight_bit=False``) or :func:`encode_8bit` (``eight_bit=True``): ``key32`` of the stream whose
    hash it draws from, plus :data:`LOW16` where it takes that hash's low 16 bits (bf16 state 0
    shares stream 0's hash; module docstring).  With ``step`` a tensor (a traced step) an int64
    0-d tensor."""
    shared = stream == 1 and not eight_bit
    src = 0 if shared else stream
    k = key32_tensor(seed, step, param_index, src) if isinstance(step, Tensor) else key32(seed, step,
                                                                                         param_index, src)
    return k | LOW16 if shared else k


def element_bits(key: int | Tensor, numel: int, device: torch.device | str = "cpu",
                 index: Tensor | None = None, offset: int = 0) -> Tensor:
    """The 32 hash bits ``H(e)`` (int64 in [0, 2^32); module docstring) of elements
    ``offset..offset+numel-1`` (or the int64 ``index``) under the 32-bit ``key``."""
    e = torch.arange(offset, offset + numel, dtype=torch.int64, device=device) if index is None else index
    return hash32((e & M32) ^ hash32((e >> 32) ^ key))


def round_bf16(x: Tensor, key: int | None, index: Tensor | None = None, offset: int = 0) -> Tensor:
    """``x`` (fp32) in bf16: to nearest (``key=None``), else stochastically with the element hash
    under the rounding ``key`` (:func:`sr_key`: the high 16 bits, with :data:`LOW16` the low 16).

    ``index`` (int64, ``x``'s shape): the elements' indices in the whole tensor (default: x's own
    row-major indices plus ``offset``), e.g. for rows gathered from a larger tensor; ``offset``: the
    index of x's first element in the whole tensor when x is a contiguous range of it (a DTensor
    shard: the global element index keys the hash, so sharded rounding equals unsharded rounding).
    """
    if key is None:
        return x.to(torch.bfloat16)
    shift = 16 - 16 * (key >> 32)  # the high 16 bits of the hash, or with LOW16 the low 16
    x = x.float().contiguous()
    u = x.view(torch.int32).to(torch.int64) & M32
    idx = None if index is None else index.reshape(-1)
    bits = element_bits(key & M32, x.numel(), x.device, index=idx, offset=offset).view(x.shape)
    r = (bits >> shift) & 0xFFFF
    hi = (u + r) >> 16  # <= 0xff80 for every non-NaN input (NaN is replaced below)
    hi = torch.where(torch.isnan(x), 0x7FC0, hi)
    hi = torch.where(hi >= 0x8000, hi - 0x10000, hi)
    return hi.to(torch.int16).view(torch.bfloat16)


def _scale(absmax: Tensor) -> Tensor:
    """``absmax / 448``, correctly rounded on every device (CUDA divides a tensor by a Python scalar
    as a multiplication by its rounded reciprocal)."""
    return absmax / torch.full_like(absmax, FP8_MAX)


def stored_absmax(absmax: Tensor) -> Tensor:
    """The absmax an encoding stores for blocks whose largest finite magnitude is ``absmax``:
    ``fl(448 * fl(absmax / 448))``, the value the block's largest code (448) decodes to.  The scale
    ``absmax / 448`` of it is the same float (checked for every float32), so the decoded values are
    those of the raw maximum, and decoding then re-encoding unchanged state gives the same codes and
    absmax (the raw maximum moved a block's absmax by one unit in ~10% of the blocks)."""
    return _scale(absmax) * FP8_MAX


def nblocks(numel: int) -> int:
    return -(-numel // BLOCK)


def covered_blocks(numel: int, offset: int = 0) -> tuple[int, int]:
    """(first block, number of blocks) that elements ``offset..offset+numel-1`` of a tensor touch."""
    first = offset // BLOCK
    return first, nblocks(offset % BLOCK + numel) if numel else 0


def _blocks(x: Tensor, offset: int) -> tuple[Tensor, int]:
    """``x`` flattened (fp32), zero-padded into the whole tensor's blocks it covers: ([nb, BLOCK], lead)."""
    n, lead = x.numel(), offset % BLOCK
    nb = covered_blocks(n, offset)[1]
    flat = x.detach().float().reshape(-1)
    if nb == 0:
        return flat.new_zeros(0, BLOCK), lead
    if lead or nb * BLOCK != lead + n:
        flat = torch.cat([flat.new_zeros(lead), flat, flat.new_zeros(nb * BLOCK - lead - n)])
    return flat.view(nb, BLOCK), lead


def block_absmax(x: Tensor, offset: int = 0) -> Tensor:
    """Largest finite magnitude of ``x``'s elements in each block they cover (``covered_blocks``), with
    ``x`` the elements ``offset..offset+numel-1`` of a tensor (0 for blocks of none).  The absmax of a
    block split between two ranges (DTensor shards) is the maximum of the ranges' values."""
    blocks, _ = _blocks(x, offset)
    a = torch.where(torch.isfinite(blocks), blocks.abs(), 0.0)
    return a.amax(dim=1) if blocks.shape[0] else a.new_zeros(0)


def encode_8bit(x: Tensor, key: int | None = None, *, offset: int = 0, absmax: Tensor | None = None,
                index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(codes uint8 of ``x``'s shape, absmax fp32 [nblocks]) of ``x`` (fp32; module docstring).

    ``key=None`` rounds to nearest (ties to even); otherwise stochastically with the high 24 bits of
    the element hash under ``key`` (:func:`sr_key` with ``eight_bit=True``).  ``x`` may be a
    contiguous range ``offset..offset+numel-1`` of a larger tensor (a DTensor shard): the blocks
    are then the whole tensor's, the returned absmax is of the blocks the range covers
    (``covered_blocks``) and the hash takes the elements' indices in the whole tensor.  ``absmax``:
    the covered blocks' absmax to encode with (a block split between ranges: the maximum of their
    :func:`block_absmax`), instead of the range's own.  ``index``: the elements' indices in the whole
    tensor for the hash when ``x`` is gathered from it (rows that are whole blocks).
    """
    shape, n = x.shape, x.numel()
    blocks, lead = _blocks(x, offset)
    nb = blocks.shape[0]
    finite = torch.isfinite(blocks)
    a = torch.where(finite, blocks.abs(), 0.0)
    if absmax is None:
        absmax = a.amax(dim=1) if nb else a.new_zeros(0)
    scale = _scale(absmax)
    y = a / torch.where(scale > 0, scale, 1.0)[:, None]
    y = y.clamp_max(FP8_MAX)
    exp = (y.view(torch.int32) >> 23) - 127  # y >= 0: the sign bit is 0
    ulp = ((exp.clamp_min(-6) - 3 + 127) << 23).view(torch.float32)  # 2^(max(e,-6)-3): e4m3's spacing
    t = y / ulp  # exact: ulp is a power of two
    fl = torch.floor(t)
    frac = t - fl
    if key is None:
        up = (frac > 0.5) | ((frac == 0.5) & (torch.remainder(fl, 2.0) == 1.0))
    else:
        if index is None:
            bits = element_bits(key, nb * BLOCK, x.device, offset=offset - lead)
        else:  # the padding's bits do not matter: a zero never rounds up
            bits = element_bits(key, 0, index=index.reshape(-1))
            bits = torch.cat([bits.new_zeros(lead), bits, bits.new_zeros(nb * BLOCK - lead - n)])
        up = frac > (bits.view(nb, BLOCK) >> 8).float() * 2.0 ** -24
    q = (fl + up.float()) * ulp
    q = torch.where(torch.signbit(blocks), -q, q)
    codes = q.to(torch.float8_e4m3fn).view(torch.uint8)
    nan_code = torch.where(torch.signbit(blocks), 0xFF, 0x7F).to(torch.uint8)
    codes = torch.where(finite, codes, nan_code)
    return codes.reshape(-1)[lead:lead + n].reshape(shape).contiguous(), scale * FP8_MAX


def decode_8bit(codes: Tensor, absmax: Tensor, offset: int = 0) -> Tensor:
    """fp32 values of ``codes`` (uint8, any shape) with their blocks' ``absmax`` (of the blocks that
    elements ``offset..offset+numel-1`` cover, when ``codes`` is a range of a larger tensor)."""
    shape, n = codes.shape, codes.numel()
    nb, lead = absmax.numel(), offset % BLOCK
    flat = codes.reshape(-1)
    if n == 0:
        return codes.float()
    if lead or nb * BLOCK != lead + n:
        flat = torch.cat([flat.new_zeros(lead), flat, flat.new_zeros(nb * BLOCK - lead - n)])
    values = flat.view(torch.float8_e4m3fn).float().view(nb, BLOCK) * _scale(absmax)[:, None]
    return values.reshape(-1)[lead:lead + n].reshape(shape)
