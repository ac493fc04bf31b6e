"""tigeropt.param_groups / describe: group assignment, no-decay detection, layer decay, errors, optimizers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import tigeropt
from tigeropt.param_groups import DEFAULT_NO_DECAY, ParamGroups, describe, param_groups

# ----------------------------------------------------------------------------- models


class CRF(nn.Module):
    def __init__(self, k: int = 4) -> None:
        super().__init__()
        self.transitions = nn.Parameter(torch.randn(k, k))
        self.start = nn.Parameter(torch.randn(k))
        self.end = nn.Parameter(torch.randn(k))


class TransformerCRF(nn.Module):
    """embed + pos_embed -> 2 TransformerEncoderLayers -> LayerNorm -> Linear head -> CRF."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.pos_embed = nn.Parameter(torch.randn(6, 8) * 0.1)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.crf = CRF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.encoder(self.embed(x) + self.pos_embed[: x.shape[1]]))
        e = self.head(h)
        # a stand-in loss that reaches every parameter, the CRF included
        return (e.square().mean() + (e[:, :-1, :, None] * self.crf.transitions).mean()
                + (e[:, 0] * self.crf.start).mean() + (e[:, -1] * self.crf.end).mean())


# nn.TransformerEncoderLayer's parameters: (suffix, decayed?) - biases and norm1/norm2 are not
LAYER_PARAMS = [
    ("self_attn.in_proj_weight", True), ("self_attn.in_proj_bias", False),
    ("self_attn.out_proj.weight", True), ("self_attn.out_proj.bias", False),
    ("linear1.weight", True), ("linear1.bias", False), ("linear2.weight", True), ("linear2.bias", False),
    ("norm1.weight", False), ("norm1.bias", False), ("norm2.weight", False), ("norm2.bias", False),
]


def assignment(groups: list[dict]) -> dict[str, tuple[float, float]]:
    """name -> (lr, wd), checking that names line up with the tensors and each appears once."""
    out: dict[str, tuple[float, float]] = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["lr"], g["weight_decay"])
    return out


def check(groups: list[dict], model: nn.Module, expected: dict[str, tuple[float, float]]) -> None:
    named = dict(model.named_parameters())
    for g in groups:
        for name, p in zip(g["param_names"], g["params"]):
            assert named[name] is p
    got = assignment(groups)
    assert set(got) == set(expected)
    for name, (lr, wd) in expected.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name
        assert got[name][1] == pytest.approx(wd, abs=0), name


# ----------------------------------------------------------------------------- assignment


def test_transformer_crf_lr_scale_no_decay_and_layer_decay() -> None:
    model = TransformerCRF()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_scale={"crf": 100}, layer_decay=0.5)
    # 2 blocks: layers.1 is d=1 (lr*0.5), layers.0 d=2 (lr*0.25), embeddings d=3 (lr*0.125), the rest d=0
    expected = {"embed.weight": (1.25e-4, 0.1), "pos_embed": (1.25e-4, 0.1),
                "norm.weight": (1e-3, 0.0), "norm.bias": (1e-3, 0.0),
                "head.weight": (1e-3, 0.1), "head.bias": (1e-3, 0.0),
                "crf.transitions": (0.1, 0.1), "crf.start": (0.1, 0.1), "crf.end": (0.1, 0.1)}
    for i, lr in ((0, 2.5e-4), (1, 5e-4)):
        for suffix, decayed in LAYER_PARAMS:
            expected[f"encoder.layers.{i}.{suffix}"] = (lr, 0.1 if decayed else 0.0)
    check(groups, model, expected)
    # groups with equal (lr, wd) are merged: {1.25e-4, 2.5e-4 x2, 5e-4 x2, 1e-3 x2, 0.1}
    assert len(groups) == 8
    assert len({(g["lr"], g["weight_decay"]) for g in groups}) == len(groups)
    assert isinstance(groups, ParamGroups) and isinstance(groups, list)


