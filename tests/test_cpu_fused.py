"""The fused CPU step (``tigeropt._cpu``, C kernels built on first use) against the reference updates.

The reference is the plain per-tensor ``_single_tensor_<name>`` function of each optimizer, plus the
hand-checked golden values of SPEC.md.  Tiger and Lion use no square root and must match bit for bit;
AdaX and Adagrad may differ by an ulp of a square root (the C kernels round sqrt correctly, torch's
CPU sqrt goes through MKL and sometimes does not), hence the tolerance table.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import math
import sys
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import tigeropt
from tigeropt import _cpu
from tigeropt.adagrad import _multi_tensor_adagrad, _single_tensor_adagrad
from tigeropt.adax import _multi_tensor_adax, _single_tensor_adax
from tigeropt.lion import _multi_tensor_lion, _single_tensor_lion
from tigeropt.tiger import _multi_tensor_tiger, _single_tensor_tiger

if _cpu._find_compiler() is None:
    pytest.skip("no C compiler: the fused CPU step cannot be built here", allow_module_level=True)

# (atol, rtol) per parameter dtype for paths that may differ by an ulp of a square root (atol: an ulp of
# an O(1) update can survive a cancellation p - u where p ends near 0).
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-6, 1e-6),
    torch.float64: (1e-14, 1e-13),
    torch.bfloat16: (1e-6, 8e-3),  # one bf16 ulp
    torch.float16: (1e-6, 1e-3),   # one fp16 ulp
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Odd sizes, empty and multi-dimensional tensors; > 65,536 elements in all so that the C kernel splits the
# list over two threads, while each tensor stays below torch's 32,768-element grain (the reference ops then
# stay single-threaded, which keeps the tests fast on a loaded machine).
SIZES = [1, 7, 15, 16, 17, 63, 64, 65, 0, 1000, (33, 17), (4, 5, 6), 32_000, 31_999]

# The C launchers import nothing from the optimizer modules: the caller (the optimizer base) names the
# foreach function that takes what the kernels cannot.  These tests pass it as the base does.
_fused_tiger = functools.partial(_cpu.fused_tiger, fallback=_multi_tensor_tiger)
_fused_lion = functools.partial(_cpu.fused_lion, fallback=_multi_tensor_lion)
_fused_adax = functools.partial(_cpu.fused_adax, fallback=_multi_tensor_adax)
_fused_adagrad = functools.partial(_cpu.fused_adagrad, fallback=_multi_tensor_adagrad)

Case = tuple[Callable[..., None], Callable[..., None], int, dict[str, Any], float]
# name -> (reference, fused, number of state tensors, hyperparameters, initial state value)
CASES: dict[str, Case] = {
    "tiger": (_single_tensor_tiger, _fused_tiger, 1,
              dict(lr=0.01, beta=0.965, weight_decay=0.01, maximize=False), 0.0),
    "tiger-nowd-max": (_single_tensor_tiger, _fused_tiger, 1,
                       dict(lr=0.01, beta=0.9, weight_decay=0.0, maximize=True), 0.0),
    "lion": (_single_tensor_lion, _fused_lion, 1,
             dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False), 0.0),
    "lion-max": (_single_tensor_lion, _fused_lion, 1,
                 dict(lr=0.003, beta1=0.95, beta2=0.98, weight_decay=0.0, maximize=True), 0.0),
    "adax-l2": (_single_tensor_adax, _fused_adax, 2,
                dict(lr=0.01, beta1=0.9, beta2=1e-4, eps=1e-12, weight_decay=5e-4,
                     decoupled_weight_decay=False, maximize=False), 0.0),
    "adax-w-max": (_single_tensor_adax, _fused_adax, 2,
                   dict(lr=0.005, beta1=0.9, beta2=1e-3, eps=1e-8, weight_decay=5e-2,
                        decoupled_weight_decay=True, maximize=True), 0.0),
    "adax-nowd": (_single_tensor_adax, _fused_adax, 2,
                  dict(lr=0.01, beta1=0.8, beta2=1e-4, eps=1e-12, weight_decay=0.0,
                       decoupled_weight_decay=False, maximize=False), 0.0),
    "adagrad": (_single_tensor_adagrad, _fused_adagrad, 1,
                dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, glove=False, grad_clip_value=None,
                     skip_nonfinite_rows=False, maximize=False), 0.0),
    "adagrad-wd-decay-max": (_single_tensor_adagrad, _fused_adagrad, 1,
                             dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, glove=False,
                                  grad_clip_value=None, skip_nonfinite_rows=False, maximize=True), 0.1),
    "glove": (_single_tensor_adagrad, _fused_adagrad, 1,
              dict(lr=0.05, lr_decay=0.0, weight_decay=0.0, eps=1e-10, glove=True, grad_clip_value=None,
                   skip_nonfinite_rows=False, maximize=False), 1.0),
    "glove-clip-wd-max": (_single_tensor_adagrad, _fused_adagrad, 1,
                          dict(lr=0.05, lr_decay=0.0, weight_decay=0.01, eps=1e-10, glove=True,
                               grad_clip_value=0.7, skip_nonfinite_rows=False, maximize=True), 1.0),
}
EXACT = {"tiger", "tiger-nowd-max", "lion", "lion-max"}  # no square root: bit-exact in every dtype


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _make(sizes: list[Any], dtype: torch.dtype, nstate: int, init: float, seed: int = 0,
          steps: list[float] | None = None) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    sd = _state_dtype(dtype)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    states = [[(torch.rand(s, generator=gen) * 0.1 + init).to(sd) for s in sizes] for _ in range(nstate)]
    steps_t = [torch.tensor(float(s)) for s in (steps or [0.0] * len(sizes))]
    return [ps, *states, steps_t]


def _grads(sizes: list[Any], dtype: torch.dtype, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return [(torch.randn(s, generator=gen) * 2).to(dtype) for s in sizes]


def _run(fn: Callable[..., None], tensors: list[list[Tensor]], grads: list[Tensor],
         kw: dict[str, Any]) -> None:
    ps, *states, steps = tensors
    for s in steps:
        s += 1
    fn(ps, grads, *states, steps, **kw)


def _compare(a: list[list[Tensor]], b: list[list[Tensor]], dtype: torch.dtype, exact: bool) -> None:
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            if exact:
                assert torch.equal(x, y), (x - y).abs().max()
            else:
                # fp32 state of low-precision params inherits their one-ulp differences (e.g. through wd*p)
                atol, rtol = TOL[dtype]
                torch.testing.assert_close(y, x, atol=atol, rtol=rtol)


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    assert _cpu.available(), _cpu.status()


def test_library_builds_is_cached_and_reports_openmp(tmp_path: Any) -> None:
    first = _cpu.build(cache=tmp_path)
    mtime = first.stat().st_mtime_ns
    again = _cpu.build(cache=tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert first.name.startswith("kernels-") and first.suffix == ".so"
    assert isinstance(_cpu.has_openmp(), bool)


@pytest.mark.skipif(sys.platform == "win32", reason="uses a /bin/sh wrapper as the compiler")
def test_compiler_without_openmp_gets_a_single_threaded_build(tmp_path: Any) -> None:
    """A compiler that refuses -fopenmp: the next flag set builds, the refusal is remembered."""
    real = _cpu._find_compiler()
    fake = tmp_path / "cc-no-openmp"
    fake.write_text("#!/bin/sh\n"
                    'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no openmp" >&2; exit 1; }; done\n'
                    f'exec "{real}" "$@"\n')
    fake.chmod(0o755)
    path = _cpu.build(cache=tmp_path / "cache", compiler=str(fake))
    lib = ctypes.CDLL(str(path))
    assert lib.tigeropt_has_openmp() == 0 and lib.tigeropt_abi() == _cpu.ABI
    failed = list((tmp_path / "cache").glob("*.failed"))
    assert failed and "no openmp" in failed[0].read_text()
    assert _cpu.build(cache=tmp_path / "cache", compiler=str(fake)) == path  # cached: no new attempt


def test_supports() -> None:
    for name in _cpu.NAMES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert _cpu.supports(name, dtype)
        assert not _cpu.supports(name, torch.int64)
        assert not _cpu.supports(name, torch.complex64)
    assert not _cpu.supports("adamw", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference(case: str, dtype: torch.dtype) -> None:
    if not _cpu.supports("tiger", dtype):
        pytest.skip(f"{dtype} not supported by this compiler")
    ref, fused, nstate, kw, init = CASES[case]
    a = _make(SIZES, dtype, nstate, init)
    b = copy.deepcopy(a)
    for step in range(3):
        kw = dict(kw, lr=kw["lr"] * (1.0 + 0.5 * step))  # lr changes between steps
        grads = _grads(SIZES, dtype, step)
        _run(ref, a, grads, kw)
        _run(fused, b, grads, kw)
    _compare(a, b, dtype, exact=case in EXACT)
    assert any(not torch.equal(x, y) for x, y in zip(a[0], _make(SIZES, dtype, nstate, init)[0])
               if x.numel())  # the parameters did move


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_step_relative_error_below_1e6(dtype: torch.dtype) -> None:
    for name, (ref, fused, nstate, kw, init) in CASES.items():
        sizes = [30_000, 30_000, 10_000]
        a = _make(sizes, dtype, nstate, init)
        before = copy.deepcopy(a)
        b = copy.deepcopy(a)
        grads = _grads(sizes, dtype, 0)
        _run(ref, a, grads, kw)
        _run(fused, b, grads, kw)
        for x, y, x0 in zip(a[0] + a[1], b[0] + b[1], before[0] + before[1]):
            x, y, x0 = x.double(), y.double(), x0.double()
            scale = x0.abs() + (x - x0).abs()  # the operands' magnitude: the value before plus the change
            rel = ((x - y).abs() / scale.clamp_min(1e-30)).max().item()
            assert rel < 1e-6, (name, rel)


def test_golden_values() -> None:
    """SPEC.md's hand-checked numbers (float64), through the fused functions alone."""
    one = lambda: [torch.tensor([1.0], dtype=torch.float64)]  # noqa: E731
    zero = lambda: [torch.tensor([0.0], dtype=torch.float64)]  # noqa: E731
    step = lambda: [torch.tensor(0.0)]  # noqa: E731

    p, m, s = one(), zero(), step()
    s[0] += 1
    _fused_tiger(p, [torch.tensor([0.5], dtype=torch.float64)], m, s, lr=0.1, beta=0.945,
                     weight_decay=0.01, maximize=False)
    assert math.isclose(m[0].item(), 0.0275, rel_tol=1e-12)
    assert math.isclose(p[0].item(), 0.899, rel_tol=1e-12)

    p, m, s = one(), zero(), step()
    for g, pe, me in ((0.5, 0.899, 0.005), (-0.2, 0.998101, 0.00295), (0.0, 0.897102899, 0.0029205)):
        s[0] += 1
        _fused_lion(p, [torch.tensor([g], dtype=torch.float64)], m, s, lr=0.1, beta1=0.9, beta2=0.99,
                        weight_decay=0.01, maximize=False)
        assert math.isclose(p[0].item(), pe, rel_tol=1e-12) and math.isclose(m[0].item(), me, rel_tol=1e-9)

    p, m, v, s = one(), zero(), zero(), step()
    for g, pe in ((0.5, 0.990000000002), (0.5, 0.971000000005), (-0.25, 0.957028356335)):
        s[0] += 1
        _fused_adax(p, [torch.tensor([g], dtype=torch.float64)], m, v, s, lr=0.1, beta1=0.9, beta2=1e-4,
                        eps=1e-12, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
        assert math.isclose(p[0].item(), pe, rel_tol=1e-11)

    for glove, acc0, expected in ((False, 0.0, (0.90000000002, 0.8292893219113)),
                                  (True, 1.0, (0.95, 0.9000623830561))):
        p, acc, s = one(), [torch.tensor([acc0], dtype=torch.float64)], step()
        for pe in expected:
            s[0] += 1
            _fused_adagrad(p, [torch.tensor([0.5], dtype=torch.float64)], acc, s, lr=0.1, lr_decay=0.0,
                               weight_decay=0.0, eps=1e-10, glove=glove, grad_clip_value=None,
                               skip_nonfinite_rows=False, maximize=False)
            assert math.isclose(p[0].item(), pe, rel_tol=1e-12)


def test_sign_of_zero_and_nonfinite_gradients() -> None:
    """sign(0) = 0: zero gradient and momentum move p by weight decay only; NaN/inf as the reference."""
    p, m = [torch.tensor([2.0, 2.0], dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)]
    _fused_tiger(p, [torch.zeros(2, dtype=torch.float64)], m, [torch.tensor(1.0)], lr=0.1, beta=0.9,
                     weight_decay=0.5, maximize=False)
    assert p[0].tolist() == [2.0 - 0.1 * 0.5 * 2.0] * 2
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, -1.0] * 20)
    for name in ("tiger", "lion", "adagrad", "glove-clip-wd-max"):
        ref, fused, nstate, kw, init = CASES[name]
        a = _make([special.numel()], torch.float32, nstate, init)
        b = copy.deepcopy(a)
        _run(ref, a, [special], kw)
        _run(fused, b, [special], kw)
        for x, y in zip(a[0] + a[1], b[0] + b[1]):
            torch.testing.assert_close(y, x, equal_nan=True, atol=1e-7, rtol=1e-6)


