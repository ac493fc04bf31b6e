"""Adversarial review, session 4: known items left open by session 3 (fused=True on devices the kernels
cannot take, the stochastic-rounding warning on every checkpoint load, 8-bit state drifting when it is
stored back unchanged) and what a demanding user hits next.  Each test reproduces a defect the way a
user hits it and failed before its fix."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger, kernels

TRITON = kernels.triton_usable()  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)


# ------------------------------------------------------------------ fused=True on a device the kernels lack
@pytest.mark.skipif(not TRITON, reason="fused=True needs Triton (the interpreter on CPU)")
@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_fused_with_parameters_on_the_meta_device_fails_in_the_constructor(cls: type) -> None:
    """fused=True with meta parameters was accepted and failed at the first step (ValueError "a Parameter
    without storage" from the launcher).  An impossible flag combination fails up front: the constructor
    and add_param_group raise (RuntimeError naming the device, as for CPU parameters without the
    interpreter) and a rejected group is not added."""
    meta = torch.zeros(4, device="meta", requires_grad=True)
    with pytest.raises(RuntimeError, match="fused=True.*meta"):
        cls([meta], fused=True)
    opt = cls([torch.zeros(4, requires_grad=True)], fused=True)
    with pytest.raises(RuntimeError, match="fused=True.*meta"):
        opt.add_param_group({"params": [meta]})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------ the SR warning, once per cause
def _no_effect_warnings(record: list[warnings.WarningMessage]) -> int:
    return sum("stochastic_rounding=True has no effect" in str(w.message) for w in record)


@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_stochastic_rounding_warning_comes_once_per_cause_not_on_every_load(cls: type) -> None:
    """stochastic_rounding=True with fp32 parameters and fp32 state warns in the constructor ("no
    effect").  Every load_state_dict (it validates the checkpoint's groups with the constructor's
    routine) warned again, once per group, and optimizer_in_backward once per parameter.  Now: the
    constructor warns once per group; loading a checkpoint into a group that already had the cause
    does not; loading one that brings the cause (stochastic_rounding=True into a group without it)
    warns once; optimizer_in_backward warns once for the call."""
    def params() -> list[dict[str, Any]]:
        return [{"params": [torch.zeros(3, requires_grad=True)]},
                {"params": [torch.zeros(2, requires_grad=True)]}]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = cls(params(), stochastic_rounding=True)
        assert _no_effect_warnings(record) == 2  # one per group
        sd = opt.state_dict()
        record.clear()
        opt.load_state_dict(sd)
        opt.load_state_dict(sd)
        assert _no_effect_warnings(record) == 0
        plain = cls(params())
        plain.load_state_dict(sd)  # the checkpoint brings stochastic_rounding=True into both groups
        assert _no_effect_warnings(record) == 2
        assert all(g["stochastic_rounding"] for g in plain.param_groups)
        record.clear()
        plain.load_state_dict(sd)
        assert _no_effect_warnings(record) == 0
        ps = [torch.zeros(3, requires_grad=True) for _ in range(4)]
        tigeropt.optimizer_in_backward(ps, cls, stochastic_rounding=True)
        assert _no_effect_warnings(record) == 1


# ------------------------------------------------------------------ 8-bit state stored back unchanged
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True)], ids=["reference", "foreach"])
def test_8bit_state_stored_back_unchanged_keeps_its_codes_and_absmax(path: dict[str, Any]) -> None:
    """Tiger's nan_guard leaves m unchanged on a step whose gradient holds a NaN, but the low-precision
    step decodes the 8-bit state and encodes it again: the block maximum of the decoded values is
    448 * (absmax/448), which is not absmax for ~10% of floats, so ~10-25% of the blocks' absmax moved
    by one unit on every such step.  The encoder now stores that decoded maximum as the absmax (same
    scale, same decoded values, same codes), a fixed point: unchanged state stays bit for bit."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256 * 64, dtype=torch.bfloat16))
    opt = Tiger([p], lr=1e-3, state_precision="8bit", nan_guard=True, **path)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    codes, absmax = st["exp_avg"].clone(), st["exp_avg_absmax"].clone()
    bad = torch.randn_like(p)
    bad[5] = float("nan")
    p.grad = bad
    opt.step()
    assert torch.equal(st["exp_avg"], codes)
    assert torch.equal(st["exp_avg_absmax"], absmax)


def test_8bit_codec_round_trip_and_precision_conversion_round_trip_are_exact() -> None:
    """decode then encode (round to nearest) gives the same codes and absmax; so does loading an 8-bit
    checkpoint into a fp32-state optimizer and its checkpoint back into an 8-bit one (the absmax of
    ~10% of the blocks moved by a unit)."""
    from tigeropt import _lowp

    torch.manual_seed(1)
    x = torch.randn(256 * 400) * torch.logspace(-30, 30, 256 * 400)
    codes, absmax = _lowp.encode_8bit(x)
    again = _lowp.encode_8bit(_lowp.decode_8bit(codes, absmax))
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)

    p = torch.nn.Parameter(torch.randn(256 * 40))
    q8 = Lion([p], state_precision="8bit")
    p.grad = torch.randn_like(p)
    q8.step()
    fp32 = Lion([p], state_precision="fp32")
    fp32.load_state_dict(q8.state_dict())
    back = Lion([p], state_precision="8bit")
    back.load_state_dict(fp32.state_dict())
    for key in ("exp_avg", "exp_avg_absmax"):
        assert torch.equal(back.state[p][key], q8.state[p][key])