def test_defaults_give_one_group_without_weight_decay() -> None:
    model = TransformerCRF()
    groups = param_groups(model, lr=3e-4)
    assert len(groups) == 1
    assert groups[0]["lr"] == 3e-4 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_lr_scale_by_module_type_and_factors_multiply() -> None:
    model = TransformerCRF()
    scale = {nn.Linear: 2.0, "head": 3.0, nn.TransformerEncoderLayer: 0.5}
    groups = param_groups(model, lr=1.0, lr_scale=scale, no_decay=None, weight_decay=0.01)
    got = assignment(groups)
    assert got["head.weight"][0] == pytest.approx(6.0)  # Linear x head
    assert got["head.bias"] == (pytest.approx(6.0), 0.01)  # no_decay=None: biases decay too
    assert got["encoder.layers.0.linear1.weight"][0] == pytest.approx(1.0)  # Linear x layer
    # out_proj is a NonDynamicallyQuantizableLinear, a subclass of nn.Linear
    assert got["encoder.layers.1.self_attn.out_proj.bias"][0] == pytest.approx(1.0)
    # in_proj_weight belongs to MultiheadAttention itself (not a Linear), inside a layer
    assert got["encoder.layers.1.self_attn.in_proj_weight"][0] == pytest.approx(0.5)
    assert got["encoder.layers.1.norm2.weight"][0] == pytest.approx(0.5)
    assert got["embed.weight"][0] == pytest.approx(1.0)
    assert got["crf.transitions"][0] == pytest.approx(1.0)
    # a compiled pattern works like a string
    got = assignment(param_groups(model, lr=1.0, lr_scale={re.compile(r"^crf\.(start|end)$"): 4.0}))
    assert got["crf.start"][0] == got["crf.end"][0] == pytest.approx(4.0)
    assert got["crf.transitions"][0] == pytest.approx(1.0)
    # a tuple of types matches any of them
    got = assignment(param_groups(model, lr=1.0, lr_scale={(nn.Embedding, CRF): 0.1}))
    assert got["embed.weight"][0] == got["crf.end"][0] == pytest.approx(0.1)
    assert got["head.weight"][0] == pytest.approx(1.0)


def test_rules_absolute_lr_and_weight_decay_and_extra() -> None:
    model = TransformerCRF()
    rules = [
        {"match": "crf", "lr": 0.05, "weight_decay": 0.0, "extra": {"kind": "dense"}},
        {"match": r"^norm\.weight$", "weight_decay": 0.3},  # beats no_decay
        {"match": nn.Embedding, "lr_scale": 0.1, "extra": {"kind": "embedding"}},
        {"match": lambda name, p, module: name == "pos_embed", "lr_scale": 0.1},
    ]
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, lr_scale={"crf": 100, "embed": 2.0}, rules=rules)
    got = assignment(groups)
    assert got["crf.transitions"] == (0.05, 0.0)  # absolute lr: the lr_scale of 100 does not apply
    assert got["norm.weight"] == (1e-3, 0.3)
    assert got["norm.bias"] == (1e-3, 0.0)
    assert got["embed.weight"] == (pytest.approx(2e-4), 0.01)  # 1e-3 * 2 ("embed") * 0.1 (rule)
    assert got["pos_embed"] == (pytest.approx(2e-4), 0.01)
    kinds = {name: g.get("kind") for g in groups for name in g["param_names"]}
    assert kinds["crf.start"] == "dense" and kinds["embed.weight"] == "embedding"
    assert kinds["pos_embed"] is None  # same lr/wd as embed.weight but another kind: separate groups
    assert kinds["head.weight"] is None