def test_adax_different_steps_per_tensor() -> None:
    """Per-tensor (bhat, 1-bhat, eps/sqrt(bc)), including t = 1 (bhat = 0) and t past the fp64 overflow."""
    ref, fused, nstate, kw, init = CASES["adax-l2"]
    sizes = [100, 33, 30_000, 30_000, 5]
    steps = [0.0, 4.0, 999.0, 1e5, 9_000_000.0]
    a = _make(sizes, torch.float32, nstate, init, steps=steps)
    b = copy.deepcopy(a)
    for k in range(2):
        grads = _grads(sizes, torch.float32, k)
        _run(ref, a, grads, kw)
        _run(fused, b, grads, kw)
    _compare(a, b, torch.float32, exact=False)
    assert all(torch.isfinite(t).all() for t in b[0] + b[1] + b[2])


def test_adagrad_lr_decay_with_different_steps() -> None:
    ref, fused, nstate, kw, init = CASES["adagrad-wd-decay-max"]
    sizes = [10, 20_000, 3]
    a = _make(sizes, torch.float64, nstate, init, steps=[0.0, 9.0, 99.0])
    b = copy.deepcopy(a)
    grads = _grads(sizes, torch.float64, 0)
    _run(ref, a, grads, kw)
    _run(fused, b, grads, kw)
    _compare(a, b, torch.float64, exact=False)


