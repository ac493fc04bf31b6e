"""Golden values (hand-computed, SPEC.md) and cross-checks against independent implementations."""

from __future__ import annotations

import math

import pytest
import torch
from optional import require

from tigeropt import Adagrad, AdaX, Lion, Tiger, kind_groups
from tigeropt.adax import adax_scalars

PATHS = [dict(foreach=False), dict(foreach=True), {}]


def step_both(ours_opt, theirs_opt, ours: list, theirs: list, gen: torch.Generator, steps: int) -> None:
    """Give both optimizers the same random gradients for ``steps`` steps."""
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        ours_opt.step()
        theirs_opt.step()
PATH_IDS = ["reference", "foreach", "default"]
F64 = torch.float64


def steps_of(opt_cls: type, grads: list[float], p0: float | list = 1.0, shape: tuple = (1,), **kwargs):
    p = torch.tensor(p0, dtype=F64).reshape(shape).clone().requires_grad_()
    opt = opt_cls([p], **kwargs)
    ps, ms = [], []
    for g in grads:
        p.grad = torch.full_like(p, g) if not isinstance(g, list) else torch.tensor(g, dtype=F64)
        opt.step()
        ps.append(p.detach().clone())
        ms.append({k: v.clone() for k, v in opt.state[p].items()})
    return ps, ms


def close(x: torch.Tensor, expected: float | list, tol: float = 1e-12) -> None:
    torch.testing.assert_close(x.flatten(), torch.tensor(expected, dtype=F64).flatten(), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_lion_golden(path: dict) -> None:
    ps, ms = steps_of(Lion, [0.5, -0.2, 0.0], lr=0.1, weight_decay=0.01, **path)
    for p, m, p_exp, m_exp in zip(ps, ms, [0.899, 0.998101, 0.897102899], [0.005, 0.00295, 0.0029205]):
        close(p, p_exp)
        close(m["exp_avg"], m_exp)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_tiger_golden(path: dict) -> None:
    ps, ms = steps_of(Tiger, [0.5, -0.2, 0.0], lr=0.1, beta=0.945, weight_decay=0.01, **path)
    # step 1: m = 0.055*0.5; p = 1 - 0.1*(1 + 0.01)
    # step 2: m = 0.945*0.0275 - 0.055*0.2 = 0.0149875 > 0; p = 0.899 - 0.1*(1 + 0.00899)
    # step 3: m = 0.945*0.0149875 = 0.0141631875;       p = 0.798101 - 0.1*(1 + 0.00798101)
    close(ms[0]["exp_avg"], 0.0275)
    close(ps[0], 0.899)
    close(ms[1]["exp_avg"], 0.0149875)
    close(ps[1], 0.798101)
    close(ms[2]["exp_avg"], 0.0141631875)
    close(ps[2], 0.697302899)


def test_tiger_sign_of_zero_momentum_does_not_move() -> None:
    ps, _ = steps_of(Tiger, [0.0], lr=0.1, weight_decay=0.0)
    close(ps[0], 1.0)


def test_tiger_lr_scaling_bias_golden() -> None:
    p = torch.tensor([0.5, -0.5, 0.2], dtype=F64, requires_grad=True)
    opt = Tiger([p], lr=0.1, weight_decay=0.01, lr_scaling=True)   # 1-D: "bias" kind under auto
    p.grad = torch.tensor([1.0, -2.0, 0.0], dtype=F64)
    opt.step()
    close(p.detach(), [0.45, -0.45, 0.2])


def test_tiger_lr_scaling_dense_and_embedding() -> None:
    w0 = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)
    g = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=F64)
    # dense: lr * RMS(whole tensor) = 0.1 * sqrt(26/4)
    w = w0.clone().requires_grad_()
    opt = Tiger([w], lr=0.1, weight_decay=0.0, lr_scaling=True)
    w.grad = g.clone()
    opt.step()
    rms = math.sqrt(26 / 4)
    close(w.detach(), (w0 - 0.1 * rms * torch.sign(g)).tolist())
    # embedding: lr * RMS(row): rows have RMS sqrt(12.5) and sqrt(0.5)
    e = w0.clone().requires_grad_()
    opt = Tiger([{"params": [e], "kind": "embedding"}], lr=0.1, weight_decay=0.0, lr_scaling=True)
    e.grad = g.clone()
    opt.step()
    row_rms = torch.tensor([[math.sqrt(12.5)], [math.sqrt(0.5)]], dtype=F64)
    close(e.detach(), (w0 - 0.1 * row_rms * torch.sign(g)).tolist())


