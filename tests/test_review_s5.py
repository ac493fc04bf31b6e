"""Independent review, session 5: the changes landed this session (the stochastic-rounding rule of
one lowbias32 per element with the bf16 parameter and bf16 state 0 sharing a hash, the 8-bit stored
absmax, attach_zero, optimizer_in_backward's DDP wiring, the cached C plans' checks, the row kernels).
Each defect test reproduces it the way a user hits it and failed before its fix; the transcription
tests check the implementation against a plain-Python reading of the _lowp docstring, written here
independently of tigeropt's own hash code."""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import pytest
import torch

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger

# ------------------------------------------------------------------ the docstring's rule, in plain Python
M32 = 0xFFFFFFFF


def _h(x: int) -> int:
    """lowbias32 as the _lowp docstring writes it."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _key(seed: int, step: int, pidx: int, stream: int) -> int:
    return _h(_h(_h(_h(seed) ^ step) ^ pidx) ^ stream)


def _H(key: int, e: int) -> int:
    return _h((e & M32) ^ _h(key ^ (e >> 32)))


def _sr_bf16(value: float, r16: int) -> int:
    """bf16 bits of fp32 ``value`` rounded with 16 random bits: (u + r) >> 16, NaN -> 0x7fc0."""
    if math.isnan(value):
        return 0x7FC0
    return ((struct.unpack("<I", struct.pack("<f", value))[0] + r16) >> 16) & 0xFFFF


def _bf16_bits(t: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in t.detach().reshape(-1).view(torch.int16).tolist()]


def _encode_block(values: list[float], r24: list[int | None]) -> tuple[list[int], float]:
    """(e4m3 codes, stored absmax) of one 256-element block as the docstring states it: absmax the largest
    finite magnitude stored as fl(448*fl(absmax/448)); codes of |x|/fl(absmax/448) on e4m3's grid, rounded
    up with probability the discarded fraction (up when fraction > r24 * 2^-24), NaN codes 0x7f|sign."""
    f32 = np.float32
    finite = [abs(v) for v in values if math.isfinite(v)]
    scale = f32(f32(max(finite) if finite else 0.0) / f32(448.0))
    codes = []
    for v, r in zip(values, r24):
        if not math.isfinite(v):
            codes.append(0xFF if math.copysign(1.0, v) < 0 else 0x7F)
            continue
        y = min(float(f32(f32(abs(v)) / scale)) if scale > 0 else abs(v), 448.0)
        q = 0.0
        if y > 0:
            ulp = 2.0 ** (max(math.frexp(y)[1] - 1, -6) - 3)
            t = y / ulp
            low = math.floor(t)
            frac = t - low
            up = frac > 0.5 or (frac == 0.5 and low % 2 == 1) if r is None else frac > r * 2.0 ** -24
            q = (low + up) * ulp
        code = int(torch.tensor([math.copysign(q, v)]).to(torch.float8_e4m3fn).view(torch.uint8))
        codes.append(code)
    return codes, float(f32(scale * f32(448.0)))


def _decoded(t: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor:
    if absmax is None:
        return t.float().clone()
    scale = absmax / torch.full_like(absmax, 448.0)
    values = t.reshape(-1).view(torch.float8_e4m3fn).float()
    padded = torch.cat([values, values.new_zeros(-values.numel() % 256)]).view(-1, 256)
    return (padded * scale[:, None]).reshape(-1)[:t.numel()].reshape(t.shape)


def _expected(opt, p: torch.Tensor, pidx: int) -> list:
    """What one step stores for ``p`` by the docstring's rule: the reference rule on fp32 copies of the
    stored values, then each tensor rounded with the bits the docstring assigns it."""
    group = opt.param_groups[0]
    st = opt.state[p]
    work_p = p.detach().float().clone()
    work_s = [_decoded(st[k], st.get(k + "_absmax") if st[k].dtype == torch.uint8 else None)
              for k in opt.state_keys]
    step = int(st["step"]) + 1
    type(opt).reference_impl([work_p], [p.grad.float()], *[[w] for w in work_s], [torch.tensor(float(step))],
                             **opt._hyper(group))
    seed = group["sr_seed"]
    key0 = _key(seed, step, pidx, 0)
    out: list = [[_sr_bf16(v, _H(key0, e) >> 16) for e, v in enumerate(work_p.reshape(-1).tolist())]
                 if p.dtype == torch.bfloat16 else None]
    for i, k in enumerate(opt.state_keys):
        values = work_s[i].reshape(-1).tolist()
        if st[k].dtype == torch.uint8:  # stream 1 + i, the high 24 bits
            bits = [_H(_key(seed, step, pidx, 1 + i), e) >> 8 for e in range(len(values))]
            blocks = [_encode_block(values[o:o + 256], bits[o:o + 256]) for o in range(0, len(values), 256)]
            out.append(([c for b in blocks for c in b[0]], [b[1] for b in blocks]))
        elif i == 0:  # bf16 state 0: the low 16 bits of stream 0's hash
            out.append([_sr_bf16(v, _H(_key(seed, step, pidx, 0), e) & 0xFFFF) for e, v in enumerate(values)])
        else:  # bf16 state i >= 1: the high 16 bits of stream 1 + i's hash
            key = _key(seed, step, pidx, 1 + i)
            out.append([_sr_bf16(v, _H(key, e) >> 16) for e, v in enumerate(values)])
    return out


@pytest.mark.parametrize("path", ["reference", "foreach", "default"])
@pytest.mark.parametrize("cls, dtype, precision", [
    (Tiger, torch.bfloat16, "bf16"), (Lion, torch.float32, "bf16"), (Adagrad, torch.bfloat16, "8bit"),
    (AdaX, torch.bfloat16, "8bit"), (AdaX, torch.float32, "bf16")],
    ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_path_rounds_by_the_documented_rule(cls: type, dtype: torch.dtype, precision: str,
                                                  path: str) -> None:
    """Stored bits of two steps (fresh and non-zero state) of two parameters equal the _lowp docstring's
    rule transcribed above: bf16 parameter the high half of stream 0's H(e), bf16 state 0 its low half
    (also with an fp32 parameter), bf16 state i >= 1 the high half of stream 1 + i, 8-bit state the high
    24 bits of stream 1 + i with the stored absmax (Adagrad's sum and AdaX's exp_avg_sq stay bf16 under
    "8bit"); the default path is the fused C step."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300, generator=gen).to(dtype).requires_grad_(),
              torch.randn(3, 100, generator=gen).to(dtype).requires_grad_()]
    flags = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}[path]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(params, lr=1e-2, state_precision=precision, stochastic_rounding=True, sr_seed=11, **flags)
    for _ in range(2):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 3).to(dtype)
            if not opt.state[p]:
                opt.state[p].update(opt._init_state(p, opt.param_groups[0]))
        want = [_expected(opt, p, i) for i, p in enumerate(params)]
        opt.step()
        for i, (p, w) in enumerate(zip(params, want)):
            if w[0] is not None:
                assert _bf16_bits(p) == w[0], f"parameter {i}"
            for k, wk in zip(opt.state_keys, w[1:]):
                t = opt.state[p][k]
                if t.dtype == torch.uint8:
                    assert t.reshape(-1).tolist() == wk[0], f"parameter {i} {k} codes"
                    assert opt.state[p][k + "_absmax"].tolist() == wk[1], f"parameter {i} {k} absmax"
                else:
                    assert _bf16_bits(t) == wk, f"parameter {i} {k}"


