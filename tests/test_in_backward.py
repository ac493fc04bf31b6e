"""tigeropt.optimizer_in_backward: the step inside backward equals an ordinary step; what it refuses."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, Tiger, optimizer_in_backward


class Model(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8, sparse=sparse)
        self.lin = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(self.emb(idx).mean(1)))).pow(2).mean()


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (4, 5), generator=gen) for _ in range(n)]  # rows 20..29 never used


CASES: list[tuple[str, Callable[..., Any], dict[str, Any], bool]] = [
    ("tiger", Tiger, dict(lr=0.01), False),
    ("lion", Lion, dict(lr=0.01, weight_decay=0.1), False),
    ("adax", AdaX, dict(lr=0.01), False),
    ("adagrad-sparse", Adagrad, dict(lr=0.1), True),
    ("torch-adamw", torch.optim.AdamW, dict(lr=0.01), False),
]


@pytest.mark.parametrize("name,cls,kwargs,sparse", CASES, ids=[c[0] for c in CASES])
def test_trajectory_equals_ordinary_step(name: str, cls: Callable[..., Any], kwargs: dict,
                                         sparse: bool) -> None:
    plain, fused = Model(sparse), Model(sparse)
    opt = cls(plain.parameters(), **kwargs)
    in_bw = optimizer_in_backward(fused.parameters(), cls, **kwargs)
    assert len(in_bw.optimizers) == len(list(fused.parameters()))
    for idx in _batches(5):
        opt.zero_grad()
        plain(idx).backward()
        opt.step()
        fused(idx).backward()
        assert all(p.grad is None for p in fused.parameters())  # freed inside backward
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_lazy_groups_and_sparse_rows() -> None:
    """lazy=True through a param group: rows without gradient keep their value, as with a normal step."""
    plain, fused = Model(sparse=True), Model(sparse=True)
    start = fused.emb.weight.detach().clone()

    def groups(m: Model) -> list[dict[str, Any]]:
        return [{"params": [m.emb.weight], "lazy": True}, {"params": list(m.lin.parameters()) +
                                                           list(m.out.parameters())}]

    opt = Tiger(groups(plain), lr=0.01, weight_decay=0.1)
    in_bw = optimizer_in_backward(groups(fused), Tiger, lr=0.01, weight_decay=0.1)
    assert len(in_bw.param_groups) == 5 and in_bw.param_groups[0]["lazy"] is True
    for idx in _batches(4):
        opt.zero_grad()
        plain(idx).backward()
        opt.step()
        fused(idx).backward()
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fused.emb.weight.detach()[20:], start[20:])


def test_scheduler_state_dict_resume_and_remove() -> None:
    model = Model()
    in_bw = optimizer_in_backward(model.parameters(), AdaX, lr=0.01)
    assert isinstance(in_bw, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(in_bw, step_size=1, gamma=0.5)
    batches = _batches(6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for idx in batches[:2]:
            model(idx).backward()
            sched.step()
    assert all(g["lr"] == pytest.approx(0.0025) for g in in_bw.param_groups)
    assert all(o.param_groups[0]["lr"] == pytest.approx(0.0025) for o in in_bw.optimizers)
    # checkpoint, resume in a fresh model + object: the same trajectory, bit for bit
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": in_bw.state_dict(), "sched": sched.state_dict()}, buf)
    twin = Model()
    twin_opt = optimizer_in_backward(twin.parameters(), AdaX, lr=0.01)
    twin_sched = torch.optim.lr_scheduler.StepLR(twin_opt, step_size=1, gamma=0.5)
    buf.seek(0)
    ckpt = torch.load(buf)
    twin.load_state_dict(ckpt["model"])
    twin_opt.load_state_dict(ckpt["opt"])
    twin_sched.load_state_dict(ckpt["sched"])
    for m, s in ((model, sched), (twin, twin_sched)):
        for idx in batches[2:]:
            m(idx).backward()
            s.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    # remove(): backward leaves the gradients and updates nothing
    in_bw.remove()
    before = [p.detach().clone() for p in model.parameters()]
    model(batches[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    in_bw.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_refusals_are_loud() -> None:
    model = Model()
    in_bw = optimizer_in_backward(model.parameters(), Tiger, lr=0.01)
    idx = _batches(1)[0]
    model(idx).backward()
    # the usual loop: clip, then step -> clear error (the gradients are gone)
    with pytest.raises(RuntimeError, match="inside backward.*clip_grad_norm_.*GradScaler.*accumulation"):
        in_bw.step()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(idx)).backward()
    scaler.unscale_(in_bw)
    with pytest.raises(RuntimeError, match="inside backward"):
        scaler.step(in_bw)
    with pytest.raises(TypeError, match="Tensor"):
        optimizer_in_backward(next(model.parameters()), Tiger)
    with pytest.raises(ValueError, match="empty"):
        optimizer_in_backward([], Tiger)
    with pytest.raises(ValueError, match="leaf"):
        optimizer_in_backward([next(model.parameters()) * 2], Tiger)
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        optimizer_in_backward([w, w], Tiger)


def test_hooks_and_public_name() -> None:
    assert "optimizer_in_backward" in tigeropt.__all__ and "OptimizerInBackward" in tigeropt.__all__
    model = Model()
    in_bw = optimizer_in_backward(model.parameters(), Lion, lr=0.01)
    calls: list[str] = []
    in_bw.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    in_bw.register_step_post_hook(lambda o, a, k: calls.append("post"))
    model(_batches(1)[0]).backward()
    assert calls == ["pre", "post"] * len(list(model.parameters()))
    clone = copy.deepcopy({"m": model, "o": in_bw})
    before = [p.detach().clone() for p in model.parameters()]
    clone["m"](_batches(1)[0]).backward()  # the copy updates its own parameters only
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, clone["m"].parameters()))
