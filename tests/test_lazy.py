"""Lazy rows: the native ``lazy=True`` option of every tigeropt optimizer, and ``LazyOptimizer``.

The promise (SPEC.md, "Lazy embedding updates"): a row (slice along dim 0) whose gradient is all zero in a
step keeps its value and its state bit-exactly; a touched row changes exactly as the dense optimizer would
change it, with the step count kept per parameter.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from textbook import tiger as textbook_tiger

from tigeropt import Adagrad, AdaX, Lion, Tiger
from tigeropt.lazy import LazyOptimizer, embedding_weights

F64 = torch.float64



# (name, class, hyperparameters): large lr and weight decay so that any wrong row shows up.
NATIVE = [
    ("tiger", Tiger, dict(lr=0.1, beta=0.9, weight_decay=0.1)),
    ("lion", Lion, dict(lr=0.1, betas=(0.8, 0.95), weight_decay=0.1)),
    ("adax", AdaX, dict(lr=0.05, weight_decay=0.1)),
    ("adax_w", AdaX, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adagrad", Adagrad, dict(lr=0.1, weight_decay=0.1, lr_decay=0.2, initial_accumulator_value=0.3)),
    ("glove", Adagrad, dict(lr=0.05, glove=True, grad_clip_value=0.5, weight_decay=0.1)),
    ("adagrad_rowwise", Adagrad, dict(lr=0.1, weight_decay=0.1, lr_decay=0.2, initial_accumulator_value=0.3,
                                      rowwise=True)),
]
NATIVE_IDS = [n for n, _, _ in NATIVE]
PATHS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "default": {}}
ROWS, DIM = 9, 3


def touched_grads(steps: int, seed: int = 0,
                  dtype: torch.dtype = F64) -> list[tuple[torch.Tensor, list[int]]]:
    """Dense (ROWS, DIM) gradients, each non-zero on a few rows only (one touched row has some zeros)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        rows = sorted(set(torch.randint(0, ROWS - 2, (3,), generator=gen).tolist()) | {s % 3})
        g = torch.zeros(ROWS, DIM, dtype=dtype)
        g[rows] = torch.randn(len(rows), DIM, generator=gen, dtype=dtype)
        g[rows[0], 0] = 0.0  # a touched row with a zero component is still touched as a whole
        out.append((g, rows))
    return out


def dense_on_rows(cls: type, kwargs: dict[str, Any], W: torch.Tensor, state: dict[str, torch.Tensor],
                  step: float, grad: torch.Tensor, rows: list[int]) -> None:
    """The dense (non-lazy) optimizer applied to the touched rows alone, with the table's step count.

    Updates ``W`` and ``state`` in place at ``rows``; every other row is left as it is.
    """
    sub = W[rows].clone().requires_grad_()
    opt = cls([sub], **kwargs)  # a plain dense optimizer, default (fastest) path
    opt.state[sub] = {"step": torch.tensor(step, dtype=torch.float32),
                      **{k: v[rows].clone() for k, v in state.items()}}
    sub.grad = grad[rows].clone()
    opt.step()
    W[rows] = sub.detach()
    for k in state:
        state[k][rows] = opt.state[sub][k]


# ------------------------------------------------------------------------------------------ native lazy
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_native_lazy_rows_equal_dense_update_of_touched_rows(name: str, cls: type, kwargs: dict, path: str
                                                             ) -> None:
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(ROWS, DIM, generator=gen, dtype=F64)
    W = W0.clone().requires_grad_()
    opt = cls([W], lazy=True, **kwargs, **PATHS[path])
    ref_W = W0.clone()
    ref_state: dict[str, torch.Tensor] | None = None
    for t, (g, rows) in enumerate(touched_grads(6)):
        before_p = W.detach().clone()
        before_state = {k: v.clone() for k, v in opt.state[W].items() if k != "step"}
        W.grad = g
        opt.step()
        if ref_state is None:  # the state a fresh optimizer gives a parameter
            ref_state = {k: _initial_state(opt, k, W) for k in opt.state[W] if k != "step"}
        dense_on_rows(cls, kwargs, ref_W, ref_state, float(t), g, rows)
        untouched = [i for i in range(ROWS) if i not in rows]
        # untouched rows: parameter and state unchanged, bit for bit
        assert torch.equal(W.detach()[untouched], before_p[untouched])
        for k, v in before_state.items():
            assert torch.equal(opt.state[W][k][untouched], v[untouched]), k
        # touched rows: the dense optimizer's update of those rows
        torch.testing.assert_close(W.detach(), ref_W, rtol=1e-12, atol=1e-12)
        for k, v in ref_state.items():
            torch.testing.assert_close(opt.state[W][k], v, rtol=1e-12, atol=1e-12)
        assert float(opt.state[W]["step"]) == t + 1  # the step count is per parameter