@pytest.mark.parametrize("name", ["tiger", "lion", "adax-l2", "glove"])
def test_empty_list_and_empty_tensors(name: str) -> None:
    ref, fused, nstate, kw, init = CASES[name]
    fused([], [], *[[] for _ in range(nstate)], [], **kw)  # nothing to do, no error
    a = _make([0, (0, 3)], torch.float32, nstate, init)
    _run(fused, a, _grads([0, (0, 3)], torch.float32, 0), kw)
    assert [t.shape for t in a[0]] == [torch.Size([0]), torch.Size([0, 3])]


def test_non_contiguous_tensors_fall_back_and_match() -> None:
    ref, fused, nstate, kw, init = CASES["adax-w-max"]
    sizes = [(64, 48), 1000]
    a = _make(sizes, torch.float32, nstate, init)
    a[0][0] = a[0][0].t()  # a transposed parameter, contiguous state: the foreach fallback takes it
    a[1][0], a[2][0] = a[1][0].t().contiguous(), a[2][0].t().contiguous()
    b = copy.deepcopy(a)
    grads = _grads([(48, 64), 1000], torch.float32, 0)
    grads[0] = grads[0].t().contiguous().t()
    assert not grads[0].is_contiguous() and not b[0][0].is_contiguous()
    _run(ref, a, grads, kw)
    _run(fused, b, grads, kw)
    _compare(a, b, torch.float32, exact=False)


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_take_the_foreach_path() -> None:
    """DTensor, FakeTensor and friends have no plain storage: only plain tensors reach the C kernel."""
    ref, fused, nstate, kw, init = CASES["lion"]
    sizes = [100, 37]
    a = _make(sizes, torch.float32, nstate, init)
    b = copy.deepcopy(a)
    b[0][0] = b[0][0].as_subclass(_Subclass)
    groups, other = _cpu._split([b[0], _grads(sizes, torch.float32, 0), b[1]], True)
    assert other == [0] and groups == {0: [1]}
    grads = _grads(sizes, torch.float32, 0)
    _run(ref, a, grads, kw)
    _run(fused, b, grads, kw)
    _compare(a, b, torch.float32, exact=True)


