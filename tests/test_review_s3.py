"""Adversarial review, session 3: low-precision options combined with the rest of the library, the
step inside backward, torch.compile's capturable flag, non-finite values on every path.  Each test
reproduces a defect the way a user hits it and failed before its fix (or is marked xfail(strict))."""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger, kernels

TRITON = kernels.triton_usable()  # CPU under TRITON_INTERPRET=1 (tests/conftest.py)
PATHS: dict[str, dict[str, Any]] = {"reference": dict(foreach=False), "foreach": dict(foreach=True),
                                    "default": {}}
if TRITON:
    PATHS["fused"] = dict(fused=True)

OPTS: list[tuple[type, dict[str, Any]]] = [
    (Tiger, dict(lr=0.01, weight_decay=0.1)), (Lion, dict(lr=0.01, weight_decay=0.1)), (AdaX, dict(lr=0.01)),
    (Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)), (Adagrad, dict(lr=0.05, glove=True)),
    (Adagrad, dict(lr=0.1, rowwise=True)),
]
OPT_IDS = ["tiger", "lion", "adax", "adagrad", "glove", "rowwise"]


# ------------------------------------------------------------------ in_backward + stochastic rounding
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).float().square().mean()


@pytest.mark.parametrize("prec", [dict(stochastic_rounding=True), dict(stochastic_rounding=True,
                                                                      state_precision="8bit")],
                         ids=["sr", "sr-8bit"])
@pytest.mark.parametrize("cls", [Tiger, Lion, AdaX, Adagrad], ids=lambda c: c.__name__)
def test_optimizer_in_backward_with_stochastic_rounding_equals_a_plain_step(cls: type, prec: dict) -> None:
    """The rounding hash is keyed on the parameter's index in the optimizer.  optimizer_in_backward
    builds one optimizer per parameter, so every parameter was index 0 there: other rounding bits than
    the plain step (the documented equality broke) and the same bits in every parameter."""
    plain, in_bw_net = _Net().bfloat16(), _Net().bfloat16()
    opt = cls(plain.parameters(), lr=1e-3, **prec)
    in_bw = tigeropt.optimizer_in_backward(in_bw_net.parameters(), cls, lr=1e-3, **prec)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 16, generator=gen).bfloat16() for _ in range(4)]
    for x in xs[:2]:
        opt.zero_grad()
        plain(x).backward()
        opt.step()
        in_bw_net(x).backward()
    for p, q in zip(plain.parameters(), in_bw_net.parameters()):
        assert torch.equal(p, q)
    # a copy and a resumed object continue with the same keys
    twin_net = copy.deepcopy(in_bw_net)
    resumed = tigeropt.optimizer_in_backward(twin_net.parameters(), cls, lr=1e-3, **prec)
    resumed.load_state_dict(in_bw.state_dict())
    for x in xs[2:]:
        opt.zero_grad()
        plain(x).backward()
        opt.step()
        in_bw_net(x).backward()
        twin_net(x).backward()
    for p, q, r in zip(plain.parameters(), in_bw_net.parameters(), twin_net.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


# ------------------------------------------------------------------ torch.compile's capturable=True
_EXTRAS = [(Tiger, dict(lr_scaling=True)), (Tiger, dict(nan_guard=True)), (Tiger, dict(accumulation_steps=2)),
           (Tiger, dict(state_precision="8bit")), (Lion, dict(state_precision="bf16")),
           (AdaX, dict(stochastic_rounding=True)), (Adagrad, dict(glove=True, skip_nonfinite_rows=True))]


@pytest.mark.parametrize("cls,kw", _EXTRAS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k in _EXTRAS])
def test_capturable_set_by_torch_compile_keeps_a_path_for_every_group(cls: type, kw: dict[str, Any]) -> None:
    """torch.compile sets ``capturable=True`` on the param groups of an optimizer it traces on a GPU
    (Dynamo's OptimizerVariable._set_capturable, as for torch.optim.Adam), also on groups using options
    the fused Triton step lacks (Tiger's extras, low precision), or fp64 ones.  The constructor refuses
    such a combination when the user asks for it, but the flip comes later: the step then raised
    "capturable=True needs the fused Triton path" for every compiled step on a GPU.  Now such a group
    runs its ordinary path (with its step counts on the device)."""
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([p], **kw)
    group = opt.param_groups[0]
    group["capturable"] = True  # what Dynamo writes into a CUDA optimizer's groups
    for dtype in (torch.float32, torch.bfloat16):
        assert opt._path(group, torch.device("cuda"), dtype) == "foreach"
    plain = Tiger([torch.zeros(4, dtype=torch.float64, requires_grad=True)])
    plain.param_groups[0]["capturable"] = True
    assert plain._path(plain.param_groups[0], torch.device("cuda"), torch.float64) == "foreach"


