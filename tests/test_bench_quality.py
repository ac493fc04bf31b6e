"""The quality study (benchmarks/bench_quality.py): --quick smoke run, records, resume, report."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tigeropt import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    bench.main(["--quick", "--no-plot", "--out", str(out)])
    return out


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quality-runs.jsonl").read_text().splitlines()]


def test_quick_study_writes_one_record_per_run_for_every_stage(bench, quick_run: Path) -> None:
    records = read(quick_run)
    assert len({bench.as_spec(r).key() for r in records}) == len(records)  # no run twice
    stages = {r["stage"] for r in records}
    expected = {"coarse", "refine", "suggest", "seeds", "demo", "lr_scaling", "batch", "long"}
    if bench.load_digits() is not None:
        expected.add("digits")
    assert stages == expected
    # the long regime's best also runs at the other seeds (seed spread at 3,000 steps)
    assert {r["seed"] for r in records if r["stage"] == "long"} == {0, *bench.Plan.quick().seeds}
    plan = bench.Plan.quick()
    for r in records:
        assert r["threads"] >= 1 and r["finished"] and r["machine"]
        assert math.isfinite(r["heldout_loss"]) and math.isfinite(r["train_loss"])
        assert r["weight_decay"] >= 0 and r["lr"] > 0 and r["wall_s"] >= 0
        assert r["batch_size"] == r["accumulation"] * (64 if r["task"] == "digits" else plan.batch)
        assert 0 < len(r["curve"]) <= 100
        if r["task"] == "charlm":
            # every run learned something: below the uniform guess over the vocabulary
            assert r["heldout_loss"] < math.log(demo.VOCAB_SIZE) - 0.3, r
            if r["stage"] == "coarse":  # lr and wd coupled: lr * wd fixed
                assert r["lr"] * r["weight_decay"] == pytest.approx(bench.LM_DECAY, rel=0.02)
        else:
            assert 0.0 <= r["accuracy"] <= 1.0
    # one state buffer for Tiger and Lion, two for AdamW
    by_opt = {(r["optimizer"], r["model"]): r["state_bytes"] for r in records}
    for model in {r["model"] for r in records}:
        assert by_opt[("tiger", model)] == by_opt[("lion", model)] == by_opt[("adamw", model)] // 2
    # batch regime: accumulation over micro-batches, same windows as the main regime
    batch = [r for r in records if r["stage"] == "batch"]
    assert batch and all(r["accumulation"] == 2 and r["steps"] == 6 for r in batch)
    # the seed stage reruns each optimizer's best seed-0 setting
    for r in (r for r in records if r["stage"] == "seeds"):
        twin = bench.replace(bench.as_spec(r), seed=0).key()
        assert twin in {bench.as_spec(x).key() for x in records}


def test_restart_skips_finished_runs_and_redoes_a_missing_one(bench, quick_run: Path) -> None:
    path = quick_run / "quality-runs.jsonl"
    before = path.read_text()
    args = bench.argparse.Namespace(quick=True, out=quick_run, stages="", max_minutes=0)
    assert bench.study(args) == 0
    assert path.read_text() == before
    lines = before.splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    assert bench.study(args) == 1
    redone = path.read_text().splitlines()
    assert bench.as_spec(json.loads(redone[-1])).key() == bench.as_spec(json.loads(lines[-1])).key()


def test_report_tables(bench, quick_run: Path) -> None:
    md = bench.report(bench.argparse.Namespace(quick=True, out=quick_run)).read_text()
    records = read(quick_run)
    assert f"{len(records)} runs finished" in md
    adamw_best = min((r for r in records if r["stage"] in ("coarse", "refine") and r["optimizer"] == "adamw"),
                     key=lambda r: r["heldout_loss"])
    row = next(line for line in md.splitlines() if line.startswith("| AdamW, best"))
    assert f"| {adamw_best['lr']:g} |" in row and "+0.0%" in row
    for label in ("Tiger, best", "Lion, best"):
        assert any(line.startswith(f"| {label}") for line in md.splitlines())


def test_readme_tables_are_the_committed_study(bench, tmp_path: Path) -> None:
    """The README's quality tables are what --report writes from the committed raw runs."""
    study = ROOT / "benchmarks" / "results" / "quality-study-2026-11-30"
    (tmp_path / "quality-runs.jsonl").write_text((study / "quality-runs.jsonl").read_text())
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    bench.report(bench.argparse.Namespace(quick=False, out=tmp_path, no_plot=True, readme=readme))
    assert readme.read_text() == (ROOT / "README.md").read_text()
    committed = (study / "quality-study.md").read_text().replace("![loss curves](quality-study.png)\n\n", "")
    assert (tmp_path / "quality-study.md").read_text().split("\n", 3)[3] == committed.split("\n", 3)[3]


