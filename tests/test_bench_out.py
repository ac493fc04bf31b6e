"""The measuring scripts behind README numbers print their results and write a file only with --out,
a file that carries the command that made it next to the results it printed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _written_only_with_out(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str], out_args: list[str]) -> str:
    """Run without, then with ``out_args``; return what the second run printed."""
    monkeypatch.chdir(tmp_path)
    run([])
    assert "| " in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # nothing written without --out
    run(out_args)
    return capsys.readouterr().out


def test_sqrt_rounding_measures_against_the_correctly_rounded_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("benchmarks/bench_sqrt_rounding.py")
    path = tmp_path / "r" / "sqrt.md"
    printed = _written_only_with_out(lambda a: bench.main(["--elements", "5000", *a]), tmp_path, monkeypatch,
                                     capsys, ["--out", str(path)])
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and all(" 5,000 | " in row for row in rows)
    text = path.read_text()
    assert "--elements 5000 --out" in text and "\n".join(rows) in text


def test_wgan_report_holds_the_printed_table_and_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        keep_threads: None) -> None:
    wgan = _load("examples/wgan_gradnorm.py")
    args = ["--steps", "3", "--batch-size", "16", "--width", "8", "--depth", "2", "--thread-time"]
    printed = _written_only_with_out(lambda a: wgan.main([*args, *a]), tmp_path, monkeypatch, capsys,
                                     ["--out", str(tmp_path / "w")])
    text = (tmp_path / "w" / "wgan_gradnorm.md").read_text()
    assert "--thread-time --out" in text and "time.thread_time" in text
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and all(line in text for line in table)  # header and one row per method
    with pytest.raises(SystemExit):  # one thread's CPU time misses the other threads' work
        wgan.main([*args, "--threads", "2"])


def test_in_backward_table_has_median_and_range_and_its_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load("benchmarks/bench_in_backward.py")

    def in_process(cmd: list[str], **_: object) -> SimpleNamespace:  # each child without a fresh interpreter
        ns = bench.parse_args(cmd[2:])
        ns.model, ns.mode = ns.child
        return SimpleNamespace(stdout=json.dumps(bench.child(ns)))

    monkeypatch.setattr(bench.subprocess, "run", in_process)
    args = ["--device", "cpu", "--d-model", "16", "--layers", "1", "--tables", "1", "--rows", "100",
            "--dim", "8", "--steps", "1", "--repeats", "1"]
    path = tmp_path / "ib.md"
    printed = _written_only_with_out(lambda a: bench.main([*args, *a]), tmp_path, monkeypatch, capsys,
                                     ["--out", str(path)])
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["demo transformer d=16 x1", "1 tables 100 x 8 + head"]
    assert all(len(row.split("|")[4].split()) == 2 for row in rows)  # median (min-max)
    text = path.read_text()
    assert "--repeats 1 --out" in text and "\n".join(rows) in text
