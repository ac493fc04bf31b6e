"""The fused Triton kernels against the reference (``_single_tensor_*``) updates.

On a machine without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
set before triton is imported) with tiny tiles, so small tensors already cover full blocks, tail
blocks and several programs per tensor.  Tests marked ``gpu`` run the same checks on CUDA
(``pytest -m gpu``) plus what only a GPU can show: no recompilation, CUDA-graph capture.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402
import math  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from torch import Tensor  # noqa: E402

if os.environ.get("TIGEROPT_REQUIRE_OPTIONAL") != "1":  # CI (.ci/run) installs triton: there it must import
    pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test,triton]' to test "
                        "the Triton kernels (on CPU under TRITON_INTERPRET=1)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tigeropt  # noqa: E402
from tigeropt import kernels  # noqa: E402
from tigeropt.adagrad import _single_tensor_adagrad  # noqa: E402
from tigeropt.adax import _single_tensor_adax  # noqa: E402
from tigeropt.kernels import _common  # noqa: E402
from tigeropt.kernels._common import LaunchConfig, _to_bf16, use_launch_config  # noqa: E402
from tigeropt.kernels.adagrad import _adagrad_kernel, fused_adagrad  # noqa: E402
from tigeropt.kernels.adax import _adax_kernel, fused_adax  # noqa: E402
from tigeropt.kernels.lion import _lion_kernel, fused_lion  # noqa: E402
from tigeropt.kernels.tiger import _tiger_kernel, fused_tiger  # noqa: E402
from tigeropt.lion import _single_tensor_lion  # noqa: E402
from tigeropt.tiger import _single_tensor_tiger  # noqa: E402

# The interpreter computes masked-off lanes too (0/0, casts of huge values) and numpy warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
TINY = LaunchConfig(block=16, chunk=32, num_warps=1)


def _device(name: str) -> torch.device:
    if name == "cpu" and not kernels.interpreter_enabled():
        pytest.skip("CPU runs of the kernels need TRITON_INTERPRET=1 before triton is imported")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    dev = _device(request.param)
    if dev.type == "cpu":
        with use_launch_config(TINY):
            yield dev
    else:
        yield dev


def _sizes(device: torch.device) -> list[tuple[int, ...]]:
    """Odd sizes around the active tile sizes: 1, 7, block +- 1, chunk +- 1, multi-chunk, 2-D, 0-D."""
    cfg = _common.launch_config(device)
    b, c = cfg.block, cfg.chunk
    return [(1,), (7,), (b - 1,), (b,), (b + 1,), (c - 1,), (c + 1,), (3 * c + b + 5,), (3, 2 * b + 1), ()]


# ------------------------------------------------------------------------------------ optimizers
# name: (reference, fused, number of state tensors, initial state value, hyperparameter cases)
def _tiger_cases() -> list[dict[str, Any]]:
    return [dict(lr=0.1, beta=0.965, weight_decay=0.0, maximize=False),
            dict(lr=0.03, beta=0.9, weight_decay=0.1, maximize=True)]


def _lion_cases() -> list[dict[str, Any]]:
    return [dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
            dict(lr=0.03, beta1=0.8, beta2=0.95, weight_decay=0.2, maximize=True)]


def _adax_cases() -> list[dict[str, Any]]:
    base = dict(beta1=0.9, beta2=1e-4, eps=1e-12)
    return [dict(base, lr=0.01, weight_decay=0.0, decoupled_weight_decay=False, maximize=False),
            dict(base, lr=0.01, weight_decay=0.05, decoupled_weight_decay=False, maximize=True),
            dict(base, lr=0.005, weight_decay=0.05, decoupled_weight_decay=True, maximize=False)]


def _adagrad_cases() -> list[dict[str, Any]]:
    base = dict(eps=1e-10, skip_nonfinite_rows=False)
    std, glove = dict(base, glove=False, grad_clip_value=None), dict(base, glove=True)
    return [dict(std, lr=0.1, lr_decay=0.0, weight_decay=0.0, maximize=False),
            dict(std, lr=0.1, lr_decay=0.01, weight_decay=0.1, maximize=True),
            dict(glove, lr=0.05, lr_decay=0.0, weight_decay=0.0, grad_clip_value=None, maximize=False),
            dict(glove, lr=0.05, lr_decay=0.01, weight_decay=0.01, grad_clip_value=0.7, maximize=True)]


OPTIMIZERS: dict[str, tuple[Callable[..., None], Callable[..., None], int]] = {
    "tiger": (_single_tensor_tiger, fused_tiger, 1),
    "lion": (_single_tensor_lion, fused_lion, 1),
    "adax": (_single_tensor_adax, fused_adax, 2),
    "adagrad": (_single_tensor_adagrad, fused_adagrad, 1),
}
KERNELS = {"tiger": _tiger_kernel, "lion": _lion_kernel, "adax": _adax_kernel, "adagrad": _adagrad_kernel}
CASES = [(name, i, kw) for name, fn in (("tiger", _tiger_cases), ("lion", _lion_cases), ("adax", _adax_cases),
                                         ("adagrad", _adagrad_cases)) for i, kw in enumerate(fn())]

# (param dtype, rtol for parameters): fp32 is held to a relative error below 1e-6; bf16/fp16
# parameters are rounded once from the same fp32 math, so they may differ by one unit in the last place.
DTYPES = [(torch.float32, 1e-6), (torch.bfloat16, 2.0 ** -7), (torch.float16, 2.0 ** -10)]
STATE_RTOL = 1e-6  # state is fp32 for every parameter dtype


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|a - e| <= rtol * (|e| + max|e|): relative error, measured against the tensor's scale."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    scale = e.abs().max().clamp_min(1e-30)
    bad = (a - e).abs() > rtol * (e.abs() + scale)
    assert not bool(bad.any()), (f"{what}: max abs err {(a - e).abs().max().item():.3g}, scale "
                                 f"{scale.item():.3g}, rtol {rtol}")


def _initial_state(name: str, kw: dict[str, Any], shape: tuple[int, ...], device: torch.device,
                   gen: torch.Generator) -> torch.Tensor:
    if name == "adagrad":  # the accumulator: >= 1 for GloVe-style (divides by it), >= 0 otherwise
        return torch.rand(shape, generator=gen).add_(1.0 if kw["glove"] else 0.0).to(device)
    return (0.1 * torch.randn(shape, generator=gen)).to(device)


def _problem(name: str, kw: dict[str, Any], shapes: list[tuple[int, ...]], dtype: torch.dtype,
             device: torch.device, n_steps: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    n_states = OPTIMIZERS[name][2]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    states = [[_initial_state(name, kw, s, device, gen) for s in shapes] for _ in range(n_states)]
    if name == "adax":  # vhat >= 0
        states[1] = [v.abs() for v in states[1]]
    grads = []
    for _ in range(n_steps):
        gs = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
        for g in gs:  # exact zeros exercise sign(0) = 0 (AdaX/Adagrad would divide 0 by eps at step 1)
            if g.numel() > 2 and name in ("tiger", "lion"):
                g.view(-1)[::3] = 0.0
        grads.append(gs)
    return dict(params=params, states=states, grads=grads)


def _run_both(name: str, kw: dict[str, Any], prob: dict[str, Any], steps0: list[float] | None = None,
              lr_schedule: list[Any] | None = None) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Run the reference and the fused step side by side; return (fused tensors, reference tensors)."""
    ref_fn, fused_fn, _ = OPTIMIZERS[name]
    n = len(prob["params"])
    fused = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
    ref = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
    start = steps0 if steps0 is not None else [0.0] * n
    fused_steps = [torch.tensor(float(s)) for s in start]
    ref_steps = [torch.tensor(float(s)) for s in start]
    for k, grads in enumerate(prob["grads"]):
        for s in fused_steps + ref_steps:
            s += 1
        hyper = dict(kw)
        if lr_schedule is not None:
            hyper["lr"] = lr_schedule[k]
        fused_fn(fused[0], grads, *fused[1:], fused_steps, **hyper)
        ref_fn(ref[0], grads, *ref[1:], ref_steps, **hyper)
    return fused, ref


