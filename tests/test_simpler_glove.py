"""The simpler-GloVe pipeline of examples/simpler_glove.py on a tiny in-test corpus."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import tigeropt

_PATH = Path(__file__).resolve().parents[1] / "examples" / "simpler_glove.py"
_spec = importlib.util.spec_from_file_location("simpler_glove", _PATH)
sg = importlib.util.module_from_spec(_spec)
sys.modules["simpler_glove"] = sg
_spec.loader.exec_module(sg)

SOURCE = '''"""Module docstring: parse a list."""
import os  # open the file


# first comment line
# second comment line
def f(x):
    """Return the list of a file."""
    y = "not a docstring"
    return x  # trailing comment


class C:
    """Thread safe class."""
'''

SEGMENTS = [
    "the cat sat on the mat".split(),
    "the dog sat on the log the end".split(),
    "a cat and a dog".split(),
    "mat mat mat".split(),
]


def brute_force(segments: list[list[str]], vocab: dict[str, int], window: int) -> Counter:
    counts: Counter = Counter()
    for seg in segments:
        toks = [w for w in seg if w in vocab]
        for a in range(len(toks)):
            for b in range(a + 1, min(a + window, len(toks) - 1) + 1):
                u, v = vocab[toks[a]], vocab[toks[b]]
                if u != v:
                    counts[(min(u, v), max(u, v))] += 1
    return counts


def test_extract_text_keeps_docstrings_and_comment_blocks_only() -> None:
    texts = sg.extract_text(SOURCE)
    assert texts == [
        "Module docstring: parse a list.",
        " open the file",
        " first comment line  second comment line",
        "Return the list of a file.",
        " trailing comment",
        "Thread safe class.",
    ]
    assert sg.extract_text("def broken(:\n") == []
    assert sg.words("Don't PARSE x2y!") == ["don", "t", "parse", "x", "y"]


def test_vocab_ranks_by_count_then_alphabetically() -> None:
    vocab = sg.build_vocab(SEGMENTS, size=3)
    assert vocab.words == ["the", "mat", "a"]  # 5, 4, then a/cat/dog/on/sat tie at 2 -> "a"
    assert vocab.counts.tolist() == [5, 4, 2]
    assert sg.build_vocab(SEGMENTS, size=100, min_count=3).words == ["the", "mat"]


@pytest.mark.parametrize("window, size", [(1, 100), (2, 100), (3, 5), (10, 100)])
def test_cooccurrence_matches_brute_force(window: int, size: int) -> None:
    vocab = sg.build_vocab(SEGMENTS, size=size)
    ids, seg = sg.encode(SEGMENTS, vocab)
    i, j, x = sg.cooccurrence(ids, seg, len(vocab.words), window)
    got = {(a, b): c for a, b, c in zip(i.tolist(), j.tolist(), x.tolist())}
    assert got == dict(brute_force(SEGMENTS, vocab.index, window))
    assert (i < j).all()  # upper triangle only, so no self-pairs


def test_self_pairs_excluded_and_segments_respected() -> None:
    segments = [["a", "a", "b"], ["b", "a"]]
    vocab = sg.build_vocab(segments, size=10)
    ids, seg = sg.encode(segments, vocab)
    i, j, x = sg.cooccurrence(ids, seg, len(vocab.words), window=5)
    # a-a never counted; a-b twice in segment 0 and once in segment 1; nothing across segments.
    assert list(zip(i.tolist(), j.tolist(), x.tolist())) == [(vocab.index["a"], vocab.index["b"], 3)]


def test_pmi_targets_and_weights_by_hand() -> None:
    unigram = torch.tensor([4, 2, 2])  # N = 8
    i, j, x = torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3, 1])  # S = 2 * 4 = 8
    t = sg.pmi_targets(i, j, x, unigram)
    expected = [math.log((3 / 8) / ((4 / 8) * (2 / 8))), math.log((1 / 8) / ((4 / 8) * (2 / 8)))]
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float32))
    lam = sg.glove_weight(torch.tensor([50, 100, 400]))
    torch.testing.assert_close(lam, torch.tensor([0.5**0.75, 1.0, 1.0]))
    untruncated = sg.glove_weight(torch.tensor([400]), truncate=False)
    torch.testing.assert_close(untruncated, torch.tensor([4.0**0.75]))


def _tiny_problem() -> tuple:
    segments = [("the cat sat on the mat while the dog sat on the log " * 3).split(),
                ("a cat and a dog ran to the mat and the log " * 3).split()]
    vocab = sg.build_vocab(segments, size=50)
    ids, seg = sg.encode(segments, vocab)
    i, j, x = sg.cooccurrence(ids, seg, len(vocab.words), window=3)
    return vocab, i, j, sg.pmi_targets(i, j, x, vocab.counts), sg.glove_weight(x, x_max=5.0)


def test_loss_matches_formula_and_gradients_are_sparse() -> None:
    vocab, i, j, t, w = _tiny_problem()
    model = sg.SimplerGloVe(len(vocab.words), 4, generator=torch.Generator().manual_seed(0))
    loss = sg.pair_loss(model, i, j, t, w)
    v = model.emb.weight.detach()
    ref = sum(0.5 * w[k] * (v[i[k]] @ v[j[k]] - t[k]) ** 2 for k in range(i.numel()))
    assert loss.item() == pytest.approx(float(ref), rel=1e-5)
    loss.backward()
    grad = model.emb.weight.grad
    assert grad.is_sparse
    # eq. (22): grad of v_a = sum over its pairs of lambda * (<v_a, v_b> - t) * v_b
    dense = grad.to_dense()
    a = int(i[0])
    ref_a = torch.zeros(4)
    for k in range(i.numel()):
        err = w[k] * (v[i[k]] @ v[j[k]] - t[k])
        if int(i[k]) == a:
            ref_a += err * v[j[k]]
        if int(j[k]) == a:
            ref_a += err * v[i[k]]
    torch.testing.assert_close(dense[a], ref_a, rtol=1e-4, atol=1e-7)


def test_standard_adagrad_decreases_the_loss_and_moves_only_touched_rows() -> None:
    vocab, i, j, t, w = _tiny_problem()
    gen = torch.Generator().manual_seed(0)
    model = sg.SimplerGloVe(len(vocab.words) + 1, 8, generator=gen)  # one extra row never used
    before = model.emb.weight.detach().clone()
    opt = tigeropt.Adagrad(model.parameters(), lr=0.1)
    start = sg.pair_loss(model, i, j, t, w).item()
    res = sg.train(model, opt, i, j, t, w, epochs=60, batch_size=8, generator=gen, progress=False)
    assert res.diverged_at is None
    assert res.epoch_losses[-1] < 0.2 * res.epoch_losses[0]
    assert sg.pair_loss(model, i, j, t, w).item() < 0.2 * start
    assert torch.equal(model.emb.weight.detach()[-1], before[-1])
    assert opt.state[model.emb.weight]["sum"][-1].abs().max() == 0


def test_train_reports_divergence() -> None:
    vocab, i, j, t, w = _tiny_problem()
    gen = torch.Generator().manual_seed(0)
    model = sg.SimplerGloVe(len(vocab.words), 8, generator=gen)
    with torch.no_grad():
        model.emb.weight.mul_(1e3)  # huge vectors: GloVe-style's first step is plain SGD and explodes
    opt = tigeropt.Adagrad(model.parameters(), lr=1.0, glove=True)
    res = sg.train(model, opt, i, j, t, w, epochs=5, batch_size=len(i), generator=gen, progress=False)
    assert res.diverged_at is not None and res.diverged_at <= 5


def test_nearest_neighbours_by_cosine() -> None:
    vocab = sg.Vocab(["a", "b", "c"], torch.tensor([3, 2, 1]))
    model = sg.SimplerGloVe(3, 2)
    with torch.no_grad():
        model.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.3]]))
    nn_ = sg.nearest(model, vocab, "a", k=2)
    assert [w for w, _ in nn_] == ["c", "b"]
    assert nn_[0][1] == pytest.approx(3.0 / math.hypot(3.0, 0.3))
    assert sg.nearest(model, vocab, "zzz") == []


def test_read_corpus_progress_bar_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm", reason="without tqdm there is no bar either way")
    files = []
    for k in range(3):
        files.append(tmp_path / f"m{k}.py")
        files[-1].write_text(SOURCE)
    quiet = sg.read_corpus(files, progress=False)
    assert capsys.readouterr().err == ""
    loud = sg.read_corpus(files)
    assert "files" in capsys.readouterr().err and loud == quiet and len(quiet) == 3 * 6


def test_main_compares_rowwise_with_standard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script's run table includes row-wise Adagrad, whose state is one float per word."""
    sg.main(["--max-files", "3", "--epochs", "1", "--vocab", "300", "--min-count", "1", "--dim", "8",
             "--runs", "standard,rowwise", "--no-progress", "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    lines = {name: next(line for line in out.splitlines() if line.startswith(f"[{name}:"))
             for name in ("standard", "rowwise")}
    assert "rowwise=True" in lines["rowwise"] and "rowwise=False" in lines["standard"]
    mb = {k: float(v.split("optimizer state ")[1].split(" MB")[0]) for k, v in lines.items()}
    vocab = int(re.search(r", vocab (\d+) ", out).group(1))
    assert mb["standard"] == pytest.approx(vocab * 8 * 4 / 1e6, rel=1e-3)  # 4 bytes per element
    assert mb["rowwise"] == pytest.approx(vocab * 4 / 1e6, rel=1e-3)  # 4 bytes per word
    assert "nearest neighbours (rowwise)" in out