def _initial_state(opt: torch.optim.Optimizer, key: str, W: torch.Tensor) -> torch.Tensor:
    group = opt.param_groups[0]
    value = group.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
    return torch.full(opt.state[W][key].shape, value, dtype=opt.state[W][key].dtype)


@pytest.mark.parametrize("name,cls,kwargs", [NATIVE[0], NATIVE[1]], ids=NATIVE_IDS[:2])
def test_native_lazy_sign_optimizers_follow_textbook_per_row(name: str, cls: type, kwargs: dict) -> None:
    """Tiger/Lion do not use the step count, so each row follows the textbook rule on its own gradients."""
    from textbook import lion as textbook_lion

    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(ROWS, DIM, generator=gen, dtype=F64)
    W = W0.clone().requires_grad_()
    opt = cls([W], lazy=True, **kwargs)
    grads = touched_grads(7, seed=3)
    for g, _ in grads:
        W.grad = g
        opt.step()
    for i in range(ROWS):
        own = [g[i] for g, rows in grads if i in rows]
        if not own:
            assert torch.equal(W.detach()[i], W0[i])
            continue
        if name == "tiger":
            expected = textbook_tiger(W0[i], own, lr=kwargs["lr"], beta=kwargs["beta"],
                                      wd=kwargs["weight_decay"])[-1][0]
        else:
            b1, b2 = kwargs["betas"]
            expected = textbook_lion(W0[i], own, lr=kwargs["lr"], b1=b1, b2=b2,
                                     wd=kwargs["weight_decay"])[-1][0]
        torch.testing.assert_close(W.detach()[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_paths_give_the_same_lazy_result(name: str, cls: type, kwargs: dict) -> None:
    results = []
    for path in PATHS.values():
        W = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(5)).requires_grad_()
        opt = cls([W], lazy=True, **kwargs, **path)
        for g, _ in touched_grads(4, dtype=torch.float32):
            W.grad = g
            opt.step()
        results.append((W.detach().clone(), {k: v.clone() for k, v in opt.state[W].items()}))
    # reference == foreach bit for bit; the default CPU path (fused C row kernel) too for the sign
    # optimizers, and within an ulp of a square root for the others (the C kernel's sqrt is correctly
    # rounded, torch's vectorized CPU sqrt sometimes is not)
    exact = name in ("tiger", "lion")
    for i, (W, state) in enumerate(results[1:], start=1):
        if exact or i == 1:
            assert torch.equal(W, results[0][0])
            for k, v in state.items():
                assert torch.equal(v, results[0][1][k])
        else:
            torch.testing.assert_close(W, results[0][0], rtol=1e-6, atol=1e-6)
            for k, v in state.items():
                torch.testing.assert_close(v, results[0][1][k], rtol=1e-6, atol=1e-7)


def _embedding_pair(bag: bool, padding_idx: int | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(3)
    if bag:
        dense = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=False).double()
        sparse = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=True).double()
    else:
        dense = torch.nn.Embedding(ROWS, DIM, sparse=False, padding_idx=padding_idx).double()
        sparse = torch.nn.Embedding(ROWS, DIM, sparse=True, padding_idx=padding_idx).double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("kind", ["embedding", "padded", "bag"])
@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_dense_lazy_equals_sparse_lazy(name: str, cls: type, kwargs: dict, kind: str) -> None:
    dense, sparse = _embedding_pair(kind == "bag", padding_idx=0 if kind == "padded" else None)
    opts = [cls(m.parameters(), lazy=True, **kwargs) for m in (dense, sparse)]
    untouched_rows = [ROWS - 2, ROWS - 1]  # never in the inputs
    start = dense.weight.detach().clone()
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        idx = torch.randint(0, ROWS - 2, (3, 4), generator=gen)
        idx[0, :2] = idx[1, 0]  # duplicates: their gradients add up
        target = torch.randn(3, DIM, generator=gen, dtype=F64)
        for m, o in zip((dense, sparse), opts):
            o.zero_grad()
            out = m(idx) if kind == "bag" else m(idx).sum(1)
            ((out - target) ** 2).sum().backward()
            o.step()
        assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-12, atol=1e-12)
    for k, v in opts[0].state[dense.weight].items():
        torch.testing.assert_close(opts[1].state[sparse.weight][k], v, rtol=1e-12, atol=1e-12)
    for m in (dense, sparse):
        assert torch.equal(m.weight.detach()[untouched_rows], start[untouched_rows])
        if kind == "padded":
            assert torch.equal(m.weight.detach()[0], start[0])  # the padding row never gets gradient


