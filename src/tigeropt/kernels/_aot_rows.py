"""Ahead-of-time compilation of the Triton row kernels (:mod:`tigeropt.kernels.rows`) for real GPUs.

The twin of :mod:`tigeropt.kernels._aot` (the dense step kernels) for the row kernels of lazy rows,
sparse gradients and row-wise Adagrad: each variant is compiled for ``sm_80``/``sm_90`` with the
shipped tile (``row_block(D)`` elements, ``ROW_WARPS`` warps) and the generated code checked:

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

import argparse
import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ._aot import _TRITON_TYPES, _access_bits, _ptxas_report

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
class RowVariant:
    """One compiled form of a row kernel: optimizer, parameter dtype, whether the row length is a
    multiple of 16 elements (``aligned``), flags, GPU arch."""

    name: str
    dtype: torch.dtype
    aligned: bool = True
    flags: tuple[tuple[str, bool], ...] = ()
    arch: int = 90

    def __str__(self) -> str:
        on = ",".join(k.lower() for k, v in self.flags if v) or "plain"
        return (f"rows-{self.name}-{_TRITON_TYPES[self.dtype]}-{'aligned' if self.aligned else 'misaligned'}"
                f"-{on}-sm{self.arch}")


def _flag_sets(name: str) -> list[tuple[tuple[str, bool], ...]]:
    """The flag combinations the launcher can produce: clipping is GloVe-only, row-wise excludes GloVe,
    ``ALL_ROWS`` is row-wise Adagrad's dense step (no index list)."""
    names = ROW_KERNELS[name][2]
    out = []
    for values in itertools.product((False, True), repeat=len(names)):
        f = dict(zip(names, values))
        if f.get("CLIP") and not f.get("GLOVE"):
            continue
        if f.get("ROWWISE") and f.get("GLOVE"):
            continue
        if f.get("ALL_ROWS") and (not f.get("ROWWISE") or f.get("HAS_IDX")):
            continue
        out.append(tuple(f.items()))
    return out


def row_variants(full: bool = False) -> list[RowVariant]:
    """Every variant (``full``), or a representative subset: each optimizer, each dtype, sparse (index
    list) and dense-lazy scans, the flags that change the loops most (GloVe clipping, AdaX-W, row-wise
    Adagrad's two passes and its dense step), sm_80 for the launches with the most registers, and a row
    length that is not a multiple of 16."""
    if full:
        return [RowVariant(n, dt, al, fl, arch) for n in ROW_KERNELS for dt in _TRITON_TYPES
                for al in (True, False) for fl in _flag_sets(n) for arch in (80, 90)]
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


