"""Fused kernels and their availability.

Importing this package imports nothing heavy: Triton is looked up, not imported,
until a kernel is first needed.  A missing or too old Triton, or a machine
without a C compiler, makes the optimizers fall back to the foreach path (with
one warning), never crash.

* ``kernels/<name>.py``: the Triton multi-tensor kernels of one optimizer,
  beside nothing else; their host launchers take the same arguments as the
  optimizer's foreach function.
* ``tigeropt._cpu``: the fused CPU step (a small C library built on first use).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["triton_usable", "triton_status", "interpreter_enabled", "cpu_fused_usable", "get_impl",
           "get_rows_impl", "MIN_TRITON", "TRITON_DTYPES"]

MIN_TRITON = (3, 0)
#: parameter dtypes the Triton kernels take (math in fp32); fp64 stays on the foreach path.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_status() -> str:
    """'ok', or why the Triton kernels cannot be used here."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        from importlib.metadata import version

        parts = tuple(int(x) for x in version("triton").split(".")[:2])
    except Exception as exc:  # pragma: no cover - broken installs
        return f"cannot read the triton version ({exc})"
    if parts < MIN_TRITON:
        return f"triton {'.'.join(map(str, parts))} is older than {'.'.join(map(str, MIN_TRITON))}"
    if not interpreter_enabled() and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return "ok"


def triton_usable() -> bool:
    return triton_status() == "ok"


def cpu_fused_usable(name: str, dtype: torch.dtype) -> bool:
    """Whether the fused CPU step exists for this optimizer and dtype and could be built."""
    from .. import _cpu

    return _cpu.supports(name, dtype) and _cpu.available()


@functools.cache
def get_impl(name: str, path: str) -> Callable[..., None]:
    """The fused launcher of optimizer ``name`` for ``path`` ('fused': Triton, 'cpu': C)."""
    if path == "cpu":
        from .. import _cpu

        return getattr(_cpu, f"fused_{name}")
    if path == "fused":
        module = importlib.import_module(f"{__name__}.{name}")
        return getattr(module, f"fused_{name}")
    raise ValueError(f"unknown kernel path {path!r}")


def get_rows_impl(name: str, path: str) -> Callable[..., bool]:
    """The fused row launcher of optimizer ``name`` for ``path`` ('cpu': C): called as
    ``fn(p, g, states, step, hyper)``, it updates the rows of ``p`` with a non-zero gradient and
    returns True, or returns False (changing nothing) when it cannot take the tensors.  'fused':
    the Triton row kernels (:mod:`tigeropt.kernels.rows`)."""
    if path == "cpu":
        from .._cpu import rows

        return functools.partial(rows.fused_rows, name)
    if path == "fused":
        from . import rows as triton_rows

        return functools.partial(triton_rows.fused_rows, name)
    raise ValueError(f"unknown row kernel path {path!r}")


def warn_fallback(what: str, why: str) -> None:
    warnings.warn(f"tigeropt: {what} unavailable ({why}); using the foreach path", RuntimeWarning,
                  stacklevel=3)