@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_sparse_duplicates_are_summed(name: str, cls: type, kwargs: dict) -> None:
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(8), dtype=F64)
    a, b = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    oa, ob = cls([a], lazy=True, **kwargs), cls([b], lazy=True, **kwargs)
    idx = torch.tensor([[4, 1, 4, 4]])
    vals = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.3, 0.3], [-0.25, 1.0, 2.0], [0.5, 0.5, -4.0]], dtype=F64)
    a.grad = torch.sparse_coo_tensor(idx, vals, (ROWS, DIM), check_invariants=True)  # uncoalesced: row 4 x3
    assert not a.grad.is_coalesced()
    dense = torch.zeros(ROWS, DIM, dtype=F64)
    dense[4] = vals[0] + vals[2] + vals[3]
    dense[1] = vals[1]
    b.grad = dense
    oa.step()
    ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=1e-14)
    assert not torch.equal(a.detach()[4], W0[4])


@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX])
def test_sparse_grad_without_lazy_names_the_fix(cls: type) -> None:
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="lazy=True"):
        opt.step()


@pytest.mark.parametrize("glove", [False, True])
def test_adagrad_sparse_without_lazy_equals_lazy(glove: bool) -> None:
    """Adagrad takes sparse gradients in a plain group, with the lazy semantics (as torch's Adagrad)."""
    results = []
    for lazy in (False, True):
        emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM) / 10)
        opt = Adagrad(emb.parameters(), lr=0.1, glove=glove, lazy=lazy)
        for i in range(3):
            opt.zero_grad()
            emb(torch.tensor([i, 3, 3])).pow(2).sum().backward()
            opt.step()
        results.append(emb.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    untouched = torch.arange(15, ROWS * DIM, dtype=torch.float32).reshape(-1, DIM) / 10
    assert torch.equal(results[0][5:], untouched)


def test_lazy_group_next_to_dense_group_and_small_tensors() -> None:
    """Only lazy groups are lazy; a 1-D tensor's rows are its elements; a 0-d tensor is one row."""
    W = torch.ones(4, 2, dtype=F64, requires_grad=True)
    v = torch.ones(4, dtype=F64, requires_grad=True)
    s = torch.ones((), dtype=F64, requires_grad=True)
    s2 = torch.ones((), dtype=F64, requires_grad=True)
    D = torch.ones(4, 2, dtype=F64, requires_grad=True)
    opt = Tiger([{"params": [W, v, s, s2], "lazy": True}, {"params": [D]}], lr=0.1, weight_decay=0.5)
    g = torch.zeros(4, 2, dtype=F64)
    g[1] = 1.0
    W.grad, D.grad = g.clone(), g.clone()
    v.grad = torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=F64)
    s.grad = torch.tensor(0.0, dtype=F64)
    s2.grad = torch.tensor(-3.0, dtype=F64)
    opt.step()
    # touched: m = 0.035*g > 0, p = 1 - 0.1*(1 + 0.5*1) = 0.85; untouched lazy rows stay 1
    assert W.detach().tolist() == [[1, 1], [0.85, 0.85], [1, 1], [1, 1]]
    assert v.detach().tolist() == [1, 1, 0.85, 1]
    assert s.detach().item() == 1.0 and opt.state[s]["exp_avg"].item() == 0.0  # zero gradient: untouched
    torch.testing.assert_close(s2.detach(), torch.tensor(1 - 0.1 * (-1 + 0.5), dtype=F64))  # 1.05
    assert float(opt.state[s]["step"]) == float(opt.state[s2]["step"]) == 1  # the count is per tensor
    torch.testing.assert_close(D.detach()[0], torch.tensor([0.95, 0.95], dtype=F64))  # dense rows decay