def compile_row_variant(v: RowVariant) -> tuple[str, str]:
    """(PTX, ptxas report) of variant ``v`` compiled for ``sm_<arch>`` with the shipped row tile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import rows

    kernel, states, names = ROW_KERNELS[v.name]
    fn = getattr(rows, kernel)
    flags = {k: bool(dict(v.flags).get(k, False)) for k in names}
    signature: dict[str, str] = {}
    for arg in fn.arg_names:
        if arg in ("p", "g"):
            signature[arg] = f"*{_TRITON_TYPES[v.dtype]}"
        elif arg in states:
            signature[arg] = "*fp32"
        elif arg == "idx":
            signature[arg] = "*i64"
        elif arg == "D":
            signature[arg] = "i32"
        elif arg == "lr":
            signature[arg] = "*fp32" if flags["LR_PTR"] else "fp32"
        elif arg.isupper():
            signature[arg] = "constexpr"
        else:
            signature[arg] = "fp32"
    constexprs: dict[str, Any] = {k: False for k, t in signature.items() if t == "constexpr"}
    constexprs.update(flags, BLOCK=rows.row_block(512 if v.aligned else 513),
                      ROUND_BF16=v.dtype == torch.bfloat16)
    # Tensors start 16-byte aligned (torch's allocations); an aligned row length is a multiple of 16
    # elements, as the JIT specializes a launch whose D is.
    divisible = [a for a, t in signature.items() if t.startswith("*") or (a == "D" and v.aligned)]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32),
                              options={"num_warps": rows.ROW_WARPS})
    ptx = compiled.asm["ptx"]
    return ptx, _ptxas_report(ptx)


def loop_bodies(ptx: str) -> list[str]:
    """The PTX of every loop: from a label through a later branch back to it."""
    lines = ptx.splitlines()
    defined: dict[str, int] = {}
    out = []
    for j, line in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            defined[m.group(1)] = j
            continue
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in defined:
            out.append("\n".join(lines[defined[m.group(1)]:j + 1]))
    return out


@dataclass
class RowReport:
    variant: RowVariant
    problems: list[str] = field(default_factory=list)
    accesses: list[tuple[str, int]] = field(default_factory=list)
    loops: int = 0
    registers: int | None = None
    spills: int | None = None
    seconds: float = 0.0


def check_row(v: RowVariant, ptx: str, report: str) -> RowReport:
    """The codegen properties of the module docstring for row variant ``v``."""
    r = RowReport(v)
    bodies = loop_bodies(ptx)
    r.loops = len(bodies)
    r.accesses = [a for body in bodies for a in _access_bits(body)]
    if not r.accesses:
        r.problems.append("no global access found in the loops")
    if v.aligned:
        narrow = sorted({a for a, bits in r.accesses if bits < 128})
        if narrow:
            r.problems.append(f"global accesses narrower than 128 bits in the loops: {narrow}")
    for what in ("bar.sync", "bar.warp.sync", "barrier", "ld.shared", "st.shared"):
        if what in ptx:
            r.problems.append(f"{what} in the kernel (a reduction or layout conversion through shared "
                              "memory)")
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = re.findall(r"Used (\d+) registers", report)
    if regs:
        r.registers = max(map(int, regs))
        if r.registers > MAX_REGISTERS:
            r.problems.append(f"{r.registers} registers per thread (> {MAX_REGISTERS}: fewer than 32 "
                              "one-warp programs fit an SM)")
    if spill:
        r.spills = max(int(a) + int(b) for a, b in spill)
        if r.spills:
            r.problems.append(f"{r.spills} bytes of register spills on sm_{v.arch}")
    else:
        r.problems.append("no ptxas report (ptxas not found?)")
    return r


def run(vs: list[RowVariant], verbose: bool = True) -> list[RowReport]:
    reports = []
    for v in vs:
        t = time.perf_counter()
        ptx, report = compile_row_variant(v)
        r = check_row(v, ptx, report)
        r.seconds = time.perf_counter() - t
        reports.append(r)
        if verbose:
            widths = sorted({bits for _, bits in r.accesses})
            print(f"{'ok  ' if not r.problems else 'FAIL'} {v}: {r.loops} loops, access bits {widths}, "
                  f"{r.registers} registers, {r.spills} spill bytes ({r.seconds:.1f} s)"
                  + "".join(f"\n      {p}" for p in r.problems), flush=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile the Triton row kernels for sm_80/sm_90 ahead of time "
                                             "and check the generated code (no GPU needed).")
    ap.add_argument("--full", action="store_true", help="every optimizer x dtype x alignment x flag x arch")
    ap.add_argument("--only", default=None, help="regex on the variant name")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    vs = row_variants(full=args.full)
    if args.only:
        vs = [v for v in vs if re.search(args.only, str(v))]
    reports = run(vs)
    bad = [r for r in reports if r.problems]
    regs = [r.registers for r in reports if r.registers is not None]
    seconds = sum(r.seconds for r in reports)
    print(f"\n{len(reports)} row variants, {len(bad)} with problems, {seconds:.0f} s; registers "
          f"{min(regs, default=0)}-{max(regs, default=0)}, spills: {sum(1 for r in reports if r.spills)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
