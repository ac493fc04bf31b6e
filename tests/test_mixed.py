"""MixedOptimizer and split_embeddings: several optimizers that look like one torch.optim.Optimizer."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tigeropt import Adagrad, Lion, Tiger
from tigeropt.lazy import LazyOptimizer
from tigeropt.mixed import MixedOptimizer, split_embeddings

VOCAB, DIM = 12, 4




class TinyLM(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.tanh(self.hidden(self.emb(idx)))))


def make_model(seed: int = 0, tied: bool = False) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(tied)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB // 2, (8,), generator=gen), torch.randint(0, VOCAB, (8,), generator=gen))
            for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def mixed_for(model: TinyLM, **tiger: Any) -> MixedOptimizer:
    rest = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    return MixedOptimizer(torch.optim.AdamW([model.emb.weight], lr=1e-2), Tiger(rest, lr=1e-2, **tiger))


def separate_for(model: TinyLM) -> list[torch.optim.Optimizer]:
    rest = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    return [torch.optim.AdamW([model.emb.weight], lr=1e-2), Tiger(rest, lr=1e-2)]


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------------------------- basics
def test_mixed_step_equals_stepping_each_optimizer() -> None:
    model, twin = make_model(), make_model()
    mixed, separate = mixed_for(model), separate_for(twin)
    for x, y in batches(5):
        mixed.zero_grad()
        loss_fn(model, x, y).backward()
        mixed.step()
        for o in separate:
            o.zero_grad()
        loss_fn(twin, x, y).backward()
        for o in separate:
            o.step()
    assert_same_params(model, twin)
    assert not torch.equal(model.emb.weight, make_model().emb.weight)


def test_param_groups_are_the_inner_dicts() -> None:
    model = make_model()
    mixed = mixed_for(model)
    adamw, tiger = mixed.optimizers
    assert isinstance(mixed, torch.optim.Optimizer)
    assert len(mixed.param_groups) == 2
    assert mixed.param_groups[0] is adamw.param_groups[0] and mixed.param_groups[1] is tiger.param_groups[0]
    mixed.param_groups[1]["lr"] = 0.5
    assert tiger.param_groups[0]["lr"] == 0.5
    assert mixed.defaults == {k: v for k, v in adamw.defaults.items() if k in mixed.defaults}
    assert "lr" in mixed.defaults and "eps" not in mixed.defaults  # only what both agree on, and
    assert mixed.defaults["betas"] == adamw.defaults["betas"]  # betas, which both have (schedulers look)
    with pytest.raises(AttributeError):
        mixed.param_groups = []


def test_closure_is_called_once_and_its_loss_returned() -> None:
    model = make_model()
    mixed = mixed_for(model)
    (x, y), = batches(1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        mixed.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = mixed.step(closure)
    assert calls == [True]
    assert torch.equal(loss, loss_fn(make_model(), x, y))  # the loss before the step


def test_zero_grad_and_state_view() -> None:
    model = make_model()
    mixed = mixed_for(model)
    adamw, tiger = mixed.optimizers
    (x, y), = batches(1)
    loss_fn(model, x, y).backward()
    mixed.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    mixed.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert len(mixed.state) == 0
    loss_fn(model, x, y).backward()
    mixed.step()
    params = list(model.parameters())
    assert len(mixed.state) == len(params) and set(mixed.state) == set(adamw.state) | set(tiger.state)
    assert mixed.state[model.emb.weight] is adamw.state[model.emb.weight]
    assert mixed.state[model.hidden.weight] is tiger.state[model.hidden.weight]
    assert model.emb.weight in mixed.state and torch.zeros(1) not in mixed.state
    with pytest.raises(KeyError):
        mixed.state[torch.zeros(1)]


def test_a_parameter_in_two_optimizers_is_an_error() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*optimizer 0 \(AdamW\).*optimizer 1 \(Tiger\)"):
        MixedOptimizer(torch.optim.AdamW([model.hidden.weight]), Tiger(model.hidden.parameters()))
    with pytest.raises(TypeError, match="argument 1"):
        MixedOptimizer(torch.optim.AdamW([model.hidden.weight]), "Tiger")  # type: ignore[arg-type]
    opt = Tiger(model.parameters())
    with pytest.raises(ValueError, match="twice"):
        MixedOptimizer(opt, opt)
    with pytest.raises(ValueError, match="at least one"):
        MixedOptimizer()


def test_add_param_group_goes_to_the_chosen_optimizer() -> None:
    model = make_model()
    mixed = mixed_for(model)
    adamw, tiger = mixed.optimizers
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    mixed.add_param_group({"params": a})  # default: the first optimizer
    mixed.add_param_group({"params": [b], "lr": 0.3}, optimizer=1)
    mixed.add_param_group({"params": iter([c])}, optimizer=tiger)
    assert adamw.param_groups[-1]["params"] == [a] and adamw.param_groups[-1]["betas"] == (0.9, 0.999)
    assert tiger.param_groups[1]["params"] == [b] and tiger.param_groups[1]["lr"] == 0.3
    assert tiger.param_groups[2]["params"] == [c]
    assert len(mixed.param_groups) == 5 and mixed.param_groups[1] is adamw.param_groups[1]
    with pytest.raises(ValueError, match="already in optimizer 1"):
        mixed.add_param_group({"params": [b]})
    with pytest.raises(ValueError, match="Invalid optimizer: 2"):
        mixed.add_param_group({"params": [torch.zeros(1, requires_grad=True)]}, optimizer=2)
    with pytest.raises(ValueError, match="not one of"):
        mixed.add_param_group({"params": [torch.zeros(1, requires_grad=True)]}, optimizer=Lion([b]))


def test_hooks_run_around_the_mixed_step_and_the_inner_steps() -> None:
    model = make_model()
    mixed = mixed_for(model)
    calls: list[str] = []
    mixed.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    mixed.register_step_post_hook(lambda o, a, k: calls.append("post"))
    mixed.optimizers[1].register_step_post_hook(lambda o, a, k: calls.append("tiger"))
    mixed.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    mixed.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    mixed.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    mixed.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    (x, y), = batches(1)
    loss_fn(model, x, y).backward()
    mixed.step()
    mixed.step()
    assert calls == ["pre", "tiger", "post"] * 2
    sd = mixed.state_dict()
    assert sd["extra"] == 1 and calls[-1] == "sd_pre"
    mixed.load_state_dict(sd)
    assert calls[-2:] == ["load_pre", "load_post"]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_resumes_bit_identically() -> None:
    model = make_model()
    mixed = mixed_for(model)
    sched = torch.optim.lr_scheduler.LambdaLR(mixed, lambda s: 0.9 ** s)
    data = batches(8)

    def train(m: nn.Module, opt: torch.optim.Optimizer, sch: Any, part: list) -> None:
        for x, y in part:
            opt.zero_grad()
            loss_fn(m, x, y).backward()
            opt.step()
            sch.step()

    train(model, mixed, sched, data[:4])
    sd = mixed.state_dict()
    # torch.optim's format: parameters numbered 0..n-1 across the optimizers, groups concatenated
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1, 2, 3, 4, 5]]
    assert sorted(sd["state"]) == [0, 1, 2, 3, 4, 5]
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(sd["state"][1]) == {"step", "exp_avg"}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd, "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    twin = make_model(seed=5)  # different starting values: everything must come from the checkpoint
    twin_opt = mixed_for(twin)
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda s: 0.9 ** s)
    twin.load_state_dict(ckpt["model"])
    twin_opt.load_state_dict(ckpt["opt"])
    twin_sched.load_state_dict(ckpt["sched"])
    for k, v in mixed.state[model.emb.weight].items():
        assert torch.equal(twin_opt.state[twin.emb.weight][k], v)
    train(model, mixed, sched, data[4:])
    train(twin, twin_opt, twin_sched, data[4:])
    assert_same_params(model, twin)
    # after loading, the views still reach the inner optimizers' (new) group dicts
    twin_opt.param_groups[0]["lr"] = 0.123
    assert twin_opt.optimizers[0].param_groups[0]["lr"] == 0.123


def test_load_state_dict_with_other_group_count_is_an_error() -> None:
    sd = mixed_for(make_model()).state_dict()
    model = make_model()
    other = MixedOptimizer(torch.optim.AdamW([model.emb.weight]), Tiger([model.hidden.weight]),
                           Tiger([model.hidden.bias]))
    with pytest.raises(ValueError, match=r"2 param groups, the optimizers have 3 \(1 \+ 1 \+ 1\)"):
        other.load_state_dict(sd)


def test_deepcopy_is_an_independent_optimizer() -> None:
    model = make_model()
    mixed = mixed_for(model)
    data = batches(4)
    for x, y in data[:2]:
        mixed.zero_grad()
        loss_fn(model, x, y).backward()
        mixed.step()
    both = copy.deepcopy({"model": model, "opt": mixed})
    m2, o2 = both["model"], both["opt"]
    assert o2.param_groups[0]["params"][0] is m2.emb.weight
    for m, o in ((model, mixed), (m2, o2)):
        for x, y in data[2:]:
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    assert_same_params(model, m2)


# ---------------------------------------------------------------------------------------------- torch's tools
def test_grad_scaler_and_clip_grad_norm() -> None:
    """Scaled-and-unscaled training equals unscaled training; an inf gradient skips every inner step."""
    model, twin = make_model(), make_model()
    mixed, plain = mixed_for(model), mixed_for(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(6):
        mixed.zero_grad()
        scaler.scale(loss_fn(model, x, y)).backward()
        scaler.unscale_(mixed)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(mixed)
        scaler.update()
        plain.zero_grad()
        loss_fn(twin, x, y).backward()
        twin_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        plain.step()
        torch.testing.assert_close(norm, twin_norm)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(dict(mixed.state[model.emb.weight]))
    mixed.zero_grad()
    x, y = batches(1)[0]
    loss = loss_fn(model, x, y)
    scaler.scale(loss * float("inf")).backward()
    scaler.step(mixed)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(v, state_before[k]) for k, v in mixed.state[model.emb.weight].items())
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf through the mixed param groups


SCHEDULERS: list[Callable[[torch.optim.Optimizer], Any]] = [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, [lambda s: 1 / (s + 1), lambda s: 0.5 ** s]),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, [0.05, 0.01], total_steps=8, cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4),
]


@pytest.mark.parametrize("make_sched", SCHEDULERS, ids=["LambdaLR", "OneCycleLR", "StepLR", "Cosine"])
def test_lr_schedulers_drive_the_inner_optimizers(make_sched: Callable) -> None:
    model, twin = make_model(), make_model()
    mixed, separate = mixed_for(model), separate_for(twin)
    sched = make_sched(mixed)
    seen: set[tuple[float, float]] = set()
    for x, y in batches(5):
        lrs = (mixed.optimizers[0].param_groups[0]["lr"], mixed.optimizers[1].param_groups[0]["lr"])
        seen.add(lrs)
        mixed.zero_grad()
        loss_fn(model, x, y).backward()
        mixed.step()
        for o, lr in zip(separate, lrs):
            o.param_groups[0]["lr"] = lr
            o.zero_grad()
        loss_fn(twin, x, y).backward()
        for o in separate:
            o.step()
        sched.step()
    assert len(seen) > 1  # the schedule changed what the inner optimizers used
    assert_same_params(model, twin)


def test_cycle_momentum_cycles_every_inner_optimizer_and_needs_momentum_everywhere() -> None:
    model = make_model()
    mixed = mixed_for(model)
    sched = torch.optim.lr_scheduler.OneCycleLR(mixed, 0.01, total_steps=4)
    adamw_group, tiger_group = mixed.param_groups
    for x, y in batches(2):
        mixed.zero_grad()
        loss_fn(model, x, y).backward()
        used = adamw_group["betas"][0]
        mixed.step()
        assert tiger_group["beta"] == used  # Tiger's step used the momentum the scheduler gave AdamW
        sched.step()
    assert adamw_group["betas"][0] == tiger_group["betas"][0] and used < 0.95  # cycled from 0.95 down
    rest = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    with pytest.raises(ValueError, match="momentum or beta1"):  # Adagrad has no momentum to cycle
        torch.optim.lr_scheduler.OneCycleLR(MixedOptimizer(Adagrad([model.emb.weight]), Tiger(rest)),
                                            0.01, total_steps=4)


# ---------------------------------------------------------------------------------------------- one-liner
def test_split_embeddings_defaults() -> None:
    model = make_model()
    mixed = split_embeddings(model)
    emb_opt, rest_opt = mixed.optimizers
    assert type(emb_opt) is torch.optim.AdamW and type(rest_opt) is Tiger
    assert emb_opt.param_groups[0]["params"] == [model.emb.weight]
    assert emb_opt.defaults["lr"] == 1e-3 and rest_opt.defaults["lr"] == 1e-3
    rest = [p for n, p in model.named_parameters() if n != "emb.weight"]
    assert rest_opt.param_groups[0]["params"] == rest


def test_split_embeddings_factories_tied_weights_and_frozen_params() -> None:
    model = make_model(tied=True)
    model.norm.bias.requires_grad_(False)
    mixed = split_embeddings(model, lambda ps: torch.optim.Adam(ps, lr=0.02),
                             lambda ps: Lion(ps, lr=1e-4))
    emb_opt, rest_opt = mixed.optimizers
    assert type(emb_opt) is torch.optim.Adam and emb_opt.param_groups[0]["lr"] == 0.02
    assert emb_opt.param_groups[0]["params"] == [model.emb.weight]  # the tied output weight, once
    held = [id(p) for p in rest_opt.param_groups[0]["params"]]
    assert id(model.emb.weight) not in held and id(model.norm.bias) not in held
    assert set(held) == {id(model.hidden.weight), id(model.hidden.bias), id(model.norm.weight)}


def test_split_embeddings_errors() -> None:
    with pytest.raises(ValueError, match="no trainable Embedding"):
        split_embeddings(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every trainable parameter"):
        split_embeddings(nn.Embedding(3, 2))


def test_lazy_adamw_inside_mixed_keeps_unused_rows() -> None:
    model = make_model()
    rest = [p for n, p in model.named_parameters() if not n.startswith("emb")]
    mixed = MixedOptimizer(LazyOptimizer(torch.optim.AdamW([model.emb.weight], lr=0.1), model), Tiger(rest))
    start = model.emb.weight.detach().clone()
    used = torch.tensor([0, 1, 2])
    for _ in range(3):
        mixed.zero_grad()
        nn.functional.cross_entropy(model(used), used).backward()
        mixed.step()
    w = model.emb.weight.detach()
    assert torch.equal(w[3:], start[3:]) and not torch.equal(w[:3], start[:3])
    assert not torch.equal(model.hidden.weight, make_model().hidden.weight)


def _sr_params(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(torch.bfloat16).requires_grad_() for s in shapes]


def _sr_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 3) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)
        opt.step()


def test_stochastic_rounding_keys_on_the_mixed_param_groups_order() -> None:
    """Inner tigeropt optimizers round as one optimizer over MixedOptimizer.param_groups does: each
    parameter's hash index is its position there (each inner optimizer numbered from 0 gave the first
    parameters of all of them the same random bits), also through a LazyOptimizer, a nested
    MixedOptimizer and after add_param_group on an earlier inner optimizer."""
    kw = dict(lr=1e-2, stochastic_rounding=True, state_precision="bf16", sr_seed=5)
    shapes = [(4, 300), (4, 300), (300,), (2, 300), (300,)]
    ref_p, mix_p = _sr_params(0, shapes), _sr_params(0, shapes)
    ref = Tiger([{"params": ref_p[0:1]}, {"params": ref_p[1:3]}, {"params": ref_p[3:4]}], **kw)
    inner = MixedOptimizer(Tiger(mix_p[1:3], **kw), LazyOptimizer(Tiger(mix_p[3:4], **kw), mix_p[3:4]))
    mixed = MixedOptimizer(Tiger(mix_p[0:1], **kw), inner)
    _sr_steps(ref, ref_p[:4])
    _sr_steps(mixed, mix_p[:4])
    for a, b in zip(ref_p, mix_p):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    # a group added to the first inner optimizer: appended to its groups, so the later parameters'
    # positions in mixed.param_groups (and their hash indices) move by one, as in the one optimizer
    # whose groups are in that order
    ref2_p, mix2_p = _sr_params(1, shapes), _sr_params(1, shapes)
    ref2 = Tiger([{"params": ref2_p[0:1]}, {"params": ref2_p[4:5]}, {"params": ref2_p[1:3]},
                  {"params": ref2_p[3:4]}], **kw)
    inner2 = MixedOptimizer(Tiger(mix2_p[1:3], **kw), LazyOptimizer(Tiger(mix2_p[3:4], **kw), mix2_p[3:4]))
    mixed2 = MixedOptimizer(Tiger(mix2_p[0:1], **kw), inner2)
    mixed2.add_param_group({"params": mix2_p[4:5]}, optimizer=0)
    order = [ref2_p[i] for i in (0, 4, 1, 2, 3)]
    _sr_steps(ref2, order)
    _sr_steps(mixed2, [mix2_p[i] for i in (0, 4, 1, 2, 3)])
    for a, b in zip(ref2_p, mix2_p):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
