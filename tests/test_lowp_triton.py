"""The Triton kernels against the reference, bit for bit: the stochastic-rounding store against the
torch code of tigeropt._lowp, the step kernels (fp32) against the reference rules, and the step
kernels' low-precision variants (stochastic rounding, bf16 and 8-bit state) against the reference
low-precision step.  On CPU under the Triton interpreter (set before triton is imported; small
tensors, the interpreter is slow), on CUDA where there is one."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TIGEROPT_REQUIRE_OPTIONAL") != "1":  # CI installs triton: there it must import
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test,triton]'")

import tigeropt  # noqa: E402
from tigeropt import _lowp, kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes masked-off lanes too (0/0, casts of huge values) and numpy warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
if DEVICE == "cuda":  # on a GPU these are CUDA tests: pytest -m gpu (benchmarks/gpu_check.sh) runs them
    pytestmark.append(pytest.mark.gpu)


def _tiles():
    """Small tiles under the interpreter (little tensors span several programs); the shipped ones on CUDA."""
    from contextlib import nullcontext

    from tigeropt.kernels._common import LaunchConfig, use_launch_config

    return nullcontext() if DEVICE == "cuda" else use_launch_config(LaunchConfig(128, 512, 4))


def test_triton_sr_bf16_equals_the_torch_code():
    assert kernels.triton_usable(), kernels.triton_status()
    from tigeropt.kernels import lowp

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(5003) * torch.logspace(-45, 38, 5003)
    x[::97], x[::101], x[::103] = float("nan"), float("inf"), -float("inf")
    x[5], x[7] = -0.0, 3.3961e38
    x = x.to(device)
    for key in (0, 12345, 0xFFFFFFFF, _lowp.LOW16 | 12345):  # LOW16: the hash's low 16 bits round
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
        assert lowp.sr_bf16(x, out, key)
        assert torch.equal(out.view(torch.int16), _lowp.round_bf16(x, key).view(torch.int16))
    assert not lowp.sr_bf16(x[::2], torch.empty(x[::2].shape, dtype=torch.bfloat16, device=device), 1)


# ----------------------------------------------------------------------------- the step kernels' math
CASES = [
    (tigeropt.Tiger, dict(lr=0.03, weight_decay=0.1, maximize=True)),
    (tigeropt.Lion, dict(lr=0.03, betas=(0.8, 0.95), weight_decay=0.2)),
    (tigeropt.AdaX, dict(lr=0.01, weight_decay=0.05)),
    (tigeropt.AdaX, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True, maximize=True)),
    (tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
    (tigeropt.Adagrad, dict(lr=0.05, glove=True, grad_clip_value=0.7, lr_decay=0.01, weight_decay=0.01)),
]
CASE_IDS = ["tiger", "lion", "adax", "adax-w", "adagrad", "adagrad-glove"]


@pytest.mark.parametrize("cls, kw", CASES, ids=CASE_IDS)
def test_step_kernels_equal_the_reference_bit_for_bit(cls, kw):
    """The kernels round as the reference's torch ops do (fused multiply-adds where torch fuses,
    addcdiv's order, float64 host scalars, a correctly rounded sqrt on both sides), so several fp32
    steps from a non-zero state agree bit for bit, not only within 1e-6 (bf16 parameters: the
    low-precision test below, state_precision="fp32" without stochastic rounding)."""
    dtype = torch.float32
    torch.manual_seed(0)
    shapes = [(1000,), (3, 7), ()]
    fused = [torch.randn(s).to(DEVICE, dtype).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in fused]
    opt_f, opt_r = cls(fused, fused=True, **kw), cls(ref, foreach=False, **kw)
    with _tiles():
        for _ in range(4):
            for a, b in zip(fused, ref):
                a.grad = torch.randn(a.shape).to(DEVICE, dtype)
                b.grad = a.grad.clone()
            opt_f.step()
            opt_r.step()
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
        for key in cls.state_keys:
            assert torch.equal(opt_f.state[a][key], opt_r.state[b][key]), key


# ----------------------------------------------------------------------------- low precision
LOWP_CASES = [
    (tigeropt.Tiger, dict(lr=0.03, weight_decay=0.1)),
    (tigeropt.Lion, dict(lr=0.03, betas=(0.8, 0.95), weight_decay=0.2, maximize=True)),
    (tigeropt.AdaX, dict(lr=0.01, weight_decay=0.05)),
    (tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
]
LOWP_IDS = ["tiger", "lion", "adax", "adagrad"]
_SIZES = [(1,), (255,), (256,), (257,), (1000,), ()]


def _lowp_params(seed: int) -> list[torch.Tensor]:
    """bf16 parameters of odd sizes (1 element, 256-element blocks +- 1, 0-d, a non-contiguous one) and
    one fp32 parameter (its own launch, with the group's low-precision state)."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).bfloat16() for s in _SIZES]
    ps.append(torch.randn(17, 23, generator=gen).bfloat16().t())  # non-contiguous: logical indices differ
    ps.append(torch.randn(300, generator=gen))
    return [p.to(DEVICE).requires_grad_() for p in ps]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    gs = [torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params]
    if step == 2:  # non-finite gradients: NaN and inf reach parameters and state on every path
        gs[4][3], gs[4][600], gs[3][256] = float("nan"), float("inf"), -float("inf")
    return gs


def _same(a: torch.Tensor, b: torch.Tensor, nan_payload: bool) -> bool:
    """Bit for bit; with ``nan_payload=False`` NaN positions only (a bf16 store rounded to nearest:
    torch's CPU conversion writes NaN as 0xffff, the kernels keep a quiet NaN with its sign)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float32, torch.bfloat16):
        ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
        nan = torch.isnan(a)
        if not nan_payload and torch.equal(nan, torch.isnan(b)):
            return torch.equal(a.masked_fill(nan, 0).view(ints), b.masked_fill(nan, 0).view(ints))
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


@pytest.mark.parametrize("sr", [False, True], ids=["rtn", "sr"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("cls, kw", LOWP_CASES, ids=LOWP_IDS)
def test_low_precision_kernels_equal_the_reference_path(monkeypatch, cls, kw, precision, sr):
    """fused=True runs the Triton low-precision variants (one pass: stochastic rounding of bf16
    parameters, bf16 or 8-bit state) and equals the reference low-precision path (foreach=False)
    bit for bit: odd sizes, a 0-d and a non-contiguous parameter, an fp32 one, NaN/inf gradients,
    and a resume from the fused optimizer's state_dict after step 1."""
    from tigeropt import _base

    handled = []
    original = _base.TigerOptimizer._step_lowp_triton

    def spy(self, group, device, md, params, grads, js, index, hyper):
        rest = original(self, group, device, md, params, grads, js, index, hyper)
        handled.append(len(js) - len(rest))
        return rest

    monkeypatch.setattr(_base.TigerOptimizer, "_step_lowp_triton", spy)
    opts = dict(kw, state_precision=precision, stochastic_rounding=sr, sr_seed=1234)
    fused, ref = _lowp_params(0), _lowp_params(0)
    opt_f, opt_r = cls(fused, fused=True, **opts), cls(ref, foreach=False, **opts)
    saved = None
    for step in range(1, 3):
        if step == 2:  # resume: a new optimizer over copies of the parameters, from the state_dict
            fused = [p.detach().clone().requires_grad_() for p in fused]
            opt_f = cls(fused, fused=True, **opts)
            opt_f.load_state_dict(saved)
        for params in (fused, ref):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
        opt_f.step()
        opt_r.step()
        saved = opt_f.state_dict()
        for i, (a, b) in enumerate(zip(fused, ref)):
            rtn_bf16 = not sr or a.dtype != torch.bfloat16
            assert _same(a.detach(), b.detach(), nan_payload=not rtn_bf16), (step, i)
            sa, sb = opt_f.state[a], opt_r.state[b]
            assert sorted(sa) == sorted(sb)
            for key in sa:
                assert _same(sa[key], sb[key], nan_payload=sr), (step, i, key)
    if precision == "fp32" and not sr:  # not a low-precision group: the plain fused step
        assert not handled
    else:  # the low-precision Triton step took every parameter
        assert sum(handled) == 2 * len(fused)


@pytest.mark.parametrize("name", ["tiger", "adax"])
def test_element_offset_shifts_the_hash_indices(name):
    """``element_offset`` (a DTensor shard's first global element) keys the hash with global indices:
    the launcher equals the torch code given the same offset (a multiple of 256 for 8-bit state, whose
    blocks are then the whole tensor's)."""
    from tigeropt.adax import _single_tensor_adax
    from tigeropt.kernels.adax import fused_adax
    from tigeropt.kernels.tiger import fused_tiger
    from tigeropt.tiger import _single_tensor_tiger

    gen = torch.Generator().manual_seed(3)
    n, offset, seed, step, pidx = 700, 3 * 2 ** 32 + 512, 99, 5, 2
    p = torch.randn(n, generator=gen).bfloat16().to(DEVICE)
    g = torch.randn(n, generator=gen).bfloat16().to(DEVICE)
    m = torch.randn(n, generator=gen).to(DEVICE) * 0.1
    v = torch.rand(n, generator=gen).to(DEVICE)
    codes, amax = _lowp.encode_8bit(m)
    steps = [torch.tensor(float(step))]
    if name == "tiger":
        kw = dict(lr=0.03, beta=0.9, weight_decay=0.1, maximize=False)
        ref_p, ref_m = [p.float()], [_lowp.decode_8bit(codes, amax)]
        _single_tensor_tiger(ref_p, [g], ref_m, steps, **kw)
        states, absmax = [codes.clone()], [[amax.clone()]]
        fused_tiger([p_f := p.clone()], [g], states, steps, **kw, sr_seed=seed, param_indices=[pidx],
                    absmax=absmax, element_offset=offset)
        want_m = _lowp.encode_8bit(ref_m[0], _lowp.key32(seed, step, pidx, 1), offset=offset)
        assert torch.equal(states[0], want_m[0]) and torch.equal(absmax[0][0], want_m[1])
    else:
        kw = dict(lr=0.01, beta1=0.9, beta2=1e-4, eps=1e-12, weight_decay=0.05, decoupled_weight_decay=False,
                  maximize=False)
        states = [m.bfloat16(), v.bfloat16()]
        ref_p, ref_m, ref_v = [p.float()], [states[0].float()], [states[1].float()]
        _single_tensor_adax(ref_p, [g], ref_m, ref_v, steps, **kw)
        fused_adax([p_f := p.clone()], [g], [states[0]], [states[1]], steps, **kw, sr_seed=seed,
                   param_indices=[pidx], element_offset=[offset])
        for i, (got, want) in enumerate(zip(states, (ref_m[0], ref_v[0]))):
            key = _lowp.sr_key(seed, step, pidx, 1 + i)
            want = _lowp.round_bf16(want, key, offset=offset)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    want_p = _lowp.round_bf16(ref_p[0], _lowp.key32(seed, step, pidx, 0), offset=offset)
    assert torch.equal(p_f.view(torch.int16), want_p.view(torch.int16))
    assert not torch.equal(want_p, _lowp.round_bf16(ref_p[0], _lowp.key32(seed, step, pidx, 0)))  # it matters


def test_sqrt_rn_is_correctly_rounded():
    """tigeropt._math.sqrt_rn (the reference's float32 sqrt, as the C and Triton steps') is the
    correctly rounded square root: no float32 neighbour of the result is closer to the root
    (measured in float64, within an ulp of the exact root: far below float32's spacing)."""
    from tigeropt._math import sqrt_rn

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(20000, generator=gen) * torch.logspace(-40, 38, 20000)
    got = sqrt_rn(x)
    assert got.dtype == torch.float32
    exact = x.double().sqrt()
    for direction in (float("inf"), 0.0):
        other = torch.nextafter(got, torch.full_like(got, direction)).double()
        assert bool(((got.double() - exact).abs() <= (other - exact).abs()).all())
    edge = sqrt_rn(torch.tensor([0.0, -0.0, float("inf"), 1.0, 2.0]))
    assert edge.tolist() == [0.0, -0.0, float("inf"), 1.0, 1.4142135381698608] and edge[1].signbit()


def test_tensors_at_different_steps_take_their_own_keys():
    """A parameter without a gradient in a step falls behind in step count: the launch then keys each
    tensor's rounding with its own step (a per-tensor key table) and still equals the reference."""
    opts = dict(lr=0.03, state_precision="8bit", stochastic_rounding=True, sr_seed=5)
    fused = [torch.randn(300).bfloat16().to(DEVICE).requires_grad_() for _ in range(3)]
    ref = [p.detach().clone().requires_grad_() for p in fused]
    opt_f, opt_r = tigeropt.Lion(fused, fused=True, **opts), tigeropt.Lion(ref, foreach=False, **opts)
    for step, active in enumerate(([0], [0, 1], [0, 1, 2])):
        for params in (fused, ref):
            gen = torch.Generator().manual_seed(step)
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(DEVICE) if i in active else None
        opt_f.step()
        opt_r.step()
    assert [int(opt_f.state[p]["step"]) for p in fused] == [3, 2, 1]
    for a, b in zip(fused, ref):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for key in ("exp_avg", "exp_avg_absmax"):
            assert torch.equal(opt_f.state[a][key], opt_r.state[b][key])
