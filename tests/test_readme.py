"""Every ```python block of README.md runs as written, each on its own (fresh namespace, temporary cwd).

Blocks that need a process group (``torch.distributed`` launched by torchrun, FSDP2) cannot run in a test:
they are parsed and every name they import must resolve.  Blocks importing transformers run when it is
installed (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
DISTRIBUTED = ("init_process_group", "fully_shard", "torch.distributed.checkpoint")


def _kind(code: str) -> str:
    if any(marker in code for marker in DISTRIBUTED):
        return "distributed"
    if re.search(r"^\s*(from|import) transformers\b", code, flags=re.M):
        return "hf"
    return "run"


def _id(code: str) -> str:
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    first = lines[0] if lines else code
    return re.sub(r"\W+", "_", first)[:40]


def test_readme_has_the_blocks_this_test_checks() -> None:
    assert len(BLOCKS) >= 8 and {_kind(b) for b in BLOCKS} == {"run", "distributed", "hf"}


def _resolve_imports(code: str) -> None:
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert importlib.util.find_spec(alias.name) is not None, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                assert hasattr(module, alias.name) or importlib.util.find_spec(sub) is not None, sub


@pytest.mark.parametrize("code", BLOCKS, ids=[f"{i}-{_id(b)}" for i, b in enumerate(BLOCKS)])
def test_readme_block(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = _kind(code)
    if kind == "distributed":
        _resolve_imports(code)
        return
    if kind == "hf":
        pytest.importorskip("transformers", reason="transformers not installed (pip install -e '.[hf]')")
        pytest.importorskip("accelerate", reason="accelerate not installed (pip install -e '.[hf]')")
    monkeypatch.chdir(tmp_path)  # snippets that write (Trainer's output_dir) write here
    # a snippet that registers an optimizer by name must not leak it into other tests
    from tigeropt import factory

    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_every_public_name_is_in_the_readme() -> None:
    import tigeropt

    text = README.read_text()
    missing = [name for name in tigeropt.__all__ if f"`{name}" not in text and f"{name}(" not in text]
    assert not missing, f"public names not documented in README.md: {missing}"
