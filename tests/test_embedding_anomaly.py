"""Seed 000's three facts on a tiny model, with the example's own code (examples/embedding_anomaly.py).

1. plain Tiger (wd = 0.01) drives the rows of rare tokens towards the fixed point +-1/wd = +-100;
2. lazy Tiger and the mixed optimizer (AdamW on the embedding) keep them at the scale of the rest;
3. the training loss is comparable across the three.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embedding_anomaly.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("embedding_anomaly", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example()


@pytest.fixture(scope="module")
def tiny(example: ModuleType) -> tuple[object, dict]:
    # emb_lr = 1 makes 1/(lr*wd) = 100 steps: a row last seen before step 150 of 300 has had time to drift
    cfg = example.Config(vocab=1000, dim=8, hidden=32, batch=32, steps=300, emb_lr=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other (100x slower on a busy box)
    try:
        return cfg, {r.name: r for r in example.run_all(cfg)}
    finally:
        torch.set_num_threads(threads)


def test_plain_tiger_drives_rare_rows_to_the_weight_decay_fixed_point(tiny: tuple) -> None:
    cfg, runs = tiny
    stats = runs["tiger"].stats
    assert stats["n_rare"] >= 20
    # p -> -sign(m)/wd = +-100: most of the way there, and never beyond (|p0| is far below 100)
    assert stats["rare_mean_abs"] > 0.75 / cfg.wd
    assert stats["rare_max_abs"] <= 1 / cfg.wd
    # the frequent rows, which keep getting gradient, are not pinned there
    assert stats["frequent_mean_abs"] < stats["rare_mean_abs"]


@pytest.mark.parametrize("remedy", ["lazy", "mixed"])
def test_remedies_keep_rare_rows_small(tiny: tuple, remedy: str) -> None:
    cfg, runs = tiny
    stats = runs[remedy].stats
    assert stats["rare_max_abs"] < 0.1 / cfg.wd
    assert stats["rare_mean_abs"] < 0.02 / cfg.wd


def test_lazy_tiger_leaves_never_seen_rows_untouched(example: ModuleType, tiny: tuple) -> None:
    cfg, runs = tiny
    torch.manual_seed(cfg.seed)
    initial = example.ContextLM(cfg).embedding.weight.detach()
    never = runs["lazy"].counts == 0
    assert never.sum() > 0
    assert torch.equal(runs["lazy"].weight[never], initial[never])
    # plain Tiger moves them (weight decay, as sign(0) = 0): p = p0 * (1 - lr*wd)^steps
    torch.testing.assert_close(runs["tiger"].weight[never],
                               initial[never] * (1 - cfg.emb_lr * cfg.wd) ** cfg.steps, rtol=1e-4, atol=1e-6)


def test_losses_are_comparable(tiny: tuple) -> None:
    _, runs = tiny
    losses = [r.stats["loss"] for r in runs.values()]
    first = [r.losses[0] for r in runs.values()]
    assert len(set(first)) == 1  # same initial weights and data in every run
    assert all(loss < 0.8 * first[0] for loss in losses)  # every run learned
    assert max(losses) / min(losses) < 1.15


def test_table_and_outputs(example: ModuleType, tiny: tuple, tmp_path: Path) -> None:
    cfg, runs = tiny
    table = example.format_table(list(runs.values()), cfg)
    assert table.count("\n| ") == 3 and "+-1/wd = 100" in table
    written = example.save_outputs(list(runs.values()), cfg, tmp_path)
    csv = (tmp_path / "embedding_anomaly.csv").read_text().splitlines()
    assert written[0].name == "embedding_anomaly.csv" and len(csv) == 1 + 3 * cfg.vocab
    with pytest.raises(ValueError, match="Invalid run name"):
        example.make_optimizer("adam", example.ContextLM(cfg), cfg)
