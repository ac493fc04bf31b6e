"""Regression tests for defects found by adversarial use (issue 10): each failed on tigeropt 0.1."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tigeropt import Adagrad, AdaX, Lion, Tiger, kernels

TRITON = kernels.triton_usable()  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)
PATHS: dict[str, dict[str, Any]] = {"reference": dict(foreach=False), "foreach": dict(foreach=True),
                                    "default": {}}
if TRITON:
    PATHS["fused"] = dict(fused=True)


def _paths_for(dtype: torch.dtype) -> list[str]:
    return [p for p in PATHS if not (p == "fused" and dtype == torch.float64)]


# ------------------------------------------------------------------ 1. AdaX at any step count
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adax_finite_at_any_step_count_with_zero_gradient_history(dtype: torch.dtype,
                                                                  decoupled: bool) -> None:
    """Element 0 never gets a gradient (a padding row); the official form gives it a zero update."""
    for t0 in (1e6, 1e7, 1e9):
        results = {}
        for path in _paths_for(dtype):
            p = torch.tensor([0.5, -0.25, 0.0], dtype=dtype, requires_grad=True)
            opt = AdaX([p], lr=1e-3, weight_decay=0.0 if not decoupled else 0.01,
                       decoupled_weight_decay=decoupled, **PATHS[path])
            p.grad = torch.tensor([0.0, 0.5, 0.0], dtype=dtype)
            opt.step()                                      # elements 0 and 2: all-zero history
            opt.state[p]["step"].fill_(t0)
            for k in range(3):
                p.grad = torch.tensor([0.0, -0.5 if k else 0.0, 0.0], dtype=dtype)
                opt.step()
            st = opt.state[p]
            assert torch.isfinite(p).all(), (path, t0, p)
            assert torch.isfinite(st["exp_avg"]).all() and torch.isfinite(st["exp_avg_sq"]).all()
            decay = (1 - 1e-3 * 0.01) ** 4 if decoupled else 1.0
            assert p[0].item() == pytest.approx(0.5 * decay, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
            assert p[2].item() == 0.0
            results[path] = (p.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
        ref = results["reference"]
        for path, got in results.items():
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=f"{path} at t={t0}")


def test_adax_scalars_stay_positive_and_fp32_representable() -> None:
    from tigeropt.adax import adax_scalars

    for t in (1.0, 1e3, 8e5, 1.6e6, 7.2e6, 1e9, math.inf):
        bhat, omb, eps_t = adax_scalars(t, 1e-4, 1e-12)
        assert 0.0 < eps_t and math.isfinite(eps_t)
        assert torch.tensor(eps_t, dtype=torch.float32).item() > 0.0, t
        assert bhat + omb == pytest.approx(1.0)


# ------------------------------------------------------------------ 3. non-finite gradients, all paths alike
OPTS = [(Tiger, dict(lr=0.01, weight_decay=0.1)), (Lion, dict(lr=0.01, weight_decay=0.1)),
        (AdaX, dict(lr=0.01)), (Adagrad, dict(lr=0.1)), (Adagrad, dict(lr=0.05, glove=True))]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter, numpy
@pytest.mark.parametrize("cls,kw", OPTS, ids=["tiger", "lion", "adax", "adagrad", "glove"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nonfinite_gradient_same_on_every_path_and_visible(cls: type, kw: dict[str, Any],
                                                           dtype: torch.dtype) -> None:
    bad = [math.nan, math.inf, -math.inf]
    results = {}
    for path in _paths_for(dtype):
        p = torch.linspace(-1, 1, 8, dtype=dtype).requires_grad_()
        opt = cls([p], **kw, **PATHS[path])
        gen = torch.Generator().manual_seed(0)
        for k in range(4):
            g = torch.randn(8, generator=gen).to(dtype)
            if k == 1:
                g[:3] = torch.tensor(bad, dtype=dtype)
            p.grad = g
            opt.step()
        results[path] = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
        # AdamW's convention: the element that saw a non-finite gradient ends non-finite, never frozen
        assert not torch.isfinite(p[:3]).any(), (path, p)
        assert torch.isfinite(p[3:]).all(), (path, p)
    ref = results["reference"]
    for path, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=path)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), path


# ------------------------------------------------------------------ 9. argument validation, one table
GOOD: dict[str, tuple[type, dict[str, Any]]] = {
    "tiger": (Tiger, {}), "lion": (Lion, {}), "adax": (AdaX, {}), "adagrad": (Adagrad, {}),
    "glove": (Adagrad, dict(glove=True)),
}
NUMBER_ARGS = {
    "tiger": ["lr", "beta", "weight_decay", "shrink_ratio"],
    "lion": ["lr", "weight_decay"],
    "adax": ["lr", "eps", "weight_decay"],
    "adagrad": ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"],
    "glove": ["lr", "lr_decay", "weight_decay", "initial_accumulator_value", "grad_clip_value"],
}
BOOL_ARGS = {
    "tiger": ["lr_scaling", "nan_guard", "maximize", "capturable", "lazy"],
    "lion": ["maximize", "lazy"],
    "adax": ["decoupled_weight_decay", "maximize", "lazy"],
    "adagrad": ["glove", "maximize", "lazy"],
    "glove": ["glove", "skip_nonfinite_rows", "maximize", "lazy"],
}
BETAS = {"lion": "betas", "adax": "betas"}


def _cases() -> list[tuple[str, str, Any, type]]:
    cases = []
    for name in GOOD:
        for arg in NUMBER_ARGS[name]:
            if arg not in ("initial_accumulator_value", "grad_clip_value"):   # None: the default there
                cases.append((name, arg, None, TypeError))
            cases += [(name, arg, "0.1", TypeError), (name, arg, True, TypeError),
                      (name, arg, math.nan, ValueError), (name, arg, math.inf, ValueError),
                      (name, arg, -math.inf, ValueError), (name, arg, -1.0, ValueError)]
        for arg in BOOL_ARGS[name]:
            cases += [(name, arg, "yes", TypeError), (name, arg, 1, TypeError), (name, arg, None, TypeError)]
        for arg in ("foreach", "fused"):
            cases += [(name, arg, "no", TypeError), (name, arg, 0, TypeError)]
        cases += [(name, "on_nonfinite", "warn", ValueError), (name, "on_nonfinite", 1, TypeError)]
        if name in BETAS:
            cases += [(name, "betas", (0.9,), ValueError), (name, "betas", (0.9, 0.99, 0.5), ValueError),
                      (name, "betas", 0.9, TypeError), (name, "betas", "ab", TypeError),
                      (name, "betas", (0.9, "x"), TypeError), (name, "betas", (math.nan, 0.5), ValueError),
                      (name, "betas", (1.0, 0.5), ValueError), (name, "betas", (0.5, math.inf), ValueError)]
    cases += [("tiger", "beta", 1.0, ValueError), ("tiger", "beta", 3, ValueError),
              ("tiger", "accumulation_steps", 1.5, TypeError), ("tiger", "accumulation_steps", 0, ValueError),
              ("tiger", "accumulation_steps", True, TypeError), ("tiger", "kind", "conv", ValueError),
              ("tiger", "kind", None, TypeError), ("tiger", "shrink_ratio", 1.5, ValueError),
              ("adax", "betas", (0.9, 0.0), ValueError),
              ("glove", "initial_accumulator_value", 0.0, ValueError),
              ("glove", "grad_clip_value", 0.0, ValueError), ("adagrad", "grad_clip_value", 1.0, ValueError),
              ("tiger", "lr", torch.tensor([1e-3, 1e-3]), ValueError),
              ("tiger", "lr", torch.tensor(math.nan), ValueError),
              ("tiger", "lr", torch.tensor(-1.0), ValueError)]
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,arg,value,error", CASES,
                         ids=[f"{n}-{a}-{v!r}" for n, a, v, _ in CASES])
def test_bad_arguments_rejected_everywhere(name: str, arg: str, value: Any, error: type) -> None:
    """Constructor, add_param_group and load_state_dict all reject the bad value the same way,
    naming the argument; a rejected add_param_group/load_state_dict leaves the optimizer as it was."""
    cls, kw = GOOD[name]
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(error, match=arg.split("[")[0]):
        cls([p], **{**kw, arg: value})
    opt = cls([p], **kw)
    p.grad = torch.randn(3)
    opt.step()
    before_groups = [dict(g) for g in opt.param_groups]
    sd = opt.state_dict()
    q = torch.randn(2, requires_grad=True)
    with pytest.raises(error, match=arg.split("[")[0]):
        opt.add_param_group({"params": [q], arg: value})
    assert len(opt.param_groups) == 1 and opt.param_groups[0] == before_groups[0]
    bad = {"state": sd["state"], "param_groups": [{**sd["param_groups"][0], arg: value}]}
    if arg in ("foreach", "fused", "capturable"):
        opt.load_state_dict(bad)        # execution flags are this optimizer's: ignored, not loaded
        assert opt.param_groups[0][arg] == before_groups[0][arg]
        return
    with pytest.raises(error, match=arg.split("[")[0]):
        opt.load_state_dict(bad)
    assert opt.param_groups[0] == before_groups[0]
    assert torch.equal(opt.state[p][cls.state_keys[0]], sd["state"][0][cls.state_keys[0]])


# ------------------------------------------------------------------ 5. a rejected add_param_group is not kept
def test_rejected_param_group_is_not_added_and_a_corrected_retry_works() -> None:
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = Tiger([p], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [q], "lr": -1})
    assert len(opt.param_groups) == 1
    q.grad = torch.ones(3)
    q0 = q.detach().clone()
    opt.step()
    assert torch.equal(q, q0)                     # not stepped by a half-added group
    opt.add_param_group({"params": [q], "lr": 0.5})  # no "more than one group" error
    opt.step()
    assert not torch.equal(q, q0)


# ------------------------------------------------------------------ 8. Tiger's extras with fused=True
@pytest.mark.parametrize("extra", [dict(lr_scaling=True), dict(accumulation_steps=2), dict(nan_guard=True)])
def test_tiger_extras_with_fused_refused_in_constructor(extra: dict[str, Any]) -> None:
    p = torch.randn(3, requires_grad=True)
    if TRITON:
        with pytest.raises(ValueError, match=next(iter(extra))):
            Tiger([p], fused=True, **extra)
    opt = Tiger([p], **extra)                     # the default path runs them (foreach -> reference)
    with pytest.raises(ValueError, match=next(iter(extra))):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], "capturable": True})
    p.grad = torch.randn(3)
    opt.step()
    with pytest.raises(ValueError, match="skip_nonfinite_rows"):
        Adagrad([p], glove=True, skip_nonfinite_rows=True, capturable=True)


# ------------------------------------------------------------------ 6. checkpoints of another class
def _stepped(opt_cls: type, **kw: Any) -> torch.optim.Optimizer:
    p = torch.randn(4, 3, requires_grad=True)
    opt = opt_cls([p], **kw)
    p.grad = torch.randn(4, 3)
    opt.step()
    return opt


@pytest.mark.parametrize("saver,loader,named", [
    (Tiger, Lion, "tigeropt.Tiger"), (Lion, Tiger, "tigeropt.Lion"), (AdaX, Tiger, "tigeropt.AdaX"),
    (AdaX, Lion, "tigeropt.AdaX"), (Lion, AdaX, "tigeropt.Lion"), (torch.optim.AdamW, Tiger, "AdamW"),
    (torch.optim.AdamW, Lion, "AdamW"), (torch.optim.SGD, Adagrad, "SGD"), (Adagrad, Tiger, "Adagrad"),
])
def test_checkpoint_of_another_optimizer_class_is_refused(saver: type, loader: type, named: str) -> None:
    sd = _stepped(saver).state_dict()
    for with_state in (True, False):          # also a checkpoint saved before the first step
        q = torch.randn(4, 3, requires_grad=True)
        opt = loader([q], lr=0.123)
        before = [dict(g) for g in opt.param_groups]
        part = sd if with_state else {"state": {}, "param_groups": sd["param_groups"]}
        with pytest.raises(ValueError, match=named) as err:
            opt.load_state_dict(part)
        assert loader.__name__ in str(err.value)
        assert opt.param_groups == before and not opt.state


def test_torch_adagrad_checkpoints_load_both_ways() -> None:
    ours = _stepped(Adagrad, lr=0.1, lr_decay=0.01)
    theirs = _stepped(torch.optim.Adagrad, lr=0.1, lr_decay=0.01)
    Adagrad([torch.randn(4, 3, requires_grad=True)]).load_state_dict(theirs.state_dict())
    t = torch.optim.Adagrad([torch.randn(4, 3, requires_grad=True)])
    t.load_state_dict(ours.state_dict())
    assert t.param_groups[0]["lr_decay"] == 0.01


# ------------------------------------------------------------------ 7. execution flags are the loader's
def test_checkpoint_execution_flags_do_not_override_and_resume_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(6)]
    p = torch.randn(4, 3, generator=gen).requires_grad_()
    opt = Tiger([p], lr=0.01, foreach=False)
    for g in grads[:3]:
        p.grad = g.clone()
        opt.step()
    sd = opt.state_dict()
    # as if saved on a GPU machine with the fused, capturable step
    sd["param_groups"][0].update(fused=True, capturable=True, foreach=None)
    q = p.detach().clone().requires_grad_()
    opt2 = Tiger([q], lr=0.5, foreach=False)
    opt2.load_state_dict(sd)
    g2 = opt2.param_groups[0]
    assert (g2["fused"], g2["capturable"], g2["foreach"], g2["lr"]) == (None, False, False, 0.01)
    assert opt2.state[q]["step"].device.type == "cpu"
    for g in grads[3:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])


# ------------------------------------------------------------------ 4. MixedOptimizer loads all or nothing
def test_mixed_load_state_dict_is_all_or_nothing() -> None:
    from tigeropt import MixedOptimizer

    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    mixed = MixedOptimizer(torch.optim.AdamW([a], lr=1e-3), Lion([b], lr=1e-3))
    a.grad, b.grad = torch.randn(3), torch.randn(2, 2)
    mixed.step()
    sd = mixed.state_dict()
    # b has the wrong shape for the checkpoint
    other_a, other_b = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
    target = MixedOptimizer(torch.optim.AdamW([other_a], lr=1e-3), Lion([other_b], lr=1e-3))
    other_a.grad, other_b.grad = torch.randn(3), torch.randn(4)
    target.step()
    before = [(dict(g), {k: v.clone() for k, v in o.state[p].items()})
              for o, p in zip(target.optimizers, (other_a, other_b)) for g in o.param_groups]
    sd["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(sd)
    after = [(dict(g), o.state[p])
             for o, p in zip(target.optimizers, (other_a, other_b)) for g in o.param_groups]
    for (g0, s0), (g1, s1) in zip(before, after):
        assert g0 == g1
        assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)

    class Refuses(torch.optim.SGD):           # cannot check beforehand: rolled back after the fact
        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            raise RuntimeError("refused")

    c = torch.randn(3, requires_grad=True)
    m2 = MixedOptimizer(Lion([other_b], lr=1e-3), Refuses([c], lr=0.1))
    lion_sd = m2.state_dict()
    lion_sd["param_groups"][0]["lr"] = 0.25
    with pytest.raises(RuntimeError, match="refused"):
        m2.load_state_dict(lion_sd)
    assert m2.optimizers[0].param_groups[0]["lr"] == 1e-3


# ------------------------------------------------------------------ 11. on_nonfinite: inf, -inf, two tensors
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls,kw", OPTS, ids=["tiger", "lion", "adax", "adagrad", "glove"])
@pytest.mark.parametrize("path", list(PATHS))
def test_skip_and_raise_on_every_nonfinite_value_whole_group(bad: float, cls: type, kw: dict[str, Any],
                                                             path: str) -> None:
    a, b, c = (torch.randn(4, requires_grad=True) for _ in range(3))
    opt = cls([{"params": [a, b]}, {"params": [c]}], **kw, on_nonfinite="skip", **PATHS[path])
    a0, b0, c0 = a.detach().clone(), b.detach().clone(), c.detach().clone()
    a.grad, b.grad, c.grad = torch.randn(4), torch.randn(4), torch.randn(4)
    b.grad[2] = bad
    opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)          # the whole group is skipped...
    assert not opt.state[a] and not opt.state[b]               # ...and no state is created
    assert not torch.equal(c, c0) and opt.state[c]["step"].item() == 1   # the other group steps
    raising = cls([a, b], **kw, on_nonfinite="raise", **PATHS[path])
    with pytest.raises(FloatingPointError):
        raising.step()
    assert torch.equal(a, a0) and torch.equal(b, b0) and not raising.state[a]


# ------------------------------------------------------------------ 10. "equal to torch.optim.Adagrad"
def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units in the last place (same-sign finite values)."""
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return int((a.view(bits).to(torch.int64) - b.view(bits).to(torch.int64)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kw", [{}, dict(lr_decay=0.1, weight_decay=0.1), dict(maximize=True)], ids=str)
def test_adagrad_reference_bitwise_and_every_path_within_2_ulp_of_torch(dtype: torch.dtype,
                                                                       kw: dict[str, Any]) -> None:
    """float32: reference, foreach and the fused C and Triton steps are bit-identical (each rounds
    sqrt correctly: tigeropt._math.sqrt_rn, IEEE sqrtf), torch.optim.Adagrad within 1 ulp per step
    (torch's vectorized float32 CPU sqrt leaves about 17% of the elements one unit off).  float64:
    reference and foreach are bit-identical to torch.optim.Adagrad (torch's sqrt), the fused C step
    (IEEE sqrt) within 2 ulp.  The sum is torch's bit for bit; sparse rows within 2 ulp per step."""
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(300, 7, generator=gen, dtype=dtype) + 2.0        # in [2, 3): one ulp size
    grads = [torch.randn(300, 7, generator=gen, dtype=dtype) for _ in range(4)]
    t_p = base.clone().requires_grad_()
    torch_opt = torch.optim.Adagrad([t_p], lr=0.1, foreach=False, **kw)
    paths = dict(PATHS, sparse=dict(foreach=False))
    ours = {name: (q := base.clone().requires_grad_(), Adagrad([q], lr=0.1, **kw, **flags))
            for name, flags in paths.items() if not (name == "fused" and dtype == torch.float64)}
    for g in grads:
        t_p.grad = g.clone()
        torch_opt.step()
        want_sum = torch_opt.state[t_p]["sum"]
        for name, (q, opt) in ours.items():
            q.grad = g.to_sparse(1) if name == "sparse" else g.clone()
            opt.step()
        ref, ref_opt = ours["reference"]
        assert torch.equal(ref_opt.state[ref]["sum"], want_sum)
        assert _ulps(ref.detach(), t_p.detach()) <= (1 if dtype == torch.float32 else 0)
        for name, (q, opt) in ours.items():
            if name == "foreach" or (name != "sparse" and dtype == torch.float32):
                assert torch.equal(q, ref) and torch.equal(opt.state[q]["sum"], want_sum), name
            else:
                assert _ulps(q.detach(), t_p.detach()) <= 2, name
        for q, opt in ours.values():
            # restart every path from torch's numbers, so the bound is per step
            with torch.no_grad():
                q.copy_(t_p)
            opt.state[q]["sum"].copy_(want_sum)


# ------------------------------------------------------------------ fuzzing covers these inputs now
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=30, deadline=None)
@given(idx=st.integers(0, len(OPTS) - 1),
       shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       bad=st.lists(st.tuples(st.integers(0, 200), st.sampled_from([math.nan, math.inf, -math.inf, 0.0])),
                    max_size=4),
       t0=st.sampled_from([0.0, 1e3, 1e6, 1e7, 1e9]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_property_nonfinite_gradients_zero_rows_and_huge_step_counts_agree_on_every_path(
        idx: int, shape: list[int], bad: list[tuple[int, float]], t0: float, dtype: torch.dtype,
        seed: int) -> None:
    cls, kw = OPTS[idx]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).to(dtype)
    grads = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    grads[0].view(-1)[0] = 0.0                      # an element whose first gradient is zero
    for i, value in bad:
        grads[1].view(-1)[i % base.numel()] = value
    results = {}
    for path in _paths_for(dtype):
        p = base.clone().requires_grad_()
        opt = cls([p], **kw, **PATHS[path])
        for k, g in enumerate(grads):
            p.grad = g.clone()
            opt.step()
            if k == 0 and t0:
                opt.state[p]["step"].fill_(t0)
        results[path] = [p.detach().clone()] + [v.clone() for v in opt.state[p].values()]
    ref = results["reference"]
    for path, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=path)
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), path


