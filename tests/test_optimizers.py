"""Generic tests, written once for every optimizer x path x dtype (like torch's OptimizerInfo)."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger


@dataclass
class OptimizerInfo:
    name: str
    cls: type
    kwargs: dict[str, Any]
    # keyword variations exercised by the generic tests (each merged into kwargs)
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    sparse: bool = False


_OPTIMIZERS_UNDER_TEST = [
    OptimizerInfo("tiger", Tiger, dict(lr=1e-2), [{}, dict(weight_decay=0.0), dict(maximize=True)]),
    OptimizerInfo("lion", Lion, dict(lr=1e-2, weight_decay=0.1),
                  [{}, dict(betas=(0.5, 0.9)), dict(maximize=True)]),
    OptimizerInfo("adax", AdaX, dict(lr=1e-2), [{}, dict(decoupled_weight_decay=True, weight_decay=0.05),
                                                dict(maximize=True, weight_decay=0.0)]),
    OptimizerInfo("adagrad", Adagrad, dict(lr=1e-1), [{}, dict(lr_decay=0.1, weight_decay=0.1,
                                                               initial_accumulator_value=0.5),
                                                      dict(maximize=True)], sparse=True),
    OptimizerInfo("adagrad_glove", Adagrad, dict(lr=5e-2, glove=True),
                  [{}, dict(grad_clip_value=0.5), dict(maximize=True, weight_decay=0.1)], sparse=True),
]
IDS = [o.name for o in _OPTIMIZERS_UNDER_TEST]
PATHS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "default": {}}
# (dtype, atol, rtol) for "path X equals the reference path after 7 steps"
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float64, 1e-12, 1e-12),
          (torch.bfloat16, 1e-2, 1e-2), (torch.float16, 1e-3, 1e-3)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (0,), (1,), (2, 3, 4), ()]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def run_steps(info: OptimizerInfo, params: list[torch.Tensor], steps: int = 7, seed: int = 1,
              none_grad_at: int | None = 3, **kwargs: Any) -> torch.optim.Optimizer:
    opt = info.cls(params, **{**info.kwargs, **kwargs})
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for j, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = None if (i == none_grad_at and j == 1) else g
        opt.step()
    return opt


@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST, ids=IDS)
@pytest.mark.parametrize("path", ["foreach", "default"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=[str(d[0]).split(".")[1] for d in DTYPES])
def test_paths_match_reference(info: OptimizerInfo, path: str, dtype: torch.dtype, atol: float,
                               rtol: float) -> None:
    """7 steps, a zero-size param, a None grad on one step: params and state equal the reference."""
    for variant in info.variants:
        ref_params, params = make_params(dtype), make_params(dtype)
        ref = run_steps(info, ref_params, **variant, **PATHS["reference"])
        opt = run_steps(info, params, **variant, **PATHS[path])
        for p_ref, p in zip(ref_params, params):
            torch.testing.assert_close(p, p_ref, atol=atol, rtol=rtol)
            s_ref, s = ref.state[p_ref], opt.state[p]
            assert s.keys() == s_ref.keys()
            for key in s_ref:
                torch.testing.assert_close(s[key], s_ref[key], atol=atol, rtol=rtol)
        # the None grad on step 3 skipped parameter 1's step count
        assert opt.state[params[1]]["step"].item() == 6
        assert opt.state[params[0]]["step"].item() == 7


def test_state_is_fp32_for_low_precision_params() -> None:
    p = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    opt = AdaX([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert p.dtype == torch.bfloat16


@settings(max_examples=25, deadline=None)
@given(
    idx=st.integers(0, len(_OPTIMIZERS_UNDER_TEST) - 1),
    shapes=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3), min_size=1, max_size=4),
    lr=st.floats(1e-4, 1.0),
    wd=st.sampled_from([0.0, 1e-3, 0.1]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_foreach_equals_reference_property(idx: int, shapes: list[list[int]], lr: float, wd: float,
                                           maximize: bool, seed: int) -> None:
    """Random shapes (size 1 and empty included) and hyperparameters: one step, rel. error < 1e-6."""
    info = _OPTIMIZERS_UNDER_TEST[idx]
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    results = []
    for path in ("reference", "foreach", "default"):
        params = [b.clone().requires_grad_() for b in base]
        opt = info.cls(params, **{**info.kwargs, "lr": lr, "weight_decay": wd, "maximize": maximize},
                       **PATHS[path])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- textbook references
def test_against_textbook_references() -> None:
    from textbook import adagrad, adax_official, lion, tiger

    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(5)]
    cases = [
        (Tiger, dict(lr=0.01, beta=0.9, weight_decay=0.1), tiger(p0, grads, lr=0.01, beta=0.9, wd=0.1)),
        (Lion, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
         lion(p0, grads, lr=0.01, b1=0.8, b2=0.95, wd=0.1)),
        (AdaX, dict(lr=0.01, weight_decay=0.01), adax_official(p0, grads, lr=0.01, b1=0.9, b2=1e-4,
                                                                 eps=1e-12, wd=0.01)),
        (AdaX, dict(lr=0.01, weight_decay=0.05, decoupled_weight_decay=True),
         adax_official(p0, grads, lr=0.01, b1=0.9, b2=1e-4, eps=1e-12, wd=0.05, decoupled=True)),
        (Adagrad, dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, initial_accumulator_value=0.1),
         adagrad(p0, grads, lr=0.1, lr_decay=0.05, wd=0.01, acc0=0.1)),
    ]
    for cls, kwargs, expected in cases:
        for path in PATHS.values():
            p = p0.clone().requires_grad_()
            opt = cls([p], **kwargs, **path)
            for g, exp in zip(grads, expected):
                p.grad = g.clone()
                opt.step()
                got = p.detach()
                want = exp[0] if isinstance(exp, tuple) else exp
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                if isinstance(exp, tuple):
                    torch.testing.assert_close(opt.state[p]["exp_avg"], exp[1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- torch.optim conventions
@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST, ids=IDS)
def test_state_dict_round_trip_and_resume_bit_exact(info: OptimizerInfo) -> None:
    params = make_params()
    opt = run_steps(info, params, steps=3, none_grad_at=None)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    # continue the original
    gen = torch.Generator().manual_seed(7)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(4)]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    # resume from the checkpoint in a fresh optimizer
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = info.cls(resumed, **info.kwargs)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state_dict()["param_groups"] == ckpt["opt"]["param_groups"]
    for gs in grads:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed):
        for key, value in opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_low_precision_state_survives_load_bit_exact() -> None:
    p = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    opt = Tiger([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    q = p.detach().clone().requires_grad_()
    opt2 = Tiger([q])
    opt2.load_state_dict(sd)
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


def test_load_state_dict_rejects_mismatched_state() -> None:
    p = torch.randn(4, 3, requires_grad=True)
    opt = Tiger([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    other = Tiger([torch.randn(3, 4, requires_grad=True)])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(sd)
    adax = AdaX([torch.randn(4, 3, requires_grad=True)])
    with pytest.raises(ValueError, match="saved by tigeropt.Tiger, not AdaX"):
        adax.load_state_dict(sd)


def test_torch_adagrad_checkpoint_loads_into_ours() -> None:
    base = torch.randn(5, 2)
    p_t, p_o = base.clone().requires_grad_(), base.clone().requires_grad_()
    t_opt = torch.optim.Adagrad([p_t], lr=0.1, lr_decay=0.01)
    for _ in range(3):
        p_t.grad = torch.randn_like(p_t)
        t_opt.step()
    with torch.no_grad():
        p_o.copy_(p_t)
    ours = Adagrad([p_o], lr=0.1, lr_decay=0.01)
    ours.load_state_dict(t_opt.state_dict())
    for _ in range(3):
        g = torch.randn_like(p_t)
        p_t.grad, p_o.grad = g.clone(), g.clone()
        t_opt.step()
        ours.step()
    torch.testing.assert_close(p_o, p_t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST, ids=IDS)
def test_maximize_is_minimize_of_negated_grads(info: OptimizerInfo) -> None:
    a, b = make_params(), make_params()
    opt_a = info.cls(a, **info.kwargs, maximize=True)
    opt_b = info.cls(b, **info.kwargs)
    for _ in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g, -g
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST, ids=IDS)
def test_complex_params_follow_view_as_real(info: OptimizerInfo) -> None:
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt_z, opt_r = info.cls([z], **info.kwargs), info.cls([r], **info.kwargs)
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.complex64)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST, ids=IDS)
def test_tensor_lr_equals_float_lr(info: OptimizerInfo) -> None:
    a, b = make_params(), make_params()
    run_steps(info, a, steps=3)
    run_steps(info, b, steps=3, lr=torch.tensor(info.kwargs["lr"]))
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


INVALID = [
    (Tiger, dict(lr=-1.0), "lr"), (Tiger, dict(beta=1.0), "beta"),
    (Tiger, dict(weight_decay=-0.1), "weight_decay"),
    (Tiger, dict(accumulation_steps=0), "accumulation_steps"), (Tiger, dict(kind="conv"), "kind"),
    (Lion, dict(betas=(1.2, 0.9)), "betas"), (Lion, dict(betas=(0.9, -0.1)), "betas"),
    (Lion, dict(lr=float("nan")), "lr"),
    (AdaX, dict(eps=-1e-8), "eps"), (AdaX, dict(betas=(0.9, 0.0)), "betas"),
    (Adagrad, dict(lr_decay=-1.0), "lr_decay"), (Adagrad, dict(initial_accumulator_value=-1.0),
                                                 "initial_accumulator_value"),
    (Adagrad, dict(glove=True, initial_accumulator_value=0.0), "initial_accumulator_value"),
    (Adagrad, dict(grad_clip_value=1.0), "grad_clip_value"),
    (Adagrad, dict(glove=True, grad_clip_value=-1.0), "grad_clip_value"),
    (Tiger, dict(on_nonfinite="maybe"), "on_nonfinite"),
]


@pytest.mark.parametrize("cls,kwargs,name", INVALID, ids=[f"{c.__name__}-{n}" for c, _, n in INVALID])
def test_invalid_hyperparameters_name_argument_and_value(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as err:
        cls([torch.zeros(2, requires_grad=True)], **kwargs)
    value = list(kwargs.values())[-1]
    shown = [repr(v) for v in (value if isinstance(value, tuple) else (value,))]
    assert any(v in str(err.value) for v in shown), str(err.value)


def test_invalid_values_in_added_group_are_rejected() -> None:
    opt = Tiger([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="beta"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "beta": 2.0})


def test_impossible_flag_combinations_fail_in_init(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="fused"):
        Tiger([torch.zeros(2, requires_grad=True)], foreach=True, fused=True)
    with pytest.raises(ValueError, match="capturable"):
        AdaX([torch.zeros(2, requires_grad=True)], capturable=True, foreach=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tigeropt.kernels.triton_status.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="fused=True"):
            Lion([torch.zeros(2, requires_grad=True)], fused=True)
    finally:
        monkeypatch.undo()
        tigeropt.kernels.triton_status.cache_clear()


@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX])
def test_sparse_grad_without_lazy_is_a_clear_error(cls: type) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_gradients(mode: str) -> None:
    p = torch.ones(3, requires_grad=True)
    opt = Lion([p], lr=0.1, on_nonfinite=mode)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    if mode == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
        assert torch.equal(p.detach(), torch.ones(3))
        assert not opt.state[p]  # nothing initialised, step not counted
    p.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, 1.1, 1.0]))


# ---------------------------------------------------------------- working with torch's tools
def _model_and_data(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


SCHEDULERS = [
    lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
    lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 3]),
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 2),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)),
    lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda s: 0.9),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 3),
    lambda o: torch.optim.lr_scheduler.ConstantLR(o, 0.5, 2),
    lambda o: torch.optim.lr_scheduler.PolynomialLR(o, 5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.01, total_steps=10, cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-4, 1e-2, 2, cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, 2), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        [2]),
]


@pytest.mark.parametrize("make_sched", SCHEDULERS)
@pytest.mark.parametrize("info", _OPTIMIZERS_UNDER_TEST[:4], ids=IDS[:4])
def test_lr_schedulers_drive_the_update(info: OptimizerInfo, make_sched: Any) -> None:
    """The scheduler's lr is the lr the step uses: same result as setting it by hand."""
    model, x, y = _model_and_data()
    twin = copy.deepcopy(model)
    opt = info.cls(model.parameters(), **info.kwargs)
    twin_opt = info.cls(twin.parameters(), **info.kwargs)
    sched = make_sched(opt)
    seen_lrs = set()
    for _ in range(5):
        seen_lrs.add(float(opt.param_groups[0]["lr"]))
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        twin_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        opt.step()
        twin_opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)
        else:
            sched.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert len(seen_lrs) > 1  # the schedule really changed the lr the steps used


