"""Low precision: stochastic rounding to bf16, bf16 and 8-bit (block-scaled fp8 e4m3) state."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import tigeropt
from tigeropt import _lowp
from tigeropt._lowp import BLOCK, FP8_MAX, decode_8bit, encode_8bit, hash32, hash32_int, key32, round_bf16

OPTIMIZERS = [tigeropt.Tiger, tigeropt.Lion, tigeropt.AdaX, tigeropt.Adagrad]
PRECISIONS = [None, "fp32", "bf16", "8bit"]


def _bits(x: torch.Tensor) -> list[int]:
    return (x.view(torch.int16).to(torch.int64) & 0xFFFF).tolist()


# ----------------------------------------------------------------------------- the hash
def test_hash_tensor_equals_scalar_definition():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 0xDEADBEEF]
    assert hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [hash32_int(x) for x in xs]
    # lowbias32 written out once more by hand on one value
    x = 0xDEADBEEF
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2 ** 32
    x ^= x >> 16
    assert hash32_int(0xDEADBEEF) == x


def test_element_bits_follow_the_documented_formula():
    key = key32(7, 3, 2, 1)
    idx = torch.tensor([0, 1, 5, 2 ** 32 + 5, 2 ** 40 + 9], dtype=torch.int64)
    got = _lowp.element_bits(key, 0, index=idx).tolist()
    want = [hash32_int((e & 0xFFFFFFFF) ^ hash32_int(key ^ (e >> 32))) for e in idx.tolist()]
    assert got == want
    assert key == hash32_int(hash32_int(hash32_int(hash32_int(7) ^ 3) ^ 2) ^ 1)


def test_sr_key_follows_the_documented_sharing():
    """The bf16 parameter takes the high 16 bits of stream 0's hash, bf16 state 0 the low 16 bits of the
    same hash, bf16 state 1 and 8-bit state their own stream's (the module docstring's list)."""
    seed, step, pidx = 7, 3, 2
    assert _lowp.sr_key(seed, step, pidx, 0) == key32(seed, step, pidx, 0)
    assert _lowp.sr_key(seed, step, pidx, 1) == key32(seed, step, pidx, 0) | 1 << 32
    assert _lowp.sr_key(seed, step, pidx, 1, eight_bit=True) == key32(seed, step, pidx, 1)
    assert _lowp.sr_key(seed, step, pidx, 2) == key32(seed, step, pidx, 2)
    assert _lowp.sr_key(seed, step, pidx, 2, eight_bit=True) == key32(seed, step, pidx, 2)
    for stream in (0, 1, 2):
        for eight in (False, True):
            got = _lowp.sr_key(seed, torch.tensor(float(step)), pidx, stream, eight)
            assert got.item() == _lowp.sr_key(seed, step, pidx, stream, eight)
    # round_bf16 with each key: x's bits plus the chosen 16 hash bits, >> 16
    torch.manual_seed(0)
    x = torch.randn(1000)
    u = (x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).tolist()
    h = _lowp.element_bits(key32(seed, step, pidx, 0), x.numel(), offset=300).tolist()
    for key, r in ((_lowp.sr_key(seed, step, pidx, 0), [b >> 16 for b in h]),
                   (_lowp.sr_key(seed, step, pidx, 1), [b & 0xFFFF for b in h])):
        assert _bits(round_bf16(x, key, offset=300)) == [(ui + ri) >> 16 for ui, ri in zip(u, r)]


def test_roundings_sharing_a_hash_decide_independently():
    """The parameter and bf16 state 0 round with the two halves of one hash per element: their up/down
    decisions must be independent.  Values whose discarded fraction is exactly 1/2 go up with
    probability 1/2 each; over 2^20 elements the 2x2 table of (parameter up, state up) must be
    uniform (chi-square, 3 degrees of freedom, below 16.3: p = 0.001), and likewise for fractions
    1/4 and 3/4 and for the per-element correlation of the two 16-bit draws."""
    n = 1 << 20
    for seed, step, pidx, offset in ((0, 1, 0, 0), (5, 1000, 3, 2 ** 33 - 7), (2 ** 32 - 1, 7, 11, 12345)):
        for fp, fm in ((0.5, 0.5), (0.25, 0.75)):
            base = 1.0
            xp = torch.full((n,), base + fp * 2 ** -7)  # bf16 unit at 1.0: 2^-7
            xm = torch.full((n,), -(base + fm * 2 ** -7))
            up_p = round_bf16(xp, _lowp.sr_key(seed, step, pidx, 0), offset=offset).float() != base
            up_m = round_bf16(xm, _lowp.sr_key(seed, step, pidx, 1), offset=offset).float() != -base
            counts = torch.stack([(up_p & up_m).sum(), (up_p & ~up_m).sum(), (~up_p & up_m).sum(),
                                  (~up_p & ~up_m).sum()]).double()
            expect = torch.tensor([fp * fm, fp * (1 - fm), (1 - fp) * fm, (1 - fp) * (1 - fm)],
                                  dtype=torch.float64) * n
            chi2 = ((counts - expect) ** 2 / expect).sum().item()
            assert chi2 < 16.3, (seed, step, pidx, offset, fp, fm, counts.tolist())
        h = _lowp.element_bits(key32(seed, step, pidx, 0), n, offset=offset)
        hi, lo = (h >> 16).double(), (h & 0xFFFF).double()
        corr = torch.corrcoef(torch.stack([hi, lo]))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(n), (seed, corr)  # 4 sigma of a correlation of independent draws


def test_key32_from_a_step_tensor_equals_key32():
    """Compiled steps compute the key from the step tensor (float32/float64 counts): the same number."""
    for seed, step, pidx, stream in [(0, 1, 0, 0), (7, 3, 2, 1), (2 ** 32 - 1, 123456, 9, 3)]:
        for dtype in (torch.float32, torch.float64):
            got = _lowp.key32_tensor(seed, torch.tensor(float(step), dtype=dtype), pidx, stream)
            assert got.dtype == torch.int64 and got.item() == key32(seed, step, pidx, stream)


# ----------------------------------------------------------------------------- SR golden values
@pytest.mark.parametrize("r16, value, want", [
    (0x0000, 1.0 + 2 ** -9, 1.0),                     # down: random bits below the discarded fraction
    (0xBFFF, 1.0 + 2 ** -9, 1.0),                     # 0x4000 + 0xbfff = 0xffff: still down
    (0xC000, 1.0 + 2 ** -9, 1.0 + 2 ** -7),           # 0x4000 + 0xc000 carries: up
    (0xFFFF, -(1.0 + 2 ** -9), -(1.0 + 2 ** -7)),     # negative: "up" is away from zero
    (0x0000, -(1.0 + 2 ** -9), -1.0),
    (0xFFFF, 1.0, 1.0),                               # a bf16 value never moves
    (0xFFFF, float("inf"), float("inf")),
    (0xFFFF, -float("inf"), -float("inf")),
    (0xFFFF, 3.3961e38, float("inf")),                # above bf16's largest: up is inf
    (0x0000, 3.3961e38, 3.3895313892515355e38),       # ... down is the largest bf16
])
def test_stochastic_rounding_golden(monkeypatch, r16, value, want):
    monkeypatch.setattr(_lowp, "element_bits", lambda key, n, device="cpu", index=None, offset=0:
                        torch.full((n,), r16 << 16, dtype=torch.int64))
    got = round_bf16(torch.tensor([value], dtype=torch.float32), key=1)
    assert got.dtype == torch.bfloat16
    assert got.float().item() == want


def test_stochastic_rounding_keeps_nan_and_matches_the_bit_rule():
    x = torch.tensor([float("nan"), -float("nan"), 1.5, 1 + 2 ** -12, -3.0e-3, 0.0, -0.0, 1e-40])
    key = key32(1, 2, 3, 0)
    got = round_bf16(x, key)
    assert torch.isnan(got[:2].float()).all()
    assert _bits(got[:2]) == [0x7FC0, 0x7FC0]
    r = [b >> 16 for b in _lowp.element_bits(key, x.numel()).tolist()]
    u = (x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert _bits(got[2:]) == [(ui + ri) >> 16 for ui, ri in zip(u[2:], r[2:])]


def test_stochastic_rounding_is_unbiased():
    n = 200_000
    for value in (1.0 + 2 ** -9, 1.0 + 3 * 2 ** -10 + 2 ** -14, -0.3, 5e-3):
        x = torch.full((n,), value)
        lo = x.to(torch.bfloat16).float()
        ulp = torch.nextafter(lo.abs(), torch.tensor(math.inf)).to(torch.bfloat16).float() - lo.abs()
        ulp = ulp[0].item() if ulp[0].item() > 0 else 2 ** (math.floor(math.log2(abs(value))) - 7)
        for seed in range(3):
            got = round_bf16(x, key32(seed, 1, 0, 0)).double()
            assert set(got.unique().tolist()) <= {math.floor(value / ulp) * ulp, math.ceil(value / ulp) * ulp}
            frac = (value - math.floor(value / ulp) * ulp) / ulp
            sigma = ulp * math.sqrt(frac * (1 - frac) / n)
            assert abs(got.mean().item() - value) < 5 * sigma + 1e-12, (value, seed)


def test_stochastic_rounding_moves_parameters_below_half_a_unit():
    """lr below half a bf16 unit: round-to-nearest never moves the parameter, SR moves it on average."""
    torch.manual_seed(0)
    steps, lr = 20, 1e-3  # half a unit at 1.0 is 2^-8 = 3.9e-3
    results = {}
    for sr in (False, True):
        p = torch.ones(20_000, dtype=torch.bfloat16, requires_grad=True)
        opt = tigeropt.Tiger([p], lr=lr, weight_decay=0.0, stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step()
        results[sr] = p.detach().double()
    assert torch.equal(results[False], torch.ones_like(results[False]))
    expected = 1.0 - steps * lr
    sigma = 2 ** -7 * math.sqrt(steps / 4 / results[True].numel())
    assert abs(results[True].mean().item() - expected) < 6 * sigma


# ----------------------------------------------------------------------------- 8-bit codes
def test_8bit_roundtrip_error_per_block():
    torch.manual_seed(0)
    x = torch.randn(7, 300) * torch.logspace(-7, 2, 300)
    codes, absmax = encode_8bit(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (math.ceil(x.numel() / BLOCK),)
    raw = torch.cat([x.reshape(-1), x.new_zeros(absmax.numel() * BLOCK - x.numel())])
    raw = raw.view(-1, BLOCK).abs().amax(1)
    assert torch.equal(absmax, raw / FP8_MAX * FP8_MAX)  # what the largest code decodes to (stored_absmax)
    y = decode_8bit(codes, absmax)
    scale = (absmax / FP8_MAX).repeat_interleave(BLOCK)[: x.numel()].view_as(x)
    bound = torch.maximum(x.abs() * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6)
    assert ((y - x).abs() <= bound).all()
    assert torch.equal(encode_8bit(y)[0], codes)  # decoded values encode to the same codes


def test_8bit_keeps_small_values_a_linear_map_flushes():
    """The frozen-element fraction: elements 1e-5 .. 1 of their block's max keep a non-zero code."""
    torch.manual_seed(1)
    x = torch.randn(64, BLOCK).sign() * torch.logspace(-5, 0, BLOCK)
    codes, absmax = encode_8bit(x)
    y = decode_8bit(codes, absmax)
    assert (y != 0).all()
    assert torch.equal(torch.sign(y), torch.sign(x))
    linear = torch.round(x / x.abs().amax(1, keepdim=True) * 127)  # int8 absmax map, for contrast
    assert (linear == 0).float().mean() > 0.3


