"""The demo (python -m tigeropt.demo): a few-second run of the real thing, plus its pieces."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tigeropt import demo

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "8",
        "--max-chars", "300000", "--eval-batches", "4", "--no-progress"]


@pytest.fixture(scope="module")
def corpus() -> demo.CharCorpus:
    return demo.load_corpus(max_chars=300_000)


def test_cli_prints_a_row_per_optimizer_and_trains(capsys: pytest.CaptureFixture[str]) -> None:
    results = demo.main(["--steps", "25", "--optimizers", "adamw,tiger,lion,adax", "--seed", "3", *TINY])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["AdamW", "Tiger", "Lion", "AdaX-W"]
    assert [r.name for r in results] == ["adamw", "tiger", "lion", "adax"]
    # same seed: same initial model and evaluation batches for every optimizer
    assert len({r.first_loss for r in results}) == 1
    for r, row in zip(results, rows[1:]):
        assert r.train_loss < r.first_loss - 0.05, (r.name, r.first_loss, r.train_loss)
        assert torch.isfinite(torch.tensor([r.heldout_loss, r.ms_per_step, r.opt_ms_per_step])).all()
        assert f"{r.state_bytes:,}" in row and f"{r.train_loss:.3f}" in row and f"{r.heldout_loss:.3f}" in row
        assert len(r.curve) == 25


def test_state_bytes_one_buffer_for_tiger_and_lion_two_for_adamw_and_adax(corpus: demo.CharCorpus) -> None:
    model = demo.CharTransformer(d_model=16, n_layers=1, n_heads=2, context=8)
    n_params = sum(p.numel() for p in model.parameters())
    expected = {"tiger": 4 * n_params, "lion": 4 * n_params, "adagrad": 4 * n_params,
                "adamw": 8 * n_params, "adax": 8 * n_params}
    x, y = corpus.batch("train", 4, 8, torch.Generator().manual_seed(0))
    for name, nbytes in expected.items():
        opt, _, _ = demo.make_optimizer(name, model)
        assert demo.state_bytes(opt) == 0  # nothing before the first step
        model.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        assert demo.state_bytes(opt) == nbytes, name
    assert demo.param_bytes(model) == 4 * n_params


def test_same_seed_same_run_and_weight_decay_groups(corpus: demo.CharCorpus) -> None:
    kw = dict(steps=3, seed=1, batch_size=4, d_model=16, n_layers=1, n_heads=2, context=8, eval_batches=2,
              progress=False)
    a, b = demo.train("tiger", corpus, **kw), demo.train("tiger", corpus, **kw)
    assert a.curve == b.curve and a.heldout_loss == b.heldout_loss
    model = demo.CharTransformer(d_model=16, n_layers=1, n_heads=2, context=8)
    opt, lr, wd = demo.make_optimizer("lion", model, lr=1e-3, weight_decay=0.7)
    assert (lr, wd) == (1e-3, 0.7)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.7 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    with pytest.raises(ValueError, match="optimizer"):
        demo.make_optimizer("sgd", model)


def test_encode_and_file_split(tmp_path: Path) -> None:
    ids = demo.encode("a\n\t~ é".encode())
    assert ids.tolist() == [demo.VOCAB.index("a"), 0, 1, demo.VOCAB.index("~"), demo.VOCAB.index(" "),
                            demo.UNK, demo.UNK]  # 'é' is two UTF-8 bytes
    for i, text in enumerate(["aaaa", "bbbb", "cccc", "dddd"]):
        (tmp_path / f"m{i}.py").write_text(text)
    c = demo.load_corpus(root=tmp_path, heldout_every=2)
    def text(ids: torch.Tensor) -> str:
        return "".join(demo.VOCAB[i] for i in ids.tolist())

    assert (text(c.train), text(c.heldout)) == ("aaaa\ncccc", "bbbb\ndddd") and c.files == 4
    x, y = c.batch("train", 5, 3, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 3) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(FileNotFoundError):
        demo.load_corpus(root=tmp_path / "empty")


def test_cosine_with_warmup_schedule() -> None:
    f = demo.cosine_with_warmup(100, warmup_frac=0.1, floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_bad_arguments_and_progress_without_tqdm(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--optimizers", "adamw,sgd", *TINY])
    assert "unknown optimizer 'sgd'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: plain lines instead of a bar
    report = demo._progress(20, "Tiger")
    for step in range(20):
        report(step, 1.5)
    report(None, 1.5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].split() == ["Tiger", "step", "20/20", "batch", "loss", "1.500"]


def test_footer_names_only_what_ran_and_thread_grammar(capsys: pytest.CaptureFixture[str]) -> None:
    torch_threads = torch.get_num_threads()
    try:
        demo.main(["--steps", "2", "--optimizers", "tiger", "--threads", "1", *TINY])
    finally:
        torch.set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert re.search(r", 1 thread$", out, flags=re.M) and "1 threads" not in out
    assert "AdaX" not in out and "AdamW" not in out  # the footer speaks of what ran
    assert "progress bar showed single training batches" in out
    demo.main(["--steps", "2", "--optimizers", "adamw,adax", *TINY])
    out = capsys.readouterr().out
    assert "AdaX-W is AdaX with decoupled weight decay" in out and "AdamW uses torch's fused kernel" in out


def test_plot_saves_a_png_of_the_loss_curves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install -e '.[demo]')")
    path = tmp_path / "sub" / "curves.png"
    demo.main(["--steps", "3", "--optimizers", "tiger,lion", "--plot", str(path), *TINY])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert f"Loss curves: {path}" in capsys.readouterr().out


def test_smooth_is_a_trailing_mean() -> None:
    assert demo.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert demo.smooth([2.0], 20) == [2.0]


def test_out_writes_the_table_with_its_conditions_only_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    torch_threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):  # CPU time of one thread misses the others' work
            demo.main(["--steps", "2", "--optimizers", "tiger", "--threads", "2", "--thread-time", *TINY])
        assert "--thread-time needs --threads 1" in capsys.readouterr().err
        demo.main(["--steps", "2", "--optimizers", "tiger", "--threads", "1", "--thread-time", *TINY])
        assert list(tmp_path.iterdir()) == []
        path = tmp_path / "res" / "demo.md"
        results = demo.main(["--steps", "2", "--optimizers", "tiger,lion", "--threads", "1", "--thread-time",
                             "--out", str(path), *TINY])
    finally:
        torch.set_num_threads(torch_threads)
    text = path.read_text()
    assert "--thread-time --out" in text and "time.thread_time" in text and "1 torch thread" in text
    assert f"torch {torch.__version__}" in text
    for r in results:  # the table of the run, as printed
        row = f"| {r.label} | {r.lr:g} | {r.weight_decay:g} | {r.train_loss:.3f} | {r.heldout_loss:.3f} |"
        assert row in text