# ------------------------------------------------------------------ 9. the wrappers and helpers too
def _wrapper_cases() -> list[tuple[str, Any, type, str]]:
    from tigeropt import (
        GradNormCritic,
        LazyOptimizer,
        MixedOptimizer,
        describe,
        embedding_weights,
        gradient_penalty,
        kind_groups,
        param_groups,
        split_embeddings,
    )

    m = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 1))
    real, fake = torch.randn(3, 2), torch.randn(3, 2)
    critic = torch.nn.Linear(2, 1)
    return [
        ("param_groups lr str", lambda: param_groups(m, "0.1"), TypeError, "lr"),
        ("param_groups lr nan", lambda: param_groups(m, math.nan), ValueError, "lr"),
        ("param_groups wd inf", lambda: param_groups(m, 0.1, math.inf), ValueError, "weight_decay"),
        ("param_groups layer_decay bool", lambda: param_groups(m, 0.1, layer_decay=True), TypeError,
         "layer_decay"),
        ("param_groups model", lambda: param_groups("m", 0.1), TypeError, "model"),
        ("describe max_names", lambda: describe([], max_names="a"), TypeError, "max_names"),
        ("kind_groups model", lambda: kind_groups(5), TypeError, "model"),
        ("embedding_weights model", lambda: embedding_weights(5), TypeError, "model"),
        ("LazyOptimizer optimizer", lambda: LazyOptimizer(5, m), TypeError, "Optimizer"),
        ("LazyOptimizer params", lambda: LazyOptimizer(Tiger(m.parameters()), 5), TypeError, "params"),
        ("MixedOptimizer optimizer", lambda: MixedOptimizer(5), TypeError, "Optimizer"),
        ("MixedOptimizer empty", lambda: MixedOptimizer(), ValueError, "at least one"),
        ("split_embeddings model", lambda: split_embeddings(5), TypeError, "model"),
        ("split_embeddings factory", lambda: split_embeddings(m, 5), TypeError, "embedding_optimizer"),
        ("GradNormCritic critic", lambda: GradNormCritic(5), TypeError, "critic"),
        ("GradNormCritic variant", lambda: GradNormCritic(critic, variant="wgan"), ValueError, "variant"),
        ("GradNormCritic variant type", lambda: GradNormCritic(critic, variant=3), TypeError, "variant"),
        ("GradNormCritic eps", lambda: GradNormCritic(critic, eps="x"), TypeError, "eps"),
        ("GradNormCritic eps nan", lambda: GradNormCritic(critic, eps=math.nan), ValueError, "eps"),
        ("GradNormCritic lipschitz bool", lambda: GradNormCritic(critic, lipschitz=True), TypeError,
         "lipschitz"),
        ("GradNormCritic lipschitz 0", lambda: GradNormCritic(critic, lipschitz=0.0), ValueError,
         "lipschitz"),
        ("gradient_penalty weight inf", lambda: gradient_penalty(critic, real, fake, weight=math.inf),
         ValueError, "weight"),
        ("gradient_penalty weight str", lambda: gradient_penalty(critic, real, fake, weight="a"), TypeError,
         "weight"),
        ("gradient_penalty target", lambda: gradient_penalty(critic, real, fake, target=math.nan), ValueError,
         "target"),
    ]