# --------------------------------------------------------------------------- the precision table (issue 12)
@pytest.fixture(scope="module")
def precision_run(bench, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("precision")
    bench.main(["--precision", "--quick", "--no-plot", "--out", str(out)])
    return out


def test_precision_quick_run_records_every_row_with_its_bytes_and_rounding(bench, precision_run: Path
                                                                          ) -> None:
    records = [json.loads(line) for line in (precision_run / bench.PRECISION_FILE).read_text().splitlines()]
    plan = bench.PrecisionPlan.quick()
    assert [bench.as_pspec(r).key() for r in records] == [s.key() for s in bench.precision_specs(plan)]
    assert not any(r["setting"] == "peer" for r in records)  # the quick plan needs no peer library
    expected = {"fp32": 8.0, "bf16-rtn": 6.0, "bf16-sr": 6.0, "bf16-sr-bf16": 4.0}
    for r in records:
        assert math.isfinite(r["heldout_loss"]) and r["heldout_loss"] < math.log(demo.VOCAB_SIZE) - 0.3, r
        assert r["lr"] > 0 and r["wall_s"] >= 0 and r["versions"]["torch"] and r["machine"]
        if r["optimizer"] == "adamw":
            assert r["bytes_per_param"] == 12.0 and tuple(r["momentum"]) == bench.STUDY_ADAMW["betas"]
            continue
        hp = bench.suggest_hparams(r["optimizer"], adamw_lr=bench.STUDY_ADAMW["lr"],
                                   adamw_weight_decay=bench.STUDY_ADAMW["weight_decay"], steps=plan.steps,
                                   batch_size=plan.batch)
        assert r["lr"] == pytest.approx(hp["lr"], rel=0.01)
        if r["setting"] == "bf16-sr-8bit":  # 2 bytes + one code + a 4-byte scale per 256-element block
            n_state = r["state_bytes"] - 4 * math.ceil(r["numel"] / 256)
            assert 2.0 + 1.0 < r["bytes_per_param"] <= 3.1 and n_state >= r["numel"]
        else:
            assert r["bytes_per_param"] == expected[r["setting"]]
        # lr 1.41e-3 is below half a bf16 unit at 1.0: round-to-nearest never moves the LayerNorm
        # weights, stochastic rounding moves some; fp32 moves them all
        if r["setting"] == "bf16-rtn":
            assert r["ln_at_one"] == 1.0
        elif r["setting"] == "fp32":
            assert r["ln_at_one"] == 0.0 and r["tail_unchanged"] < 0.01
        else:
            assert r["ln_at_one"] < 0.9


def test_precision_restart_runs_nothing_and_report_has_every_row(bench, precision_run: Path) -> None:
    path = precision_run / bench.PRECISION_FILE
    before = path.read_text()
    args = bench.argparse.Namespace(quick=True, out=precision_run, max_minutes=0, optimizers="")
    assert bench.precision_study(args) == 0 and path.read_text() == before
    md = bench.precision_report(args).read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| Tiger |", "| Lion |"))]
    assert len(rows) == 2 * len(bench.PRECISION_SETTINGS)
    assert any(line.startswith("| AdamW | fp32 | fp32 |") for line in md.splitlines())
    records = bench.load_precision(path)
    q = bench.compare(records, "tiger", "bf16-rtn", "tiger", "bf16-sr")
    assert q.n == 3  # seeds 0, 1, 2
    assert f"{q.mean:+.4f} ± {q.se:.4f} nats" in md and "measurably better?" in md
    assert "bytes/param (target <= 3.1)" in md


def test_paired_statistics_hand_checked(bench) -> None:
    # differences 1, 2, 3: mean 2, standard deviation 1, SE 1/sqrt(3), t(0.975, 2 df) = 4.303
    p = bench.paired([1.0, 1.0, 1.0], [2.0, 3.0, 4.0])
    assert (p.n, p.mean, p.wins) == (3, 2.0, 0)
    assert p.se == pytest.approx(1 / math.sqrt(3)) and p.half_ci == pytest.approx(4.303 / math.sqrt(3))
    assert p.rel_mean == pytest.approx(200.0) and p.rel_worst == pytest.approx(300.0)
    q = bench.paired([2.0, 2.0], [1.0, 3.0])  # one seed better, one worse
    assert q.wins == 1 and q.mean == 0.0 and q.half_ci == pytest.approx(12.706)
    assert math.isnan(bench.paired([1.0], [0.5]).se)


def test_precision_peer_that_does_not_import_is_a_skip_note(bench, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake = ("Fake8bit", "tigeropt_no_such_module", bench.torch.float32, "fp32", "8-bit")
    monkeypatch.setattr(bench, "PEERS", {"fake8bit": fake})
    quick = bench.PrecisionPlan.quick()
    monkeypatch.setattr(bench.PrecisionPlan, "quick", staticmethod(lambda: bench.replace(quick, peers=True,
                                                                                         blocks=())))
    args = bench.argparse.Namespace(quick=True, out=tmp_path, max_minutes=0, optimizers="fake8bit")
    assert bench.precision_study(args) == 1  # only the note: adamw filtered out
    (note,) = bench.load_precision(tmp_path / bench.PRECISION_FILE).values()
    assert "tigeropt_no_such_module does not import" in note["skipped"]
    assert bench.precision_study(args) == 0  # not noted twice
    args.optimizers = ""
    assert bench.precision_study(args) == 1  # AdamW's row
    md = bench.precision_report(args).read_text()
    assert "Fake8bit (fp32 parameters): not run, tigeropt_no_such_module does not import" in md


def test_readme_precision_table_is_the_committed_runs(bench, tmp_path: Path) -> None:
    """The README's precision table is what --precision --report writes from the committed raw runs."""
    study = ROOT / "benchmarks" / "results" / "precision-study-2026-11-30"
    (tmp_path / bench.PRECISION_FILE).write_text((study / bench.PRECISION_FILE).read_text())
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    bench.precision_report(bench.argparse.Namespace(out=tmp_path, readme=readme))
    assert readme.read_text() == (ROOT / "README.md").read_text()
    assert (tmp_path / "precision-study.md").read_text() == (study / "precision-study.md").read_text()
