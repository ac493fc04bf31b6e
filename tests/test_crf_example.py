"""examples/crf_learning_rate.py: the CRF against brute force, the data, the metrics, and seed 003's
result on a tiny version (impossible transitions clearly negative at 100x the encoder's lr, not at 1x)."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "crf_learning_rate.py"
_spec = importlib.util.spec_from_file_location("crf_learning_rate", _PATH)
crf_ex = importlib.util.module_from_spec(_spec)
sys.modules["crf_learning_rate"] = crf_ex
_spec.loader.exec_module(crf_ex)

S, B, M, E = crf_ex.S, crf_ex.B, crf_ex.M, crf_ex.E


def brute_force(crf, emissions: torch.Tensor, length: int) -> tuple[float, list[int], dict]:
    """log Z, the best path and every path's score of one sequence, by enumerating all K**length paths."""
    k = emissions.shape[-1]
    trans, start, end = crf.transitions.detach(), crf.start.detach(), crf.end.detach()
    scores = {}
    for path in itertools.product(range(k), repeat=length):
        s = start[path[0]] + end[path[-1]] + sum(emissions[t, path[t]] for t in range(length))
        s = s + sum(trans[path[t - 1], path[t]] for t in range(1, length))
        scores[path] = float(s)
    log_z = float(torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0))
    return log_z, list(max(scores, key=scores.get)), scores


def test_crf_matches_brute_force_with_padding() -> None:
    torch.manual_seed(0)
    crf = crf_ex.CRF(4).double()
    with torch.no_grad():
        crf.transitions.normal_()
        crf.start.normal_()
        crf.end.normal_()
    lengths = [5, 3, 1]
    emissions = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    tags = torch.randint(0, 4, (3, 5))
    with torch.no_grad():
        log_z = crf.log_partition(emissions, mask)
        gold = crf.score(emissions, tags, mask)
    decoded = crf.decode(emissions, mask)
    for row, n in enumerate(lengths):
        ref_z, ref_best, scores = brute_force(crf, emissions[row], n)
        assert float(log_z[row]) == pytest.approx(ref_z, rel=1e-10)
        assert float(gold[row]) == pytest.approx(scores[tuple(tags[row, :n].tolist())], rel=1e-10)
        assert decoded[row, :n].tolist() == ref_best
        assert (decoded[row, n:] == S).all()
    # nll = mean(log Z - score) and its gradient flows to the transitions
    nll = crf.nll(emissions, tags, mask)
    assert float(nll.detach()) == pytest.approx(float((log_z - gold).mean()), rel=1e-12)
    nll.backward()
    assert crf.transitions.grad.abs().sum() > 0


def test_spans_and_validity_by_hand() -> None:
    assert crf_ex.spans([B, E, S, B, M, E]) == {(0, 1), (2, 2), (3, 5)}
    assert crf_ex.spans([S, S]) == {(0, 0), (1, 1)}
    assert crf_ex.spans([B, M]) == {(0, 1)}  # an unfinished word still ends the sentence
    assert crf_ex.is_valid([B, M, E, S])
    for bad in ([B, B, E], [S, E], [M, E], [E], [B, E, B], [S, M, E], [B, S]):
        assert not crf_ex.is_valid(bad), bad
    assert crf_ex.word_tags(1) == [S] and crf_ex.word_tags(4) == [B, M, M, E]


def test_generated_data_is_valid_bmes() -> None:
    cfg = replace(crf_ex.TINY, train=200, test=50)
    data = crf_ex.make_data(cfg)
    for chars, tags, mask in data.values():
        assert torch.equal(mask, chars != crf_ex.PAD)
        lengths = mask.sum(1)
        assert int(lengths.min()) >= cfg.min_len and int(lengths.max()) <= cfg.max_len
        assert bool((chars[mask] >= crf_ex.FIRST_CHAR).all())
        for row in range(len(chars)):
            assert crf_ex.is_valid(tags[row, :int(lengths[row])].tolist())
    # deterministic in the seed
    again = crf_ex.make_data(cfg)
    assert all(torch.equal(a, b) for k in data for a, b in zip(data[k], again[k]))


class _Fixed:
    """A stand-in model whose predictions are given."""

    def __init__(self, pred: torch.Tensor) -> None:
        self.pred = pred

    def predict(self, chars: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.pred[: len(chars)]


def test_evaluate_by_hand() -> None:
    gold = torch.tensor([[B, E, S, S], [S, B, M, E]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    chars = torch.where(mask, 5, crf_ex.PAD)
    perfect = crf_ex.evaluate(_Fixed(gold), (chars, gold, mask))
    assert all(perfect[k] == pytest.approx(1.0) for k in ("F1_S", "F1_B", "F1_M", "F1_E", "word_F1"))
    assert perfect["invalid"] == 0.0
    all_s = crf_ex.evaluate(_Fixed(torch.full_like(gold, S)), (chars, gold, mask))
    # 7 tokens, 2 gold S: precision 2/7, recall 1; gold words 2 + 2, predicted 7 single words, 2 right
    assert all_s["F1_S"] == pytest.approx(2 * (2 / 7) / (2 / 7 + 1))
    assert all_s["F1_B"] == 0.0
    assert all_s["word_F1"] == pytest.approx(2 * (2 / 7) * (2 / 4) / (2 / 7 + 2 / 4))
    bad = torch.tensor([[B, B, S, S], [S, B, M, E]])  # row 0 has B->B
    assert crf_ex.evaluate(_Fixed(bad), (chars, gold, mask))["invalid"] == 0.5


def test_larger_crf_lr_learns_impossible_transitions() -> None:
    torch.manual_seed(0)
    results = crf_ex.run(crf_ex.TINY, scales=[1, 100], softmax=False)
    (_, slow, res_slow), (_, fast, res_fast) = results
    lo, hi = crf_ex.transition_scores(slow.crf), crf_ex.transition_scores(fast.crf)
    # at the encoder's lr (1e-3, 150 steps) the CRF scores stay near their init (|x| <= 0.1)
    assert abs(lo["impossible"]) < 0.5 and abs(lo["possible"]) < 0.5
    # at 100x, impossible transitions are strongly negative and all below every possible one
    assert hi["impossible"] < -1.5
    assert hi["impossible"] < lo["impossible"] - 1.5
    assert hi["max_impossible_minus_min_possible"] < 0
    # so Viterbi never decodes an impossible transition, while the 1x CRF often does
    assert res_fast["invalid"] == 0.0
    assert res_slow["invalid"] > 0.2
    assert res_fast["word_F1"] > res_slow["word_F1"]


def test_main_writes_matrices_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(crf_ex, "OUT", tmp_path / "default")  # never written: files only with --out
    tiny = ["--chars", "30", "--words", "60", "--min-len", "4", "--max-len", "8", "--train", "100",
            "--test", "20", "--dim", "8", "--layers", "1", "--pretrain-steps", "3", "--steps", "3",
            "--batch", "8", "--scales", "1,100"]
    threads = torch.get_num_threads()
    try:
        crf_ex.main(tiny)
        assert list(tmp_path.iterdir()) == []
        capsys.readouterr()
        crf_ex.main([*tiny, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("from\\to") == 2 and "start" in out and "CRF lr x100" in out
    assert "word_F1" in out and "softmax" in out
    text = (tmp_path / "crf_learning_rate.txt").read_text(encoding="utf-8")
    assert text.count("from\\to") == 2 and "--out" in text.splitlines()[0]
    rows = (tmp_path / "crf_learning_rate.csv").read_text().splitlines()
    assert rows[0].startswith("run,F1_S,F1_B,F1_M,F1_E") and len(rows) == 4