def _compare(fused: list[list[torch.Tensor]], ref: list[list[torch.Tensor]], p_rtol: float,
             state_rtol: float = STATE_RTOL) -> None:
    for role, (fl, rl) in enumerate(zip(fused, ref)):
        for i, (a, e) in enumerate(zip(fl, rl)):
            _assert_rel(a, e, p_rtol if role == 0 else state_rtol, f"{'param' if role == 0 else 'state'} {i}")
    low = [(a, e) for a, e in zip(fused[0], ref[0]) if a.dtype in (torch.bfloat16, torch.float16)]
    if low:  # rounded once, to nearest like param.copy_(p32): almost every element is bit-identical
        differ = sum(int((a != e).sum()) for a, e in low)
        total = sum(a.numel() for a, _ in low)
        assert differ <= max(1, total // 100), f"{differ} of {total} low-precision params differ"


# ------------------------------------------------------------------------------------ fused == reference
@pytest.mark.parametrize("dtype,p_rtol", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,case,kw", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_fused_matches_reference(device: torch.device, name: str, case: int, kw: dict[str, Any],
                                 dtype: torch.dtype, p_rtol: float) -> None:
    prob = _problem(name, kw, _sizes(device), dtype, device, n_steps=2, seed=case)
    fused, ref = _run_both(name, kw, prob)
    _compare(fused, ref, p_rtol)
    # the parameters really moved (a kernel that did nothing would fail above, but be explicit)
    assert any(not torch.equal(a, b) for a, b in zip(fused[0], prob["params"]))


def test_fp32_one_step_relative_error_below_1e6(device: torch.device) -> None:
    """The headline promise, per element: after one fp32 step the error relative to the operands
    (max of |p_new|, |p_old| and |update|, which is what fp32 rounding scales with) is below 1e-6."""
    for name, _, kw in CASES:
        prob = _problem(name, kw, [(97,), (4, 33)], torch.float32, device, n_steps=1, seed=7)
        fused, ref = _run_both(name, kw, prob)
        for a, e, p0 in zip(fused[0], ref[0], prob["params"]):
            a, e, p0 = a.double(), e.double(), p0.double()
            scale = torch.maximum(torch.maximum(e.abs(), p0.abs()), (e - p0).abs()).clamp_min(1e-30)
            rel = ((a - e).abs() / scale).max().item()
            assert rel < 1e-6, (name, kw, rel)


def test_golden_values(device: torch.device) -> None:
    """SPEC.md's hand-checked float64 values, through the fused kernels in fp32."""
    def one(value: float = 1.0, init: float = 0.0, n_states: int = 1) -> tuple[list, list]:
        return ([torch.tensor([value], device=device)],
                [[torch.full((1,), init, device=device)] for _ in range(n_states)])

    def steps(k: int) -> list[torch.Tensor]:
        return [torch.tensor(float(k))]

    p, (m,) = one()
    fused_tiger(p, [torch.tensor([0.5], device=device)], m, steps(1), lr=0.1, beta=0.945,
                weight_decay=0.01, maximize=False)
    assert p[0].item() == pytest.approx(0.899, rel=1e-6) and m[0].item() == pytest.approx(0.0275, rel=1e-6)

    p, (m,) = one()
    for k, (g, pe, me) in enumerate(zip((0.5, -0.2, 0.0), (0.899, 0.998101, 0.897102899),
                                        (0.005, 0.00295, 0.0029205)), start=1):
        fused_lion(p, [torch.tensor([g], device=device)], m, steps(k), lr=0.1, beta1=0.9, beta2=0.99,
                   weight_decay=0.01, maximize=False)
        assert p[0].item() == pytest.approx(pe, rel=1e-6) and m[0].item() == pytest.approx(me, rel=1e-5)

    p, (m, v) = one(n_states=2)
    for k, (g, pe) in enumerate(zip((0.5, 0.5, -0.25), (0.990000000002, 0.971000000005, 0.957028356335)),
                                start=1):
        fused_adax(p, [torch.tensor([g], device=device)], m, v, steps(k), lr=0.1, beta1=0.9, beta2=1e-4,
                   eps=1e-12, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
        assert p[0].item() == pytest.approx(pe, rel=1e-6)

    for glove, init, expected in ((False, 0.0, (0.90000000002, 0.8292893219113)),
                                  (True, 1.0, (0.95, 0.9000623830561))):
        p, (acc,) = one(init=init)
        for k, pe in enumerate(expected, start=1):
            fused_adagrad(p, [torch.tensor([0.5], device=device)], acc, steps(k), lr=0.1, lr_decay=0.0,
                          weight_decay=0.0, eps=1e-10, glove=glove, grad_clip_value=None,
                          skip_nonfinite_rows=False, maximize=False)
            assert p[0].item() == pytest.approx(pe, rel=1e-6)


def test_sign_of_zero_is_zero(device: torch.device) -> None:
    """sign(0) = 0: with m = 0 and g = 0 Tiger/Lion leave p unchanged (wd = 0)."""
    p = [torch.tensor([1.5, -2.0, 0.25], device=device)]
    for fn, kw in ((fused_tiger, dict(beta=0.9)), (fused_lion, dict(beta1=0.9, beta2=0.99))):
        q = [p[0].clone()]
        fn(q, [torch.zeros(3, device=device)], [torch.zeros(3, device=device)], [torch.tensor(1.0)],
           lr=0.1, weight_decay=0.0, maximize=False, **kw)
        assert torch.equal(q[0], p[0])


# ------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_empty_list_and_empty_tensors(device: torch.device, name: str) -> None:
    _, fused_fn, n_states = OPTIMIZERS[name]
    kw = next(kw for n, _, kw in CASES if n == name)
    fused_fn([], [], *([[]] * n_states), [], **kw)  # nothing to do, no error
    # only empty tensors: no launch, nothing changes, no error
    params = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    fused_fn(params, [torch.empty_like(p) for p in params],
             *[[torch.empty_like(p) for p in params] for _ in range(n_states)],
             [torch.tensor(1.0)] * 2, **kw)
    # empty tensors mixed with non-empty ones
    prob = _problem(name, kw, [(0,), (5,), (2, 0), (3,)], torch.float32, device, n_steps=1)
    fused, ref = _run_both(name, kw, prob)
    _compare(fused, ref, 1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_changes_between_steps(device: torch.device, name: str) -> None:
    """A scheduler changes lr every step, as a float or in place in a tensor; results follow it."""
    kw = next(kw for n, _, kw in CASES if n == name)
    shapes = [(5,), (40,)]
    prob = _problem(name, kw, shapes, torch.float32, device, n_steps=3, seed=3)
    fused, ref = _run_both(name, kw, prob, lr_schedule=[0.1, 0.02, 0.3])
    _compare(fused, ref, 1e-6)
    # a tensor lr on the parameters' device, changed in place (read by the kernel through its pointer)
    lr_t = torch.tensor(0.1, device=device)
    ref_fn, fused_fn, _ = OPTIMIZERS[name]
    f = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
    r = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
    for k, (grads, lr) in enumerate(zip(prob["grads"], (0.1, 0.02, 0.3)), start=1):
        lr_t.fill_(lr)
        steps = [torch.tensor(float(k)) for _ in shapes]
        fused_fn(f[0], grads, *f[1:], steps, **dict(kw, lr=lr_t))
        ref_fn(r[0], grads, *r[1:], steps, **dict(kw, lr=lr))
    _compare(f, r, 1e-6)


@pytest.mark.parametrize("kernel", [_tiger_kernel, _lion_kernel, _adax_kernel, _adagrad_kernel])
def test_hyperparameters_are_runtime_arguments(kernel: Any) -> None:
    """lr and the other hyperparameters are never constexpr, so a new value cannot trigger a compile."""
    fn = kernel.fn
    sig = inspect.signature(fn)
    runtime = {"lr", "wd"} & set(sig.parameters)
    assert runtime == {"lr", "wd"}
    for name, param in sig.parameters.items():
        is_constexpr = param.annotation in (tl.constexpr, "tl.constexpr")
        assert is_constexpr == name.isupper(), name  # only the UPPER-CASE structural flags are constexpr


def test_adax_different_steps_per_tensor(device: torch.device) -> None:
    """Steps differ per tensor (e.g. a parameter that had no gradient for a while): per-tensor scalars."""
    _, _, kw = next(c for c in CASES if c[0] == "adax" and c[2]["weight_decay"] > 0)
    shapes = [(3,), (20,), (40,), (7,)]
    prob = _problem("adax", kw, shapes, torch.float32, device, n_steps=2, seed=5)
    # step 1 (bhat = 0), mid-range, past the float32 overflow of (1+b2)^t, past Python's OverflowError
    fused, ref = _run_both("adax", kw, prob, steps0=[0, 41, 2_000_000, 8_000_000])
    _compare(fused, ref, 1e-6)


def test_adagrad_lr_decay_different_steps(device: torch.device) -> None:
    _, _, kw = next(c for c in CASES if c[0] == "adagrad" and c[2]["lr_decay"] > 0)
    prob = _problem("adagrad", kw, [(3,), (20,), (9,)], torch.float32, device, n_steps=2, seed=6)
    fused, ref = _run_both("adagrad", kw, prob, steps0=[0, 10, 1000])
    _compare(fused, ref, 1e-6)


def test_non_contiguous_tensors(device: torch.device) -> None:
    """Transposed (dense) params are walked in place; strided views use a working copy + write-back."""
    kw = _lion_cases()[1]
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(6, 40, generator=gen).to(device)
    params = [torch.randn(40, 6, generator=gen).to(device).t(),  # dense, not contiguous
              base[:, ::2],  # not dense
              torch.randn(33, generator=gen).to(device)]
    states = [torch.zeros_like(p) for p in params]  # preserve_format: same strides as the params
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    grads[0] = grads[0].t().contiguous().t()  # a grad laid out unlike its (contiguous) state
    grads[1] = torch.randn(20, 6, generator=gen).to(device).t()
    ref_p, ref_s = [p.clone() for p in params], [s.clone() for s in states]
    before = base.clone()
    fused_lion(params, grads, states, [torch.tensor(1.0)] * 3, **kw)
    _single_tensor_lion(ref_p, grads, ref_s, [torch.tensor(1.0)] * 3, **kw)
    for a, e in zip(params + states, ref_p + ref_s):
        _assert_rel(a, e, 1e-6, "non-contiguous")
    assert torch.equal(base[:, 1::2], before[:, 1::2])  # the columns between the view's are untouched


def test_tables_cached_and_gradient_buffers_may_move(device: torch.device) -> None:
    """Repeated steps reuse the tables; new gradient buffers (set_to_none) still give exact results."""
    kw = _tiger_cases()[1]
    prob = _problem("tiger", kw, [(9,), (70,), (3, 5)], torch.float32, device, n_steps=3, seed=9)
    f = [[p.clone() for p in prob["params"]], [s.clone() for s in prob["states"][0]]]
    r = [[p.clone() for p in prob["params"]], [s.clone() for s in prob["states"][0]]]
    _common.clear_cache()
    tables = []
    for grads in prob["grads"]:
        fresh = [g.clone() for g in grads]  # a new buffer every step, as after zero_grad(set_to_none=True)
        fused_tiger(f[0], fresh, f[1], [torch.tensor(1.0)] * 3, **kw)
        _single_tensor_tiger(r[0], grads, r[1], [torch.tensor(1.0)] * 3, **kw)
        del fresh
        (plan,) = _common._plans.values()
        tables.append(plan.table)
    assert tables[0] is tables[1] is tables[2]  # one plan, built once
    _compare(f, r, 1e-6)
    # replacing a state tensor (e.g. load_state_dict) gives a new plan, not a stale address
    f[1][1] = f[1][1].clone()
    r_before = [t.clone() for t in r[0]]
    fused_tiger(f[0], prob["grads"][0], f[1], [torch.tensor(1.0)] * 3, **kw)
    _single_tensor_tiger(r_before, prob["grads"][0], r[1], [torch.tensor(1.0)] * 3, **kw)
    _compare([f[0], f[1]], [r_before, r[1]], 1e-6)
    assert len(_common._plans) == 2


def test_dtensor_parameters_update_their_local_shards(device: torch.device, tmp_path: Any) -> None:
    """FSDP2-style DTensor params (whose data_ptr() is 0) are updated through their local shards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized() or device.type != "cpu":
        pytest.skip("needs a fresh single-process gloo group on CPU")
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        kw = _tiger_cases()[1]
        prob = _problem("tiger", kw, [(8, 5), (33,)], torch.float32, device, n_steps=1, seed=4)

        def shard(t: Tensor) -> Tensor:
            return distribute_tensor(t.clone(), mesh, [Shard(0)])

        params = [shard(p) for p in prob["params"]]
        grads = [shard(g) for g in prob["grads"][0]]
        states = [shard(m) for m in prob["states"][0]]
        assert params[0].data_ptr() == 0  # why the kernels must unwrap them
        fused_tiger(params, grads, states, [torch.tensor(1.0)] * 2, **kw)
        ref_p = [p.clone() for p in prob["params"]]
        ref_m = [m.clone() for m in prob["states"][0]]
        _single_tensor_tiger(ref_p, prob["grads"][0], ref_m, [torch.tensor(1.0)] * 2, **kw)
        _compare([[p.full_tensor() for p in params], [m.full_tensor() for m in states]], [ref_p, ref_m], 1e-6)
    finally:
        dist.destroy_process_group()


def test_round_bf16_matches_torch(device: torch.device) -> None:
    """The kernels' fp32 -> bf16 rounding is torch's (nearest, ties to even, NaN/inf/subnormals kept)."""

    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _to_bf16(x), mask=offs < n)

    gen = torch.Generator().manual_seed(1)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x3F80FFFF],
                        dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e38])
    x = torch.cat([torch.randn(200, generator=gen) * 100, ties, special]).to(device)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _round_kernel[(triton.cdiv(x.numel(), 64),)](x, y, x.numel(), BLOCK=64)
    expected = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert bool(same.all()), x[~same]


def test_errors() -> None:
    p = [torch.zeros(3, dtype=torch.float64)]
    with pytest.raises(TypeError, match="float64"):
        fused_lion(p, p, [torch.zeros(3, dtype=torch.float64)], [torch.tensor(1.0)], lr=0.1, beta1=0.9,
                   beta2=0.99, weight_decay=0.0, maximize=False)
    q = [torch.zeros(3)]
    with pytest.raises(ValueError, match="plain Tiger rule"):
        fused_tiger(q, q, [torch.zeros(3)], [torch.tensor(1.0)], lr=0.1, beta=0.9, weight_decay=0.0,
                    maximize=False, nan_guard=True)
    with pytest.raises(ValueError, match="skip_nonfinite_rows"):
        fused_adagrad(q, q, [torch.ones(3)], [torch.tensor(1.0)], lr=0.1, lr_decay=0.0, weight_decay=0.0,
                      eps=1e-10, glove=True, grad_clip_value=None, skip_nonfinite_rows=True, maximize=False)
    with pytest.raises(ValueError, match="lengths"):
        fused_lion(q + q, q, [torch.zeros(3)], [torch.tensor(1.0)], lr=0.1, beta1=0.9, beta2=0.99,
                   weight_decay=0.0, maximize=False)
    with pytest.raises(ValueError, match="shape"):
        fused_lion(q, [torch.zeros(4)], [torch.zeros(3)], [torch.tensor(1.0)], lr=0.1, beta1=0.9, beta2=0.99,
                   weight_decay=0.0, maximize=False)
    with pytest.raises(ValueError, match="block"):
        LaunchConfig(block=48, chunk=96, num_warps=4)


# ------------------------------------------------------------------------------------ through the classes
@pytest.mark.parametrize("cls,kwargs", [
    (tigeropt.Tiger, dict(lr=0.01, weight_decay=0.01)),
    (tigeropt.Lion, dict(lr=0.01, weight_decay=0.1)),
    (tigeropt.AdaX, dict(lr=0.01)),
    (tigeropt.AdaX, dict(lr=0.01, decoupled_weight_decay=True, weight_decay=0.05)),
    (tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    (tigeropt.Adagrad, dict(lr=0.05, glove=True, grad_clip_value=1.0)),
], ids=["tiger", "lion", "adax", "adax-w", "adagrad", "adagrad-glove"])
def test_optimizer_classes_fused(device: torch.device, cls: type, kwargs: dict[str, Any]) -> None:
    """``fused=True`` through the optimizer (state init, step counts, scheduler) == the reference path."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(4, 9), (9,), (1,), (33,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": kwargs["lr"] * 3}], fused=fused,
                  foreach=None if fused else False, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(device)
            opt.step()
            sched.step()
        results.append((params, opt))
    (fp, fopt), (rp, ropt) = results
    for a, e in zip(fp, rp):
        _assert_rel(a.detach(), e.detach(), 1e-6, cls.__name__)
    for a, e in zip(fp, rp):
        for key in cls.state_keys:
            _assert_rel(fopt.state[a][key], ropt.state[e][key], 1e-6, key)
        assert fopt.state[a]["step"].item() == 3


# ------------------------------------------------------------------------------------ property test
@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(list(OPTIMIZERS)),
       sizes=st.lists(st.integers(min_value=0, max_value=80), min_size=1, max_size=4),
       lr=st.floats(min_value=1e-4, max_value=0.5),
       wd=st.sampled_from([0.0, 0.01, 0.3]),
       maximize=st.booleans(), flag=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_and_hyperparameters(name: str, sizes: list[int], lr: float, wd: float,
                                                    maximize: bool, flag: bool, seed: int) -> None:
    if not kernels.interpreter_enabled() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = next(kw for n, _, kw in CASES if n == name)
    kw = dict(kw, lr=lr, weight_decay=wd, maximize=maximize)
    if name == "adax":
        kw["decoupled_weight_decay"] = flag
    if name == "adagrad":
        kw.update(glove=flag, grad_clip_value=0.5 if flag else None)
    with use_launch_config(TINY if device.type == "cpu" else _common.launch_config(device)):
        prob = _problem(name, kw, [(n,) for n in sizes], torch.float32, device, n_steps=1, seed=seed)
        fused, ref = _run_both(name, kw, prob)
    # L2 decay (AdaX, Adagrad) adds wd*p to g before squaring it: where they nearly cancel, one
    # rounding of g + wd*p (fused multiply-add or not: torch's own CPU add uses an FMA in its vector
    # body and not in its tail) is a larger share of the result, and the squared state doubles it.
    l2 = wd != 0.0 and (name == "adagrad" or (name == "adax" and not flag))
    _compare(fused, ref, 2e-6, state_rtol=1e-5 if l2 else STATE_RTOL)


# ------------------------------------------------------------------------------------ GPU only
def _compiled_variants(kernel: Any) -> int:
    """Number of compiled binaries of a jit kernel (the cache layout differs across Triton versions)."""
    caches = getattr(kernel, "device_caches", None)
    if caches:
        return sum(len(entry[0]) for entry in caches.values())
    cache = getattr(kernel, "cache", None)
    if isinstance(cache, dict):
        return sum(len(v) for v in cache.values())
    pytest.skip(f"cannot read the compile cache of triton {triton.__version__}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_no_recompilation_when_lr_changes(name: str) -> None:
    device = _device("cuda")
    kw = next(kw for n, _, kw in CASES if n == name)
    kernel = KERNELS[name]
    prob = _problem(name, kw, [(1000,), (5000,)], torch.float32, device, n_steps=6)
    _run_both(name, kw, prob, lr_schedule=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # warm: compiles once
    before = _compiled_variants(kernel)
    _run_both(name, kw, prob, lr_schedule=[0.1 * 0.9 ** k for k in range(6)])
    _run_both(name, dict(kw, weight_decay=0.123), prob, lr_schedule=[1e-3 * (k + 1) for k in range(6)])
    assert _compiled_variants(kernel) == before


@pytest.mark.gpu
@pytest.mark.parametrize("grads_moved", [False, True], ids=["static-grads", "grads-allocated-in-capture"])
@pytest.mark.parametrize("name", ["tiger", "lion"])
def test_cuda_graph_capture(name: str, grads_moved: bool) -> None:
    """The step captured in a CUDA graph replays correctly with new gradients and a new lr each time.

    ``grads-allocated-in-capture``: the gradient buffers seen at capture time are not those of the
    warm-up (as when backward runs inside the graph), so the tables are built during the capture.
    """
    device = _device("cuda")
    kw = next(kw for n, _, kw in CASES if n == name and kw["weight_decay"] > 0)
    ref_fn, fused_fn, _ = OPTIMIZERS[name]
    prob = _problem(name, kw, [(3000,), (17,), (64, 33)], torch.float32, device, n_steps=4)
    params = [p.clone() for p in prob["params"]]
    states = [s.clone() for s in prob["states"][0]]
    static_grads = [torch.zeros_like(p) for p in params]
    lr_t = torch.tensor(0.01, device=device)
    steps = [torch.tensor(1.0)] * len(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the real tensors: compiles and builds the tables
        for _ in range(2):
            fused_fn(params, static_grads, states, steps, **dict(kw, lr=lr_t))
    torch.cuda.current_stream().wait_stream(side)
    if grads_moved:
        static_grads = [torch.zeros_like(p) for p in params]
    ref_p = [p.clone() for p in params]  # start the reference from the warmed-up tensors
    ref_s = [s.clone() for s in states]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_fn(params, static_grads, states, steps, **dict(kw, lr=lr_t))
    for k, grads in enumerate(prob["grads"]):
        lr = 0.05 / (k + 1)
        for sg, g in zip(static_grads, grads):
            sg.copy_(g)
        lr_t.fill_(lr)
        graph.replay()
        ref_fn(ref_p, grads, ref_s, steps, **dict(kw, lr=lr))
    torch.cuda.synchronize()
    _compare([params, states], [ref_p, ref_s], 1e-6)


@pytest.mark.gpu
def test_device_step_counts_are_capturable_scalars() -> None:
    """Step counts on the GPU (capturable): AdaX/Adagrad scalars come from device math, same numbers."""
    device = _device("cuda")
    for name in ("adax", "adagrad"):
        kw = next(kw for n, _, kw in CASES if n == name and kw.get("lr_decay", 1) != 0 and kw["maximize"])
        prob = _problem(name, kw, [(300,), (70,)], torch.float32, device, n_steps=1)
        ref_fn, fused_fn, _ = OPTIMIZERS[name]
        f = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
        r = [[p.clone() for p in prob["params"]]] + [[s.clone() for s in lst] for lst in prob["states"]]
        fused_fn(f[0], prob["grads"][0], *f[1:], [torch.tensor(3.0, device=device), torch.tensor(9.0,
                 device=device)], **kw)
        ref_fn(r[0], prob["grads"][0], *r[1:], [torch.tensor(3.0), torch.tensor(9.0)], **kw)
        _compare(f, r, 1e-6)


@pytest.mark.gpu
def test_large_tensor_and_many_small_tensors() -> None:
    """The default GPU tiles on one tensor past 2**24 elements and on 2,000 small tensors."""
    device = _device("cuda")
    kw = _tiger_cases()[1]
    for shapes in ([(2 ** 24 + 3,)], [(int(n),) for n in torch.randint(1, 3000, (2000,)).tolist()]):
        prob = _problem("tiger", kw, shapes, torch.bfloat16, device, n_steps=1)
        fused, ref = _run_both("tiger", kw, prob)
        _compare(fused, ref, 2.0 ** -7)
    assert math.isfinite(float(fused[0][0].float().sum()))