# ------------------------------------------------------------------------------ "touched" = non-zero gradient
def _zero_listed_sparse(dtype: torch.dtype = F64) -> torch.Tensor:
    """Sparse gradient listing rows 2 (all-zero values), 5 (duplicates that cancel) and 4 (non-zero)."""
    idx = torch.tensor([[2, 5, 4, 5, 2]])
    vals = torch.tensor([[0.0, 0.0, 0.0], [1.5, -2.0, 0.25], [0.5, -1.0, 2.0], [-1.5, 2.0, -0.25],
                         [0.0, -0.0, 0.0]], dtype=dtype)
    return torch.sparse_coo_tensor(idx, vals, (ROWS, DIM), check_invariants=True)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_sparse_rows_with_zero_gradient_are_untouched(name: str, cls: type, kwargs: dict, path: str) -> None:
    """Issue 10 item 2: a listed row whose coalesced gradient is zero does not move, like dense-lazy."""
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(21), dtype=F64)
    a, b = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    oa, ob = cls([a], lazy=True, **kwargs, **PATHS[path]), cls([b], lazy=True, **kwargs, **PATHS[path])
    for _ in range(5):
        a.grad = _zero_listed_sparse()
        b.grad = a.grad.to_dense()
        oa.step()
        ob.step()
    assert torch.equal(a.detach()[[2, 5]], W0[[2, 5]])
    assert not torch.equal(a.detach()[4], W0[4])
    assert torch.equal(a.detach(), b.detach())  # sparse-lazy == dense-lazy, bit for bit
    for k, v in oa.state[a].items():
        assert torch.equal(v, ob.state[b][k]), k


@pytest.mark.parametrize("glove", [False, True])
def test_adagrad_plain_sparse_rows_with_zero_gradient_are_untouched(glove: bool) -> None:
    """Adagrad's sparse path without lazy=True: L2 weight decay would move a listed zero row."""
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(22), dtype=F64)
    W = W0.clone().requires_grad_()
    opt = Adagrad([W], lr=0.1, weight_decay=0.5, glove=glove)
    for _ in range(3):
        W.grad = _zero_listed_sparse()
        opt.step()
    assert torch.equal(W.detach()[[2, 5]], W0[[2, 5]])
    init = opt.param_groups[0]["initial_accumulator_value"]
    assert opt.state[W]["sum"][[2, 5]].eq(init).all()
    assert not torch.equal(W.detach()[4], W0[4])


def test_tiger_sparse_padding_row_does_not_drift() -> None:
    """The issue's case: a masked pad token (no padding_idx) gives its row zero values: no drift."""
    emb = torch.nn.Embedding(ROWS, DIM, sparse=True)
    start = emb.weight.detach().clone()
    opt = Tiger(emb.parameters(), lr=0.01, lazy=True)
    idx = torch.tensor([[0, 3, 3, 0]])
    mask = (idx != 0).unsqueeze(-1).float()
    for _ in range(100):
        opt.zero_grad()
        (emb(idx) * mask).sum().backward()
        opt.step()
    assert torch.equal(emb.weight.detach()[0], start[0])
    assert not torch.equal(emb.weight.detach()[3], start[3])


def test_lazy_optimizer_sparse_rows_with_zero_gradient_are_untouched() -> None:
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(23), dtype=F64)
    a, b = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    oa, ob = LazyOptimizer(_adamw([a]), [a]), LazyOptimizer(_adamw([b]), [b])
    for _ in range(3):
        a.grad = _zero_listed_sparse()
        b.grad = a.grad.to_dense()
        oa.step()
        ob.step()
    assert torch.equal(a.detach()[[2, 5]], W0[[2, 5]])
    assert torch.equal(a.detach(), b.detach())
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(oa.state[a][k], ob.state[b][k])
        assert oa.state[a][k][[2, 5]].eq(0).all()


@pytest.mark.parametrize("wrapped", [False, True])
def test_zero_dim_parameter_is_one_row(wrapped: bool) -> None:
    """One rule for a 0-d parameter, native lazy=True and LazyOptimizer: updated iff its gradient != 0."""
    s = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ref = torch.tensor(1.0, dtype=F64, requires_grad=True)
    if wrapped:
        opt: torch.optim.Optimizer = LazyOptimizer(_adamw([s]), [s])
        dense: torch.optim.Optimizer = _adamw([ref])
    else:
        opt = Tiger([s], lr=0.1, weight_decay=0.5, lazy=True)
        dense = Tiger([ref], lr=0.1, weight_decay=0.5)
    s.grad = torch.tensor(2.0, dtype=F64)
    ref.grad = torch.tensor(2.0, dtype=F64)
    opt.step()
    dense.step()
    assert torch.equal(s.detach(), ref.detach()) and s.item() != 1.0
    after, m = s.item(), opt.state[s]["exp_avg"].clone()
    s.grad = torch.tensor(0.0, dtype=F64)
    opt.step()  # zero gradient: no decay, no momentum step
    assert s.item() == after and torch.equal(opt.state[s]["exp_avg"], m)
    assert float(opt.state[s]["step"]) == 2  # the tensor's step keeps counting


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_lazy_keeps_untouched_rows_and_fp32_state(dtype: torch.dtype) -> None:
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(9)).to(dtype)
    W = W0.clone().requires_grad_()
    dense = W0.clone().requires_grad_()
    opt = Tiger([W], lr=0.05, lazy=True)
    dense_opt = Tiger([dense], lr=0.05)
    g, rows = touched_grads(1, dtype=torch.float32)[0]
    W.grad = g.to(dtype)
    dense.grad = g.to(dtype)
    opt.step()
    dense_opt.step()
    assert opt.state[W]["exp_avg"].dtype == torch.float32
    untouched = [i for i in range(ROWS) if i not in rows]
    assert torch.equal(W.detach()[untouched], W0[untouched])
    assert torch.equal(W.detach()[rows], dense.detach()[rows])  # same fp32 math, same rounding


