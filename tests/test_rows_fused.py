"""The fused C row kernel (lazy rows and sparse gradients on the default CPU path) against the reference.

The reference path (``foreach=False``) gathers the touched rows, runs ``_single_tensor_<name>`` on them
and scatters them back; the default CPU path runs ``tigeropt_rows`` (``tigeropt._cpu.rows``): one pass
that sums duplicate sparse rows itself and skips rows whose gradient is zero.  Tiger and Lion must match
bit for bit; the optimizers with a square root within an ulp of it (the C sqrt is correctly rounded,
torch's vectorized sqrt sometimes is not).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rows_cases import IDS, OPTIMIZERS, sparse_grads, stable_coalesce

from tigeropt import Tiger, _cpu
from tigeropt._cpu import rows as cpu_rows

if _cpu._find_compiler() is None or not _cpu.available():
    pytest.skip("the fused CPU step cannot be built here", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16] + (
    [torch.float16] if _cpu.supports("tiger", torch.float16) else [])
TOL = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-14, 1e-13), torch.bfloat16: (1e-6, 8e-3),
       torch.float16: (1e-6, 1e-3)}
# rows: 1, 17 and 35 (not multiples of the kernel's 16-row scheduling block); 513 > the 512-element
# conversion block of low-precision rows
SHAPES = [(1, 3), (17, 5), (35, 513)]


def _run(cls: type, kwargs: dict, shape: tuple[int, int], dtype: torch.dtype, grads: list[torch.Tensor],
         mode: str, path: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    opt = cls([W], lazy=True, **kwargs, **path)
    for g in grads:
        if mode == "dense":
            W.grad = g.to_dense()
        elif mode == "coalesced":
            W.grad = stable_coalesce(g)
        else:
            W.grad = g
        opt.step()
    return W.detach().clone(), {k: v.clone() for k, v in opt.state[W].items()}


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The results of every call of the C row launcher (True: the kernel did the update)."""
    calls: list[bool] = []
    original = cpu_rows.fused_rows

    def spy(*args: Any, **kwargs: Any) -> bool:
        calls.append(original(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(cpu_rows, "fused_rows", spy)
    return calls


@pytest.mark.parametrize("mode", ["uncoalesced", "coalesced", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_fused_rows_equal_reference(name: str, cls: type, kwargs: dict, dtype: torch.dtype, mode: str,
                                    kernel_calls: list[bool]) -> None:
    for shape in SHAPES:
        grads = sparse_grads(*shape, dtype, steps=4, seed=shape[0])
        W_ref, st_ref = _run(cls, kwargs, shape, dtype, [stable_coalesce(g) for g in grads], mode,
                             dict(foreach=False))
        assert not kernel_calls
        W_c, st_c = _run(cls, kwargs, shape, dtype, grads, mode, {})
        assert kernel_calls and all(kernel_calls)  # the C kernel did every step
        kernel_calls.clear()
        if name.startswith(("tiger", "lion")):
            assert torch.equal(W_c, W_ref), shape
            for k in st_ref:
                assert torch.equal(st_c[k], st_ref[k]), (shape, k)
        else:
            atol, rtol = TOL[dtype]
            torch.testing.assert_close(W_c, W_ref, atol=atol, rtol=rtol)
            for k in st_ref:
                torch.testing.assert_close(st_c[k], st_ref[k], atol=atol, rtol=max(rtol, 1e-6))
        # rows never touched (and the cancelled / zero rows when no step touched them) are unchanged
        start = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        touched = torch.zeros(shape[0], dtype=torch.bool)
        for g in grads:
            c = g.coalesce()
            if c._nnz():
                touched[c.indices()[0][c.values().flatten(1).ne(0).any(1)]] = True
        assert torch.equal(W_c[~touched], start[~touched])


@pytest.mark.parametrize("name,cls,kwargs", [OPTIMIZERS[0], OPTIMIZERS[3], OPTIMIZERS[-1]],
                         ids=["tiger", "adax", "rowwise"])
def test_fused_rows_two_threads_equal_one(name: str, cls: type, kwargs: dict) -> None:
    shape = (301, 257)  # > 2 x 32768 elements: the kernel runs on two threads
    grads = sparse_grads(*shape, torch.float32, steps=3, seed=7)
    out = []
    previous = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            for mode in ("uncoalesced", "dense"):
                out.append(_run(cls, kwargs, shape, torch.float32, grads, mode, {}))
        finally:
            torch.set_num_threads(previous)
    for W, st in out[1:]:
        assert torch.equal(W, out[0][0])
        for k in st:
            assert torch.equal(st[k], out[0][1][k])


def test_fused_rows_refuses_what_it_cannot_take() -> None:
    hyper = dict(lr=0.1, beta=0.9, weight_decay=0.0, maximize=False)
    p, m = torch.zeros(4, 3), torch.zeros(4, 3)
    step = torch.tensor(1.0)
    assert not cpu_rows.fused_rows("tiger", p.t(), torch.ones(3, 4), [m.t()], step, hyper)  # not contiguous
    assert not cpu_rows.fused_rows("tiger", p, torch.ones(4, 3, dtype=torch.float64), [m], step, hyper)
    assert not cpu_rows.fused_rows("tiger", p, torch.ones(4, 3), [m], step, dict(hyper, nan_guard=True))
    assert not cpu_rows.fused_rows("nope", p, torch.ones(4, 3), [m], step, hyper)
    assert torch.equal(p, torch.zeros(4, 3))
    bad = torch.sparse_coo_tensor(torch.tensor([[5]]), torch.ones(1, 3), (6, 3))  # row 5 of a 4-row table
    with pytest.raises(IndexError, match="row index 5 out of range for 4 rows"):
        cpu_rows.fused_rows("tiger", p, torch.sparse_coo_tensor(bad._indices(), bad._values(), (4, 3),
                                                                check_invariants=False), [m], step, hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_scan_finds_exactly_the_rows_with_a_non_zero(dtype: torch.dtype) -> None:
    """The kernel's row scan (64-element blocks) against the rule: a single non-zero anywhere in a row
    (first element, block edges, the tail), NaN or inf touch it; -0.0 does not."""
    dim = 130  # two full 64-element blocks and a tail of 2
    positions = [0, 63, 64, 127, 128, 129]
    g = torch.zeros(len(positions) + 5, dim, dtype=dtype)
    for r, j in enumerate(positions):
        g[r, j] = 0.5
    r = len(positions)
    g[r] = -0.0  # all -0.0: untouched
    g[r + 1, 70] = float("nan")
    g[r + 2, 129] = float("-inf")
    g[r + 3, 5] = -0.0  # one -0.0 in a zero row: untouched
    # row r + 4 stays all zero
    W0 = torch.randn(g.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    W = W0.clone().requires_grad_()
    opt = Tiger([W], lr=0.1, weight_decay=0.1, lazy=True)
    W.grad = g
    opt.step()
    changed = (W.detach() != W0).any(dim=1).tolist()
    expected = [True] * len(positions) + [False, True, True, False, False]
    assert changed == expected
