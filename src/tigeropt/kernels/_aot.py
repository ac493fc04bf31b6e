"""Ahead-of-time compilation of the Triton kernels for real GPUs, on any machine (no GPU needed).

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` runs the whole Triton and LLVM pipeline for sm_80/sm_90 and ptxas, exactly as a first launch
on that GPU would, with the tile configuration :func:`tigeropt.kernels._common.launch_config` ships
for the parameter dtype.  :func:`check` then reads the generated PTX and the ptxas report:

* the full-block loop (the ``for i in range(n_full)`` of every kernel) of an aligned launch uses
  vector global accesses: 128-bit for every stream of an fp32 launch, at least 64-bit for every
  stream when the parameters are bf16/fp16 (their fp32 state streams stay 128-bit or 64-bit);
* no shared-memory traffic and no barrier in that loop (a ``convert_layout`` between the 16-bit
  and the fp32 streams would put both there);
* no register spills (checked on sm_90; reported for sm_80).

Used by ``tests/test_codegen.py`` (a representative subset, seconds) and by
``python -m tigeropt.kernels._aot --full`` (every optimizer x dtype x alignment x flag x arch).
Needs triton with its bundled ptxas (``TRITON_PTXAS_PATH`` overrides); imports nothing from the
optimizer modules.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Variant", "variants", "compile_variant", "check", "loop_body", "ptxas_paths", "KERNELS"]

#: optimizer -> (module, kernel, state pointer args, other pointer args, boolean constexpr flags)
KERNELS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "tiger": ("tiger", "_tiger_kernel", ("m_base",), (), ("MAXIMIZE", "LR_PTR")),
    "lion": ("lion", "_lion_kernel", ("m_base",), (), ("MAXIMIZE", "LR_PTR")),
    "adax": ("adax", "_adax_kernel", ("m_base", "v_base"), ("scal",),
             ("MAXIMIZE", "DECOUPLED", "PER_TENSOR", "LR_PTR")),
    "adagrad": ("adagrad", "_adagrad_kernel", ("s_base",), ("scal",),
                ("MAXIMIZE", "GLOVE", "CLIP", "PER_TENSOR", "LR_PTR")),
}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_UNIT_NAMES = {"p_base": "U_P", "g_base": "U_G", "m_base": "U_M", "v_base": "U_V", "s_base": "U_S"}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: optimizer, parameter dtype, alignment, flags, GPU arch."""

    name: str
    dtype: torch.dtype
    aligned: bool = True
    flags: tuple[tuple[str, bool], ...] = ()
    arch: int = 90

    def __str__(self) -> str:
        on = ",".join(k.lower() for k, v in self.flags if v) or "plain"
        return (f"{self.name}-{_TRITON_TYPES[self.dtype]}-{'aligned' if self.aligned else 'misaligned'}-{on}"
                f"-sm{self.arch}")


def _flag_sets(name: str) -> list[tuple[tuple[str, bool], ...]]:
    names = KERNELS[name][4]
    out = []
    for values in itertools.product((False, True), repeat=len(names)):
        flags = dict(zip(names, values))
        if flags.get("CLIP") and not flags.get("GLOVE"):
            continue  # clipping is GloVe-only
        out.append(tuple(flags.items()))
    return out


def variants(full: bool = False) -> list[Variant]:
    """Every variant (``full``), or a representative subset: each optimizer x dtype, aligned, default
    flags, sm_90; the flags that change the loop most (GloVe clipping, AdaX-W, per-tensor scalars,
    lr pointer) in bf16; sm_80 for the 16-bit launches with the most registers; and a misaligned one."""
    if full:
        return [Variant(n, dt, al, fl, arch) for n in KERNELS for dt in _TRITON_TYPES
                for al in (True, False) for fl in _flag_sets(n) for arch in (80, 90)]
    out = [Variant(n, dt, True, tuple((f, False) for f in KERNELS[n][4]))
           for n in KERNELS for dt in _TRITON_TYPES]
    out += [
        Variant("adagrad", torch.bfloat16, True, (("MAXIMIZE", True), ("GLOVE", True), ("CLIP", True),
                                                  ("PER_TENSOR", True), ("LR_PTR", True))),
        Variant("adax", torch.bfloat16, True, (("MAXIMIZE", True), ("DECOUPLED", True), ("PER_TENSOR", True),
                                               ("LR_PTR", True))),
        Variant("adagrad", torch.float16, True, (("GLOVE", False),), arch=80),
        Variant("adax", torch.bfloat16, True, (), arch=80),
        Variant("tiger", torch.float32, False, ()),
    ]
    return out


def _kernel(name: str) -> Any:
    import importlib

    module, attr, *_ = KERNELS[name]
    return getattr(importlib.import_module(f"tigeropt.kernels.{module}"), attr)


def _config(dtype: torch.dtype) -> Any:
    from ._common import launch_config

    return launch_config(torch.device("cuda"), dtype)