def test_complex_lazy_rows() -> None:
    W0 = torch.randn(ROWS, DIM, dtype=torch.complex128, generator=torch.Generator().manual_seed(10))
    W = W0.clone().requires_grad_()
    opt = Lion([W], lr=0.1, weight_decay=0.1, lazy=True)
    real = torch.view_as_real(W0).clone().requires_grad_()
    real_opt = Lion([real], lr=0.1, weight_decay=0.1)
    g = torch.zeros(ROWS, DIM, dtype=torch.complex128)
    g[2] = torch.tensor([1 + 1j, -2j, 0.5])
    W.grad = g
    real.grad = torch.view_as_real(g).clone()
    opt.step()
    real_opt.step()
    assert torch.equal(torch.view_as_real(W.detach())[2], real.detach()[2])
    assert torch.equal(W.detach()[[0, 1, 3]], W0[[0, 1, 3]])


def test_lazy_group_with_empty_tensor() -> None:
    E = torch.zeros(0, 3, requires_grad=True)
    W = torch.ones(2, 3, requires_grad=True)
    opt = Tiger([E, W], lazy=True, lr=0.1)
    E.grad = torch.zeros(0, 3)
    W.grad = torch.ones(2, 3)
    opt.step()
    assert E.shape == (0, 3)
    torch.testing.assert_close(W.detach(), torch.full((2, 3), 1 - 0.1 * 1.01))


# ------------------------------------------------------------------------------------------ LazyOptimizer
def _adamw(params: Any, **kw: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, **{**dict(lr=0.05, weight_decay=0.1, foreach=False), **kw})