def test_results_do_not_depend_on_the_thread_count() -> None:
    ref, fused, nstate, kw, init = CASES["adax-l2"]
    sizes = [200_003, 7, 70_001]
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            a = _make(sizes, torch.float32, nstate, init)
            _run(fused, a, _grads(sizes, torch.float32, 0), kw)
            out.append(a)
    finally:
        torch.set_num_threads(before)
    for other in out[1:]:
        _compare(out[0], other, torch.float32, exact=True)


def test_lr_may_be_a_tensor_and_versions_are_bumped() -> None:
    ref, fused, nstate, kw, init = CASES["lion"]
    a = _make([300], torch.float32, nstate, init)
    b = copy.deepcopy(a)
    grads = _grads([300], torch.float32, 0)
    v_p, v_m = b[0][0]._version, b[1][0]._version
    _run(ref, a, grads, kw)
    _run(fused, b, grads, dict(kw, lr=torch.tensor(kw["lr"])))
    _compare(a, b, torch.float32, exact=True)
    assert b[0][0]._version > v_p and b[1][0]._version > v_m  # autograd sees the in-place update


def test_tiger_extras_and_glove_skip_rows_use_the_reference_rule() -> None:
    sizes = [(6, 5), 5]
    kw = dict(lr=0.1, beta=0.965, weight_decay=0.01, maximize=False, lr_scaling=True, accumulation_steps=2,
              nan_guard=True, shrink_ratio=0.99, kind="auto")
    a = _make(sizes, torch.float32, 1, 0.0)
    b = copy.deepcopy(a)
    for k in range(2):
        grads = _grads(sizes, torch.float32, k)
        _run(_single_tensor_tiger, a, grads, kw)
        _run(_fused_tiger, b, grads, kw)
    _compare(a, b, torch.float32, exact=True)
    kw = dict(CASES["glove"][3], skip_nonfinite_rows=True)
    a = _make(sizes, torch.float32, 1, 1.0)
    b = copy.deepcopy(a)
    grads = _grads(sizes, torch.float32, 0)
    grads[0][2, 1] = float("inf")
    _run(_single_tensor_adagrad, a, grads, kw)
    _run(_fused_adagrad, b, grads, kw)
    _compare(a, b, torch.float32, exact=True)
    assert torch.equal(b[0][0][2], _make(sizes, torch.float32, 1, 1.0)[0][0][2])  # the row was skipped