@pytest.mark.parametrize("cls,kw", _EXTRAS + [(Lion, dict(foreach=True))],
                         ids=[*(f"{c.__name__}-{next(iter(k))}" for c, k in _EXTRAS), "Lion-foreach"])
def test_checkpoint_loads_after_torch_compile_set_capturable(cls: type, kw: dict[str, Any]) -> None:
    """After torch.compile has set capturable=True on a GPU optimizer's groups, load_state_dict checked
    the checkpoint's group together with that flag and refused to resume ("capturable=True does not
    support the options this group uses", "capturable=True needs the fused Triton path").  The flag is
    the loading optimizer's, not the checkpoint's: the checkpoint loads, the flag stays."""
    p = nn.Parameter(torch.randn(4, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls([p], **kw)
    p.grad = torch.randn(4, 256)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["capturable"] = True  # what Dynamo writes into a CUDA optimizer's groups
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["capturable"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", _EXTRAS, ids=[f"{c.__name__}-{next(iter(k))}" for c, k in _EXTRAS])
def test_cuda_compiled_step_with_options_the_triton_step_lacks(cls: type, kw: dict[str, Any]) -> None:
    """The same on a GPU, end to end: torch.compile(opt.step) equals the eager step."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(32, 16, generator=gen).bfloat16()
    grads = [torch.randn(32, 16, generator=gen).bfloat16() for _ in range(3)]
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        p = base.cuda().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([p], lr=1e-2, **kw)
        step = torch.compile(opt.step) if compiled else opt.step
        for g in grads:
            p.grad = g.cuda()
            step()
        results.append(p.detach().float().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2 ** -6)


# ------------------------------------------------------------------ non-finite values: the same on every path
_PRECISIONS = [(torch.float32, {}), (torch.float32, dict(state_precision="8bit")), (torch.bfloat16, {}),
               (torch.bfloat16, dict(state_precision="bf16")),
               (torch.bfloat16, dict(stochastic_rounding=True)),
               (torch.bfloat16, dict(state_precision="8bit", stochastic_rounding=True))]
_NONFINITE_CASES = ([(cls, kw, False) for cls, kw in OPTS]
                    + [(Tiger, OPTS[0][1], True), (Lion, OPTS[1][1], True)])


def _nonfinite_pattern(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the README's contract fixes about a tensor holding NaN/inf: which elements are NaN, the
    bits of every other element (±inf included); not a NaN's sign or payload (nor, so, the sign bit
    of an 8-bit NaN code, 0x7f or 0xff)."""
    t = t.detach()
    if t.dtype == torch.uint8:
        nan = (t & 0x7F) == 0x7F
        return nan, torch.where(nan, 0, t)
    nan = t.isnan()
    return nan, torch.where(nan, 0, t)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter, numpy
@pytest.mark.parametrize("cls,kw,maximize", _NONFINITE_CASES, ids=[*OPT_IDS, "tiger-max", "lion-max"])
def test_nan_and_inf_land_alike_on_every_path_and_precision(cls: type, kw: dict[str, Any],
                                                            maximize: bool) -> None:
    """±NaN, +inf and -inf in a gradient, every path, fp32/bf16 parameters, every state precision, with
    and without stochastic rounding: the same elements end NaN, and every other bit (±inf, finite
    values, codes, absmax) is the same.  Only a NaN's sign may differ (README, non-finite gradients)."""
    bad = torch.tensor([math.nan, -math.nan, math.inf, -math.inf])
    for dtype, prec in _PRECISIONS:
        results = {}
        for path, flags in PATHS.items():
            p = torch.linspace(-1, 1, 300, dtype=dtype).reshape(30, 10).requires_grad_()
            opt = cls([p], maximize=maximize, **kw, **flags, **prec)
            for k in range(3):
                g = torch.randn(30, 10, generator=torch.Generator().manual_seed(k)).to(dtype)
                if k == 1:
                    g.view(-1)[:4] = bad.to(dtype)
                    g[7] = bad[0]  # a whole row
                p.grad = g
                opt.step()
            results[path] = [p] + [v for k, v in opt.state[p].items() if k != "step"]
        ref = results["reference"]
        assert not ref[0].view(-1)[:4].isfinite().any() and not ref[0][7].isfinite().any()
        for path, got in results.items():
            for a, b in zip(got, ref):
                for x, y in zip(_nonfinite_pattern(a), _nonfinite_pattern(b)):
                    assert torch.equal(x, y), (path, dtype, prec, a, b)


# ------------------------------------------------------------------ malformed checkpoints load nothing
def _deep(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.dtype, tuple(x.shape), x.detach().clone())
    if isinstance(x, dict):
        return {(id(k) if isinstance(k, torch.Tensor) else k): _deep(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_deep(v) for v in x]
    return x


def _deep_equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.Tensor):
        return isinstance(b, tuple) and a[:2] == b[:2] and torch.equal(a[2], b[2])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_deep_equal, a, b))
    return bool(a == b)


def _everything(opt: torch.optim.Optimizer) -> Any:
    params = [p for g in opt.param_groups for p in g["params"]]
    return _deep({"groups": opt.param_groups, "defaults": opt.defaults, "params": params,
                  "state": [dict(opt.state[p]) if p in opt.state else None for p in params]})


def _set(where: str, key: str, value: Any) -> Any:
    def change(sd: dict[str, Any], keys: tuple[str, ...]) -> None:
        target = sd if where == "top" else sd["state"][1] if where == "state" else sd["param_groups"][0]
        target[key if key != "KEY" else keys[0]] = value(sd) if callable(value) else value
    return change


_MALFORMED = {
    "step str": (_set("state", "step", "7"), TypeError),
    "step list": (_set("state", "step", [1.0]), TypeError),
    "step None": (_set("state", "step", None), ValueError),
    "step nan": (_set("state", "step", torch.tensor(math.nan)), ValueError),
    "step negative": (_set("state", "step", -2.0), ValueError),
    "step two elements": (_set("state", "step", torch.tensor([1.0, 2.0])), ValueError),
    "state value a list": (_set("state", "KEY", [0.0] * 12), TypeError),
    "state value complex": (_set("state", "KEY", lambda sd: torch.zeros(
        sd["state"][1][next(iter(k for k in sd["state"][1] if k != "step"))].shape, dtype=torch.complex64)),
        ValueError),
    "state not a dict": (_set("top", "state", [1, 2]), TypeError),
    "a parameter's state not a dict": (lambda sd, keys: sd["state"].__setitem__(1, 5.0), TypeError),
    "group without params": (lambda sd, keys: sd["param_groups"][0].pop("params"), TypeError),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
@pytest.mark.parametrize("cls,kw", OPTS, ids=OPT_IDS)
def test_malformed_checkpoint_is_refused_with_the_documented_error_and_loads_nothing(
        cls: type, kw: dict[str, Any], case: str) -> None:
    """A step count that is not a number raised after torch's loader had already replaced the param
    groups and state (the optimizer half loaded, then a ValueError/TypeError from float()); step None,
    NaN, negative or a two-element tensor loaded silently (the next step crashed or computed garbage);
    a list or a complex tensor as state, a state that is not a dict, a group without params raised
    AttributeError/KeyError or were cast silently.  Now TypeError/ValueError, and nothing changes."""
    change, error = _MALFORMED[case]
    ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 4))]
    opt = cls(ps, **kw)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    change(sd, cls.state_keys)
    before = _everything(opt)
    with pytest.raises(error, match="load_state_dict"):
        opt.load_state_dict(sd)
    assert _deep_equal(_everything(opt), before)
    opt.step()  # still usable