# ------------------------------------------------------------------ C plans and tensors re-viewed in place
def _unplanned(cls: type) -> type:
    return type(f"Unplanned{cls.__name__}", (cls,), {"_build_plan": lambda self, *args: None})


@pytest.mark.parametrize("setting", [dict(dtype=torch.float32),
                                     dict(dtype=torch.bfloat16, stochastic_rounding=True),
                                     dict(dtype=torch.bfloat16, state_precision="bf16")],
                         ids=["fp32", "bf16-sr", "bf16-state"])
@pytest.mark.parametrize("cls", [Tiger, AdaX], ids=lambda c: c.__name__)
def test_c_plan_sees_a_parameter_and_its_state_re_viewed_in_place(cls: type, setting: dict[str, Any]) -> None:
    """``p.data = p.data.t()`` (and the state's ``.data`` likewise) keeps every tensor object and data
    address the cached C plan checks, but not the layout: the plan paired the transposed parameter's
    memory with the row-major gradient (wrong elements updated, silently).  It now also requires the
    tensors it holds to be contiguous, else the step takes the plain route."""
    setting = dict(setting)
    dtype = setting.pop("dtype")
    results = []
    for c in (cls, _unplanned(cls)):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3, generator=gen).to(dtype)),
              torch.nn.Parameter(torch.randn(300, generator=gen).to(dtype))]
        opt = c(ps, lr=0.01, **setting)
        for i in range(4):
            if i == 2:
                ps[0].data = ps[0].data.t()
                for k, v in opt.state[ps[0]].items():
                    if k != "step":
                        v.data = v.data.t()
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        results.append((ps, opt))
    (pa, a), (pb, b) = results
    assert a._plans and not b._plans
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        for k in a.state[p]:
            assert torch.equal(a.state[p][k], b.state[q][k]), k


# ------------------------------------------------------------------ optimizer_in_backward
def test_optimizer_in_backward_takes_named_parameters_as_torch_optimizers_do() -> None:
    """torch.optim optimizers (and tigeropt's) take ``model.named_parameters()`` and keep the names in
    the state_dict's ``param_names``; optimizer_in_backward raised TypeError ("params must hold tensors,
    got tuple").  Now each per-parameter optimizer gets its (name, tensor) pair, in plain lists and in
    group dicts, and the result equals an ordinary step."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    in_bw = tigeropt.optimizer_in_backward(a.named_parameters(), Tiger, lr=0.1)
    plain = Tiger(b.parameters(), lr=0.1)
    assert [g["param_names"] for g in in_bw.state_dict()["param_groups"]] == [["weight"], ["bias"]]
    x = torch.randn(4, 3)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    plain.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    grouped = tigeropt.optimizer_in_backward([{"params": list(b.named_parameters()), "lr": 0.5}], Lion)
    assert [g["lr"] for g in grouped.param_groups] == [0.5, 0.5]


def test_optimizer_in_backward_after_remove_steps_like_an_ordinary_optimizer() -> None:
    """remove() detaches the hooks, so backward() leaves the gradients; step() still raised "the
    optimizer step runs inside backward()" (no longer true) and nothing could step the parameters.
    Now, once removed, step() (and GradScaler.step, which then unscales and skips inf steps itself)
    is an ordinary step of every parameter; while attached it is refused as before."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    in_bw = tigeropt.optimizer_in_backward(a.parameters(), Tiger, lr=0.1)
    plain = Tiger(b.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="inside backward"):
        in_bw.step()
    in_bw.remove()
    x = torch.randn(4, 3)
    for model, opt in ((a, in_bw), (b, plain)):
        for _ in range(2):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(a(x).sum()).backward()
    a.weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in a.parameters()]
    scaler.step(in_bw)  # inf: skipped by the scaler
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, a.parameters()))