def test_no_decay_detection() -> None:
    class MyRMSNorm(nn.Module):  # a norm from another library: found by its class name
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.ModuleDict({
        "conv": nn.Conv1d(4, 4, 3), "bn": nn.BatchNorm1d(4), "gn": nn.GroupNorm(2, 4),
        "inorm": nn.InstanceNorm1d(4, affine=True), "rms": nn.RMSNorm(4), "ln": nn.LayerNorm(4),
        "my": MyRMSNorm(), "lstm": nn.LSTM(4, 4), "mha": nn.MultiheadAttention(4, 2),
        "emb": nn.Embedding(5, 4), "lin": nn.Linear(4, 4),
    })
    model.unbiased = nn.Parameter(torch.zeros(3))  # 'bias' only inside a word: decayed
    decayed = {"conv.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "mha.in_proj_weight",
               "mha.out_proj.weight", "emb.weight", "lin.weight", "unbiased"}
    free = {"conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "inorm.weight", "inorm.bias",
            "rms.weight", "ln.weight", "ln.bias", "my.weight", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
            "mha.in_proj_bias", "mha.out_proj.bias", "lin.bias"}
    assert decayed | free == {n for n, _ in model.named_parameters()}
    got = assignment(param_groups(model, lr=1.0, weight_decay=0.5))
    assert {n for n, (_, wd) in got.items() if wd == 0.5} == decayed
    assert {n for n, (_, wd) in got.items() if wd == 0.0} == free
    # disabled, replaced, extended
    for off in (None, False):
        assert {wd for _, wd in assignment(param_groups(model, 1.0, 0.5, no_decay=off)).values()} == {0.5}
    got = assignment(param_groups(model, 1.0, 0.5, no_decay=[nn.Embedding, r"^lin\."]))
    assert {n for n, (_, wd) in got.items() if wd == 0.0} == {"emb.weight", "lin.weight", "lin.bias"}
    got = assignment(param_groups(model, 1.0, 0.5, no_decay=(*DEFAULT_NO_DECAY, "emb")))
    assert {n for n, (_, wd) in got.items() if wd == 0.0} == free | {"emb.weight"}


def test_layer_decay_gpt2_names_and_block_pattern() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(4)
            self.attn = nn.Linear(4, 4)

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = nn.ModuleDict({"wte": nn.Embedding(10, 4), "wpe": nn.Embedding(8, 4),
                                              "h": nn.ModuleList([Block() for _ in range(3)]),
                                              "ln_f": nn.LayerNorm(4)})
            self.lm_head = nn.Linear(4, 10, bias=False)

    model = GPT()
    got = assignment(param_groups(model, lr=1.0, layer_decay=0.8))
    expected_lr = {"transformer.wte.weight": 0.8**4, "transformer.wpe.weight": 0.8**4,
                   "transformer.ln_f.weight": 1.0, "transformer.ln_f.bias": 1.0, "lm_head.weight": 1.0}
    for i, lr in ((0, 0.8**3), (1, 0.8**2), (2, 0.8)):
        for s in ("ln_1.weight", "ln_1.bias", "attn.weight", "attn.bias"):
            expected_lr[f"transformer.h.{i}.{s}"] = lr
    assert set(got) == set(expected_lr)
    for name, lr in expected_lr.items():
        assert got[name][0] == pytest.approx(lr, rel=1e-12), name

    # layer decay combines with lr_scale; embeddings can be named explicitly
    got = assignment(param_groups(model, lr=1.0, layer_decay=0.5, lr_scale={"lm_head": 10},
                                  embeddings=[r"\.wte\."]))
    assert got["lm_head.weight"][0] == pytest.approx(10.0)
    assert got["transformer.wte.weight"][0] == pytest.approx(0.5**4)
    assert got["transformer.wpe.weight"][0] == pytest.approx(1.0)  # no longer an embedding: on top

    # custom block names need block_pattern
    stages = nn.ModuleDict({"stem": nn.Linear(2, 2), "fc": nn.Linear(2, 2),
                            "stages": nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])})
    with pytest.raises(ValueError, match="finds no block"):
        param_groups(stages, lr=1.0, layer_decay=0.5)
    got = assignment(param_groups(stages, lr=1.0, layer_decay=0.5, block_pattern=r"stages\.(\d+)\.",
                                  embeddings=["stem"]))
    assert got["stem.weight"][0] == pytest.approx(0.125)
    assert got["stages.0.weight"][0] == pytest.approx(0.25)
    assert got["stages.1.bias"][0] == pytest.approx(0.5)
    assert got["fc.weight"][0] == pytest.approx(1.0)

    # two stacks (encoder-decoder) are ambiguous
    two = nn.ModuleDict({"enc": nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2)])}),
                         "dec": nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(2, 2)])})})
    with pytest.raises(ValueError, match="several prefixes"):
        param_groups(two, lr=1.0, layer_decay=0.5)


# ----------------------------------------------------------------------------- edge cases


