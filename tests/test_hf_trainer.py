"""The Hugging Face Trainer recipes of the README, on a tiny GPT-2 built from a config (no downloads).

Runs when transformers is installed (``pip install -e ".[hf]"``); skipped otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tigeropt

_SKIP = "transformers/accelerate not installed: pip install -e '.[hf]' to test the Trainer recipes"
transformers = pytest.importorskip("transformers", reason=_SKIP)
pytest.importorskip("accelerate", reason=_SKIP)  # Trainer needs it

STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12, vocab: int = 50) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def args(tmp_path: Path, **kw: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, **kw)


def inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def test_recipe_optimizers_tuple(tmp_path: Path) -> None:
    """Build the optimizer yourself (by name, biases/norms without decay); Trainer adds its lr schedule."""
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = tigeropt.create_optimizer(model, "tiger", lr=1e-3, weight_decay=0.1)
    trainer = transformers.Trainer(model=model, args=args(tmp_path, learning_rate=5e-5, weight_decay=0.0),
                                   train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    assert inner(trainer.optimizer) is opt
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # ours, not args.weight_decay
    assert all(g["initial_lr"] == 1e-3 for g in opt.param_groups)  # Trainer's schedule starts at our lr
    assert opt.param_groups[0]["lr"] < 1e-3  # ... and decayed it (linear to 0)
    assert all(int(s["step"]) == STEPS for s in opt.state.values())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_recipe_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    """Trainer builds the groups itself: weight decay per group comes from TrainingArguments."""
    model = tiny_gpt2()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, weight_decay=0.05), train_dataset=Tokens(),
        optimizer_cls_and_kwargs=(tigeropt.Tiger, {"lr": 1e-3, "beta": 0.9, "weight_decay": 0.7}))
    trainer.train()
    opt = inner(trainer.optimizer)
    assert type(opt) is tigeropt.Tiger
    wds = sorted({g["weight_decay"] for g in opt.param_groups})
    assert wds == [0.0, 0.05]  # the kwargs' 0.7 is overridden in every group
    assert all(g["beta"] == 0.9 and g["initial_lr"] == 1e-3 for g in opt.param_groups)
    assert all(int(s["step"]) == STEPS for s in opt.state.values())


def test_recipe_mixed_with_trainer(tmp_path: Path) -> None:
    """split_embeddings by name (AdamW for wte/wpe, Tiger for the rest) runs under Trainer too."""
    model = tiny_gpt2()
    opt = tigeropt.create_optimizer(model, "mixed", lr=1e-3, weight_decay=0.1)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=Tokens(),
                                   optimizers=(opt, None))
    trainer.train()
    emb, rest = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in emb.param_groups for p in g["params"]) == ["transformer.wpe.weight",
                                                                                   "transformer.wte.weight"]
    assert all(int(s["step"]) == STEPS for s in opt.state.values())