WRAPPER_CASES = _wrapper_cases()


@pytest.mark.parametrize("what,call,error,named", WRAPPER_CASES, ids=[c[0] for c in WRAPPER_CASES])
def test_wrappers_and_helpers_reject_bad_arguments(what: str, call: Any, error: type, named: str) -> None:
    with pytest.raises(error, match=named):
        call()


def test_subclass_with_own_constructor_loads_its_own_checkpoint() -> None:
    """The class check uses the hyperparameters a subclass really keeps (its defaults)."""

    class ScaledTiger(Tiger):
        def __init__(self, params: Any, lr: float = 1e-3, scale: float = 2.0) -> None:
            super().__init__(params, lr=lr * scale)

    p = torch.randn(3, requires_grad=True)
    opt = ScaledTiger([p])
    p.grad = torch.randn(3)
    opt.step()
    q = p.detach().clone().requires_grad_()
    again = ScaledTiger([q])
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_the_same_tensor_twice_in_a_group_is_refused() -> None:
    """torch.optim warns; stepping one tensor twice (and from two C threads) gives wrong numbers."""
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    for cls in (Tiger, Lion, AdaX, Adagrad):
        with pytest.raises(ValueError, match="twice"):
            cls([p, p])
        opt = cls([p])
        with pytest.raises(ValueError, match="twice"):
            opt.add_param_group({"params": [q, q]})
        assert len(opt.param_groups) == 1


