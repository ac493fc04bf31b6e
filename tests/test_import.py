"""Import cost: ``import tigeropt`` (and CPU training) must not pull in torch.distributed.tensor or triton.

Each check runs in a fresh interpreter and inspects ``sys.modules`` (never a time: speed lives in
benchmarks).  torch.distributed.tensor alone costs about half a second to import; tigeropt looks it up in
``sys.modules`` instead, because while nobody has imported it no tensor can be a DTensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch.distributed.tensor", "torch.distributed._tensor", "triton")


def _modules_after(code: str) -> set[str]:
    """The heavy modules imported by ``code`` in a fresh interpreter (no GPU, no Triton interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_tigeropt_imports_neither_dtensor_nor_triton() -> None:
    # premise first: torch's own import leaves these modules out (else the check would test nothing)
    code = f"import sys, torch\nassert not [m for m in sys.modules if m in {HEAVY!r}]\nimport tigeropt"
    assert _modules_after(code) == set()


# Records every import of a heavy module whose importing code is in tigeropt.  Constructing any torch
# optimizer imports torch._dynamo (``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``),
# and torch._dynamo imports triton and DTensor itself: that is torch's cost, the same for
# torch.optim.AdamW, so the check is on who imports, not on sys.modules.
WATCH = f"""
import importlib.abc, sys
TIGEROPT = {SRC!r}
BY_TIGEROPT = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton" or name.startswith(("torch.distributed.tensor",
                                                               "torch.distributed._tensor")):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(TIGEROPT):
                BY_TIGEROPT.append((name, frame.f_code.co_filename, frame.f_lineno))
        return None
sys.meta_path.insert(0, Watch())
"""


def test_cpu_training_steps_never_import_them() -> None:
    """Every optimizer on every CPU path (default = fused C step, foreach, reference), lazy rows, skip."""
    code = WATCH + """
import importlib.util
import torch, tigeropt
model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
x = torch.randint(0, 10, (5,))
opts = [tigeropt.split_embeddings(model)]
for kw in ({}, {"foreach": True}, {"foreach": False}):
    opts += [tigeropt.Tiger(model.parameters(), **kw), tigeropt.Lion(model.parameters(), **kw),
             tigeropt.AdaX(model.parameters(), **kw), tigeropt.Adagrad(model.parameters(), **kw),
             tigeropt.Tiger(model.parameters(), on_nonfinite="skip", **kw),
             tigeropt.Tiger([{"params": model[0].parameters(), "lazy": True}], **kw)]
for opt in opts:
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    opt.load_state_dict(opt.state_dict())
# premise: torch's optimizer machinery imports triton (when installed), and the watch saw that import
assert "triton" in sys.modules or importlib.util.find_spec("triton") is None
assert not BY_TIGEROPT, BY_TIGEROPT
"""
    _modules_after(code)


def test_the_watch_sees_an_import_by_tigeropt() -> None:
    """The watch above is not blind: a heavy import from a tigeropt frame is recorded."""
    code = WATCH + """
import tigeropt._base as b
exec(compile("import torch.distributed.tensor", b.__file__, "exec"))
assert BY_TIGEROPT and BY_TIGEROPT[0][0] == "torch.distributed.tensor", BY_TIGEROPT
"""
    _modules_after(code)


def test_dtensor_module_is_found_once_imported() -> None:
    """The lazy lookup sees DTensor as soon as anyone imports it (FSDP2 does so before any step)."""
    code = """
import tigeropt._dtensor as b
assert b.dtensor_module() is None
import torch.distributed.tensor as dt
assert b.dtensor_module() is dt
"""
    assert _modules_after(code) >= {"torch.distributed.tensor"}


def test_import_is_warning_free_and_numpy_is_a_dependency() -> None:
    """torch warns "Failed to initialize NumPy" on import when numpy is missing, and does not depend on it:
    tigeropt declares numpy so that a plain ``pip install .`` imports cleanly (checked with -W error)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "numpy" for d in deps), deps
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-W", "error", "-c", "import tigeropt"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and not out.stderr, out.stderr
