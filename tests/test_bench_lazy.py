"""benchmarks/bench_lazy.py runs the path it reports, and checks it: the GPU rows' code path (the Triton
kernels, ``--fused``) under the Triton interpreter at a tiny size, and the default CPU path (the C row
kernel).  Nothing is timed here: the script's numbers are not looked at, only its checks and labels."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_lazy.py"
OPTIMIZERS = ["Tiger", "AdaX", "Adagrad (rowwise)"]


def _run(*args: str, interpret: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), "--devices", "cpu", "--rows", "64", "--dim", "40",
                           "--frac", "0.1", "--reps", "1", "--warmup", "0", "--no-torch-reference",
                           "--optimizers", *OPTIMIZERS, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _rows(stdout: str) -> dict[str, list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {c[0]: c for c in cells if c[0] != "optimizer"}  # (the last table's rows)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_rows_run_the_triton_row_kernels_and_match_the_reference() -> None:
    out = _run("--fused", "--threads", "1", interpret=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = _rows(out.stdout)
    assert sorted(rows) == sorted(OPTIMIZERS)
    for name, cells in rows.items():
        assert cells[-1].endswith("Triton 4/4"), (name, cells)  # every lazy step in the Triton row kernel
        assert float(cells[-1].split(",")[0]) <= 1e-5
    assert "fused=True (Triton kernels)" in out.stdout


def test_default_cpu_rows_run_the_c_row_kernel() -> None:
    from tigeropt import _cpu

    if not _cpu.available():
        pytest.skip("the fused CPU step cannot be built here")
    out = _run("--threads", "1", "2", interpret=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tables = out.stdout.split("| optimizer |")[1:]
    assert len(tables) == 2  # one per thread count, each checked against the reference
    for table, threads in zip(tables, (1, 2)):
        assert f", {threads} threads)" in table
        rows = _rows("| optimizer |" + table)
        assert sorted(rows) == sorted(OPTIMIZERS)
        assert all(cells[-1].endswith("C 4/4") for cells in rows.values()), rows
