"""Every torch.optim.lr_scheduler with every optimizer (and MixedOptimizer / LazyOptimizer), table-driven.

For each (scheduler, optimizer) pair a run with the scheduler is compared with a twin run without one, whose
``lr`` and momentum are set by hand before each step to the values the scheduler put in the groups: the
trajectories must be bit-identical (the optimizer really uses what the scheduler sets, every step, also
Tiger's beta).  The schedule itself must equal the one the same scheduler gives ``torch.optim.AdamW``.

What a momentum-cycling scheduler (OneCycleLR/CyclicLR, ``cycle_momentum=True``) cycles:
Tiger ``beta`` (through its ``betas = (beta, beta)`` mirror), Lion ``betas[0]`` (the interpolation weight of
the update direction; ``betas[1]``, the momentum decay, stays), AdaX ``betas[0]``; Adagrad has no momentum and
raises torch's error, exactly like ``torch.optim.Adagrad``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.optim.lr_scheduler as lrs
from torch import Tensor, nn

from tigeropt import Adagrad, AdaX, LazyOptimizer, Lion, MixedOptimizer, Tiger, split_embeddings

STEPS = 8

# name -> (factory(optimizer), cycles momentum)
SCHEDULERS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "LambdaLR": (lambda o: lrs.LambdaLR(o, lambda s: 0.8**s), False),
    "MultiplicativeLR": (lambda o: lrs.MultiplicativeLR(o, lambda s: 0.9), False),
    "StepLR": (lambda o: lrs.StepLR(o, step_size=2, gamma=0.5), False),
    "MultiStepLR": (lambda o: lrs.MultiStepLR(o, milestones=[2, 5], gamma=0.3), False),
    "ConstantLR": (lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=3), False),
    "LinearLR": (lambda o: lrs.LinearLR(o, start_factor=0.25, total_iters=4), False),
    "ExponentialLR": (lambda o: lrs.ExponentialLR(o, gamma=0.8), False),
    "SequentialLR": (lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.5, total_iters=3),
                                                    lrs.ExponentialLR(o, gamma=0.7)], milestones=[3]), False),
    "PolynomialLR": (lambda o: lrs.PolynomialLR(o, total_iters=6, power=2.0), False),
    "CosineAnnealingLR": (lambda o: lrs.CosineAnnealingLR(o, T_max=6), False),
    "ChainedScheduler": (lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, 0.5, total_iters=2),
                                                         lrs.ExponentialLR(o, gamma=0.9)]), False),
    "ReduceLROnPlateau": (lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0), False),
    "CyclicLR": (lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3), True),
    "CyclicLR-no-momentum": (lambda o: lrs.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=3,
                                                    cycle_momentum=False), False),
    "CosineAnnealingWarmRestarts": (lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3), False),
    "OneCycleLR": (lambda o: lrs.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS), True),
    "OneCycleLR-no-momentum": (lambda o: lrs.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS,
                                                        cycle_momentum=False), False),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.lin = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.emb(x).flatten(1))


def _others(m: Net) -> list[Tensor]:
    return list(m.lin.parameters())


# name -> (factory(model), has momentum)
OPTIMIZERS: dict[str, tuple[Callable[[Net], Any], bool]] = {
    "Tiger": (lambda m: Tiger(m.parameters(), lr=1e-2), True),
    "Tiger-tensor-lr": (lambda m: Tiger(m.parameters(), lr=torch.tensor(1e-2)), True),
    "Tiger-reference": (lambda m: Tiger(m.parameters(), lr=1e-2, foreach=False), True),
    "Tiger-groups": (lambda m: Tiger([{"params": _others(m), "beta": 0.9},
                                      {"params": m.emb.parameters(), "lazy": True}], lr=1e-2), True),
    "Lion": (lambda m: Lion(m.parameters(), lr=1e-2, weight_decay=0.1), True),
    "AdaX": (lambda m: AdaX(m.parameters(), lr=1e-2), True),
    "AdaX-W": (lambda m: AdaX(m.parameters(), lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True), True),
    "Adagrad": (lambda m: Adagrad(m.parameters(), lr=1e-2), False),
    "Adagrad-glove": (lambda m: Adagrad(m.parameters(), lr=1e-2, glove=True), False),
    "Mixed(AdamW,Lion)": (lambda m: MixedOptimizer(torch.optim.AdamW(m.emb.parameters(), lr=1e-2),
                                                   Lion(_others(m), lr=1e-2)), True),
    "split_embeddings(AdamW,Tiger)": (lambda m: split_embeddings(m), True),
    "Mixed(Lion,Tiger)": (lambda m: MixedOptimizer(Lion(m.emb.parameters()), Tiger(_others(m))), True),
    "Mixed(Adagrad,Tiger)": (lambda m: MixedOptimizer(Adagrad(m.emb.parameters()), Tiger(_others(m))), False),
    "Lazy(Tiger)": (lambda m: LazyOptimizer(Tiger(m.parameters(), lr=1e-2), m), True),
}


def test_the_table_covers_every_torch_scheduler() -> None:
    public = {name for name, cls in vars(lrs).items()
              if inspect.isclass(cls) and issubclass(cls, lrs.LRScheduler) and not name.startswith("_")
              and cls.__module__ == lrs.__name__} - {"LRScheduler"}
    assert public <= {name.split("-")[0] for name in SCHEDULERS}, public


def _batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 6, (5, 2), generator=gen), torch.randn(5, 3, generator=gen))
            for _ in range(STEPS)]


def _model() -> Net:
    torch.manual_seed(0)
    return Net()


def _momentum(group: dict[str, Any]) -> float | None:
    """The momentum a scheduler cycles in this group (betas[0]; Tiger mirrors beta there)."""
    return group["betas"][0] if "betas" in group else None


def _set_by_hand(group: dict[str, Any], lr: Any, momentum: float | None) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].copy_(lr)
    else:
        group["lr"] = lr
    if momentum is None:
        return
    if "beta" in group:  # Tiger: its own knob, not the mirror
        group["beta"] = momentum
    else:
        group["betas"] = (momentum, *group["betas"][1:])


def _train(opt: Any, model: Net, sched: Any = None,
           plan: list[list[tuple[Any, float | None]]] | None = None) -> list[list[tuple[Any, float | None]]]:
    """Train STEPS steps; with ``sched`` record (lr, momentum) per group, else set them from ``plan``."""
    seen = []
    for i, (x, y) in enumerate(_batches()):
        if plan is not None:
            for group, (lr, mom) in zip(opt.param_groups, plan[i]):
                _set_by_hand(group, lr, mom)
        seen.append([(g["lr"].clone() if isinstance(g["lr"], Tensor) else g["lr"], _momentum(g))
                     for g in opt.param_groups])
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            if isinstance(sched, lrs.ReduceLROnPlateau):
                sched.step(1.0)  # never improves: the lr halves every step
            else:
                sched.step()
    return seen


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_scheduler_drives_the_optimizer(sched_name: str, opt_name: str) -> None:
    make_sched, cycles = SCHEDULERS[sched_name]
    make_opt, has_momentum = OPTIMIZERS[opt_name]
    model = _model()
    opt = make_opt(model)
    if cycles and not has_momentum:
        # No momentum to cycle: torch's own error, as for torch.optim.Adagrad.
        with pytest.raises(ValueError, match="momentum or beta1"):
            make_sched(torch.optim.Adagrad(nn.Linear(1, 1).parameters()))
        with pytest.raises(ValueError, match="momentum or beta1"):
            make_sched(opt)
        return
    lr0 = [float(g["lr"]) for g in opt.param_groups]
    seen = _train(opt, model, make_sched(opt))

    # The twin without a scheduler, lr and momentum set by hand, follows the identical trajectory.
    twin_model = _model()
    _train(make_opt(twin_model), twin_model, plan=seen)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b), (sched_name, opt_name)

    # The schedule is the one torch.optim.AdamW (same groups, same initial lrs) gets from the scheduler.
    expected = _schedule_of(lr0, make_sched)
    lrs_seen = [float(lr) for step in seen for lr, _ in step]
    assert lrs_seen == pytest.approx([lr for step in expected for lr, _ in step], rel=1e-6)
    assert len(set(lrs_seen)) > 1, "the scheduler changed nothing"
    if cycles:
        moms = [m for step in seen for _, m in step]
        assert moms == pytest.approx([m for step in expected for _, m in step], rel=1e-12)
        assert len(set(moms)) > 1, "momentum was not cycled"


def _schedule_of(lr0: list[float], make_sched: Callable[[Any], Any]) -> list[list[tuple[float, float]]]:
    ref_opt = torch.optim.AdamW([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in lr0])
    sched = make_sched(ref_opt)
    out = []
    for _ in range(STEPS):
        out.append([(float(g["lr"]), g["betas"][0]) for g in ref_opt.param_groups])
        ref_opt.step()  # no gradients: nothing moves, but the scheduler sees a step
        if isinstance(sched, lrs.ReduceLROnPlateau):
            sched.step(1.0)
        else:
            sched.step()
    return out


# ---------------------------------------------------------------- Tiger's beta and its betas mirror
def _tiger_step(opt: Tiger, p: Tensor, g: float) -> None:
    p.grad = torch.full_like(p, g)
    opt.step()


def test_tiger_takes_a_scheduler_write_of_betas_and_a_hand_write_of_beta() -> None:
    p = torch.zeros(3, requires_grad=True)
    opt = Tiger([p], lr=0.1, beta=0.9, weight_decay=0.0)
    group = opt.param_groups[0]
    assert opt.defaults["betas"] == (0.9, 0.9) and group["betas"] == (0.9, 0.9)
    group["betas"] = (0.5, *group["betas"][1:])  # what OneCycleLR/CyclicLR write
    _tiger_step(opt, p, 1.0)
    assert group["beta"] == 0.5 and group["betas"] == (0.5, 0.5)
    assert torch.equal(opt.state[p]["exp_avg"], torch.full((3,), 0.5))  # m = (1 - 0.5) * 1
    group["beta"] = 0.25  # by hand, as before: beta wins over the unchanged mirror
    _tiger_step(opt, p, 1.0)
    assert group["betas"] == (0.25, 0.25)
    assert torch.equal(opt.state[p]["exp_avg"], torch.full((3,), 0.25 * 0.5 + 0.75))


def test_tiger_groups_mirror_their_own_beta_and_bad_betas_are_rejected() -> None:
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = Tiger([{"params": [p], "beta": 0.8}, {"params": [q]}], beta=0.95)
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.8), (0.95, 0.95)]
    with pytest.raises(ValueError, match="betas"):
        Tiger([{"params": [p], "betas": (0.9, 1.5)}])


def test_tiger_checkpoint_without_betas_keeps_its_beta() -> None:
    """A state dict saved before the mirror existed (no "betas" key) loads with its own beta."""
    p = torch.zeros(2, requires_grad=True)
    opt = Tiger([p], beta=0.7)
    _tiger_step(opt, p, 1.0)
    sd = opt.state_dict()
    del sd["param_groups"][0]["betas"]
    fresh = Tiger([p])  # default beta 0.965
    fresh.load_state_dict(sd)
    _tiger_step(fresh, p, 1.0)
    assert fresh.param_groups[0]["beta"] == 0.7 and fresh.param_groups[0]["betas"] == (0.7, 0.7)


@pytest.mark.parametrize("opt_name", ["Tiger", "split_embeddings(AdamW,Tiger)", "Mixed(AdamW,Lion)"])
def test_resume_mid_cycle_continues_the_identical_trajectory(opt_name: str) -> None:
    make_opt = OPTIMIZERS[opt_name][0]
    make_sched = SCHEDULERS["OneCycleLR"][0]
    batches = _batches()

    def run(model: Net, opt: Any, sched: Any, part: list[tuple[Tensor, Tensor]]) -> None:
        for x, y in part:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    model = _model()
    opt = make_opt(model)
    sched = make_sched(opt)
    run(model, opt, sched, batches)

    half = STEPS // 2
    first = _model()
    opt1 = make_opt(first)
    sched1 = make_sched(opt1)
    run(first, opt1, sched1, batches[:half])
    ckpt = {"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}
    second = _model()
    opt2 = make_opt(second)
    sched2 = make_sched(opt2)
    second.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    run(second, opt2, sched2, batches[half:])
    for a, b in zip(model.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert [_momentum(g) for g in opt.param_groups] == [_momentum(g) for g in opt2.param_groups]