def test_unmatched_pattern_is_an_error() -> None:
    model = TransformerCRF()
    with pytest.raises(ValueError, match="crff"):
        param_groups(model, lr=1e-3, lr_scale={"crff": 100})
    with pytest.raises(ValueError, match="Conv2d"):
        param_groups(model, lr=1e-3, lr_scale={nn.Conv2d: 2})
    with pytest.raises(ValueError, match=r"rules\[1\]"):
        param_groups(model, lr=1e-3, rules=[{"match": "crf", "lr": 1.0}, {"match": "hed", "lr": 1.0}])
    with pytest.raises(ValueError, match="no_decay entry 'gamma'"):
        param_groups(model, lr=1e-3, no_decay=["gamma"])
    with pytest.raises(ValueError, match="embeddings entry"):
        param_groups(model, lr=1e-3, layer_decay=0.9, embeddings=["tok_emb"])
    # strict=False lets it pass and does nothing
    groups = param_groups(model, lr=1e-3, lr_scale={"crff": 100}, strict=False)
    assert {g["lr"] for g in groups} == {1e-3}
    # the built-in defaults never complain: a model without biases or norms
    assert len(param_groups(nn.Linear(3, 3, bias=False), lr=1.0, weight_decay=0.1)) == 1


def test_invalid_arguments() -> None:
    model = TransformerCRF()
    with pytest.raises(ValueError, match="Invalid lr"):
        param_groups(model, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        param_groups(model, lr=1.0, weight_decay=float("nan"))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="Invalid layer_decay"):
            param_groups(model, lr=1.0, layer_decay=bad)
    with pytest.raises(ValueError, match=r"lr_scale\['crf'\]"):
        param_groups(model, lr=1.0, lr_scale={"crf": -2})
    with pytest.raises(ValueError, match="unknown keys"):
        param_groups(model, lr=1.0, rules=[{"match": "crf", "learning_rate": 1.0}])
    with pytest.raises(ValueError, match="'match'"):
        param_groups(model, lr=1.0, rules=[{"lr": 1.0}])
    with pytest.raises(ValueError, match="regular expression"):
        param_groups(model, lr=1.0, lr_scale={"crf(": 2})
    with pytest.raises(ValueError, match="a match is"):
        param_groups(model, lr=1.0, lr_scale={int: 2})
    with pytest.raises(ValueError, match="extra"):
        param_groups(model, lr=1.0, rules=[{"match": "crf", "extra": {"lr": 1.0}}])


def test_tied_params_once_and_rules_see_every_name() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.emb.weight

    model = Tied()
    groups = param_groups(model, lr=1.0, lr_scale={"lm_head": 3.0})
    tensors = [p for g in groups for p in g["params"]]
    assert len(tensors) == 3 and len({id(p) for p in tensors}) == 3
    got = assignment(groups)
    assert set(got) == {"emb.weight", "body.weight", "body.bias"}  # first name kept
    assert got["emb.weight"][0] == pytest.approx(3.0)  # the rule on the second name applies
    assert got["body.weight"][0] == pytest.approx(1.0)


def test_frozen_params_left_out() -> None:
    model = TransformerCRF()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.embed.weight.requires_grad_(False)
    # a rule that only matches frozen parameters is not a typo: no error
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_scale={"encoder": 0.1})
    names = set(assignment(groups))
    assert names == {"pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias",
                     "crf.transitions", "crf.start", "crf.end"}
    assert all(p.requires_grad for g in groups for p in g["params"])
    model.requires_grad_(False)
    assert param_groups(model, lr=1e-3) == []


# ----------------------------------------------------------------------------- describe


