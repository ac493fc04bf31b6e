"""The low-precision step in the fused C kernel (``tigeropt._cpu.lowp_step``, kernels.c
``tigeropt_lowp_step``) against the reference low-precision step (``foreach=False``: working copies,
the reference rule, the stores of :mod:`tigeropt._lowp`), bit for bit.

Stored bits are compared exactly: bf16 parameters and state (NaN included), 8-bit codes and absmax.
fp32 and fp16 tensors compare NaN with NaN whatever the payload, 8-bit NaN codes whatever their sign
(neither path specifies NaN payloads, and the sign of a NaN computed from NaNs is one; bf16 stores write
torch's NaN bits).
AdaX and Adagrad take a square root: the C kernel's is correctly rounded, torch's CPU sqrt (MKL) is
not always (see tests/test_cpu_fused.py), so their reference runs with a correctly rounded sqrt
(:func:`exact_sqrt`); everything else is the reference as it is.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tigeropt
from tigeropt import _cpu, _lowp

if _cpu._find_compiler() is None or not _cpu.available():
    pytest.skip("the fused CPU library cannot be built here", allow_module_level=True)

OPTIMIZERS = [tigeropt.Tiger, tigeropt.Lion, tigeropt.AdaX, tigeropt.Adagrad]
# odd sizes around the 256-element block, a 2-D tensor, a 0-d tensor
SHAPES: list[tuple[int, ...]] = [(1,), (255,), (256,), (257,), (1000,), (33, 17), ()]
SETTINGS = [  # (parameter dtype, state_precision, stochastic_rounding): every low-precision group kind
    (torch.bfloat16, "fp32", True), (torch.bfloat16, "bf16", False), (torch.bfloat16, "bf16", True),
    (torch.bfloat16, "8bit", False), (torch.bfloat16, "8bit", True), (torch.float32, "bf16", False),
    (torch.float32, "bf16", True), (torch.float32, "8bit", False), (torch.float32, "8bit", True),
    (torch.float16, "8bit", False),
]


@contextlib.contextmanager
def exact_sqrt() -> Iterator[None]:
    """torch's fp32 sqrt correctly rounded (through fp64: innocuous double rounding for sqrt)."""
    tensor_sqrt, foreach_sqrt = torch.Tensor.sqrt, torch._foreach_sqrt

    def sqrt(self: torch.Tensor) -> torch.Tensor:
        return tensor_sqrt(self.double()).float() if self.dtype == torch.float32 else tensor_sqrt(self)

    torch.Tensor.sqrt = sqrt  # type: ignore[method-assign]
    torch._foreach_sqrt = lambda ts: [sqrt(t) for t in ts]
    try:
        yield
    finally:
        torch.Tensor.sqrt = tensor_sqrt  # type: ignore[method-assign]
        torch._foreach_sqrt = foreach_sqrt


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype == torch.float32:
        both_nan = torch.isnan(a) & torch.isnan(b)
        diff = (a.view(torch.int32) != b.view(torch.int32)) & ~both_nan
    elif a.dtype == torch.float16:  # stored by conversion from fp32 (which keeps the NaN's sign and payload)
        both_nan = torch.isnan(a) & torch.isnan(b)
        diff = (a.view(torch.int16) != b.view(torch.int16)) & ~both_nan
    elif a.dtype == torch.bfloat16:
        diff = a.view(torch.int16) != b.view(torch.int16)
    elif a.dtype == torch.uint8:  # 8-bit codes: the NaN codes 0x7f and 0xff alike (a NaN's sign is payload)
        diff = (a != b) & ~(((a & 0x7F) == 0x7F) & ((b & 0x7F) == 0x7F))
    else:
        diff = a != b
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}"


def _compare(pa: list[torch.Tensor], opt_a: Any, pb: list[torch.Tensor], opt_b: Any) -> None:
    for i, (a, b) in enumerate(zip(pa, pb)):
        _same(a.detach(), b.detach(), f"param {i}")
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            _same(sa[k], sb[k], f"param {i} state {k}")