OPTIMIZERS: list[tuple[type, dict[str, Any]]] = [
    (tigeropt.Tiger, dict(lr=0.01)),
    (tigeropt.Lion, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    (tigeropt.AdaX, dict(lr=0.01)),
    (tigeropt.AdaX, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True)),
    (tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    (tigeropt.Adagrad, dict(lr=0.05, glove=True, grad_clip_value=1.0)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_optimizer_default_path_is_the_fused_cpu_step(cls: type, kwargs: dict[str, Any],
                                                      dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    shapes = [(37, 11), (11,), (5, 4, 3), (30_001,), (32_000,), (9_000,)]  # > 2**16 elements: 2 threads
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = cls(params, **kwargs)
    reference = cls(twins, foreach=False, **kwargs)
    assert fused._path(fused.param_groups[0], torch.device("cpu"), dtype) == "cpu"
    assert reference._path(reference.param_groups[0], torch.device("cpu"), dtype) == "reference"
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape).to(dtype)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
        for group in (fused.param_groups[0], reference.param_groups[0]):
            group["lr"] *= 0.7
    exact = cls in (tigeropt.Tiger, tigeropt.Lion)
    _compare([params], [twins], dtype, exact=exact)
    for p, q in zip(params, twins):
        for key in fused.state_keys:
            _compare([[reference.state[q][key]]], [[fused.state[p][key]]], dtype, exact=exact)
        assert fused.state[p]["step"].item() == 3


def test_options_the_kernels_lack_choose_foreach() -> None:
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = tigeropt.Tiger(p, lr_scaling=True)
    assert opt._path(opt.param_groups[0], torch.device("cpu"), torch.float32) == "foreach"
    opt = tigeropt.Adagrad(p, glove=True, skip_nonfinite_rows=True)
    assert opt._path(opt.param_groups[0], torch.device("cpu"), torch.float32) == "foreach"


def test_unavailable_library_warns_once_and_falls_back(tmp_path: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    saved = dict(_cpu._state)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TIGEROPT_CACHE", str(tmp_path))
    _cpu._state.clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU step is unavailable"):
            assert not _cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _cpu.available()  # no second warning
        assert "no-such-compiler" in _cpu.status()
        ref, fused, nstate, kw, init = CASES["tiger"]
        a = _make([100], torch.float32, nstate, init)
        b = copy.deepcopy(a)
        grads = _grads([100], torch.float32, 0)
        _run(ref, a, grads, kw)
        _run(fused, b, grads, kw)  # the foreach path
        _compare(a, b, torch.float32, exact=True)
        opt = tigeropt.Tiger([torch.nn.Parameter(torch.randn(3))])
        assert opt._path(opt.param_groups[0], torch.device("cpu"), torch.float32) == "foreach"
        monkeypatch.setenv("TIGEROPT_CPU_FUSED", "0")
        _cpu._state.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _cpu.available() and "TIGEROPT_CPU_FUSED" in _cpu.status()
    finally:
        _cpu._state.clear()
        _cpu._state.update(saved)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(CASES)),
       sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=6),
       lr=st.floats(1e-4, 0.5), wd=st.sampled_from([0.0, 1e-3, 0.1]), maximize=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       seed=st.integers(0, 2**16))
def test_property_random_lists_and_hyperparameters(name: str, sizes: list[int], lr: float, wd: float,
                                                   maximize: bool, dtype: torch.dtype, seed: int) -> None:
    ref, fused, nstate, kw, init = CASES[name]
    kw = dict(kw, lr=lr, weight_decay=wd, maximize=maximize)
    a = _make(sizes, dtype, nstate, init, seed=seed)
    b = copy.deepcopy(a)
    grads = _grads(sizes, dtype, seed)
    _run(ref, a, grads, kw)
    _run(fused, b, grads, kw)
    _compare(a, b, dtype, exact=name in EXACT)


def test_launchers_without_fallback_refuse_what_they_cannot_take() -> None:
    """Without a fallback the C launchers raise rather than silently picking an optimizer's path."""
    sizes = [(6, 5)]
    a = _make(sizes, torch.float32, 1, 0.0)
    a[0][0] = a[0][0].t()  # non-contiguous: not for the C kernel
    with pytest.raises(ValueError, match="no fallback"):
        _run(_cpu.fused_lion, a, [torch.zeros(5, 6)], CASES["lion"][3])
    with pytest.raises(ValueError, match="no fallback"):
        _run(_cpu.fused_tiger, _make(sizes, torch.float32, 1, 0.0), _grads(sizes, torch.float32, 0),
             dict(CASES["tiger"][3], nan_guard=True))


def test_kernels_import_nothing_from_optimizer_modules() -> None:
    """Layering: the C launchers and Triton kernels never import tigeropt's optimizer modules."""
    import ast
    import pathlib

    root = pathlib.Path(tigeropt.__file__).parent
    optimizer_modules = {"tiger", "lion", "adax", "adagrad", "_base", "_lowp_step", "lazy", "mixed", "gan",
                         "param_groups", "demo"}
    files = [root / "_cpu" / "__init__.py", *sorted((root / "kernels").glob("*.py"))]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:  # from ..x import
                top = (node.module or "").split(".")[0]
                assert top not in optimizer_modules, f"{f.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                assert not (parts[0] == "tigeropt" and len(parts) > 1 and parts[1] in optimizer_modules), \
                    f"{f.name} imports {node.module}"


@pytest.mark.skipif(sys.platform == "win32", reason="uses /bin/sh wrappers as the compiler")
@pytest.mark.parametrize("how", ["signal", "oom-message"])
def test_a_compiler_stopped_midway_is_not_remembered_as_a_refusal(tmp_path: Any, how: str) -> None:
    """A compile killed by a signal (the OOM killer, Ctrl-C) or ended by a crash/out-of-memory message
    says nothing about the flags: no ``.failed`` marker, so the next process builds normally (a
    marker turned the fused C step off for good on that machine)."""
    real = _cpu._find_compiler()
    fake = tmp_path / "cc-stopped"
    body = ('kill -9 $$\n' if how == "signal"
            else 'echo "gcc: fatal error: Killed signal terminated program cc1" >&2; exit 1\n')
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="failed"):
        _cpu.build(cache=cache, compiler=str(fake))
    assert list(cache.glob("*.failed")) == []
    # a working compiler at the same path then builds
    fake.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    path = _cpu.build(cache=cache, compiler=str(fake))
    assert ctypes.CDLL(str(path)).tigeropt_abi() == _cpu.ABI