def test_describe_summary() -> None:
    model = nn.ModuleDict({"a": nn.Linear(3, 5), "b": nn.Linear(5, 2), "c": nn.LayerNorm(2)})
    groups = param_groups(model, lr=2e-3, weight_decay=0.05, lr_scale={r"^b\.": 10},
                          rules=[{"match": r"^c\.", "extra": {"kind": "norm"}}])
    text = describe(groups, max_names=2)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["group", "lr", "wd", "tensors", "elements"]
    # groups in order of first parameter: a.weight (decay), a.bias (no decay), b.weight, b.bias, c (norm)
    assert lines[1].split()[:5] == ["0", "0.002", "0.05", "1", "15"]
    assert lines[2].split()[:5] == ["1", "0.002", "0", "1", "5"] and "a.bias" in lines[2]
    assert lines[3].split()[:5] == ["2", "0.02", "0.05", "1", "10"] and "b.weight" in lines[3]
    assert lines[4].split()[:5] == ["3", "0.02", "0", "1", "2"]
    assert lines[5].split()[:6] == ["4", "0.002", "0", "2", "4", "kind='norm'"]
    assert "c.weight, c.bias" in lines[5]
    assert lines[-1] == "total: 6 tensors, 36 elements in 5 groups"
    assert str(groups) == describe(groups)

    many = param_groups(nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(5)]), lr=1.0)
    assert "0.weight, 1.weight, 2.weight, ... (+2)" in describe(many)
    # an optimizer works too; only extra keys that differ between groups are shown
    opt = torch.optim.AdamW(groups)
    text = describe(opt, max_names=2)
    assert "betas" not in text and "kind='norm'" in text and "total: 6 tensors, 36 elements" in text
    # groups without names
    assert "-" in describe([{"params": [torch.zeros(3)], "lr": 0.1, "weight_decay": 0.0}]).splitlines()[1]


# ----------------------------------------------------------------------------- optimizers


OPTIMIZERS = {
    "AdamW": lambda g: torch.optim.AdamW(g),
    "Tiger": lambda g: tigeropt.Tiger(g),
    "Lion": lambda g: tigeropt.Lion(g),
    "AdaX": lambda g: tigeropt.AdaX(g),
    "Adagrad": lambda g: tigeropt.Adagrad(g),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_accept_groups_and_state_dict(name: str) -> None:
    torch.manual_seed(0)
    model = TransformerCRF()
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, lr_scale={"crf": 100}, layer_decay=0.5,
                          rules=[{"match": nn.Embedding, "extra": {"kind": "embedding"}}])
    opt = OPTIMIZERS[name](groups)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]
    assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in groups]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 20, (3, 5))
    for _ in range(2):
        opt.zero_grad()
        model(x).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        assert not torch.equal(p, before[n]), f"{name} did not move {n}"

    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [g["param_names"] for g in groups]
    clone = copy.deepcopy(model)
    opt2 = OPTIMIZERS[name](param_groups(clone, lr=1e-3, weight_decay=0.01, lr_scale={"crf": 100},
                                         layer_decay=0.5,
                                         rules=[{"match": nn.Embedding, "extra": {"kind": "embedding"}}]))
    opt2.load_state_dict(copy.deepcopy(sd))  # as torch.save/torch.load would: torch shares tensors
    for (p, q) in zip(model.parameters(), clone.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], value)
    # both take the same next step
    for o, m in ((opt, model), (opt2, clone)):
        o.zero_grad()
        m(x).backward()
        o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Tiger", "Lion"])
def test_sign_optimizers_move_each_parameter_by_its_group_lr(name: str) -> None:
    # Tiger/Lion with wd 0: the first step moves every element with a non-zero gradient by exactly lr
    torch.manual_seed(0)
    model = TransformerCRF()
    groups = param_groups(model, lr=1e-3, lr_scale={"crf": 100, "head": 10}, layer_decay=0.5)
    expected_lr = {n: lr for n, (lr, _) in assignment(groups).items()}
    assert expected_lr["crf.start"] == pytest.approx(0.1) and expected_lr["head.bias"] == pytest.approx(1e-2)
    opt = OPTIMIZERS[name](groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 20, (3, 5))).backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = (p - before[n]).abs()[p.grad != 0]
        assert moved.numel() > 0
        torch.testing.assert_close(moved, torch.full_like(moved, expected_lr[n]), rtol=1e-3, atol=0)


def test_scheduler_sees_final_lr() -> None:
    model = TransformerCRF()
    groups = param_groups(model, lr=1e-3, lr_scale={"crf": 1000})
    opt = tigeropt.Tiger(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.step()  # no gradients: nothing moves
    sched.step()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [pytest.approx(5e-4), pytest.approx(0.5)]