def compile_variant(v: Variant) -> tuple[str, str, Any]:
    """(PTX, ptxas report, config) of variant ``v`` compiled for ``sm_<arch>`` with the shipped tiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(v.name)
    _, _, states, others, _ = KERNELS[v.name]
    cfg = _config(v.dtype)
    flags = dict(v.flags)
    elem = {"p_base": v.dtype, "g_base": v.dtype, **{s: torch.float32 for s in states}}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for arg in fn.arg_names:
        if arg in ("table", "gtab"):
            signature[arg] = "*i64"
        elif arg == "work":
            signature[arg] = "*i32"
        elif arg in elem:
            signature[arg] = f"*{_TRITON_TYPES[elem[arg]]}"
        elif arg in others:
            signature[arg] = "*fp32"
        elif arg == "lr":
            signature[arg] = "*fp32" if flags.get("LR_PTR") else "fp32"
        elif arg.isupper():
            signature[arg] = "constexpr"
        else:
            signature[arg] = "fp32"
    for ptr, unit in _UNIT_NAMES.items():
        if ptr in elem:
            constexprs[unit] = (16 // torch.empty((), dtype=elem[ptr]).element_size()) if v.aligned else 1
    constexprs.update(NCOLS=2 + len(states), BLOCK=cfg.block, CHUNK=cfg.chunk,
                      ROUND_BF16=v.dtype == torch.bfloat16)
    for name in KERNELS[v.name][4]:
        constexprs[name] = bool(flags.get(name, False))
    # Pointers are 16-byte aligned (the witness bases and the tables), as the JIT specializes them.
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t.startswith("*")}
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options={"num_warps": cfg.num_warps})
    ptx = compiled.asm["ptx"]
    return ptx, _ptxas_report(ptx), cfg


def ptxas_paths() -> list[str]:
    """ptxas candidates: ``TRITON_PTXAS_PATH``, the ones bundled with triton (newest first), PATH."""
    out = []
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        out.append(env)
    try:
        import triton

        bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        out += [str(bindir / n) for n in ("ptxas-blackwell", "ptxas") if (bindir / n).exists()]
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if found:
        out.append(found)
    return out


def ptxas_path() -> str | None:
    paths = ptxas_paths()
    return paths[0] if paths else None


def _ptxas_report(ptx: str) -> str:
    """``ptxas -v`` on the PTX for its target, with the first ptxas that accepts its PTX version."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    arch = target.group(1).rstrip(",") if target else "sm_90a"
    report = ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for ptxas in ptxas_paths():
            cmd = [ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")]
            out = subprocess.run(cmd,
                                 capture_output=True, text=True, timeout=120)
            report = out.stdout + out.stderr
            if out.returncode == 0:
                return report
    return report


def loop_body(ptx: str) -> str:
    """The PTX of the kernel's full-block loop: from the first label that a later branch jumps back
    to, through that branch (the kernels have one loop: ``for i in range(n_full)``)."""
    lines = ptx.splitlines()
    defined: dict[str, int] = {}
    for j, line in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            defined[m.group(1)] = j
            continue
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in defined:
            return "\n".join(lines[defined[m.group(1)]:j + 1])
    raise ValueError("no loop found in the PTX")


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z]+)*?)\.(v[248]\.)?([bfsu]\d+)\b")


def _access_bits(body: str) -> list[tuple[str, int]]:
    out = []
    for m in _ACCESS.finditer(body):
        width = int(m.group(3)[1]) if m.group(3) else 1
        out.append((m.group(0), width * int(m.group(4)[1:])))
    return out


@dataclass
class Report:
    variant: Variant
    problems: list[str] = field(default_factory=list)
    accesses: list[tuple[str, int]] = field(default_factory=list)
    registers: int | None = None
    spills: int | None = None
    seconds: float = 0.0


def check(v: Variant, ptx: str, report: str) -> Report:
    """The codegen properties of the module docstring for variant ``v``."""
    r = Report(v)
    body = loop_body(ptx)
    r.accesses = _access_bits(body)
    if not r.accesses:
        r.problems.append("no global access found in the loop")
    if v.aligned:
        need = 128 if v.dtype == torch.float32 else 64
        narrow = sorted({a for a, bits in r.accesses if bits < need})
        if narrow:
            r.problems.append(f"global accesses narrower than {need} bits in the loop: {narrow}")
    for what in ("bar.sync", "bar.warp", "barrier", "ld.shared", "st.shared"):
        if what in body:
            r.problems.append(f"{what} in the loop (a layout conversion through shared memory)")
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = re.findall(r"Used (\d+) registers", report)
    if regs:
        r.registers = max(map(int, regs))
    if spill:
        r.spills = max(int(a) + int(b) for a, b in spill)
        if r.spills and v.arch >= 90:
            r.problems.append(f"{r.spills} bytes of register spills on sm_{v.arch}")
    elif v.arch >= 90:
        r.problems.append("no ptxas report (ptxas not found?)")
    return r


def run(vs: list[Variant], verbose: bool = True) -> list[Report]:
    reports = []
    for v in vs:
        t = time.perf_counter()
        ptx, report, _ = compile_variant(v)
        r = check(v, ptx, report)
        r.seconds = time.perf_counter() - t
        reports.append(r)
        if verbose:
            widths = sorted({bits for _, bits in r.accesses})
            print(f"{'ok  ' if not r.problems else 'FAIL'} {v}: loop access bits {widths}, "
                  f"{r.registers} registers, {r.spills} spill bytes ({r.seconds:.1f} s)"
                  + "".join(f"\n      {p}" for p in r.problems), flush=True)
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile the Triton kernels for sm_80/sm_90 ahead of time "
                                             "and check the generated code (no GPU needed).")
    ap.add_argument("--full", action="store_true", help="every optimizer x dtype x alignment x flag x arch")
    ap.add_argument("--only", default=None, help="regex on the variant name")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    vs = variants(full=args.full)
    if args.only:
        vs = [v for v in vs if re.search(args.only, str(v))]
    reports = run(vs)
    bad = [r for r in reports if r.problems]
    print(f"\n{len(reports)} variants, {len(bad)} with problems, "
          f"{sum(r.seconds for r in reports):.0f} s; spills on sm_80: "
          f"{sum(1 for r in reports if r.variant.arch == 80 and r.spills)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
