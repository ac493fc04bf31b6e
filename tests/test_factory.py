"""tigeropt.create_optimizer / register_optimizer: optimizers by name, no decay on biases and norms."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import tigeropt
from tigeropt import Adagrad, AdaX, Lion, MixedOptimizer, Tiger, create_optimizer, register_optimizer
from tigeropt import factory as factory_module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.lin(self.emb(x)))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = dict(factory_module._REGISTRY)
    yield
    factory_module._REGISTRY.clear()
    factory_module._REGISTRY.update(saved)


BUILTIN = {
    "tiger": (Tiger, {}), "lion": (Lion, {}), "adax": (AdaX, {"decoupled_weight_decay": False}),
    "adaxw": (AdaX, {"decoupled_weight_decay": True}), "adagrad": (Adagrad, {"glove": False}),
    "adagrad_glove": (Adagrad, {"glove": True}), "adamw": (torch.optim.AdamW, {}),
}


def test_known_names() -> None:
    assert tigeropt.available_optimizers() == sorted([*BUILTIN, "mixed"])


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_names_build_their_optimizer_with_no_decay_groups(name: str) -> None:
    cls, options = BUILTIN[name]
    model = net()
    opt = create_optimizer(model, name, lr=0.02, weight_decay=0.3)
    assert type(opt) is cls
    assert all(opt.param_groups[0][k] == v for k, v in options.items())
    decay, plain = opt.param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in decay["params"]) == ["emb.weight", "head.weight", "lin.weight"]
    assert sorted(named[id(p)] for p in plain["params"]) == ["head.bias", "lin.bias", "norm.bias",
                                                             "norm.weight"]
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.3, 0.0)
    assert decay["lr"] == plain["lr"] == 0.02


def test_same_trajectory_as_the_optimizer_built_by_hand() -> None:
    x = torch.randint(0, 7, (6,))
    results = []
    for by_name in (True, False):
        model = net()
        if by_name:
            opt = create_optimizer(model, "Tiger", lr=0.01, weight_decay=0.1, beta=0.9)
        else:
            decay = [model.emb.weight, model.lin.weight, model.head.weight]
            plain = [model.lin.bias, model.norm.weight, model.norm.bias, model.head.bias]
            opt = Tiger([{"params": decay}, {"params": plain, "weight_decay": 0.0}], lr=0.01,
                        weight_decay=0.1, beta=0.9)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n


def test_unset_lr_and_weight_decay_keep_the_optimizers_defaults() -> None:
    assert create_optimizer(net(), "lion").param_groups[0]["lr"] == 1e-4
    opt = create_optimizer(net(), "adaxw")  # the authors' AdaX-W values
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (5e-3, 5e-2)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert create_optimizer(net(), "tiger").param_groups[0]["weight_decay"] == 0.01


def test_parameters_and_group_dicts_pass_unchanged() -> None:
    model = net()
    groups = [{"params": model.lin.parameters(), "lr": 0.5}, {"params": model.head.parameters()}]
    opt = create_optimizer(groups, "tiger", lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    opt = create_optimizer(model.lin.parameters(), "adamw", weight_decay=0.2)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.2
    with pytest.raises(TypeError, match="single tensor"):
        create_optimizer(model.lin.weight, "tiger")


def test_no_decay_option() -> None:
    opt = create_optimizer(net(), "tiger", weight_decay=0.1, no_decay=())
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    opt = create_optimizer(net(), "tiger", weight_decay=0.1, no_decay=[nn.Embedding])
    assert [len(g["params"]) for g in opt.param_groups] == [6, 1]


def test_unknown_names_list_the_known_ones_and_bad_arguments() -> None:
    known = "adagrad, adagrad_glove, adamw, adax, adaxw, lion, mixed, tiger"
    with pytest.raises(ValueError, match=f"'sgd'.*known optimizers: {known}"):
        create_optimizer(net(), "sgd")
    with pytest.raises(TypeError, match="name"):
        create_optimizer(net(), Tiger)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lr"):
        create_optimizer(net(), "tiger", lr="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_decay.*-1"):
        create_optimizer(net(), "tiger", weight_decay=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_optimizer(net(), "tiger", betas_typo=0.9)
    assert type(create_optimizer(net(), " ADAGRAD-glove ")) is Adagrad  # case and -/_ do not matter


def test_register_user_optimizers() -> None:
    register_optimizer("sgd", functools.partial(torch.optim.SGD, momentum=0.9))
    opt = create_optimizer(net(), "SGD", lr=0.1, weight_decay=1e-4)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert "sgd" in tigeropt.available_optimizers()
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("sgd", torch.optim.SGD)
    register_optimizer("sgd", torch.optim.SGD, overwrite=True)
    assert create_optimizer(net(), "sgd", lr=0.1).param_groups[0]["momentum"] == 0
    with pytest.raises(TypeError, match="callable"):
        register_optimizer("nothing", None)  # type: ignore[arg-type]
    seen: list[Any] = []

    def whole_model(model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
        seen.append((model, kw))
        return torch.optim.SGD(model.parameters(), **kw)

    register_optimizer("whole", whole_model, takes_module=True)
    model = net()
    create_optimizer(model, "whole", lr=0.1)
    assert seen == [(model, {"lr": 0.1})]
    with pytest.raises(TypeError, match="needs the model"):
        create_optimizer(model.parameters(), "whole")


def test_mixed_splits_embeddings_with_no_decay_groups_on_each_side() -> None:
    model = net()
    opt = create_optimizer(model, "mixed", lr=1e-3, weight_decay=0.1, embedding_kwargs={"lr": 3e-3})
    assert isinstance(opt, MixedOptimizer)
    emb, rest = opt.optimizers
    assert type(emb) is torch.optim.AdamW and type(rest) is Tiger
    assert emb.param_groups[0]["params"] == [model.emb.weight] and emb.param_groups[0]["lr"] == 3e-3
    assert [g["weight_decay"] for g in rest.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 1e-3 for g in rest.param_groups)
    assert len(rest.param_groups[1]["params"]) == 4  # biases and the norm weight
    lion_side = create_optimizer(model, "mixed", other_optimizer="lion").optimizers[1]
    assert type(lion_side) is Lion
    with pytest.raises(ValueError, match="Invalid optimizer for 'mixed': 'sgd'"):
        create_optimizer(model, "mixed", embedding_optimizer="sgd")
    with pytest.raises(TypeError, match="needs the model"):
        create_optimizer(model.parameters(), "mixed")