# ------------------------------------------------------------------ state_precision changed between steps
_CHANGES = [(cls, a, b) for cls in (Tiger, Lion, AdaX, Adagrad)
            for a, b in [("8bit", None), ("8bit", "bf16"), (None, "8bit"), ("bf16", None)]
            if not (cls is Adagrad and "bf16" in (a, b))]  # Adagrad's "8bit" sum is bf16


@pytest.mark.parametrize("cls,before,after", _CHANGES,
                         ids=[f"{c.__name__}-{a}-to-{b}" for c, a, b in _CHANGES])
@pytest.mark.parametrize("path", ["foreach", "default"])
def test_state_precision_changed_between_steps_converts_the_state_like_a_checkpoint(
        cls: type, before: str | None, after: str | None, path: str) -> None:
    """``group["state_precision"] = ...`` between steps (to save memory mid-run, or to undo that):
    8-bit codes then met float math (RuntimeError "result type Float can't be cast to ... Byte", or the
    fused kernels' TypeError) and float state stayed float under "8bit"/"bf16" (no memory saved,
    silently).  Now the next step converts it, as loading a checkpoint into an optimizer of the new
    precision does: the two continue bit for bit alike."""
    def grads(p: torch.Tensor, k: int) -> None:
        p.grad = torch.randn(2, 256, generator=torch.Generator().manual_seed(k)).bfloat16()

    p = nn.Parameter(torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).bfloat16())
    opt = cls([p], lr=0.01, state_precision=before, **PATHS[path])
    for k in range(2):
        grads(p, k)
        opt.step()
    q = nn.Parameter(p.detach().clone())
    twin = cls([q], lr=0.01, state_precision=after, **PATHS[path])
    twin.load_state_dict(opt.state_dict())  # the documented conversion
    opt.param_groups[0]["state_precision"] = after
    for k in range(2, 4):
        grads(p, k)
        opt.step()
        grads(q, k)
        twin.step()
    assert torch.equal(p, q)
    assert opt.state[p].keys() == twin.state[q].keys()
    for key, value in twin.state[q].items():
        assert value.dtype == opt.state[p][key].dtype and torch.equal(opt.state[p][key], value), key