@pytest.mark.parametrize("amsgrad", [False, True])
def test_lazy_adamw_rows_equal_adamw_on_touched_rows(amsgrad: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    W0 = torch.randn(ROWS, DIM, generator=gen, dtype=F64)
    W = W0.clone().requires_grad_()
    opt = LazyOptimizer(_adamw([W], amsgrad=amsgrad), params=[W])
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    ref_W = W0.clone()
    ref_state = {k: torch.zeros(ROWS, DIM, dtype=F64) for k in keys}
    for t, (g, rows) in enumerate(touched_grads(5, seed=12)):
        before_p = W.detach().clone()
        before_state = {k: opt.state[W][k].clone() for k in keys} if opt.state[W] else ref_state
        W.grad = g
        opt.step()
        untouched = [i for i in range(ROWS) if i not in rows]
        assert torch.equal(W.detach()[untouched], before_p[untouched])
        for k in keys:
            assert torch.equal(opt.state[W][k][untouched], before_state[k][untouched])
        # reference: torch's AdamW on the touched rows alone, with the tensor's step count
        sub = ref_W[rows].clone().requires_grad_()
        ref = _adamw([sub], amsgrad=amsgrad)
        ref.state[sub] = {"step": torch.tensor(float(t)),
                          **{k: v[rows].clone() for k, v in ref_state.items()}}
        sub.grad = g[rows]
        ref.step()
        ref_W[rows] = sub.detach()
        for k in keys:
            ref_state[k][rows] = ref.state[sub][k]
        torch.testing.assert_close(W.detach(), ref_W, rtol=1e-13, atol=1e-13)
        for k in keys:
            torch.testing.assert_close(opt.state[W][k], ref_state[k], rtol=1e-13, atol=1e-13)
        assert float(opt.state[W]["step"]) == t + 1  # torch's per-tensor step keeps counting


def test_lazy_wrapper_of_tiger_equals_native_lazy() -> None:
    gen = torch.Generator().manual_seed(13)
    W0 = torch.randn(ROWS, DIM, generator=gen, dtype=F64)
    a, b = W0.clone().requires_grad_(), W0.clone().requires_grad_()
    wrapped = LazyOptimizer(Tiger([a], lr=0.1, weight_decay=0.1), [a])
    native = Tiger([b], lr=0.1, weight_decay=0.1, lazy=True)
    for g, _ in touched_grads(6, seed=14):
        a.grad, b.grad = g, g.clone()
        wrapped.step()
        native.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(wrapped.state[a]["exp_avg"], native.state[b]["exp_avg"],
                               rtol=1e-13, atol=1e-13)


ROWWISE = dict(lr=0.1, weight_decay=0.1, lr_decay=0.2, initial_accumulator_value=0.3, rowwise=True)


def test_lazy_wrapper_restores_per_row_state_of_rowwise_adagrad() -> None:
    """Row-wise Adagrad's ``sum`` has one element per row (shape (rows,)): the wrapper restores it for
    untouched rows, so the wrapped dense step equals the native lazy step, and a checkpoint taken
    mid-way round-trips and resumes the identical trajectory."""
    gen = torch.Generator().manual_seed(15)
    W0 = torch.randn(ROWS, DIM, generator=gen, dtype=F64)
    a, b, c = (W0.clone().requires_grad_() for _ in range(3))
    wrapped = LazyOptimizer(Adagrad([a], **ROWWISE), [a])
    native = Adagrad([b], **ROWWISE, lazy=True)
    grads = [(torch.ones(ROWS, DIM, dtype=F64), list(range(ROWS)))] + touched_grads(8, seed=16)
    for i, (g, rows) in enumerate(grads):  # (the first step touches every row: state exists for all)
        a.grad, b.grad = g, g.clone()
        sum_before = wrapped.state[a]["sum"].clone() if wrapped.state else None
        wrapped.step()
        native.step()
        assert wrapped.state[a]["sum"].shape == (ROWS,)
        if sum_before is not None:  # weight decay would move every row's accumulator: untouched ones keep it
            untouched = [r for r in range(ROWS) if r not in rows]
            assert torch.equal(wrapped.state[a]["sum"][untouched], sum_before[untouched])
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(wrapped.state[a]["sum"], native.state[b]["sum"], rtol=1e-13, atol=1e-13)
        if i == 3:  # checkpoint: round trip into a fresh wrapper, which then continues on c
            buf = io.BytesIO()
            torch.save(wrapped.state_dict(), buf)
            c.data.copy_(a.detach())
            resumed = LazyOptimizer(Adagrad([c], **ROWWISE), [c])
            resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
            saved, loaded = wrapped.state_dict(), resumed.state_dict()
            assert saved["param_groups"] == loaded["param_groups"]
            assert all(torch.equal(saved["state"][0][k], loaded["state"][0][k]) for k in saved["state"][0])
        elif i > 3:
            c.grad = g.clone()
            resumed.step()
            assert torch.equal(c.detach(), a.detach())
            assert torch.equal(resumed.state[c]["sum"], wrapped.state[a]["sum"])
            assert torch.equal(resumed.state[c]["step"], wrapped.state[a]["step"])


def test_lazy_wrapper_restores_row_statistics_not_column_statistics() -> None:
    """torch's Adafactor: ``row_var`` (rows, 1) is per row (restored for untouched rows), ``col_var``
    (1, cols) spans the rows (left as the step leaves it)."""
    W0 = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(17), dtype=F64)
    W = W0.clone().requires_grad_()
    opt = LazyOptimizer(torch.optim.Adafactor([W], lr=0.1, weight_decay=0.1), [W])
    (g1, _), (g2, rows) = touched_grads(2, seed=18)
    W.grad = torch.ones(ROWS, DIM, dtype=F64)  # every row touched: every row has state
    opt.step()
    st = opt.state[W]
    assert st["row_var"].shape == (ROWS, 1) and st["col_var"].shape == (1, DIM)
    W1, row_var, col_var = W.detach().clone(), st["row_var"].clone(), st["col_var"].clone()
    W.grad = g2
    opt.step()
    untouched = [r for r in range(ROWS) if r not in rows]
    assert torch.equal(W.detach()[untouched], W1[untouched])
    assert torch.equal(st["row_var"][untouched], row_var[untouched])
    assert not torch.equal(st["row_var"][rows], row_var[rows])
    assert not torch.equal(st["col_var"], col_var)  # updated by the step, as the wrapped optimizer does


def test_lazy_wrapper_leaves_native_lazy_groups_alone() -> None:
    W = torch.ones(3, 2, requires_grad=True)
    inner = Tiger([{"params": [W], "lazy": True}], lr=0.1)
    calls: list[int] = []
    wrapped = LazyOptimizer(inner, [W])
    wrapped._snapshot = lambda p: calls.append(1)  # type: ignore[method-assign]
    W.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    wrapped.step()
    assert not calls  # nothing snapshotted: the native lazy path did the work
    assert W.detach()[1:].eq(1).all() and W.detach()[0, 0] < 1