def _snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in params]
    return [p.detach().clone() for p in params] + state


def _same(a: list[Any], b: list[Any]) -> bool:
    for x, y in zip(a, b):
        if isinstance(x, dict):
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif not torch.equal(x, y):
            return False
    return len(a) == len(b)


@pytest.mark.parametrize("path", [{}, {"foreach": True}, {"foreach": False}])
@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad])
def test_raise_in_a_later_group_changes_no_group(cls: type, path: dict[str, Any]) -> None:
    """on_nonfinite='raise' in group 1 refuses the step before group 0 (planned or not) changes."""
    params = [torch.randn(5, 4, requires_grad=True), torch.randn(7, requires_grad=True)]
    opt = cls([{"params": [params[0]]}, {"params": [params[1]], "on_nonfinite": "raise"}], **path)
    for step in range(3):  # steps 0-1 build the cached plans; step 2 raises
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            params[1].grad[3] = float("nan")
            before = _snapshot(opt, params)
            with pytest.raises(FloatingPointError, match="param group 1"):
                opt.step()
            assert _same(before, _snapshot(opt, params))
            params[1].grad[3] = 0.0  # the corrected retry steps both groups
            opt.step()
            assert not torch.equal(before[0], params[0]) and not torch.equal(before[1], params[1])
        else:
            opt.step()


