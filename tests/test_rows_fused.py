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

from tigeropt import Adagrad, Tiger, _cpu
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
    # the sparse steps list ~4100 rows x 520 > 2 x 2^20 elements (the kernel's ROWS_MIN_PER_THREAD):
    # the kernel runs on two threads
    shape = (8200, 520)
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


def _c_sort(idx: torch.Tensor, rows: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    lib = cpu_rows._lib()
    n = idx.numel()
    sidx, order = torch.full((n,), -7, dtype=torch.int64), torch.full((n,), -7, dtype=torch.int64)
    err = lib.tigeropt_rows_sort(idx.data_ptr(), n, rows, sidx.data_ptr(), order.data_ptr())
    return err, sidx, order


@pytest.mark.parametrize("rows", [1, 2, 37, 2048, 2049, 1_000_003, 2**40 + 5, 2**62 + 1])
def test_c_sort_is_torchs_stable_sort(rows: int) -> None:
    """The kernel's index sort (radix: 1, 2 or 4 passes by the row count; merge sort when index and
    position need more than 64 bits: 2^62 rows) against torch.sort(stable=True): duplicates in input
    order, unsorted input, the first and last row, one entry, none."""
    gen = torch.Generator().manual_seed(rows % 1000)
    for n in (0, 1, 2, 5, 1000, 4099):
        draw = torch.randint(0, min(rows, 2**62), (n,), generator=gen)
        if rows > 2**40:  # spread over the whole range, not only the low bits
            draw = draw * (rows // 2**62 + 1) + torch.randint(0, 2**20, (n,), generator=gen)
            draw = draw.clamp(max=rows - 1)
        if n >= 5:
            draw[:3] = draw[n // 2]  # a run of repeats far apart from its other copy
            draw[3], draw[4] = 0, rows - 1  # first, last
        err, sidx, order = _c_sort(draw, rows)
        assert err == 0
        expected, expected_order = torch.sort(draw, stable=True)
        assert torch.equal(sidx, expected), (rows, n)
        assert torch.equal(order, expected_order), (rows, n)


def test_c_sort_refuses_out_of_range_before_writing() -> None:
    for bad in (-1, 10, 2**40):
        idx = torch.tensor([3, 1, bad, 3])
        err, sidx, order = _c_sort(idx, 10)
        assert err == -2
        assert (sidx == -7).all() and (order == -7).all()


@pytest.mark.parametrize("coalesced", [False, True])
@pytest.mark.parametrize("bad", [-1, 6])
def test_sparse_row_kernel_refuses_out_of_range_before_any_change(coalesced: bool, bad: int) -> None:
    """The kernel checks every index (unsorted: all of them; coalesced: the ends) before it updates a
    row: IndexError naming the index, p and state unchanged (the optimizers check first too:
    check_sparse_rows; this is the kernel's own guard)."""
    hyper = dict(lr=0.1, beta=0.9, weight_decay=0.1, maximize=False)
    p, m = torch.randn(6, 3), torch.randn(6, 3)
    p0, m0 = p.clone(), m.clone()
    rows = [bad, 0, 5, 2] if not coalesced else ([bad, 0, 2] if bad < 0 else [0, 2, bad])
    g = torch.sparse_coo_tensor(torch.tensor([rows]), torch.ones(len(rows), 3), (6, 3),
                                check_invariants=False, is_coalesced=coalesced)
    with pytest.raises(IndexError, match=f"row index {bad} out of range for 6 rows"):
        cpu_rows.fused_rows("tiger", p, g, [m], torch.tensor(1.0), hyper)
    assert torch.equal(p, p0) and torch.equal(m, m0)


@pytest.mark.parametrize("name,cls,kwargs", [OPTIMIZERS[0], OPTIMIZERS[3], OPTIMIZERS[-1]],
                         ids=["tiger", "adax", "rowwise"])
def test_repeats_summed_in_groups_match_reference(name: str, cls: type, kwargs: dict) -> None:
    """Repeated indices are summed when their group of rows is full: groups of only repeats, repeats
    that cancel (all zero: the row drops out of its group, untouched) next to ones that do not, in
    every position of a group, many copies of one row, on unsorted input; against the reference
    (bit for bit for Tiger)."""
    rows, dim = 40, 70
    gen = torch.Generator().manual_seed(3)
    idx, vals = [], []
    for r in range(0, rows, 3):
        copies = 1 + r % 4
        v = torch.randn(copies, dim, generator=gen)
        if r % 9 == 0:  # cancelling copies (a, -a, a, -a: each partial sum exact) or one zero row
            a = torch.randn(1, dim, generator=gen)
            v = torch.cat([a, -a] * (copies // 2)) if copies > 1 else torch.zeros(1, dim)
        idx += [r] * len(v)
        vals.append(v)
    idx += [7] * 9  # many copies of one row
    vals.append(torch.randn(9, dim, generator=gen))
    perm = torch.randperm(len(idx), generator=gen)
    g = torch.sparse_coo_tensor(torch.tensor([idx])[:, perm], torch.cat(vals)[perm], (rows, dim))
    assert not g.is_coalesced()
    W_ref, st_ref = _run(cls, kwargs, (rows, dim), torch.float32, [stable_coalesce(g)] * 2, "coalesced",
                         dict(foreach=False))
    W_c, st_c = _run(cls, kwargs, (rows, dim), torch.float32, [g] * 2, "uncoalesced", {})
    if name == "tiger":
        assert torch.equal(W_c, W_ref)
        for k in st_ref:
            assert torch.equal(st_c[k], st_ref[k])
    else:
        torch.testing.assert_close(W_c, W_ref, atol=1e-6, rtol=1e-6)
        for k in st_ref:
            torch.testing.assert_close(st_c[k], st_ref[k], atol=1e-6, rtol=1e-6)
    W0 = torch.randn((rows, dim), generator=torch.Generator().manual_seed(1))
    untouched = [r for r in range(rows) if (r % 3 or r % 9 == 0) and r != 7]
    assert torch.equal(W_c[untouched], W0[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rowwise_interleaved_rows_equal_the_dense_step_bitwise(dtype: torch.dtype) -> None:
    """Row-wise Adagrad: the lazy rows (a group's rows summed and updated 64 elements of each in turn) and
    the dense step (every row, one after the other) give the same bits when every row is touched: the
    interleaved partial sums are the one-pass sums (517 elements: 8 chunks and a tail)."""
    shape = (37, 517)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    out = []
    for lazy in (True, False):
        W = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
        opt = Adagrad([W], lr=0.1, lr_decay=0.2, initial_accumulator_value=0.3, rowwise=True, lazy=lazy)
        for g in grads:
            W.grad = g
            opt.step()
        out.append((W.detach().clone(), opt.state[W]["sum"].clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("coalesced", [True, False], ids=["coalesced", "uncoalesced"])
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=IDS)
def test_listed_zero_rows_dropped_in_every_group_position(name: str, cls: type, kwargs: dict,
                                                          coalesced: bool) -> None:
    """A sparse gradient's listed rows are checked for a non-zero when their group of rows is full: listed
    all-zero rows (+0.0 and -0.0) in every position of a group of 4 and of a 16-row scheduling block, a
    whole block of them, the first and last table rows, a row whose only non-zero is its last element, a
    row count not a multiple of the group; the zero rows stay untouched (their state too), the others get
    the reference update (bit for bit for Tiger and Lion)."""
    rows, dim = 61, 67
    gen = torch.Generator().manual_seed(11)
    listed = list(range(53))  # 53 listed rows: not a multiple of 4 or 16
    listed[-1] = rows - 1
    zero = {0, 5, 10, 15, 19, rows - 1} | set(range(32, 48))  # group positions 0..3, a whole 16-row block
    vals = torch.randn(len(listed), dim, generator=gen)
    for k, r in enumerate(listed):
        if r in zero:
            vals[k] = -0.0 if r % 2 else 0.0
    last_only = listed.index(23)
    vals[last_only] = 0.0
    vals[last_only, -1] = 0.5
    if coalesced:
        g = torch.sparse_coo_tensor(torch.tensor([listed]), vals, (rows, dim), is_coalesced=True)
    else:
        perm = torch.randperm(len(listed), generator=gen)
        g = torch.sparse_coo_tensor(torch.tensor([listed])[:, perm], vals[perm], (rows, dim))
    W_ref, st_ref = _run(cls, kwargs, (rows, dim), torch.float32, [stable_coalesce(g)] * 2, "coalesced",
                         dict(foreach=False))
    mode = "coalesced" if coalesced else "uncoalesced"
    W_c, st_c = _run(cls, kwargs, (rows, dim), torch.float32, [g] * 2, mode, {})
    if name.startswith(("tiger", "lion")):
        assert torch.equal(W_c, W_ref)
        for k in st_ref:
            assert torch.equal(st_c[k], st_ref[k]), k
    else:
        torch.testing.assert_close(W_c, W_ref, atol=1e-6, rtol=1e-6)
        for k in st_ref:
            torch.testing.assert_close(st_c[k], st_ref[k], atol=1e-6, rtol=1e-6)
    W0 = torch.randn((rows, dim), generator=torch.Generator().manual_seed(1))
    untouched = sorted(zero | (set(range(rows)) - set(listed)))
    assert torch.equal(W_c[untouched], W0[untouched])
    assert not torch.equal(W_c[23], W0[23])