# ------------------------------------------------------------------ WGAN critic under inference_mode
@pytest.mark.parametrize("variant", ["gn", "gran"])
def test_grad_norm_critic_evaluates_under_inference_mode(variant: str) -> None:
    """The normalized critic needs the input gradient; under ``torch.no_grad()`` it enables autograd
    itself, but under ``torch.inference_mode()`` (the default of validation loops, e.g. Lightning's)
    it failed with "element 0 of tensors does not require grad".  Now it takes the gradient outside
    inference mode on a copy of x and returns the same values."""
    from tigeropt import GradNormCritic

    torch.manual_seed(0)
    critic = GradNormCritic(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(),
                                                torch.nn.Linear(8, 1)), variant)
    x = torch.randn(5, 4)
    expected = critic(x).detach()
    with torch.inference_mode():
        got = critic(x.clone())
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ the demo's command line
@pytest.mark.parametrize("value", ["", " , "])
def test_demo_refuses_an_empty_optimizer_list(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m tigeropt.demo --optimizers ''`` loaded the corpus, trained nothing and ended in an
    IndexError traceback; it is now a usage error naming the argument, before any work."""
    from tigeropt import demo

    with pytest.raises(SystemExit):
        demo.main(["--optimizers", value])
    assert "--optimizers names none" in capsys.readouterr().err


# ------------------------------------------------------------------ Tiger's betas mirror
def test_tiger_takes_an_equal_betas_pair_written_into_a_group() -> None:
    """Tiger mirrors beta as ``group["betas"] = (beta, beta)`` for schedulers, and took a write of betas
    only when ``betas[0] != betas[1]``: ``group["betas"] = (0.9, 0.9)`` (by hand, or a scheduler cycling
    to the current second value) was silently reverted to the old beta.  Tiger now remembers the pair it
    mirrored: any other pair written since is taken, equal or not; a hand-set beta still wins over an
    unwritten mirror; copies and loaded checkpoints mirror afresh."""
    import copy

    p = torch.nn.Parameter(torch.ones(3))
    opt = Tiger([p], lr=0.1, beta=0.965)
    group = opt.param_groups[0]
    p.grad = torch.ones(3)
    group["betas"] = (0.9, 0.9)
    opt.step()
    assert group["beta"] == 0.9 and group["betas"] == (0.9, 0.9)
    group["beta"] = 0.7
    opt.step()
    assert group["beta"] == 0.7 and group["betas"] == (0.7, 0.7)
    twin = copy.deepcopy(opt)
    twin.param_groups[0]["betas"] = (0.5, 0.5)
    twin.param_groups[0]["params"][0].grad = torch.ones(3)
    twin.step()
    assert twin.param_groups[0]["beta"] == 0.5
    loaded = Tiger([p], lr=0.1)
    loaded.load_state_dict(opt.state_dict())
    loaded.param_groups[0]["betas"] = (0.4, 0.4)
    loaded.step()
    assert loaded.param_groups[0]["beta"] == 0.4


# ------------------------------------------------------------------ numpy scalars as hyperparameters
@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_numpy_scalars_are_taken_as_torch_optimizers_take_them(cls: type) -> None:
    """``lr=np.float32(1e-3)`` (a sweep over ``np.logspace(...).astype(np.float32)``, a config) and
    ``np.int64`` counts are numbers to torch.optim; every tigeropt optimizer and helper raised TypeError
    ("expected a real number, got float32").  Now any ``numbers.Real`` / ``numbers.Integral`` (not bool)
    is accepted and stored as the Python number, and the step equals the one with Python numbers."""
    np = pytest.importorskip("numpy")

    def run(lr: Any, wd: Any, seed: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 10))
        opt = cls([p], lr=lr, weight_decay=wd, sr_seed=seed)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr})
        p.grad = torch.linspace(1, -1, 10)
        opt.step()
        return p.detach(), opt.param_groups[1]

    got, group = run(np.float32(0.01), np.float32(0.1), np.int64(3))
    want, _ = run(float(np.float32(0.01)), float(np.float32(0.1)), 3)
    assert torch.equal(got, want)
    assert type(group["lr"]) is float and type(group["sr_seed"]) is int
    kw = tigeropt.suggest_hparams("tiger", adamw_lr=np.float32(3e-3), adamw_weight_decay=np.float64(0.1),
                                  steps=np.int64(600))
    assert kw["lr"] == pytest.approx(1e-3)
    model = torch.nn.Linear(2, 2)
    assert tigeropt.create_optimizer(model, "tiger", lr=np.float32(1e-3), weight_decay=np.float32(0.1))
    assert tigeropt.param_groups(model, lr=np.float32(1e-3), weight_decay=np.float32(0.1))
    with pytest.raises(TypeError, match="nan_guard.*numpy"):
        Tiger([torch.zeros(1, requires_grad=True)], nan_guard=np.bool_(True))


# ------------------------------------------------------------------ LazyOptimizer over SparseAdam
def test_lazy_optimizer_hands_sparse_gradients_to_sparse_adam_as_they_are() -> None:
    """LazyOptimizer densifies a sparse gradient for the wrapped optimizer (most torch optimizers refuse
    sparse ones), but torch.optim.SparseAdam refuses dense ones: wrapping it (directly or inside a
    MixedOptimizer next to AdamW) raised "SparseAdam does not support dense gradients" on the first
    step.  Its gradients now go through as they are (it updates only the listed rows itself), and the
    result equals SparseAdam alone."""
    torch.manual_seed(0)
    emb, twin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Embedding(10, 4, sparse=True)
    twin.load_state_dict(emb.state_dict())
    head, twin_head = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    twin_head.load_state_dict(head.state_dict())
    lazy = tigeropt.LazyOptimizer(tigeropt.MixedOptimizer(torch.optim.SparseAdam(emb.parameters(), lr=0.1),
                                                          torch.optim.AdamW(head.parameters())), emb)
    plain = tigeropt.MixedOptimizer(torch.optim.SparseAdam(twin.parameters(), lr=0.1),
                                    torch.optim.AdamW(twin_head.parameters()))
    for i in range(3):
        idx = torch.tensor([1, 2, i + 3])
        for e, h, opt in ((emb, head, lazy), (twin, twin_head, plain)):
            opt.zero_grad()
            h(e(idx)).sum().backward()
            opt.step()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    assert torch.equal(emb.weight, twin.weight)


# ------------------------------------------------------------------ describe()
def test_describe_names_its_argument_and_formats_every_case() -> None:
    """``describe(5)`` raised "'int' object is not iterable" and a list of tensors a RuntimeError; groups
    without lr printed the placeholder as a quoted string ('-') and ``max_names=0`` a name list starting
    with a comma (", ... (+4)").  Now a TypeError names ``groups``, and the table reads - and ... (+4)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    with pytest.raises(TypeError, match="groups"):
        tigeropt.describe(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="groups"):
        tigeropt.describe(list(model.parameters()))  # type: ignore[arg-type]
    row = tigeropt.describe([{"params": [model[0].weight]}]).splitlines()[1].split()
    assert row[1:3] == ["-", "-"]
    table = tigeropt.describe(tigeropt.param_groups(model, lr=1e-3), max_names=0)
    assert table.splitlines()[1].endswith("  ... (+4)")


def test_tiger_group_given_only_betas_is_the_dict_the_caller_passed() -> None:
    """torch.optim stores the dict given to add_param_group as the group, so a caller may keep it and
    change ``lr`` later; Tiger stored a copy when the dict set ``betas`` without ``beta`` (code written for
    Lion/Adam), and later changes to the caller's dict did nothing.  It now sets ``beta`` in that dict."""
    opt = Tiger([torch.zeros(2, requires_grad=True)])
    group = {"params": [torch.zeros(2, requires_grad=True)], "betas": (0.9, 0.9)}
    opt.add_param_group(group)
    assert opt.param_groups[1] is group and group["beta"] == 0.9
    rejected = {"params": [torch.zeros(2, requires_grad=True)], "betas": (0.9, 0.9), "lr": -1.0}
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group(rejected)
    assert "beta" not in rejected and len(opt.param_groups) == 2
