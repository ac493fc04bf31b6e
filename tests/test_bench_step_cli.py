"""benchmarks/bench_step.py writes files only when asked (--out DIR); its --help speaks to a user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_step.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_quick_writes_nothing_without_out_and_into_out_when_asked(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results"
    before = _tree(results)
    quiet = _run("--quick", "--only", "Tiger", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "| tigeropt Tiger" in quiet.stdout  # the table is printed
    assert _tree(results) == before and not any(tmp_path.iterdir())
    out = tmp_path / "res"
    loud = _run("--quick", "--only", "Tiger", "--out", str(out), cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    written = sorted(p.suffix for p in out.iterdir())
    assert ".md" in written and "| tigeropt Tiger" in next(out.glob("*.md")).read_text()
    assert _tree(results) == before


def test_help_speaks_to_a_user(tmp_path: Path) -> None:
    text = _run("--help", cwd=tmp_path).stdout
    assert "--out DIR" in text and "issue" not in text.lower()