def test_lazy_adamw_with_sparse_embedding_equals_dense_embedding() -> None:
    dense, sparse = _embedding_pair(bag=False)
    opts = [LazyOptimizer(_adamw(m.parameters()), m) for m in (dense, sparse)]
    start = dense.weight.detach().clone()
    for step in range(4):
        idx = torch.tensor([[1, 3, 3], [2, step, 1]])
        for m, o in zip((dense, sparse), opts):
            o.zero_grad()
            (m(idx) ** 2).sum().backward()
            sparse_grad = m.weight.grad
            o.step()
            assert m.weight.grad is sparse_grad  # the gradient the user sees is left as it was
        assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-13, atol=1e-13)
    assert torch.equal(sparse.weight.detach()[4:], start[4:])
    assert not torch.equal(sparse.weight.detach()[1], start[1])


def test_lazy_sgd_momentum_buffer_is_restored() -> None:
    W = torch.ones(3, 2, requires_grad=True)
    opt = LazyOptimizer(torch.optim.SGD([W], lr=0.1, momentum=0.9, weight_decay=0.5), [W])
    W.grad = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    opt.step()
    W.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    # row 0: buf = 1.5, then 0.9*1.5 + (1 + 0.5*0.85) = 2.775; p = 0.85 - 0.2775 = 0.5725
    torch.testing.assert_close(W.detach()[0], torch.tensor([0.5725, 0.5725]))
    # row 1: untouched in step 2: keeps p = 0.85 and its buffer 1.5 (dense SGD would move it to 0.6875)
    torch.testing.assert_close(W.detach()[1], torch.tensor([0.85, 0.85]))
    torch.testing.assert_close(opt.state[W]["momentum_buffer"][1], torch.tensor([1.5, 1.5]))
    assert W.detach()[2].eq(1).all()


def test_lazy_params_from_groups_modules_and_errors() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 2), torch.nn.EmbeddingBag(4, 2))
    emb, lin, bag = model[0], model[1], model[2]
    assert embedding_weights(model) == [emb.weight, bag.weight]
    assert LazyOptimizer(_adamw(model.parameters()), model)._lazy_params() == [emb.weight, bag.weight]
    groups = [{"params": [emb.weight], "lazy": True}, {"params": list(lin.parameters()) + [bag.weight]}]
    opt = LazyOptimizer(_adamw(groups))
    assert opt._lazy_params() == [emb.weight]
    opt.add_param_group({"params": [torch.zeros(3, 1, requires_grad=True)], "lazy": True})
    assert len(opt._lazy_params()) == 2  # groups added later count too
    with pytest.raises(ValueError, match="lazy=True"):
        LazyOptimizer(_adamw(model.parameters()))
    with pytest.raises(ValueError, match="not in the wrapped"):
        LazyOptimizer(_adamw(lin.parameters()), [emb.weight])
    s = torch.zeros((), requires_grad=True)
    assert LazyOptimizer(_adamw([s]), [s])._lazy_params() == [s]  # a 0-d tensor is one row
    with pytest.raises(ValueError, match="no tensor"):
        LazyOptimizer(_adamw(lin.parameters()), lin)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        LazyOptimizer(object(), [emb.weight])  # type: ignore[arg-type]


def _train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 6, (4, 2), generator=gen)

        def closure(idx: torch.Tensor = idx) -> torch.Tensor:
            opt.zero_grad()
            loss = model(idx).pow(2).mean()
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def _lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))