def test_8bit_non_finite_and_zero_blocks():
    x = torch.zeros(2 * BLOCK)
    x[0], x[1], x[2], x[BLOCK] = float("nan"), -float("inf"), 2.0, -0.0
    codes, absmax = encode_8bit(x)
    assert absmax.tolist() == [2.0, 0.0]
    y = decode_8bit(codes, absmax)
    assert torch.isnan(y[:2]).all() and y[2].item() == 2.0
    assert (y[3:] == 0).all()


def test_8bit_stochastic_encoding_is_unbiased():
    n_blocks = 2000
    x = torch.full((n_blocks, BLOCK), 0.3)
    x[:, 0] = 1.0  # absmax 1: 0.3*448 = 134.4 lies between the e4m3 values 128 and 144
    y = decode_8bit(*encode_8bit(x, key32(0, 1, 0, 1)))[:, 1:].double()
    scale = torch.tensor(1.0) / FP8_MAX  # decoding multiplies the code's value by absmax/448 in fp32
    assert set(y.unique().tolist()) == set((torch.tensor([128.0, 144.0]) * scale).tolist())
    p = (134.4 - 128) / 16
    sigma = 16 / 448 * math.sqrt(p * (1 - p) / y.numel())
    assert abs(y.mean().item() - 0.3) < 5 * sigma
    rtn = decode_8bit(*encode_8bit(x))[:, 1:]
    assert torch.equal(rtn, torch.full_like(rtn, 128.0) * scale)