def test_the_hash_with_element_indices_beyond_2_32() -> None:
    """Tensors of more than 2^32 elements (e_hi != 0): the reference functions on index tensors equal the
    docstring's H(e) = h(e_lo ^ h(key ^ e_hi)), for the high and the low (LOW16) half and the 8-bit codes."""
    from tigeropt import _lowp

    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 1 << 40, (256,), generator=gen)
    idx[:4] = torch.tensor([1 << 32, (1 << 32) - 1, (1 << 33) + 7, (1 << 40) - 1])
    x = torch.randn(256, generator=gen) * 2
    key = _key(1, 2, 3, 0)
    es = idx.tolist()
    assert _lowp.element_bits(key, 0, index=idx).tolist() == [_H(key, e) for e in es]
    assert _bf16_bits(_lowp.round_bf16(x, key, index=idx)) == [
        _sr_bf16(v, _H(key, e) >> 16) for v, e in zip(x.tolist(), es)]
    assert _bf16_bits(_lowp.round_bf16(x, key | _lowp.LOW16, index=idx)) == [
        _sr_bf16(v, _H(key, e) & 0xFFFF) for v, e in zip(x.tolist(), es)]
    codes, absmax = _lowp.encode_8bit(x, key, index=idx)
    want_codes, want_absmax = _encode_block(x.tolist(), [_H(key, e) >> 8 for e in es])
    assert codes.tolist() == want_codes and absmax.tolist() == [want_absmax]