def test_mixed_optimizer_refusal_in_a_later_optimizer_changes_none() -> None:
    """An out-of-range sparse row or a non-finite gradient under on_nonfinite='raise' in the second
    inner optimizer refuses MixedOptimizer.step before the first one steps."""
    from tigeropt import MixedOptimizer

    dense = torch.randn(4, 3, requires_grad=True)
    table = torch.randn(6, 3, requires_grad=True)
    other = torch.randn(5, requires_grad=True)
    first = Tiger([dense])
    second = Lion([{"params": [table], "lazy": True}, {"params": [other], "on_nonfinite": "raise"}])
    opt = MixedOptimizer(first, second)
    params = [dense, table, other]
    bad_rows = torch.sparse_coo_tensor(torch.tensor([[1, 6]]), torch.ones(2, 3), (6, 3))
    good_rows = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.ones(2, 3), (6, 3))
    for table_grad, other_grad, error in ((bad_rows, torch.ones(5), IndexError),
                                          (good_rows, torch.full((5,), float("inf")), FloatingPointError)):
        dense.grad, table.grad, other.grad = torch.randn(4, 3), table_grad, other_grad
        before = [p.detach().clone() for p in params] + [dict(first.state[dense]), dict(second.state[table])]
        with pytest.raises(error):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert first.state[dense] == before[3] and second.state[table] == before[4]
    dense.grad, table.grad, other.grad = torch.randn(4, 3), good_rows, torch.ones(5)
    opt.step()
    assert not torch.equal(before[0], dense) and not torch.equal(before[2], other)
