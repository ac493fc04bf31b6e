"""Adversarial review, session 3: low-precision options combined with the rest of the library, the
step inside backward, torch.compile's capturable flag, non-finite values on every path.  Each test
reproduces a defect the way a user hits it and failed before its fix (or is marked xfail(strict))."""

from __future__ import annotations

import copy
import math
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