@pytest.mark.parametrize("n", [5, 256, 257, 1000, 2100])
@pytest.mark.parametrize("key", [None, 12345])
def test_ranges_of_a_tensor_encode_and_round_as_the_whole(n, key):
    """A tensor cut in contiguous ranges (DTensor shards), each encoded with ``offset`` and the maximum
    of the ranges' block_absmax (what the all-reduce gives), is the whole tensor's codes and absmax;
    stochastic rounding of the ranges with ``offset`` is the whole tensor's rounding."""
    torch.manual_seed(n)
    x = torch.randn(n) * torch.logspace(-5, 1, n)[torch.randperm(n)]
    x[n // 2] = float("nan")
    codes, absmax = encode_8bit(x, key)
    for cuts in ([0, n // 3, 2 * n // 3, n], [0, min(100, n), n], [0, 0, n], [0, min(256, n), n]):
        parts = [(x[a:b], a) for a, b in zip(cuts, cuts[1:])]
        whole = torch.zeros(absmax.numel())
        for part, offset in parts:
            first, count = _lowp.covered_blocks(part.numel(), offset)
            partial = _lowp.block_absmax(part, offset)
            assert partial.numel() == count
            whole[first:first + count] = torch.maximum(whole[first:first + count], partial)
        assert torch.equal(_lowp.stored_absmax(whole), absmax)  # the stored absmax: 448 * (max / 448)
        got = []
        for part, offset in parts:
            first, count = _lowp.covered_blocks(part.numel(), offset)
            c, _ = encode_8bit(part, key, offset=offset, absmax=whole[first:first + count])
            decoded = decode_8bit(c, whole[first:first + count], offset)
            torch.testing.assert_close(decoded, decode_8bit(codes, absmax)[offset:offset + part.numel()],
                                       atol=0, rtol=0, equal_nan=True)
            got.append(c)
        assert torch.equal(torch.cat(got), codes)
        if key is not None:
            rounded = torch.cat([round_bf16(part, key, offset=offset) for part, offset in parts])
            assert torch.equal(rounded.view(torch.int16), round_bf16(x, key).view(torch.int16))


def test_c_stores_equal_the_torch_code():
    from tigeropt import _cpu

    if not _cpu.available():
        pytest.skip(f"fused CPU library unavailable: {_cpu.status()}")
    torch.manual_seed(0)
    x = torch.randn(100_003) * torch.logspace(-45, 38, 100_003)
    x[::97], x[::101], x[::103] = float("nan"), float("inf"), -float("inf")
    x[5], x[7] = -0.0, 3.3961e38
    for key in (0, 12345, 0xFFFFFFFF, _lowp.LOW16 | 12345):  # LOW16: the hash's low 16 bits round
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        assert _cpu.sr_bf16(x, out, key)
        assert torch.equal(out.view(torch.int16), round_bf16(x, key).view(torch.int16))
    y = torch.randn(70_001) * torch.logspace(-12, 3, 70_001)[torch.randperm(70_001)]
    y[::211], y[3], y[::1000], y[2] = float("nan"), -0.0, 0.0, -float("inf")
    y[5 * BLOCK:6 * BLOCK] = 0.0
    for key in (None, 7, 0xFFFFFFFF):
        codes = torch.empty(y.shape, dtype=torch.uint8)
        absmax = torch.empty(math.ceil(y.numel() / BLOCK))
        assert _cpu.encode_e4m3(y, codes, absmax, key)
        want_codes, want_absmax = encode_8bit(y, key)
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)
    assert not _cpu.sr_bf16(x[::2], torch.empty(x[::2].shape, dtype=torch.bfloat16), 1)  # strided: torch's


# ----------------------------------------------------------------------------- optimizers
def _run(cls, prec, sr, foreach, steps=4, seed=3, dtype=torch.bfloat16, state=None, params=None):
    torch.manual_seed(0)
    if params is None:
        params = [torch.randn(300, 7).to(dtype).requires_grad_(), torch.randn(7).to(dtype).requires_grad_()]
    opt = cls(params, state_precision=prec, stochastic_rounding=sr, foreach=foreach, sr_seed=seed)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(1 + (0 if state is None else 100))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return params, opt


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("sr", [False, True])
def test_reference_foreach_and_default_bitwise(cls, prec, sr):
    """Reference, foreach and the default path (on CPU: C stores when the library builds) agree bitwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pr, optr = _run(cls, prec, sr, foreach=False)
        for foreach in (True, None):
            pf, optf = _run(cls, prec, sr, foreach=foreach)
            for a, b in zip(pr, pf):
                assert torch.equal(a, b)
                _state_equal(optr.state[a], optf.state[b])
    eight = torch.bfloat16 if cls is tigeropt.Adagrad else torch.uint8  # Adagrad's sum: bf16 under "8bit"
    want = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "8bit": eight}[prec]
    assert optr.state[pr[0]][cls.state_keys[0]].dtype == want


def test_8bit_stores_non_negative_state_in_bf16():
    """AdaX's exp_avg_sq and Adagrad's sum stay bf16 under "8bit" (benchmarks/bench_8bit_maps.py: an
    8-bit second moment flushed to 0 next to a non-zero numerator gives huge updates)."""
    p, opt = _run(tigeropt.AdaX, "8bit", True, foreach=None)
    st = opt.state[p[0]]
    assert st["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in st
    assert st["exp_avg_sq"].dtype == torch.bfloat16 and "exp_avg_sq_absmax" not in st
    p, opt = _run(tigeropt.Adagrad, "8bit", False, foreach=None)
    assert set(opt.state[p[0]]) == {"step", "sum"} and opt.state[p[0]]["sum"].dtype == torch.bfloat16


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_fp32_state_precision_is_the_default_path(cls):
    """state_precision='fp32' with bf16 parameters and no SR is today's rule: bitwise the same."""
    pa, _ = _run(cls, None, False, foreach=None)
    pb, _ = _run(cls, "fp32", False, foreach=None)
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_seed_changes_the_rounding():
    pa, _ = _run(tigeropt.Tiger, "bf16", True, foreach=True, seed=1)
    pb, _ = _run(tigeropt.Tiger, "bf16", True, foreach=True, seed=2)
    assert not torch.equal(pa[0], pb[0])


def test_bf16_params_fp64_state_precision_fp32():
    """fp64 parameters with state_precision='fp32': state stored fp32, math fp64."""
    pr, optr = _run(tigeropt.AdaX, "fp32", False, foreach=False, dtype=torch.float64)
    pf, optf = _run(tigeropt.AdaX, "fp32", False, foreach=True, dtype=torch.float64)
    assert optr.state[pr[0]]["exp_avg"].dtype == torch.float32
    for a, b in zip(pr, pf):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prec", ["bf16", "8bit"])
def test_resume_continues_identically(cls, prec):
    """3 steps, checkpoint, 3 more in a new optimizer == 6 steps in one (gradients from seed 101 after 3)."""
    full, opt_full = _run(cls, prec, True, foreach=True, steps=3)
    sd = copy.deepcopy(opt_full.state_dict())
    cont_params = [p.detach().clone().requires_grad_() for p in full]
    _, opt_a = _run(cls, prec, True, foreach=True, steps=3, state=sd, params=cont_params)
    gen = torch.Generator().manual_seed(101)
    for _ in range(3):
        for p in full:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt_full.step()
    for a, b in zip(full, cont_params):
        assert torch.equal(a, b)
        _state_equal(opt_full.state[a], opt_a.state[b])
    for g in opt_a.state_dict()["param_groups"]:
        assert (g["state_precision"], g["stochastic_rounding"], g["sr_seed"]) == (prec, True, 3)


@pytest.mark.parametrize("prec", ["bf16", "8bit"])
def test_state_dict_round_trip_bit_exact(prec):
    params, opt = _run(tigeropt.AdaX, prec, True, foreach=True)
    sd = copy.deepcopy(opt.state_dict())
    other = tigeropt.AdaX([p.detach().clone().requires_grad_() for p in params], state_precision=prec)
    other.load_state_dict(sd)
    for k, st in sd["state"].items():
        _state_equal(st, other.state_dict()["state"][k])


def test_checkpoint_conversion_between_precisions():
    params, opt32 = _run(tigeropt.Tiger, None, False, foreach=True, dtype=torch.float32)
    sd32 = copy.deepcopy(opt32.state_dict())
    m32 = sd32["state"][0]["exp_avg"]
    fresh = [p.detach().clone().requires_grad_() for p in params]
    # fp32 -> 8bit: quantized (round to nearest)
    opt8 = tigeropt.Tiger(fresh, state_precision="8bit")
    opt8.load_state_dict(sd32)
    codes, absmax = encode_8bit(m32)
    assert torch.equal(opt8.state[fresh[0]]["exp_avg"], codes)
    assert torch.equal(opt8.state[fresh[0]]["exp_avg_absmax"], absmax)
    assert opt8.param_groups[0]["state_precision"] == "8bit"  # the loader's precision, not the checkpoint's
    # 8bit -> fp32: decoded
    sd8 = copy.deepcopy(opt8.state_dict())
    back = tigeropt.Tiger(fresh)
    back.load_state_dict(sd8)
    assert torch.equal(back.state[fresh[0]]["exp_avg"], decode_8bit(codes, absmax))
    assert "exp_avg_absmax" not in back.state[fresh[0]]
    # fp32 -> bf16 (round to nearest) -> fp32 (exact)
    optb = tigeropt.Tiger(fresh, state_precision="bf16")
    optb.load_state_dict(sd32)
    assert torch.equal(optb.state[fresh[0]]["exp_avg"], m32.to(torch.bfloat16))
    back.load_state_dict(copy.deepcopy(optb.state_dict()))
    assert torch.equal(back.state[fresh[0]]["exp_avg"], m32.to(torch.bfloat16).float())
    # and training continues from the converted state on every precision
    for o in (opt8, optb, back):
        for p in fresh:
            p.grad = torch.ones_like(p)
        o.step()
    assert all(torch.isfinite(p).all() for p in fresh)


def test_8bit_bytes_per_element():
    p = torch.zeros(1000, 256, dtype=torch.bfloat16, requires_grad=True)
    opt = tigeropt.Tiger([p], state_precision="8bit", stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    st = opt.state[p]
    state_bytes = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
    assert state_bytes / p.numel() == 1 + 4 / BLOCK
    assert (p.element_size() * p.numel() + state_bytes) / p.numel() < 3.1


def test_tiger_8bit_elements_do_not_freeze():
    """Small momenta next to a large one in the same block still move their parameters."""
    torch.manual_seed(0)
    p = torch.zeros(4 * BLOCK, requires_grad=True)
    opt = tigeropt.Tiger([p], lr=0.1, weight_decay=0.0, state_precision="8bit")
    scale = torch.logspace(-5, 0, p.numel())[torch.randperm(p.numel())]
    for _ in range(3):
        p.grad = scale.clone()
        opt.step()
    assert (p.detach() != 0).all()


# ----------------------------------------------------------------------------- bad input
def test_validation_errors_name_the_argument():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="state_precision.*16bit"):
        tigeropt.Tiger([p], state_precision="16bit")
    with pytest.raises(TypeError, match="state_precision"):
        tigeropt.Lion([p], state_precision=8)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        tigeropt.AdaX([p], stochastic_rounding="yes")
    with pytest.raises(ValueError, match="sr_seed"):
        tigeropt.Adagrad([p], sr_seed=-1)
    with pytest.raises(TypeError, match="sr_seed"):
        tigeropt.Adagrad([p], sr_seed=1.5)
    with pytest.raises(ValueError, match="stochastic_rounding"):  # fused=True takes it (Triton variants)
        tigeropt.Tiger([p], stochastic_rounding=True, capturable=True)
    with pytest.raises(ValueError, match="lazy.*parameter 0 of shape \\(3,\\)"):
        tigeropt.Tiger([p], state_precision="8bit", lazy=True)  # rows of 1 element: blocks span rows
    with pytest.raises(ValueError, match="lazy.*rows of 100 elements"):
        tigeropt.Lion([torch.zeros(4, 100, requires_grad=True)], state_precision="8bit", lazy=True)
    tigeropt.Tiger([torch.zeros(4, 256, requires_grad=True), torch.zeros(1, 7, requires_grad=True)],
                   state_precision="8bit", lazy=True)  # whole blocks per row, or one row: fine
    tigeropt.Adagrad([p], state_precision="8bit", lazy=True)  # Adagrad's "8bit" sum is bf16
    tigeropt.Tiger([p], state_precision="bf16", stochastic_rounding=True, lazy=True)  # bf16 rows: fine
    with pytest.raises(ValueError, match="stochastic_rounding"):
        tigeropt.Tiger([torch.zeros(3, dtype=torch.float16, requires_grad=True)], stochastic_rounding=True)
    with pytest.warns(UserWarning, match="no effect"):
        tigeropt.Tiger([torch.zeros(3, requires_grad=True)], stochastic_rounding=True)


def test_rejected_group_and_checkpoint_change_nothing():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = tigeropt.Tiger([p], state_precision="bf16", stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="state_precision"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "state_precision": "int4"})
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["sr_seed"] = 2 ** 32
    with pytest.raises(ValueError, match="sr_seed"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["state"][0]["exp_avg"] = torch.zeros(3, dtype=torch.uint8)  # 8-bit codes without their absmax
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(bad)
    bad["state"][0]["exp_avg_absmax"] = torch.zeros(2)
    with pytest.raises(ValueError, match="exp_avg_absmax.*shape"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert len(opt.param_groups) == 1
    assert after["param_groups"] == before["param_groups"]
    _state_equal(after["state"][0], before["state"][0])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_lazy_rows_all_touched_equal_the_dense_step(cls):
    """Lazy rows with bf16 state and SR: the rows' element indices in the whole tensor key the hash,
    so a step touching every row is bit for bit the dense step."""
    dense, opt_d = _run(cls, "bf16", True, foreach=False)
    torch.manual_seed(0)
    params = [torch.randn(300, 7).bfloat16().requires_grad_(), torch.randn(7).bfloat16().requires_grad_()]
    opt = cls(params, state_precision="bf16", stochastic_rounding=True, sr_seed=3, lazy=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    for a, b in zip(dense, params):
        assert torch.equal(a, b)
        _state_equal(opt_d.state[a], opt.state[b])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_lazy_rows_leave_untouched_rows(cls):
    torch.manual_seed(0)
    p = torch.randn(50, 4).bfloat16().requires_grad_()
    opt = cls([p], lr=0.1, state_precision="bf16", stochastic_rounding=True, lazy=True)
    g = torch.randn(50, 4).bfloat16()
    g[::3] = 0
    p.grad = g
    opt.step()
    before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.zeros_like(p)
    p.grad[1] = 1.0
    opt.step()
    changed = (p.detach() != before[0]).any(dim=1)
    assert changed[1] and not changed[torch.arange(50) != 1].any()
    for k in cls.state_keys:
        s, s0 = opt.state[p][k], before[1][k]
        rows = s.ne(s0).reshape(s.shape[0], -1).any(dim=1)
        assert not rows[torch.arange(50) != 1].any()


LAZY_8BIT_SHAPES = [(6, 256), (3, 2, 128), (1, 300), (), (5, 512)]


def _lazy_8bit_params(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in LAZY_8BIT_SHAPES]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("sr", [False, True])
def test_lazy_8bit_rows_all_touched_equal_the_dense_step(cls, sr):
    """Rows of whole 256-element blocks (or one row): a lazy step touching every row re-encodes every
    block as the dense step does, with the same hash bits (global element indices): bit for bit."""
    out = []
    for lazy in (False, True):
        params = _lazy_8bit_params()
        opt = cls(params, state_precision="8bit", stochastic_rounding=sr, sr_seed=3, lazy=lazy, foreach=False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) + 0.01).to(p.dtype)  # no zero row
            opt.step()
        out.append((params, opt))
    (dense, opt_d), (lazy, opt_l) = out
    for a, b in zip(dense, lazy):
        assert torch.equal(a, b)
        _state_equal(opt_d.state[a], opt_l.state[b])
    if cls is not tigeropt.Adagrad:
        assert opt_l.state[lazy[0]][cls.state_keys[0]].dtype == torch.uint8


@pytest.mark.parametrize("cls", [tigeropt.Tiger, tigeropt.Lion, tigeropt.AdaX], ids=lambda c: c.__name__)
def test_lazy_8bit_rows_equal_the_dense_step_on_touched_rows_and_keep_the_others(cls):
    """Against the dense step (itself equal to the reference): each step, a copy of the optimizer takes
    the dense step with the same gradients; the lazy step's touched rows equal the copy's rows (rows are
    whole blocks, so a row's codes and absmax depend on that row only) and every other row keeps its
    parameter, codes and absmax bit for bit."""
    params = [torch.randn(8, 256).bfloat16().requires_grad_(),
              torch.randn(6, 2, 128).bfloat16().requires_grad_()]
    opt = cls(params, lr=0.05, state_precision="8bit", stochastic_rounding=True, lazy=True)
    gen = torch.Generator().manual_seed(2)
    for p in params:  # a first step touching every row: non-zero state everywhere
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
    opt.step()
    for step in range(4):
        grads = []
        for p in params:
            g = torch.randn(p.shape, generator=gen).bfloat16()
            rows = torch.randperm(p.shape[0], generator=gen)[: p.shape[0] // 2]
            keep = torch.zeros(p.shape[0], dtype=torch.bool)
            keep[rows] = True
            g[~keep] = 0
            grads.append((g, keep))
        dense_opt = copy.deepcopy(opt)
        dense_opt.param_groups[0]["lazy"] = False
        dense_params = dense_opt.param_groups[0]["params"]
        before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
        for p, q, (g, _) in zip(params, dense_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        dense_opt.step()
        for p, q, (_, keep), (p0, st0) in zip(params, dense_params, grads, before):
            assert keep.any() and not keep.all()
            assert not torch.equal(q.detach(), p0)  # the dense step moved the untouched rows too
            want_p = torch.where(keep.view(-1, *[1] * (p.dim() - 1)), q.detach(), p0)
            assert torch.equal(p.detach(), want_p)
            st, st_d = opt.state[p], dense_opt.state[q]
            for k in cls.state_8bit_keys or cls.state_keys:
                codes_want = torch.where(keep.view(-1, *[1] * (p.dim() - 1)), st_d[k], st0[k])
                assert torch.equal(st[k], codes_want), (step, k)
                block_keep = keep.repeat_interleave(p[0].numel() // 256)
                assert torch.equal(st[k + "_absmax"], torch.where(block_keep, st_d[k + "_absmax"],
                                                                  st0[k + "_absmax"]))
            assert st[cls.state_keys[0]].dtype == torch.uint8


def test_sparse_gradient_equals_dense_lazy_with_8bit_rows():
    out = []
    for sparse in (False, True):
        p = torch.ones(20, 256, dtype=torch.bfloat16, requires_grad=True)
        opt = tigeropt.Tiger([p], lr=0.1, state_precision="8bit", stochastic_rounding=True, lazy=True)
        gen = torch.Generator().manual_seed(0)
        for step in range(3):
            rows = torch.tensor([1, 4 + step, 9])
            values = torch.randn(3, 256, generator=gen).bfloat16()
            if sparse:
                p.grad = torch.sparse_coo_tensor(rows[None], values, (20, 256), check_invariants=True)
            else:
                p.grad = torch.zeros(20, 256, dtype=torch.bfloat16).index_copy_(0, rows, values)
            opt.step()
        out.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    assert out[1][1]["exp_avg"].dtype == torch.uint8
    assert torch.equal(out[0][0], out[1][0])
    _state_equal(out[0][1], out[1][1])
    assert torch.equal(out[1][0][0], torch.ones(256, dtype=torch.bfloat16))  # row 0: never touched


def test_sparse_gradient_equals_dense_lazy_with_low_precision():
    torch.manual_seed(0)
    out = []
    for sparse in (False, True):
        p = torch.ones(20, 3, dtype=torch.bfloat16, requires_grad=True)
        opt = tigeropt.Adagrad([p], lr=0.1, state_precision="8bit", stochastic_rounding=True, lazy=not sparse)
        for step in range(3):
            rows = torch.tensor([1, 4 + step, 9])
            values = torch.full((3, 3), 0.5 + step, dtype=torch.bfloat16)
            if sparse:
                p.grad = torch.sparse_coo_tensor(rows[None], values, (20, 3), check_invariants=True)
            else:
                p.grad = torch.zeros(20, 3, dtype=torch.bfloat16).index_copy_(0, rows, values)
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["sum"].clone()))
    assert opt.state[p]["sum"].dtype == torch.bfloat16  # Adagrad's "8bit" sum is bf16: rows work
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_distributed_checkpoint_round_trips_8bit_state(tmp_path):
    """torch.distributed.checkpoint (single process) saves and loads the codes and scales bit-exactly."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    params, opt = _run(tigeropt.AdaX, "8bit", True, foreach=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP warns and runs on this process
        dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
        fresh = [p.detach().clone().requires_grad_() for p in params]
        other = tigeropt.AdaX(fresh, state_precision="8bit", stochastic_rounding=True)
        for p in fresh:
            p.grad = torch.zeros_like(p)
        other.step()  # state of the right structure for DCP to load into
        sd = {"optim": other.state_dict()}
        dcp.load(sd, checkpoint_id=str(tmp_path))
    other.load_state_dict(sd["optim"])
    want, got = opt.state_dict()["state"], other.state_dict()["state"]
    for k in want:
        _state_equal(want[k], got[k])
