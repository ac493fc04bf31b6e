"""Adversarial review of the step engine, row kernels, wrappers and checkpoints: each test is a
defect a user could hit, reproduced the way the user would hit it (fails before its fix)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tigeropt

OPTIMIZERS: list[tuple[type, dict[str, Any]]] = [
    (tigeropt.Tiger, dict(lr=0.01)),
    (tigeropt.Lion, dict(lr=0.01, weight_decay=0.1)),
    (tigeropt.AdaX, dict(lr=0.01)),
    (tigeropt.Adagrad, dict(lr=0.1, lr_decay=0.01)),
]
IDS = [c.__name__ for c, _ in OPTIMIZERS]


def _unplanned(cls: type) -> type:
    """The same optimizer with cached step plans switched off."""
    return type(f"Unplanned{cls.__name__}", (cls,), {"_build_plan": lambda self, *args: None})


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(5, 3), (7,), (300,)]]


def _grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _same(a: torch.optim.Optimizer, pa: list, b: torch.optim.Optimizer, pb: list) -> None:
    for p, q in zip(pa, pb):
        assert torch.equal(p, q), (p - q).abs().max()
        assert a.state[p].keys() == b.state[q].keys()
        for key in a.state[p]:
            assert torch.equal(a.state[p][key], b.state[q][key]), key


def _twin_runs(cls: type, kwargs: dict[str, Any], change: Any, steps: int = 6, at: int = 3) -> None:
    """Run cls (plans on) and its unplanned twin with the same mid-training change: same result."""
    runs = []
    for c in (cls, _unplanned(cls)):
        params = _params()
        opt = c(params, **kwargs)
        keep: list[Any] = []
        for i in range(steps):
            if i == at:
                keep.append(change(opt, params))
            _grads(params, i)
            opt.step()
        runs.append((opt, params))
    _same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
def test_emptied_state_dict_after_planned_steps_starts_fresh(cls: type, kwargs: dict[str, Any]) -> None:
    # "reset the optimizer state of this layer": state[p].clear() made the planned step raise KeyError
    def clear(opt: torch.optim.Optimizer, params: list) -> None:
        opt.state[params[0]].clear()

    _twin_runs(cls, kwargs, clear)


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("what", ["state", "step"])
def test_state_storage_replaced_through_data_is_seen(cls: type, kwargs: dict[str, Any], what: str) -> None:
    # t.data = t.data.clone() (or .to(...)/pin_memory()/an offload round trip) keeps the state tensor
    # object but moves its storage: the C plan kept writing at the old address (heap corruption
    # when the old storage was freed; here it is kept alive, so the state silently froze instead).
    def move(opt: torch.optim.Optimizer, params: list) -> list:
        old = []
        for key, t in opt.state[params[2]].items():
            if (key == "step") == (what == "step"):
                old.append(t.data)
                t.data = t.data.clone()
        return old

    _twin_runs(cls, kwargs, move)


def test_replaced_state_dict_rebuilds_the_plan_once() -> None:
    # after opt.state[p] = {...} the snapshot of the state was never refreshed: every later step
    # dropped and rebuilt every plan (the plans were never used again)
    params = _params()
    opt = tigeropt.Tiger(params, lr=0.01)
    builds = []
    build = opt._build_plan
    opt._build_plan = lambda *args: (builds.append(1), build(*args))[1]
    for i in range(8):
        if i == 2:
            opt.state[params[0]] = {k: v.clone() for k, v in opt.state[params[0]].items()}
        _grads(params, i)
        opt.step()
    assert len(builds) == 2  # the first step, and the step after the replacement


@pytest.mark.parametrize("betas", [(0.9, 0.9), (0.8, 0.99)])
def test_tiger_group_given_only_betas_takes_beta_from_them(betas: tuple[float, float]) -> None:
    # a group written for Lion (or copying the betas mirror) set only betas; equal betas were
    # silently replaced by the default beta's mirror (0.965), unequal ones took betas[0]
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = tigeropt.Tiger([{"params": [p], "betas": betas}])
    opt.add_param_group({"params": [q], "betas": betas})
    for group in opt.param_groups:
        assert group["beta"] == betas[0] and group["betas"] == (betas[0], betas[0])
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "betas": (1.5, 1.5)})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=IDS)
def test_a_set_of_parameters_in_a_group_is_refused_as_torch_does(cls: type, kwargs: dict[str, Any]) -> None:
    # the group's params were converted with list(set): an order that changes between runs, so a
    # checkpoint's state lands on other tensors of the same shape when resumed (torch refuses sets)
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    with pytest.raises(TypeError, match="params.*ordered"):
        cls([{"params": {a, b}}], **kwargs)
    opt = cls([a], **kwargs)
    with pytest.raises(TypeError, match="params.*ordered"):
        opt.add_param_group({"params": {b, c}})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="ordered"):
        torch.optim.AdamW([{"params": {a, b}}])  # the convention followed


def test_wrappers_refuse_a_set_of_parameters_in_a_group() -> None:
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    mixed = tigeropt.MixedOptimizer(torch.optim.AdamW([a]), tigeropt.Tiger([b]))
    with pytest.raises(TypeError, match="params.*ordered"):
        mixed.add_param_group({"params": {c}}, optimizer=1)
    assert [len(o.param_groups) for o in mixed.optimizers] == [1, 1]
    with pytest.raises(TypeError, match="params.*ordered"):
        tigeropt.optimizer_in_backward([{"params": {a, b}}], tigeropt.Tiger)
    assert not a._post_accumulate_grad_hooks and not b._post_accumulate_grad_hooks