def test_grad_scaler_clip_closure_zero_grad_and_hooks() -> None:
    model, x, y = _model_and_data()
    opt = Tiger(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert calls[:2] == ["pre", "post"] and len(calls) == 40
    assert all(p.grad is None for p in model.parameters()) is False
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # an inf gradient makes GradScaler skip the step: parameters do not move
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = torch.nn.functional.mse_loss(model(x), y)
        out.backward()
        return out

    assert isinstance(opt.step(closure), torch.Tensor)


def test_compiled_training_step_matches_eager() -> None:
    results = []
    for compiled in (False, True):
        model, x, y = _model_and_data()
        opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)

        def train_step(model=model, opt=opt, x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(3):
            fn()
        results.append([p.detach().clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- convergence
def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


# (optimizer, kwargs on the quadratic, kwargs on Rosenbrock, cosine-decayed lr on Rosenbrock)
CONVERGENCE = [
    (Tiger, dict(lr=3e-3, weight_decay=0.0, beta=0.9), dict(lr=3e-3, weight_decay=0.0, beta=0.9), True),
    (Lion, dict(lr=3e-3), dict(lr=3e-3), True),
    (AdaX, dict(lr=2e-2, weight_decay=0.0), dict(lr=2e-2, weight_decay=0.0), True),
    (Adagrad, dict(lr=0.5), dict(lr=1.0), False),
    # GloVe-style starts as SGD with step lr*g: Rosenbrock's large gradients need GloVe's clipping.
    (Adagrad, dict(lr=0.05, glove=True), dict(lr=0.01, glove=True, grad_clip_value=100.0), False),
]


@pytest.mark.parametrize("cls,quad_kwargs,rosen_kwargs,cosine", CONVERGENCE,
                         ids=["tiger", "lion", "adax", "adagrad", "glove"])
def test_convergence_on_quadratic_and_rosenbrock(cls: type, quad_kwargs: dict, rosen_kwargs: dict,
                                                 cosine: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.5, 2.0, 10, dtype=torch.float64)
    target = torch.randn(10, generator=gen, dtype=torch.float64)
    w = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = cls([w], **quad_kwargs)
    for i in range(3000):
        if cls in (Tiger, Lion) and i == 2000:
            opt.param_groups[0]["lr"] *= 0.05   # sign updates need a decaying lr to settle
        opt.zero_grad()
        loss = (scales * (w - target) ** 2).sum()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3
    xy = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = cls([xy], **rosen_kwargs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6000)
    for _ in range(6000):
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward()
        opt.step()
        if cosine:
            sched.step()
    assert loss.item() < 1e-2, loss.item()
    torch.testing.assert_close(xy.detach(), torch.ones(2, dtype=torch.float64), atol=0.1, rtol=0)