# ------------------------------------------------------------------ LazyOptimizer over 8-bit state
@pytest.mark.parametrize("sr", [False, True], ids=["rtn", "sr"])
@pytest.mark.parametrize("cls", [Tiger, Lion], ids=lambda c: c.__name__)  # AdaX: L2 decay on the 1st step
def test_lazy_optimizer_over_8bit_state_keeps_untouched_rows_and_equals_the_native_lazy_step(
        cls: type, sr: bool) -> None:
    """LazyOptimizer restored the untouched rows' 8-bit codes but not their blocks' absmax: with rows
    of 512 elements (two blocks a row) a row left alone had its momentum rescaled by whatever the
    wrapped step wrote into the absmax (exp_avg off by 0.02 in one step).  Now the untouched
    rows' absmax is restored with their codes: the result equals the optimizer's own lazy=True step."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 512, generator=gen).bfloat16()
    grads = []
    for k in range(4):
        g = torch.zeros(8, 512)
        g[[k, 5]] = torch.randn(2, 512, generator=gen) * (100.0 if k == 3 else 1.0)
        grads.append(g.bfloat16())
    wrapped_p, native_p = nn.Parameter(base.clone()), nn.Parameter(base.clone())
    kw = dict(lr=0.01, state_precision="8bit", stochastic_rounding=sr)
    wrapped = tigeropt.LazyOptimizer(cls([wrapped_p], **kw), [wrapped_p])
    native = cls([native_p], lazy=True, **kw)
    for g in grads:
        wrapped_p.grad, native_p.grad = g.clone(), g.clone()
        wrapped.step()
        native.step()
    assert torch.equal(wrapped_p, native_p)
    for key, value in native.state[native_p].items():
        assert torch.equal(wrapped.state[wrapped_p][key], value), key


def test_lazy_optimizer_refuses_8bit_state_whose_blocks_span_rows_before_anything_changes() -> None:
    """Rows of 64 elements share a block: untouched rows cannot keep their 8-bit state (their momentum
    jumped by up to 3 when a touched neighbour raised the block's absmax).  ValueError at the first
    step, as the optimizer's own lazy=True refuses such shapes, and nothing changes."""
    emb = nn.Embedding(8, 64)
    opt = tigeropt.LazyOptimizer(Tiger(emb.parameters(), lr=0.01, state_precision="8bit"), [emb])
    emb(torch.tensor([1, 2])).sum().backward()
    sparse_like = emb.weight.grad.clone()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="256-element blocks"):
        opt.step()
    assert torch.equal(emb.weight, before) and not opt.state[emb.weight]
    assert torch.equal(emb.weight.grad, sparse_like)