def test_tiger_nan_guard_golden() -> None:
    w = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    gamma = torch.tensor([1.2, 0.8], dtype=F64, requires_grad=True)
    opt = Tiger([{"params": [w], "kind": "dense"}, {"params": [gamma], "kind": "norm"}],
                lr=0.1, weight_decay=0.01, nan_guard=True)
    w.grad = torch.tensor([0.5, 0.5], dtype=F64)
    gamma.grad = torch.tensor([0.5, 0.5], dtype=F64)
    opt.step()
    m_w, m_g = opt.state[w]["exp_avg"].clone(), opt.state[gamma]["exp_avg"].clone()
    before_w, before_g = w.detach().clone(), gamma.detach().clone()
    w.grad = torch.tensor([float("nan"), 1.0], dtype=F64)
    gamma.grad = torch.tensor([1.0, float("nan")], dtype=F64)
    opt.step()
    close(w.detach(), (before_w * 0.99).tolist())
    close(gamma.detach(), ((before_g - 1) * 0.99 + 1).tolist())
    assert torch.equal(opt.state[w]["exp_avg"], m_w) and torch.equal(opt.state[gamma]["exp_avg"], m_g)
    # SPEC's numbers, straight from fresh parameters
    w2 = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    g2 = torch.tensor([1.2, 0.8], dtype=F64, requires_grad=True)
    opt = Tiger([{"params": [w2], "kind": "dense"}, {"params": [g2], "kind": "norm"}], lr=0.1,
                weight_decay=0.01, beta=0.965, nan_guard=True)
    w2.grad = torch.tensor([float("nan"), 0.0], dtype=F64)
    g2.grad = torch.tensor([float("nan"), 0.0], dtype=F64)
    opt.step()
    close(w2.detach(), [0.99, -1.98])
    close(g2.detach(), [1.198, 0.802])
    assert torch.count_nonzero(opt.state[w2]["exp_avg"]) == 0


def test_tiger_accumulation_golden() -> None:
    # the original's extras together: k=2 micro-steps, lr scaled by RMS(p) of a "dense" tensor
    ps, ms = steps_of(Tiger, [0.4, -0.1, 0.3, 0.3], shape=(1, 1), lr=0.1, beta=0.965, weight_decay=0.01,
                      accumulation_steps=2, lr_scaling=True)
    for p, m, p_exp, m_exp in zip(ps, ms, [1, 0.899, 0.899, 0.808291799],
                                  [0.007, 0.00525, 0.01031625, 0.01556625]):
        close(m["exp_avg"], m_exp)
        close(p, p_exp)


def test_tiger_accumulation_without_scaling_equals_big_batch_step() -> None:
    """k micro-steps of g_i/.. give the same m and p as one plain step on the mean gradient."""
    gen = torch.Generator().manual_seed(0)
    micro = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(6)]
    p0 = torch.randn(4, 3, generator=gen, dtype=F64)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    acc = Tiger([a], lr=0.01, accumulation_steps=3)
    big = Tiger([b], lr=0.01)
    for i, g in enumerate(micro):
        a.grad = g
        acc.step()
        if i % 3 == 2:
            b.grad = torch.stack(micro[i - 2:i + 1]).mean(0)
            big.step()
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(acc.state[a]["exp_avg"], big.state[b]["exp_avg"],
                                       rtol=1e-12, atol=1e-14)


def test_kind_groups_from_model() -> None:
    model = torch.nn.ModuleDict(dict(emb=torch.nn.Embedding(5, 4), lin=torch.nn.Linear(4, 4),
                                     norm=torch.nn.LayerNorm(4)))
    groups = {g["kind"]: g["params"] for g in kind_groups(model, lr=0.1)}
    assert groups["embedding"] == [model["emb"].weight]
    assert groups["dense"] == [model["lin"].weight]
    assert groups["norm"] == [model["norm"].weight]
    assert set(map(id, groups["bias"])) == {id(model["lin"].bias), id(model["norm"].bias)}
    Tiger(kind_groups(model), lr_scaling=True, nan_guard=True)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_adax_golden(path: dict) -> None:
    ps, _ = steps_of(AdaX, [0.5, 0.5, -0.25], lr=0.1, weight_decay=0.0, eps=1e-12, **path)
    for p, exp in zip(ps, [0.990000000002, 0.971000000005, 0.957028356335]):
        close(p, exp, tol=1e-12)


