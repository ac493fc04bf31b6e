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