# ------------------------------------------------------------------ complex parameters + low precision
_COMPLEX_REFUSED = [(torch.complex64, dict(state_precision="bf16")),
                    (torch.complex64, dict(state_precision="8bit")),
                    (torch.complex64, dict(stochastic_rounding=True)),
                    (torch.complex128, dict(state_precision="fp32"))]


@pytest.mark.parametrize("dtype,options", _COMPLEX_REFUSED,
                         ids=[f"{d}-{next(iter(o.values()))}" for d, o in _COMPLEX_REFUSED])
def test_complex_parameters_with_low_precision_options_are_refused_up_front(
        dtype: torch.dtype, options: dict[str, Any]) -> None:
    """An impossible combination fails in the constructor (README, "Bad input"): complex parameters with
    low-precision options were accepted there and raised RuntimeError at the first step.  Now a
    ValueError naming the option from the constructor, add_param_group and load_state_dict."""
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        Tiger([torch.zeros(3, dtype=dtype, requires_grad=True)], **options)
    opt = Tiger([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=dtype, requires_grad=True)], **options})
    assert len(opt.param_groups) == 1
    mixed = [torch.zeros(3, dtype=dtype, requires_grad=True)]
    plain = Tiger(mixed)
    sd = plain.state_dict()
    sd["param_groups"][0].update(options)
    if name == "stochastic_rounding":  # the loading optimizer's own precision, the checkpoint's rounding
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            Tiger(mixed).load_state_dict(sd)


# ------------------------------------------------------------------ row-wise Adagrad: rows of no element
def test_rowwise_adagrad_rows_of_no_element_keep_a_finite_accumulator_on_every_path() -> None:
    """A (rows, 0) table (an embedding of width 0, e.g. a config sweep's edge): the reference and
    foreach paths (and the Triton path's dense step, which runs the reference) added mean(g^2) = 0/0 =
    NaN to every row's accumulator, the fused C step and lazy rows 0."""
    for path, flags in PATHS.items():
        for lazy in (False, True):
            p = torch.zeros(5, 0, requires_grad=True)
            opt = Adagrad([p], lr=0.1, rowwise=True, lazy=lazy, **flags)
            for _ in range(2):
                p.grad = torch.ones(5, 0)
                opt.step()
            assert torch.equal(opt.state[p]["sum"], torch.zeros(5)), (path, lazy)


def test_rowwise_flag_of_a_wrong_type_is_a_type_error() -> None:
    """rowwise=1 raised ValueError; every other bool flag raises TypeError naming the argument."""
    with pytest.raises(TypeError, match="Invalid type for rowwise"):
        Adagrad([torch.zeros(2, 2, requires_grad=True)], rowwise=1)