def test_adax_stable_form_equals_official_over_100_steps() -> None:
    from textbook import adax_official

    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(7, 5, generator=gen, dtype=F64)
    grads = [torch.randn(7, 5, generator=gen, dtype=F64) for _ in range(100)]
    for decoupled, wd in ((False, 5e-4), (True, 5e-2)):
        expected = adax_official(p0, grads, lr=1e-3, b1=0.9, b2=1e-4, eps=1e-12, wd=wd, decoupled=decoupled)
        for path in PATHS:
            p = p0.clone().requires_grad_()
            opt = AdaX([p], lr=1e-3, weight_decay=wd, decoupled_weight_decay=decoupled, **path)
            for g, exp in zip(grads, expected):
                p.grad = g.clone()
                opt.step()
                rel = ((p.detach() - exp).norm() / exp.norm()).item()   # norm-wise relative error
                assert rel < 1e-12, rel


def test_adax_finite_at_ten_million_steps_where_official_overflows() -> None:
    t = 10_000_000
    # the official form in float32: v ~ (1+b2)^t overflows (and Python's (1+b2)**t already at ~7.1M steps)
    with pytest.raises(OverflowError):
        (1 + 1e-4) ** t
    v = torch.tensor(1.0, dtype=torch.float32)
    assert not torch.isfinite(v * torch.tensor(1 + 1e-4, dtype=torch.float32) ** t)
    bhat, one_minus_bhat, eps_t = adax_scalars(t, 1e-4, 1e-12)
    assert bhat == 1.0 and one_minus_bhat == 0.0 and eps_t == 2.0 ** -126  # flushed / floored
    # a run of fp32 steps around t = 10M: vhat holds the long-term mean of g^2, the step is ~lr*m/rms(g)
    for path in PATHS:
        p = torch.zeros(1000, requires_grad=True)
        opt = AdaX([p], lr=1e-3, weight_decay=0.0, **path)
        p.grad = torch.ones(1000)
        opt.step()
        opt.state[p]["step"].fill_(t - 1)
        opt.state[p]["exp_avg"].fill_(0.5)
        opt.state[p]["exp_avg_sq"].fill_(4.0)
        before = p.detach().clone()
        p.grad = torch.full((1000,), 2.0)
        opt.step()
        m = 0.9 * 0.5 + 0.1 * 2.0
        vhat = 4.0  # (1+b2)^t - 1 = e^1000 overflows even float64: 1 - bhat = b2/bc = 0 exactly
        assert torch.isfinite(p).all()
        torch.testing.assert_close(before - p.detach(), torch.full((1000,), 1e-3 * m / math.sqrt(vhat)),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_adagrad_golden(path: dict) -> None:
    ps, _ = steps_of(Adagrad, [0.5, 0.5, 0.5], lr=0.1, **path)
    close(ps[0], 0.90000000002)
    close(ps[1], 0.8292893219113, tol=1e-13)
    close(ps[2], 1 - sum(0.05 / (math.sqrt(0.25 * k) + 1e-10) for k in (1, 2, 3)))
    ps, ms = steps_of(Adagrad, [0.5, 0.5, 0.5], lr=0.1, glove=True, **path)
    close(ps[0], 0.95)
    close(ps[1], 0.9000623830561, tol=1e-13)
    close(ps[2], 0.9000623830561078 - 0.05 / math.sqrt(1.005))
    close(ms[2]["sum"], 1.0075)


ADAGRAD_OPTIONS = [
    dict(lr=0.1),
    dict(lr=0.05, lr_decay=0.1),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.1, initial_accumulator_value=0.3),
    dict(lr=0.1, eps=1e-3),
    dict(lr=0.1, maximize=True),
    dict(lr=0.2, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
]


@pytest.mark.parametrize("options", ADAGRAD_OPTIONS)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_adagrad_equals_torch_dense(options: dict, path: dict) -> None:
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(6, 5, generator=gen), torch.randn(3, generator=gen)]
    ours = [b.clone().requires_grad_() for b in base]
    theirs = [b.clone().requires_grad_() for b in base]
    o, t = Adagrad(ours, **options, **path), torch.optim.Adagrad(theirs, **options)
    step_both(o, t, ours, theirs, gen, 5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o.state[a]["sum"], t.state[b]["sum"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options", [o for o in ADAGRAD_OPTIONS if "weight_decay" not in o])
def test_adagrad_equals_torch_sparse(options: dict) -> None:
    torch.manual_seed(0)
    e1 = torch.nn.Embedding(20, 4, sparse=True)
    e2 = torch.nn.Embedding(20, 4, sparse=True)
    e2.load_state_dict(e1.state_dict())
    o, t = Adagrad(e1.parameters(), **options), torch.optim.Adagrad(e2.parameters(), **options)
    untouched = e1.weight.detach()[10:].clone()
    for step in range(4):
        idx = torch.tensor([[1, 3, 3, 7], [0, 2, 9, step]])   # duplicates are summed
        for emb, opt in ((e1, o), (e2, t)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
    torch.testing.assert_close(e1.weight, e2.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(o.state[e1.weight]["sum"], t.state[e2.weight]["sum"], rtol=1e-6, atol=1e-7)
    assert torch.equal(e1.weight.detach()[10:], untouched)


def test_glove_equals_c_transcription_dense_and_sparse() -> None:
    from textbook import glove_c

    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(6, 3, generator=gen, dtype=F64)
    rows = [[0, 2], [2, 5], [1, 2]]
    grads = []
    for r in rows:
        g = torch.zeros(6, 3, dtype=F64)
        g[r] = torch.randn(len(r), 3, generator=gen, dtype=F64) * 3
        grads.append(g)
    for clip in (None, 1.0):
        # the C loop, row by row: a row is updated only on the steps where it is present
        expected = W0.clone()
        for i in range(6):
            present = [g[i].tolist() for g, r in zip(grads, rows) if i in r]
            if present:
                expected[i] = torch.tensor(glove_c(W0[i].tolist(), [1.0] * 3, present, eta=0.05,
                                                   grad_clip_value=clip)[-1], dtype=F64)
        emb = torch.nn.Embedding(6, 3, sparse=True).double()
        with torch.no_grad():
            emb.weight.copy_(W0)
        opt = Adagrad(emb.parameters(), lr=0.05, glove=True, grad_clip_value=clip)
        for g, r in zip(grads, rows):
            idx = torch.tensor(r)
            emb.weight.grad = torch.sparse_coo_tensor(idx[None], g[idx], (6, 3))
            opt.step()
        torch.testing.assert_close(emb.weight.detach(), expected, rtol=1e-13, atol=1e-13)
        # dense gradients on a single vector: the same C loop
        w = W0[0].clone().requires_grad_()
        opt = Adagrad([w], lr=0.05, glove=True, grad_clip_value=clip, foreach=True)
        dense_grads = [g[2] for g in grads]   # row 2 gets gradient on every step
        for g in dense_grads:
            w.grad = g.clone()
            opt.step()
        exp = glove_c(W0[0].tolist(), [1.0] * 3, [g.tolist() for g in dense_grads], eta=0.05,
                      grad_clip_value=clip)[-1]
        close(w.detach(), exp, tol=1e-13)


def test_glove_skip_nonfinite_rows() -> None:
    w = torch.ones(3, 2, dtype=F64, requires_grad=True)
    opt = Adagrad([w], lr=0.1, glove=True, skip_nonfinite_rows=True)
    w.grad = torch.tensor([[1.0, float("inf")], [1.0, 1.0], [0.0, 0.0]], dtype=F64)
    opt.step()
    close(w.detach()[0], [1.0, 1.0])          # row 0's update sum is not finite: not applied
    close(w.detach()[1], [0.9, 0.9])
    assert math.isinf(opt.state[w]["sum"][0, 1].item())   # ... but its accumulator is updated, as glove.c


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_lion_equals_lion_pytorch(path: dict) -> None:
    lion_pytorch = require("lion_pytorch", "the independent Lion cross-check")
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(8, 4, generator=gen), torch.randn(4, generator=gen)]
    ours = [b.clone().requires_grad_() for b in base]
    theirs = [b.clone().requires_grad_() for b in base]
    o = Lion(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **path)
    t = lion_pytorch.Lion(theirs, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    step_both(o, t, ours, theirs, gen, 10)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o.state[a]["exp_avg"], t.state[b]["exp_avg"], rtol=1e-6, atol=1e-7)


def test_tiger_equals_pytorch_optimizer_tiger() -> None:
    po = require("pytorch_optimizer", "the independent Tiger cross-check")
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(8, 4, generator=gen)
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    o = Tiger([a], lr=1e-2, beta=0.965, weight_decay=0.01)
    t = po.Tiger([b], lr=1e-2, beta=0.965, weight_decay=0.01)
    for _ in range(10):
        g = torch.randn(8, 4, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        o.step()
        t.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
