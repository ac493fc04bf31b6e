"""Ahead-of-time compilation of the Triton row kernels (:mod:`tigeropt.kernels.rows`) for real GPUs.

The row variants as another variant source of the checker in :mod:`tigeropt.kernels._aot` (the
dense step kernels): each variant is compiled for ``sm_80``/``sm_90`` with the shipped tile
(``row_block(D)`` elements, ``ROW_WARPS`` warps) and the generated code checked:

* every global access inside the kernel's loops (the touched-row scan, the update, row-wise
  Adagrad's two passes) is 128-bit when the row length is a multiple of 16 elements (what Triton
  specializes a launch on: the common case, e.g. 64, 128, 512-wide tables); the scalar accesses
  outside the loops (the row index, the row-wise accumulator, an lr pointer) are not checked;
* no shared memory and no barrier anywhere (the row reductions stay within the warp);
* no register spills and at most 64 registers per thread, on both archs (one-warp programs: an SM
  holds at most 32 of them, whose registers then fill the 64K register file exactly).

``python -m tigeropt.kernels._aot_rows`` compiles a representative subset, ``--full`` every
optimizer x dtype x alignment x flag x arch; ``tests/test_codegen.py`` runs both (the full set
under ``-m codegen_full``).  Imports nothing from the optimizer modules.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._aot import _TRITON_TYPES, Report, Source, VariantBase, _signature, check, compile_variant, flag_sets
from ._aot import loop_bodies as loop_bodies
from ._aot import main as _main
from ._aot import run as run

__all__ = ["RowVariant", "row_variants", "compile_row_variant", "check_row", "loop_bodies", "ROW_KERNELS"]

#: optimizer -> (kernel, state pointer args, boolean constexpr flags)
ROW_KERNELS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "tiger": ("_tiger_rows", ("m",), ("HAS_IDX", "MAXIMIZE", "LR_PTR")),
    "lion": ("_lion_rows", ("m",), ("HAS_IDX", "MAXIMIZE", "LR_PTR")),
    "adax": ("_adax_rows", ("m", "v"), ("HAS_IDX", "MAXIMIZE", "DECOUPLED", "LR_PTR")),
    "adagrad": ("_adagrad_rows", ("s",), ("HAS_IDX", "MAXIMIZE", "GLOVE", "CLIP", "ROWWISE", "ALL_ROWS",
                                          "LR_PTR")),
}
MAX_REGISTERS = 64


@dataclass(frozen=True)
class RowVariant(VariantBase):
    """One compiled form of a row kernel: optimizer, parameter dtype, whether the row length is a
    multiple of 16 elements (``aligned``), flags, GPU arch."""

    WHAT: ClassVar[str] = "row "
    PREFIX: ClassVar[str] = "rows-"
    EVERY_LOOP: ClassVar[bool] = True
    SHARED_SCOPE: ClassVar[str] = "kernel"
    SPILL_ARCH: ClassVar[int] = 0
    MAX_REGISTERS: ClassVar[int | None] = MAX_REGISTERS

    def limits(self) -> tuple[int, int, int]:
        return 128, 0, 0

    def source(self) -> Source:
        """What to compile for this variant, with the shipped row tile."""
        from . import rows

        kernel, states, names = ROW_KERNELS[self.name]
        fn = getattr(rows, kernel)
        flags = {k: bool(dict(self.flags).get(k, False)) for k in names}
        elem = f"*{_TRITON_TYPES[self.dtype]}"
        signature = _signature(fn, {"p": elem, "g": elem, **{s: "*fp32" for s in states}, "idx": "*i64",
                                    "D": "i32"}, flags["LR_PTR"])
        constexprs: dict[str, Any] = {k: False for k, t in signature.items() if t == "constexpr"}
        constexprs.update(flags, BLOCK=rows.row_block(512 if self.aligned else 513),
                          ROUND_BF16=self.dtype == torch.bfloat16)
        # Tensors start 16-byte aligned (torch's allocations); an aligned row length is a multiple of 16
        # elements, as the JIT specializes a launch whose D is.
        divisible = [a for a, t in signature.items() if t.startswith("*") or (a == "D" and self.aligned)]
        return fn, signature, constexprs, divisible, rows.ROW_WARPS

    @staticmethod
    def summary(reports: list[Report]) -> str:
        regs = [r.registers for r in reports if r.registers is not None]
        return (f"registers {min(regs, default=0)}-{max(regs, default=0)}, "
                f"spills: {sum(1 for r in reports if r.spills)}")


def _allowed(f: dict[str, bool]) -> bool:
    """The flag combinations the launcher can produce: clipping is GloVe-only, row-wise excludes GloVe,
    ``ALL_ROWS`` is row-wise Adagrad's dense step (no index list)."""
    return not ((f.get("CLIP") and not f.get("GLOVE")) or (f.get("ROWWISE") and f.get("GLOVE"))
                or (f.get("ALL_ROWS") and (not f.get("ROWWISE") or f.get("HAS_IDX"))))


def row_variants(full: bool = False) -> list[RowVariant]:
    """Every variant (``full``), or a representative subset: each optimizer, each dtype, sparse (index
    list) and dense-lazy scans, the flags that change the loops most (GloVe clipping, AdaX-W, row-wise
    Adagrad's two passes and its dense step), sm_80 for the launches with the most registers, and a row
    length that is not a multiple of 16."""
    if full:
        return [RowVariant(n, dt, al, fl, arch) for n in ROW_KERNELS for dt in _TRITON_TYPES
                for al in (True, False) for fl in flag_sets(ROW_KERNELS[n][2], _allowed) for arch in (80, 90)]
    return [
        RowVariant("tiger", torch.float32, True, (("HAS_IDX", True),)),
        RowVariant("lion", torch.bfloat16, True, (("HAS_IDX", False),)),
        RowVariant("adax", torch.bfloat16, True, (("HAS_IDX", True), ("MAXIMIZE", True), ("DECOUPLED", True),
                                                  ("LR_PTR", True)), arch=80),
        RowVariant("adagrad", torch.float16, True, (("HAS_IDX", True), ("GLOVE", True), ("CLIP", True))),
        RowVariant("adagrad", torch.float32, True, (("ROWWISE", True), ("ALL_ROWS", True))),
        RowVariant("adagrad", torch.bfloat16, True, (("HAS_IDX", True), ("ROWWISE", True)), arch=80),
        RowVariant("tiger", torch.float32, False, (("HAS_IDX", True),)),
    ]


compile_row_variant = compile_variant
check_row = check
RowReport = Report


def main(argv: list[str] | None = None) -> int:
    return _main(argv, RowVariant, row_variants)


if __name__ == "__main__":
    sys.exit(main())