# ------------------------------------------------------------------ tigeropt.param_groups: wrong types
_PG_WRONG_TYPES = {"lr_scale": dict(lr_scale=[("crf", 2.0)]), "rules": dict(rules={"match": "crf"}),
                   "rules[0]": dict(rules=["crf"]),
                   "rules[0]['extra']": dict(rules=[{"match": "0", "extra": 5}]),
                   "names": dict(names=1), "strict": dict(strict="no"),
                   "block_pattern": dict(block_pattern=5, layer_decay=0.5), "no_decay": dict(no_decay=5),
                   "embeddings": dict(embeddings=5, layer_decay=0.5)}


@pytest.mark.parametrize("name", list(_PG_WRONG_TYPES))
def test_param_groups_helper_names_the_argument_of_a_wrong_type(name: str) -> None:
    """A wrong type is a TypeError naming the argument: lr_scale/rules/extra of a wrong type and
    no_decay=5 raised ValueError, names=1 and strict='no' were accepted, block_pattern=5 raised re's
    TypeError naming nothing."""
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(TypeError, match=f"Invalid type for {re.escape(name)}:"):
        tigeropt.param_groups(model, lr=0.1, **_PG_WRONG_TYPES[name])


# ------------------------------------------------------------------ load_state_dict hooks
@pytest.mark.parametrize("cls,kw", OPTS[:4] + [(Tiger, dict(lr=0.01, state_precision="8bit"))],
                         ids=[*OPT_IDS[:4], "tiger-8bit"])