# ------------------------------------------------------------------ optimizer_in_backward after remove()
def _bf16_params(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(64, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(n)]


def test_in_backward_group_added_after_remove_rounds_as_one_optimizer() -> None:
    """optimizer_in_backward gives each per-parameter optimizer its position as the hash's parameter
    index (the rounding of one optimizer over all parameters), but only in _attach: a group added after
    remove() kept index 0, so its stochastic rounding was the first parameter's (equal random bits for
    equal element indices) and not one optimizer's; the next step() (an ordinary step after remove())
    rounded it with the wrong bits.  Checked against one Tiger and against the docstring's rule."""
    kw: dict = dict(lr=1e-2, stochastic_rounding=True, sr_seed=3)
    a, b = _bf16_params(3), _bf16_params(3)
    ib = tigeropt.optimizer_in_backward(a[:2], Tiger, **kw)
    ib.remove()
    ib.add_param_group({"params": [a[2]]})
    one = Tiger(b[:2], **kw)
    one.add_param_group({"params": [b[2]]})
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(64, generator=gen).to(torch.bfloat16) for _ in range(3)]
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), g.clone()
    # the fp32 values the step stores (Tiger on an fp32 copy, fresh state: one reference step)
    work = a[2].detach().float().clone()
    Tiger.reference_impl([work], [grads[2].float()], [torch.zeros(64)], [torch.tensor(1.0)],
                         **one._hyper(one.param_groups[1]))
    ib.step()
    one.step()
    for i, (p, q) in enumerate(zip(a, b)):
        assert _bf16_bits(p) == _bf16_bits(q), f"parameter {i}"
    key = _key(3, 1, 2, 0)  # parameter 2, stream 0, step 1
    want = [_sr_bf16(v, _H(key, e) >> 16) for e, v in enumerate(work.tolist())]
    assert _bf16_bits(a[2]) == want


def test_a_copy_of_a_removed_in_backward_optimizer_stays_removed() -> None:
    """A deepcopy (or pickle) of an optimizer_in_backward after remove() re-attached its hooks: the copy's
    step() refused ("the step runs inside backward()") and backward() on the copied parameters updated
    them, unlike the original, which steps as an ordinary optimizer.  The copy keeps the original's
    attachment (and an attached one's copy is still attached) and steps as it does, bit for bit."""
    import copy

    kw: dict = dict(lr=1e-2, stochastic_rounding=True, sr_seed=3)
    ib = tigeropt.optimizer_in_backward(_bf16_params(2), Tiger, **kw)
    assert copy.deepcopy(ib).attached
    ib.remove()
    dup = copy.deepcopy(ib)
    assert not dup.attached
    gen = torch.Generator().manual_seed(1)
    for p, q in zip(ib._params, dup._params):
        p.grad = torch.randn(64, generator=gen).to(torch.bfloat16)
        q.grad = p.grad.clone()
    ib.step()
    dup.step()
    for p, q in zip(ib._params, dup._params):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