@pytest.fixture
def c_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """Records (number of tensors given, indices handed back) of every call of the C step: of
    ``lowp_step``, and of a cached step plan's launch (``LowpStepPlan.run``: all its tensors)."""
    calls: list[tuple[int, list[int]]] = []
    real = _cpu.lowp_step
    real_run = _cpu.LowpStepPlan.run

    def spy(name: str, params: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[int]:
        rest = real(name, params, *args, **kwargs)
        calls.append((len(params), rest))
        return rest

    def run_spy(plan: Any, grads: list[torch.Tensor], hyper: dict[str, Any]) -> bool:
        ran = real_run(plan, grads, hyper)
        if ran:
            calls.append((plan.n, []))
        return ran

    monkeypatch.setattr(_cpu, "lowp_step", spy)
    monkeypatch.setattr(_cpu.LowpStepPlan, "run", run_spy)
    return calls


@pytest.fixture(scope="module")
def generic_build() -> Any:
    """The library built without AVX-512, so its low-precision step runs the generic block loop (skipped
    where the native build already does)."""
    if not _cpu.lowp_simd():
        pytest.skip("the native build already runs the generic block loop")
    patch = pytest.MonkeyPatch()
    patch.setattr(_cpu, "_FLAG_SETS", (["-march=native", "-mno-avx512f", "-fopenmp"],))
    try:
        path = _cpu.build()
    except RuntimeError as exc:
        pytest.skip(f"no build without AVX-512 here: {exc}")
    finally:
        patch.undo()
    lib = ctypes.CDLL(str(path))
    _cpu._declare(lib)
    assert lib.tigeropt_lowp_simd() == 0
    return lib


@pytest.fixture(params=["native", "generic"])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the native library (the AVX-512 block loop where the CPU has it) and with the
    generic block loop's build."""
    if request.param == "generic":
        monkeypatch.setitem(_cpu._state, "lib", request.getfixturevalue("generic_build"))
    return str(request.param)


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _grads(params: list[torch.Tensor], gen: torch.Generator, nonfinite: bool) -> None:
    for p in params:
        g = torch.randn(p.shape, generator=gen) * 3
        if nonfinite and p.numel() > 8:
            flat = g.view(-1)
            flat[3], flat[5], flat[6] = float("nan"), float("inf"), -float("inf")
        p.grad = g.to(p.dtype)


def _train(cls: type, params: list[torch.Tensor], steps: int, nonfinite: bool = True, gen_seed: int = 1,
           opt: Any = None, **kw: Any) -> Any:
    if opt is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. stochastic_rounding with nothing to round
            opt = cls(params, **kw)
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        _grads(params, gen, nonfinite)
        opt.step()
    return opt


def _reference(cls: type, params: list[torch.Tensor], steps: int, **kw: Any) -> Any:
    with exact_sqrt():
        return _train(cls, params, steps, foreach=False, **kw)


# ----------------------------------------------------------------------------- the optimizers
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype, prec, sr", SETTINGS, ids=lambda x: str(x).replace("torch.", ""))
def test_c_step_equals_the_reference(cls: type, dtype: torch.dtype, prec: str, sr: bool,
                                     c_calls: list[tuple[int, list[int]]], build: str) -> None:
    """Default path (the C step) == reference, bit for bit, over odd sizes, a 0-d tensor and non-finite
    gradients; the C step took every tensor (both block loops: ``build``)."""
    if sr and dtype == torch.float16:
        pytest.skip("stochastic rounding rounds to bf16 (fp16 parameters are refused)")
    kw = dict(state_precision=prec, stochastic_rounding=sr, sr_seed=12345, weight_decay=0.1)
    ref_params = _params(SHAPES, dtype)
    ref = _reference(cls, ref_params, 3, **kw)
    c_params = _params(SHAPES, dtype)
    c = _train(cls, c_params, 3, **kw)
    _compare(ref_params, ref, c_params, c)
    assert c_calls and all(rest == [] for _, rest in c_calls)
    assert sum(n for n, _ in c_calls) == 3 * len(SHAPES)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_options_and_maximize(cls: type, c_calls: list[tuple[int, list[int]]], build: str) -> None:
    """The optimizers' kernel options (AdaX decoupled decay, Adagrad GloVe-style with clipping and
    lr_decay, maximize) on the C step == reference (both block loops)."""
    extra = {tigeropt.Tiger: dict(beta=0.9), tigeropt.Lion: dict(betas=(0.8, 0.95)),
             tigeropt.AdaX: dict(decoupled_weight_decay=True, weight_decay=0.05),
             tigeropt.Adagrad: dict(glove=True, grad_clip_value=2.0, lr_decay=0.01)}[cls]
    kw = dict(state_precision="8bit", stochastic_rounding=True, maximize=True, lr=0.02, **extra)
    ref_params = _params(SHAPES, torch.bfloat16, seed=4)
    ref = _reference(cls, ref_params, 4, **kw)
    c_params = _params(SHAPES, torch.bfloat16, seed=4)
    c = _train(cls, c_params, 4, **kw)
    _compare(ref_params, ref, c_params, c)
    assert c_calls and all(rest == [] for _, rest in c_calls)


def test_tensors_the_kernel_cannot_take_run_the_reference_code(c_calls: list[tuple[int, list[int]]]) -> None:
    """A non-contiguous parameter is handed back (the torch code steps it), the others run in C."""
    shapes = [(40, 9), (300,)]

    def make() -> list[torch.Tensor]:
        ps = _params(shapes, torch.bfloat16, seed=2)
        return [ps[0].detach().t().requires_grad_(), ps[1]]  # the first is a transposed (strided) view

    kw = dict(state_precision="8bit", stochastic_rounding=True)
    ref_params = make()
    ref = _reference(tigeropt.Tiger, ref_params, 3, **kw)
    c_params = make()
    c = _train(tigeropt.Tiger, c_params, 3, **kw)
    _compare(ref_params, ref, c_params, c)
    assert c_calls and all(rest == [0] for _, rest in c_calls)


@pytest.mark.parametrize("cls", [tigeropt.Tiger, tigeropt.AdaX], ids=lambda c: c.__name__)
def test_tiger_options_outside_the_kernel(cls: type, c_calls: list[tuple[int, list[int]]]) -> None:
    """Options the kernel lacks (Tiger's lr_scaling; Adagrad's row-wise rule) keep the torch code."""
    kw: dict[str, Any] = dict(state_precision="bf16", stochastic_rounding=True)
    if cls is tigeropt.Tiger:
        kw["lr_scaling"] = True
    ref_params = _params(SHAPES, torch.bfloat16)
    ref = _reference(cls, ref_params, 2, **kw)
    c_params = _params(SHAPES, torch.bfloat16)
    c = _train(cls, c_params, 2, **kw)
    _compare(ref_params, ref, c_params, c)
    if cls is tigeropt.Tiger:
        assert all(rest == list(range(n)) for n, rest in c_calls)
    else:
        assert c_calls and all(rest == [] for _, rest in c_calls)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_one_and_two_threads_give_the_same_bits(cls: type) -> None:
    """Tensors big enough for the kernel to split them over two threads (blocks are independent)."""
    if not _cpu.has_openmp():
        pytest.skip("the library was built without OpenMP")
    shapes = [(100_003,), (70_000,), (257,)]
    kw = dict(state_precision="8bit", stochastic_rounding=True, sr_seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ps = _params(shapes, torch.bfloat16, seed=5)
            results.append((ps, _train(cls, ps, 2, **kw)))
    finally:
        torch.set_num_threads(threads)
    _compare(*results[0], *results[1])


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("prec", ["bf16", "8bit"])
def test_resume_from_state_dict_continues_identically(cls: type, prec: str,
                                                       c_calls: list[tuple[int, list[int]]]) -> None:
    """3 steps, state_dict, a new optimizer loads it, 3 more steps == 6 steps in one optimizer, on the C
    step, and == the reference's 6 steps."""
    kw = dict(state_precision=prec, stochastic_rounding=True, sr_seed=99)
    full_params = _params(SHAPES, torch.bfloat16, seed=3)
    full = _train(cls, full_params, 3, **kw)
    sd = copy.deepcopy(full.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in full_params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = cls(resumed_params, **kw)
    resumed.load_state_dict(sd)
    _train(cls, full_params, 3, gen_seed=2, opt=full)
    _train(cls, resumed_params, 3, gen_seed=2, opt=resumed)
    _compare(full_params, full, resumed_params, resumed)
    ref_params = _params(SHAPES, torch.bfloat16, seed=3)
    with exact_sqrt():
        ref = _train(cls, ref_params, 3, foreach=False, **kw)
        _train(cls, ref_params, 3, gen_seed=2, opt=ref)
    _compare(ref_params, ref, full_params, full)
    assert c_calls and all(rest == [] for _, rest in c_calls)


@settings(max_examples=25, deadline=None)
@given(cls=st.sampled_from(OPTIMIZERS), sizes=st.lists(st.integers(0, 700), min_size=1, max_size=4),
       setting=st.sampled_from(SETTINGS[:-1]), seed=st.integers(0, 2 ** 32 - 1),
       lr=st.floats(1e-4, 0.3), wd=st.sampled_from([0.0, 0.01, 0.3]), steps=st.integers(1, 3))
def test_property_c_step_equals_the_reference(cls: type, sizes: list[int], setting: tuple[Any, ...],
                                              seed: int, lr: float, wd: float, steps: int) -> None:
    dtype, prec, sr = setting
    shapes = [(n,) for n in sizes]
    kw = dict(state_precision=prec, stochastic_rounding=sr, sr_seed=seed, lr=lr, weight_decay=wd)
    ref_params = _params(shapes, dtype, seed=seed % 1000)
    ref = _reference(cls, ref_params, steps, **kw)
    c_params = _params(shapes, dtype, seed=seed % 1000)
    c = _train(cls, c_params, steps, **kw)
    _compare(ref_params, ref, c_params, c)


# ----------------------------------------------------------------------------- the element offset
def _lowp_args(n: int, prec: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    m = torch.randn(n, generator=gen) * 0.1
    if prec == "8bit":
        codes, absmax = _lowp.encode_8bit(m)
        return p, g, codes, absmax
    return p, g, m.to(torch.bfloat16), None


HYPER = dict(lr=0.01, beta=0.9, weight_decay=0.01, maximize=False)


def _c_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, absmax: torch.Tensor | None,
            step: torch.Tensor, offset: int) -> None:
    rest = _cpu.lowp_step("tiger", [p], [g], [[m]], [[absmax]], [step], HYPER, param_index=[3], seed=11,
                          stochastic_rounding=True, offsets=[offset])
    assert rest == []


@pytest.mark.parametrize("prec, cut", [("8bit", 512), ("8bit", 256 * 3), ("bf16", 300), ("bf16", 1)])
def test_shards_with_their_offset_equal_the_whole_tensor(prec: str, cut: int) -> None:
    """A tensor stepped as two shards, each with its global element offset, == the whole tensor
    (8-bit: the shard boundary on the 256-element grid, so no block straddles it)."""
    n = 1500
    p, g, m, absmax = _lowp_args(n, prec)
    shards = [(0, cut), (cut, n)]
    parts = [(p[a:b].clone(), g[a:b].clone(), m[a:b].clone(),
              None if absmax is None else absmax[a // 256:-(-b // 256)].clone(), a) for a, b in shards]
    _c_step(p, g, m, absmax, torch.tensor(4.0), 0)
    for sp, sg, sm, sa, off in parts:
        _c_step(sp, sg, sm, sa, torch.tensor(4.0), off)
    _same(torch.cat([q[0] for q in parts]), p, "params")
    _same(torch.cat([q[2] for q in parts]), m, "state")
    if absmax is not None:
        _same(torch.cat([q[3] for q in parts]), absmax, "absmax")


@pytest.mark.parametrize("off", [2 ** 32 - 300, 2 ** 32 + 70_000 - 5, 5 * 2 ** 32 - 512])
def test_offsets_across_index_words_key_the_hash_with_the_global_index(off: int, build: str) -> None:
    """Elements on both sides of a multiple of 2^32 (the index's high word changes) and of a multiple of
    2^16 (the AVX-512 loop folds the hash's first step into a per-block key): the C step's bf16 rounding
    (parameter and state sharing one hash) and 8-bit encoding equal the torch code with global indices."""
    n = 900
    p, g, m, _ = _lowp_args(n, "bf16")
    p0, m0 = p.float(), m.float()
    _c_step(p, g, m, None, torch.tensor(0.0), off)
    work_p, work_m = [p0.clone()], [m0.clone()]
    with exact_sqrt():
        tigeropt.tiger._single_tensor_tiger(work_p, [g], work_m, [torch.tensor(1.0)], **HYPER)
    index = torch.arange(off, off + n)
    _same(p, _lowp.round_bf16(work_p[0], _lowp.sr_key(11, 1, 3, 0), index=index), "params")
    _same(m, _lowp.round_bf16(work_m[0], _lowp.sr_key(11, 1, 3, 1), index=index), "state")
    off8 = off - off % 256  # 8-bit: a block-aligned range over the same boundary
    p8, g8, codes, absmax = _lowp_args(n, "8bit")
    work_p8, work_m8 = [p8.float()], [_lowp.decode_8bit(codes, absmax)]
    _c_step(p8, g8, codes, absmax, torch.tensor(0.0), off8)
    with exact_sqrt():
        tigeropt.tiger._single_tensor_tiger(work_p8, [g8], work_m8, [torch.tensor(1.0)], **HYPER)
    want_codes, want_absmax = _lowp.encode_8bit(work_m8[0], _lowp.sr_key(11, 1, 3, 1, eight_bit=True),
                                                offset=off8)
    _same(codes, want_codes, "codes")
    _same(absmax, want_absmax, "absmax")
    _same(p8, _lowp.round_bf16(work_p8[0], _lowp.sr_key(11, 1, 3, 0), offset=off8), "params (8-bit state)")


def test_offset_keys_the_hash_with_the_global_index() -> None:
    """The random bits of element i of a shard at offset o are those of element o + i (the torch code
    with ``index``), and an unaligned 8-bit shard has one absmax per grid block it touches."""
    n, off = 900, 1000
    p, g, m, _ = _lowp_args(n, "bf16")
    p0 = p.float()
    _c_step(p, g, m, None, torch.tensor(0.0), off)  # step 1 after the increment
    work_p, work_m = [p0.clone()], [_lowp_args(n, "bf16")[2].float()]
    with exact_sqrt():
        tigeropt.tiger._single_tensor_tiger(work_p, [g], work_m, [torch.tensor(1.0)], **HYPER)
    index = torch.arange(off, off + n)
    _same(p, _lowp.round_bf16(work_p[0], _lowp.key32(11, 1, 3, 0), index=index), "params")
    _same(m, _lowp.round_bf16(work_m[0], _lowp.sr_key(11, 1, 3, 1), index=index), "state")
    assert _cpu.lowp_absmax_len(n, off) == 5  # blocks 3..7 of the grid: [768, 1024) ... [1792, 2048)
    assert _cpu.lowp_absmax_len(n, 0) == _lowp.nblocks(n) and _cpu.lowp_absmax_len(0, off) == 0
    p8, g8, codes, absmax = _lowp_args(n, "8bit")
    wrong = torch.empty(_lowp.nblocks(n))  # 4 blocks: the wrong length at this offset
    def step(absmax: torch.Tensor) -> list[int]:
        return _cpu.lowp_step("tiger", [p8], [g8], [[codes]], [[absmax]], [torch.tensor(0.0)], HYPER,
                              param_index=[0], seed=0, stochastic_rounding=False, offsets=[off])

    assert step(wrong) == [0]
    right = torch.zeros(5)
    assert step(right) == []
    assert right[0] > 0 and right[-1] > 0  # partial first and last blocks hold the shard's values


# ----------------------------------------------------------------------------- capturable=True
def test_capturable_with_low_precision_is_refused_with_a_clear_error() -> None:
    """capturable=True (CUDA graphs) has no low-precision variant (its rounding keys follow the host's
    step counts): refused in the constructor and add_param_group (nothing added), pointing at the
    default path.  fused=True takes these options (the Triton kernels' low-precision variants:
    tests/test_lowp_triton.py)."""
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=r"state_precision='8bit'.*leave fused unset.*fused C step on CPU"):
        tigeropt.Tiger([p], capturable=True, state_precision="8bit")
    opt = tigeropt.Lion([p])
    with pytest.raises(ValueError, match="stochastic_rounding=True"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)],
                             "capturable": True, "stochastic_rounding": True})
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------------- special values
SPECIAL = [0.0, -0.0, 1e-39, -1e-39, 1e-45, 2.0 ** -126, -(2.0 ** -126) * 0.75, 3.0e38, -3.3e38, 1e30,
           float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 2.0 ** -133, 1.00390625, -1.01171875]


TINY = [1e-39, -3e-40, 2.0 ** -133, 9e-41, 2.0 ** -127, -(2.0 ** -130) * 3]  # bf16 and fp32 subnormals


def _with_specials(n: int, gen: torch.Generator, scale: float, shift: int, grad: bool) -> torch.Tensor:
    """Random normal values with SPECIAL written at positions shift, shift + 5, ... and 256, 261, ...
    (wrapping); then fixed elements: parameters 150.. subnormal with zero gradients there (p stays
    subnormal: its stores round subnormals), gradients 170.. subnormal (so is the state)."""
    x = torch.randn(n, generator=gen) * scale
    for i, v in enumerate(SPECIAL):
        x[(shift + 5 * i) % n] = v
        x[(256 + 5 * i) % n] = v
    for i, v in enumerate(TINY):
        x[150 + i] = (0.0 if i % 2 else -0.0) if grad else v
        x[170 + i] = v
    return x


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype, prec, sr", SETTINGS, ids=lambda x: str(x).replace("torch.", ""))
def test_special_values_equal_the_reference(cls: type, dtype: torch.dtype, prec: str, sr: bool,
                                            c_calls: list[tuple[int, list[int]]], build: str) -> None:
    """Parameters and gradients holding +-0, fp32/bf16 subnormals (stored state then rounds subnormals),
    values near the largest float (rounding to inf), +-inf and NaN, ties of the bf16 rounding: the C step
    (both block loops) == reference, bit for bit, over 3 steps of 300 elements (a full block, a partial
    one ending in a partial vector)."""
    if sr and dtype == torch.float16:
        pytest.skip("stochastic rounding rounds to bf16 (fp16 parameters are refused)")
    kw = dict(state_precision=prec, stochastic_rounding=sr, sr_seed=77, weight_decay=0.1, lr=0.05)
    results = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(8)
        p = _with_specials(300, gen, 1.0, 0, grad=False).to(dtype).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([p], foreach=False, **kw) if not results else cls([p], **kw)
        with exact_sqrt() if not results else contextlib.nullcontext():
            for step in range(3):
                p.grad = _with_specials(300, gen, 10.0 ** -step, 1 + step, grad=True).to(dtype)
                opt.step()
        results.append(([p], opt))
    _compare(*results[0], *results[1])
    assert c_calls and all(rest == [] for _, rest in c_calls)


# ----------------------------------------------------------------------------- the codec inside the kernel
def _codec_values() -> torch.Tensor:
    """Blocks of 256 whose first element is 448 (scale 1: y = |x|), holding every e4m3 value, the
    midpoints between neighbours (ties), the midpoints +- an fp32 ulp, the subnormal range and below,
    then blocks of random magnitudes with zeros, -0.0, inf and NaN."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    ulp_up, ulp_down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -10 * 1.0001, 2.0 ** -11, 1e-30, 1e-40, 2.0 ** -6,
                         2.0 ** -6 * 0.999])
    special = torch.cat([grid, mids, ulp_up, ulp_down, tiny])
    special = torch.cat([special, -special])
    blocks = []
    for i in range(0, special.numel(), 255):
        chunk = special[i:i + 255]
        blocks.append(torch.cat([torch.tensor([448.0]), chunk, torch.zeros(255 - chunk.numel())]))
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(256 * 6 + 77, generator=gen) * torch.logspace(-8, 3, 256 * 6 + 77)
    rand[5], rand[300], rand[301], rand[600], rand[601] = -0.0, float("inf"), float("nan"), -float("inf"), 0.0
    rand[1024:1280] = 0.0  # an all-zero block
    return torch.cat([*blocks, rand])


def _fast_path_values() -> torch.Tensor:
    """Blocks for the AVX-512 codec's shortcuts (vectors of 16 elements whose scaled values are all 0 or
    in e4m3's normal range skip the subnormal-range and non-finite work; blocks without NaN codes decode
    without the NaN blend): normal-range values with zeros between them, one vector holding a single
    subnormal-range value (and one holding 2^-6 exactly, the normal range's smallest), normal values in
    a block that also holds an inf (its codes then include the NaN code), and all of them negated."""
    gen = torch.Generator().manual_seed(1)
    normal = 2.0 ** -6 + torch.rand(255, generator=gen) * 400  # y = |x| with the block's 448 first
    with_zeros = normal.clone()
    with_zeros[::5] = 0.0
    one_small = normal.clone()
    one_small[40] = 2.0 ** -7 * 1.5  # lanes 32..47: one subnormal-range value
    one_small[70] = 2.0 ** -6
    with_inf = normal.clone()
    with_inf[200] = float("inf")
    blocks = [torch.cat([torch.tensor([448.0]), b]) for b in (normal, with_zeros, one_small, with_inf)]
    x = torch.cat(blocks)
    return torch.cat([x, -x])


@pytest.mark.parametrize("sr", [False, True])
def test_kernel_codec_fast_paths_equal_encode_8bit(sr: bool, build: str) -> None:
    """The codec's shortcuts give encode_8bit's codes and absmax (Tiger with beta = 0 stores m = g), and
    decoding those codes (NaN codes in one block) gives decode_8bit's values (beta = 0.5, g = 0)."""
    g = _fast_path_values()
    n = g.numel()
    p = torch.zeros(n)
    codes, absmax = _lowp.encode_8bit(torch.zeros(n))
    hyper = dict(lr=0.01, beta=0.0, weight_decay=0.0, maximize=False)
    assert _cpu.lowp_step("tiger", [p], [g], [[codes]], [[absmax]], [torch.tensor(0.0)], hyper,
                          param_index=[1], seed=9, stochastic_rounding=sr) == []
    key = _lowp.sr_key(9, 1, 1, 1, eight_bit=True) if sr else None
    want_codes, want_absmax = _lowp.encode_8bit(g + 0.0, key)
    _same(codes, want_codes, "codes")
    _same(absmax, want_absmax, "absmax")
    assert ((codes & 0x7F) == 0x7F).sum() == 2  # the inf blocks' NaN codes: their decode takes the blend
    p2, g2 = torch.zeros(n), torch.zeros(n)
    codes2, absmax2 = codes.clone(), absmax.clone()
    assert _cpu.lowp_step("tiger", [p2], [g2], [[codes2]], [[absmax2]], [torch.tensor(0.0)],
                          dict(hyper, beta=0.5), param_index=[1], seed=9, stochastic_rounding=False) == []
    want2 = _lowp.encode_8bit(_lowp.decode_8bit(codes, absmax) * 0.5 + 0.5 * g2)
    _same(codes2, want2[0], "codes after decode")
    _same(absmax2, want2[1], "absmax after decode")


@pytest.mark.parametrize("sr", [False, True])
def test_kernel_codec_equals_encode_8bit_on_ties_and_edges(sr: bool, build: str) -> None:
    """Tiger with beta = 0 stores m = g: the kernel's 8-bit codes and absmax of g == _lowp.encode_8bit(g)
    on every e4m3 value, tie and near-tie, the subnormal range, non-finite values (fp32 parameters)."""
    g = _codec_values()
    n = g.numel()
    p = torch.zeros(n)
    codes, absmax = _lowp.encode_8bit(torch.zeros(n))
    hyper = dict(lr=0.01, beta=0.0, weight_decay=0.0, maximize=False)
    rest = _cpu.lowp_step("tiger", [p], [g], [[codes]], [[absmax]], [torch.tensor(0.0)], hyper,
                          param_index=[2], seed=5, stochastic_rounding=sr)
    assert rest == []
    m = g + 0.0  # what the step stores: 0 * 0 + g (-0.0 becomes +0.0)
    want_codes, want_absmax = _lowp.encode_8bit(m, _lowp.key32(5, 1, 2, 1) if sr else None)
    _same(codes, want_codes, "codes")
    _same(absmax, want_absmax, "absmax")
    decoded = _lowp.decode_8bit(codes, absmax)  # and the kernel decodes them as torch does
    p2, g2 = torch.zeros(n), torch.zeros(n)
    hyper1 = dict(hyper, beta=0.5)  # m = 0.5 * decoded (exact) + 0.5 * 0
    codes2, absmax2 = codes.clone(), absmax.clone()
    assert _cpu.lowp_step("tiger", [p2], [g2], [[codes2]], [[absmax2]], [torch.tensor(0.0)], hyper1,
                          param_index=[2], seed=5, stochastic_rounding=False) == []
    want2 = _lowp.encode_8bit(decoded * 0.5 + 0.5 * g2)
    _same(codes2, want2[0], "codes after decode")
    _same(absmax2, want2[1], "absmax after decode")