def test_load_state_dict_hooks_run_as_torch_runs_them(cls: type, kw: dict[str, Any]) -> None:
    """torch.optim runs load_state_dict pre hooks first and loads what they return, and post hooks at
    the end.  tigeropt checked the checkpoint before the pre hooks ran (a hook that migrates an old
    checkpoint, renaming a state key, could not rescue it: "holds ['momentum'], which ... does not
    keep"), loaded the state from the dict the hooks had replaced (groups from the hooks' dict, state
    from the caller's), and ran the post hooks before converting the state (what they changed was
    overwritten)."""
    p = nn.Parameter(torch.randn(4, 300))
    opt = cls([p], **kw)
    p.grad = torch.randn(4, 300)
    opt.step()
    key = cls.state_keys[0]
    old = copy.deepcopy(opt.state_dict())
    old["state"][0]["momentum"] = old["state"][0].pop(key)  # an old checkpoint's name for it
    old["state"][0].pop(key + "_absmax", None)
    old["state"][0]["momentum"] = torch.zeros(4, 300) + 0.25
    calls = []

    def migrate(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("pre")
        sd = copy.deepcopy(sd)
        sd["state"][0][key] = sd["state"][0].pop("momentum")
        sd["param_groups"][0]["lr"] = 0.5
        return sd

    def after(o: torch.optim.Optimizer) -> None:
        calls.append("post")
        assert o.state[p]["step"].item() == 1.0
        o.state[p]["step"].fill_(7.0)

    loader = cls([p], **kw)
    loader.register_load_state_dict_pre_hook(migrate)
    loader.register_load_state_dict_post_hook(after)
    loader.load_state_dict(old)
    assert calls == ["pre", "post"]
    assert loader.param_groups[0]["lr"] == 0.5 and loader.state[p]["step"].item() == 7.0
    state = loader.state[p]
    codes = state[key].dtype == torch.uint8
    values = tigeropt._lowp.decode_8bit(state[key], state[key + "_absmax"]) if codes else state[key]
    assert torch.equal(values.float(), torch.full((4, 300), 0.25))


# ------------------------------------------------------------------ optimizer_in_backward.add_param_group
@pytest.mark.parametrize("cls", [Tiger, AdaX], ids=lambda c: c.__name__)
def test_optimizer_in_backward_add_param_group_steps_the_new_parameters_in_backward(cls: type) -> None:
    """Unfreezing a layer mid-run (``opt.add_param_group({"params": head.parameters(), "lr": ...})``):
    OptimizerInBackward inherited MixedOptimizer's add_param_group, which put the new parameters into
    the first parameter's inner optimizer: no hook of their own, stepped whenever that parameter's hook
    ran, with whatever gradient they held then, their gradients never freed (so accumulated over
    backward calls).  Now each gets its own optimizer and hook: the run equals a plain optimizer's."""
    def run(in_backward: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        body, head = nn.Linear(4, 4), nn.Linear(4, 1)
        head.requires_grad_(False)
        opt: Any = (tigeropt.optimizer_in_backward(body.parameters(), cls, lr=0.01) if in_backward
                    else cls(body.parameters(), lr=0.01))
        gen = torch.Generator().manual_seed(1)
        for k in range(4):
            if k == 2:
                head.requires_grad_(True)
                opt.add_param_group({"params": list(head.parameters()), "lr": 0.05})
            if not in_backward:
                opt.zero_grad()
            head(torch.tanh(body(torch.randn(3, 4, generator=gen)))).square().mean().backward()
            if not in_backward:
                opt.step()
            else:
                assert all(p.grad is None for p in [*body.parameters(), *head.parameters()])
        return [p.detach().clone() for p in [*body.parameters(), *head.parameters()]]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ optimizer_in_backward + on_nonfinite
@pytest.mark.parametrize("where", ["kwargs", "group"])
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_optimizer_in_backward_refuses_whole_step_nonfinite_policies(mode: str, where: str) -> None:
    """on_nonfinite="skip" promises the whole group left untouched, "raise" an error before any group
    changes; inside backward each parameter is stepped when its gradient arrives, so "skip" updated
    every parameter but the NaN one (a partial step) and "raise" left the parameters whose hooks had
    already run updated while saying "nothing was updated".  Refused like the other policies that
    need all gradients first."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    kwargs = dict(on_nonfinite=mode) if where == "kwargs" else {}
    params: Any = [a, b] if where == "kwargs" else [{"params": [a, b], "on_nonfinite": mode}]
    with pytest.raises(ValueError, match="Invalid on_nonfinite"):
        tigeropt.optimizer_in_backward(params, Tiger, lr=0.1, **kwargs)
    ok = tigeropt.optimizer_in_backward([a], Tiger, lr=0.1)
    with pytest.raises(ValueError, match="Invalid on_nonfinite"):
        ok.add_param_group({"params": [b], "on_nonfinite": mode})
    assert len(ok.optimizers) == 1


# ------------------------------------------------------------------ MixedOptimizer.add_param_group: types
def test_mixed_add_param_group_checks_its_arguments() -> None:
    """optimizer=True chose inner optimizer 1 (bool is an int); optimizer='0' or 1.0 raised ValueError; a
    list instead of a dict raised "list indices must be integers"; a group without params a KeyError."""
    a, b, c = (nn.Parameter(torch.ones(2)) for _ in range(3))
    mixed = tigeropt.MixedOptimizer(Tiger([a]), Lion([b]))
    for bad in (True, "0", 1.0):
        with pytest.raises(TypeError, match="Invalid type for optimizer"):
            mixed.add_param_group({"params": [c]}, optimizer=bad)
    with pytest.raises(TypeError, match="Invalid type for param_group"):
        mixed.add_param_group([c])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid param_group"):
        mixed.add_param_group({"lr": 0.1})
    assert [len(o.param_groups) for o in mixed.optimizers] == [1, 1]


# ------------------------------------------------------------------ fused=True with fp64 parameters
@pytest.mark.skipif(not TRITON, reason="fused=True needs Triton (the interpreter on CPU)")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_fused_with_parameters_the_kernels_do_not_take_fails_in_the_constructor(dtype: torch.dtype) -> None:
    """An impossible combination fails in the constructor (README, "Bad input"): fused=True with fp64
    parameters was accepted and raised TypeError at the first step.  Now a ValueError naming fused,
    from the constructor and add_param_group."""
    with pytest.raises(ValueError, match="Invalid fused: True"):
        Lion([torch.zeros(3, dtype=dtype, requires_grad=True)], fused=True)
    opt = Lion([torch.zeros(3, requires_grad=True)], fused=True)
    with pytest.raises(ValueError, match="Invalid fused: True"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=dtype, requires_grad=True)]})
    assert len(opt.param_groups) == 1