def test_lazy_optimizer_is_a_torch_optimizer() -> None:
    model = _lm()
    inner = _adamw(model.parameters(), foreach=None)
    opt = LazyOptimizer(inner, model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    n_closure = []
    idx = torch.tensor([[1, 2]])

    def closure() -> torch.Tensor:
        n_closure.append(1)
        opt.zero_grad()
        loss = model(idx).sum()
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)
    assert n_closure == [1] and calls == ["pre", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # scheduler on the wrapper drives the wrapped optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    opt.step(closure)
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    # state_dict round trip: a resumed run is bit-identical and the dict is the wrapped optimizer's
    sd = opt.state_dict()
    assert sd["param_groups"] == inner.state_dict()["param_groups"]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    twin = _lm()
    twin_opt = LazyOptimizer(_adamw(twin.parameters(), foreach=None), twin)
    buf.seek(0)
    ckpt = torch.load(buf)
    twin.load_state_dict(ckpt["model"])
    twin_opt.load_state_dict(ckpt["opt"])
    _train(opt, model, 4, seed=3)
    _train(twin_opt, twin, 4, seed=3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # a deep copy is an independent optimizer over the copied parameters
    clone = copy.deepcopy({"m": model, "o": opt})
    assert clone["o"].optimizer is not inner
    assert clone["o"].param_groups[0]["params"][0] is clone["m"][0].weight


def test_lazy_optimizer_with_grad_scaler_and_clipping() -> None:
    model = _lm()
    opt = LazyOptimizer(_adamw(model.parameters()), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    start = model[0].weight.detach().clone()
    idx = torch.tensor([[1, 2], [2, 3]])
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(idx).pow(2).mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
    w = model[0].weight.detach()
    assert torch.equal(w[[0, 4, 5, 6, 7, 8, 9]], start[[0, 4, 5, 6, 7, 8, 9]])
    assert not torch.equal(w[1:4], start[1:4])
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(idx).sum() * float("inf")).backward()
    scaler.step(opt)  # inf gradient: the step is skipped
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lazy_wrapper_of_native_lazy_groups_with_default_params() -> None:
    W = torch.ones(3, 2, requires_grad=True)
    opt = LazyOptimizer(Tiger([{"params": [W], "lazy": True}], lr=0.1))  # params=None: the lazy=True groups
    W.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    opt.step()
    assert W.detach()[1:].eq(1).all() and W.detach()[0].lt(1).all()


# ------------------------------------------------------------------------------ out-of-range sparse rows
def _bad_sparse(index: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """A sparse gradient of a ROWS x DIM table listing ``index`` (built without torch's invariant check,
    as a hand-made gradient can be)."""
    idx = torch.tensor([[1, index, 3]])
    vals = torch.ones(3, DIM, dtype=dtype)
    return torch.sparse_coo_tensor(idx, vals, (ROWS, DIM), check_invariants=False)


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    return [p.detach().clone() for p in params] + [{k: v.clone() for k, v in opt.state[p].items()}
                                                   for p in params]


def _assert_same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert torch.equal(x, y)


LOWP = {"bf16-state": dict(state_precision="bf16"), "bf16-sr": dict(state_precision="bf16",
                                                                    stochastic_rounding=True)}


@pytest.mark.parametrize("index", [ROWS, ROWS + 100, -1])
@pytest.mark.parametrize("path", list(PATHS) + list(LOWP))
@pytest.mark.parametrize("name,cls,kwargs", NATIVE, ids=NATIVE_IDS)
def test_out_of_range_sparse_row_is_refused_before_any_change(name: str, cls: type, kwargs: dict, path: str,
                                                               index: int) -> None:
    """A sparse gradient listing a row the table lacks raises IndexError naming the parameter and the
    index, on every path, before anything changes (the other parameters of the group, the step counts)."""
    dtype = torch.float32 if path in LOWP else F64
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(ROWS, DIM, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
    opt = cls([{"params": params[:1]}, {"params": params[1:], "lazy": True}], **kwargs,
              **PATHS.get(path, LOWP.get(path, {})))
    for p in params:
        p.grad = touched_grads(1, dtype=dtype)[0][0].to_sparse(1)
    params[0].grad = params[0].grad.to_dense()
    opt.step()  # state exists; the tables have moved
    before = _snapshot(opt, params)
    params[1].grad = touched_grads(1, dtype=dtype)[0][0].to_sparse(1)
    params[2].grad = _bad_sparse(index, dtype)
    with pytest.raises(IndexError, match=rf"parameter 2 \(param group 1, shape \({ROWS}, {DIM}\)\) lists row "
                                         rf"index {index}, out of range for {ROWS} rows"):
        opt.step()
    _assert_same(_snapshot(opt, params), before)
    params[2].grad = touched_grads(1, dtype=dtype)[0][0].to_sparse(1)
    opt.step()  # a good gradient afterwards steps as usual
    assert not torch.equal(params[2].detach(), before[2])


def test_out_of_range_sparse_row_in_lazy_wrapper() -> None:
    A, B = (torch.randn(ROWS, DIM, dtype=F64, requires_grad=True) for _ in range(2))
    wrapped = LazyOptimizer(torch.optim.AdamW([A, B], lr=0.1), [A, B])
    A.grad, B.grad = touched_grads(1)[0][0].to_sparse(1), _bad_sparse(-2)
    a0, b0, good, bad = A.detach().clone(), B.detach().clone(), A.grad, B.grad
    with pytest.raises(IndexError, match=r"parameter 1 \(param group 0, shape \(9, 3\)\) lists row index -2"):
        wrapped.step()
    assert torch.equal(A.detach(), a0) and torch.equal(B.detach(), b0) and not wrapped.state
    assert A.grad is good and B.grad is bad  # the sparse gradients are left as they were
