"""Cached step plans: every change that makes a plan stale must be seen (a stale plan is silent).

Each test runs an optimizer (plans on) next to a twin whose plans are switched off, applies the same
change to both mid-training, and requires bit-identical parameters and state afterwards.  Low-precision
groups (bf16 parameters with stochastic rounding, bf16 state, 8-bit state) are planned too on the
default CPU path (the fused C low-precision step with its pointer tables) and face the same changes,
plus those that only they see (the rounding seed, parameters added to an earlier group: the hash
keys' parameter indices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import tigeropt
from tigeropt import _cpu

OPTIMIZERS: list[tuple[str, type, dict[str, Any]]] = [
    ("tiger", tigeropt.Tiger, dict(lr=0.01)),
    ("lion", tigeropt.Lion, dict(lr=0.01, weight_decay=0.1)),
    ("adax", tigeropt.AdaX, dict(lr=0.01)),
    ("adagrad", tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01)),
]
PATHS = {"default": {}, "foreach": dict(foreach=True), "reference": dict(foreach=False)}
#: low-precision settings (bf16 parameters), planned on the default path
LOWP = {"bf16_sr": dict(stochastic_rounding=True, sr_seed=11),
        "bf16_state": dict(state_precision="bf16"),
        "8bit_sr": dict(state_precision="8bit", stochastic_rounding=True, sr_seed=12)}


def _unplanned(cls: type) -> type:
    """The same optimizer with plans switched off (every step takes the plain route)."""
    return type(f"Unplanned{cls.__name__}", (cls,), {"_build_plan": lambda self, *args: None})


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (300,), (2, 3, 4), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _filled(t: torch.Tensor, value: float) -> torch.Tensor:
    """A new tensor like ``t`` holding ``value`` (8-bit codes: the code 0x38, 1.0 times the absmax)."""
    return torch.full_like(t, 0x38) if t.dtype == torch.uint8 else torch.full_like(t, value)


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _run(cls: type, kwargs: dict[str, Any], change: Callable[[torch.optim.Optimizer, list], None],
         steps: int = 6, at: int = 3, dtype: torch.dtype = torch.float32
         ) -> tuple[torch.optim.Optimizer, list]:
    params = _params(dtype=dtype)
    opt = cls(params, **kwargs)
    for i in range(steps):
        if i == at:
            change(opt, params)
        _grads([p for g in opt.param_groups for p in g["params"]], i)
        opt.step()
    return opt, params


def _same(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    assert len(pa) == len(pb)
    for p, q in zip(pa, pb):
        assert p.dtype == q.dtype and torch.equal(p, q), (p - q).abs().max()
        assert a.state[p].keys() == b.state[q].keys()
        for key in a.state[p]:
            assert torch.equal(a.state[p][key], b.state[q][key]), key


def _add_group(opt: torch.optim.Optimizer, params: list) -> None:
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(40, generator=torch.Generator()
                                                                    .manual_seed(7)).to(params[0].dtype))],
                         "lr": 0.003})


_LOADED = ("lr", "state_precision", "stochastic_rounding", "sr_seed")


def _load_checkpoint(opt: torch.optim.Optimizer, params: list) -> None:
    other = type(opt)(_params(seed=3, dtype=params[0].dtype), **{k: opt.defaults[k] for k in _LOADED})
    _grads([p for p in other.param_groups[0]["params"]], 50)
    other.step()
    other.step()
    opt.load_state_dict(other.state_dict())


def _change_dtype(opt: torch.optim.Optimizer, params: list) -> None:
    if params[2].dtype == torch.bfloat16:  # a low-precision group: the state keeps its storage
        params[2].data = params[2].data.to(torch.float32)
        return
    params[2].data = params[2].data.to(torch.float64)
    for key, t in list(opt.state[params[2]].items()):
        if key != "step":
            opt.state[params[2]][key] = t.to(torch.float64)


def _replace_param(opt: torch.optim.Optimizer, params: list) -> None:
    new = torch.nn.Parameter(params[1].detach() * 2)
    opt.param_groups[0]["params"][1] = new
    params[1] = new


def _replace_data(opt: torch.optim.Optimizer, params: list) -> None:
    params[2].data = params[2].data.clone() + 1.0  # same parameter object, new storage


def _replace_state(opt: torch.optim.Optimizer, params: list) -> None:
    key = opt.state_keys[0]
    opt.state[params[0]][key] = _filled(opt.state[params[0]][key], 0.5)


def _replace_state_dict(opt: torch.optim.Optimizer, params: list) -> None:
    opt.state[params[3]] = {k: (_filled(v, 0.25) if k != "step" else v.clone())
                            for k, v in opt.state[params[3]].items()}


def _replace_absmax(opt: torch.optim.Optimizer, params: list) -> None:
    key = opt.state_keys[0] + "_absmax"
    if key in opt.state[params[0]]:
        opt.state[params[0]][key] = opt.state[params[0]][key] * 2
    else:
        _replace_state(opt, params)


def _change_seed(opt: torch.optim.Optimizer, params: list) -> None:
    opt.param_groups[0]["sr_seed"] += 1


def _reset_step(opt: torch.optim.Optimizer, params: list) -> None:
    opt.state[params[4]]["step"] = torch.tensor(100.0)


def _no_grad_once(opt: torch.optim.Optimizer, params: list) -> None:
    pass  # handled in the test: one parameter without a gradient for one step


def _toggle_foreach(opt: torch.optim.Optimizer, params: list) -> None:
    opt.param_groups[0]["foreach"] = not opt.param_groups[0]["foreach"]


CHANGES = {"add_param_group": _add_group, "load_state_dict": _load_checkpoint, "dtype": _change_dtype,
           "replace_param": _replace_param, "replace_data": _replace_data, "replace_state": _replace_state,
           "replace_state_dict": _replace_state_dict, "reset_step": _reset_step,
           "toggle_foreach": _toggle_foreach}
#: changes that only low-precision plans must see (besides those above)
LOWP_CHANGES = {"replace_absmax": _replace_absmax, "change_seed": _change_seed}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_changes_mid_training_are_seen(name: str, cls: type, kwargs: dict[str, Any], path: str,
                                       change: str) -> None:
    if change == "toggle_foreach" and path != "foreach":
        pytest.skip("toggles the foreach flag of a foreach optimizer")
    kw = dict(kwargs, **PATHS[path])
    planned, _ = _run(cls, kw, CHANGES[change])
    plain, _ = _run(_unplanned(cls), kw, CHANGES[change])
    _same(planned, plain)
    assert planned._plans, "the planned optimizer used no plan: the test would check nothing"


def _lowp_planned(opt: torch.optim.Optimizer) -> bool:
    """Whether the optimizer holds a low-precision plan (its one bucket is the C low-precision step)."""
    return any(b.impl is None and type(b.cpu).__name__ == "LowpStepPlan"
               for plan in opt._plans.values() for b in plan.buckets)


@pytest.mark.parametrize("change", [*CHANGES, *LOWP_CHANGES])
@pytest.mark.parametrize("precision", list(LOWP))
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_changes_mid_training_are_seen_by_low_precision_plans(name: str, cls: type, kwargs: dict[str, Any],
                                                              precision: str, change: str) -> None:
    """bf16 parameters with stochastic rounding / bf16 state / 8-bit state on the default path: every
    change above, and a new rounding seed or absmax tensor, gives the bits of the unplanned optimizer."""
    if not _cpu.available():
        pytest.skip(_cpu.status())
    kw = dict(kwargs, **LOWP[precision])
    fn = {**CHANGES, **LOWP_CHANGES}[change]
    planned, _ = _run(cls, kw, fn, dtype=torch.bfloat16)
    plain, _ = _run(_unplanned(cls), kw, fn, dtype=torch.bfloat16)
    _same(planned, plain)
    assert _lowp_planned(planned), "no low-precision plan was used: the test would check nothing"
    assert not _lowp_planned(plain)


@pytest.mark.parametrize("precision", list(LOWP))
def test_low_precision_plan_sees_parameters_added_to_an_earlier_group(precision: str) -> None:
    """The rounding hash keys on each parameter's global index (param_groups order): a parameter
    appended to group 0 shifts group 1's indices, which its plan must notice (the new parameter has
    no gradient, so no new state invalidates the plans on the way)."""
    if not _cpu.available():
        pytest.skip(_cpu.status())
    results = []
    for c in (tigeropt.Tiger, _unplanned(tigeropt.Tiger)):
        params = _params(dtype=torch.bfloat16)
        opt = c([{"params": params[:2]}, {"params": params[2:]}], lr=0.01, **LOWP[precision])
        for i in range(6):
            if i == 3:
                opt.param_groups[0]["params"].append(torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16)))
            _grads(params, i)
            opt.step()
        results.append(opt)
    _same(*results)
    assert _lowp_planned(results[0])


@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_missing_gradient_for_one_step(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    results = []
    for c in (cls, _unplanned(cls)):
        params = _params()
        opt = c(params, **kwargs)
        for i in range(6):
            _grads(params, i)
            if i == 3:
                params[1].grad = None
            opt.step()
        results.append(opt)
        assert opt.state[params[1]]["step"].item() == 5 and opt.state[params[0]]["step"].item() == 6
    _same(*results)


def test_plans_are_used_and_the_c_plan_reads_only_gradients() -> None:
    if not _cpu.available():
        pytest.skip(_cpu.status())
    params = _params()
    opt = tigeropt.AdaX(params, lr=0.01)
    for i in range(2):
        _grads(params, i)
        opt.step()
    plan = opt._plans[0]
    assert plan.buckets[0].cpu is not None
    _grads(params, 2)
    assert opt._step_planned(opt.param_groups[0], plan)  # the fast path took the step
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_sparse_gradient_after_planned_steps_takes_the_plain_route() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = tigeropt.Adagrad(emb.parameters(), lr=0.1)
    twin = torch.nn.Embedding(10, 3, sparse=True)
    twin.load_state_dict(emb.state_dict())
    ref = _unplanned(tigeropt.Adagrad)(twin.parameters(), lr=0.1)
    for i, sparse in enumerate([False, False, False, True, True]):
        for m in (emb, twin):
            m.weight.grad = torch.randn(10, 3, generator=torch.Generator().manual_seed(i))
            if sparse:
                m.weight.grad = m.weight.grad.to_sparse(1)
        opt.step()
        ref.step()
    _same(opt, ref)
