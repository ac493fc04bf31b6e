"""Ahead-of-time compilation of the Triton kernels for real GPUs, on any machine (no GPU needed).

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch,
32))`` runs the whole Triton and LLVM pipeline for sm_80/sm_90 and ptxas, exactly as a first launch
on that GPU would, with the tile configuration :func:`tigeropt.kernels._common.launch_config` ships
for the parameter dtype.  :func:`check` then reads the generated PTX and the ptxas report:

* the full-block loop (the ``for i in range(n_full)`` of every kernel) of an aligned launch uses
  vector global accesses: 128-bit for every stream of an fp32 launch, at least 64-bit for every
  stream when the parameters are bf16/fp16 (their fp32 state streams stay 128-bit or 64-bit);
* no shared-memory traffic and no barrier in that loop (a ``convert_layout`` between the 16-bit
  and the fp32 streams would put both there), except, with 8-bit state, one 32-bit exchange of the
  tile's absmax values (two with fp32 parameters, whose 256-element blocks span two warps);
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

#: optimizer -> (module, kernel, state pointer args, other pointer args, boolean constexpr flags,
#: the 8-bit switch of each state pointer)
KERNELS: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "tiger": ("tiger", "_tiger_kernel", ("m_base",), (), ("MAXIMIZE", "LR_PTR"), ("Q8_M",)),
    "lion": ("lion", "_lion_kernel", ("m_base",), (), ("MAXIMIZE", "LR_PTR"), ("Q8_M",)),
    "adax": ("adax", "_adax_kernel", ("m_base", "v_base"), ("scal",),
             ("MAXIMIZE", "DECOUPLED", "PER_TENSOR", "LR_PTR"), ("Q8_M", "Q8_V")),
    "adagrad": ("adagrad", "_adagrad_kernel", ("s_base",), ("scal",),
                ("MAXIMIZE", "GLOVE", "CLIP", "PER_TENSOR", "LR_PTR"), ("Q8_S",)),
}
#: What each state pointer stores under state_precision="8bit" (the optimizers' state_8bit_keys):
#: AdaX's exp_avg_sq and Adagrad's sum stay bf16.
STATE_8BIT: dict[str, tuple[str, ...]] = {"tiger": ("8bit",), "lion": ("8bit",), "adax": ("8bit", "bf16"),
                                          "adagrad": ("bf16",)}
#: state precisions of the variants: fp32 (the default), bf16, 8bit
STATES = ("fp32", "bf16", "8bit")
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_UNIT_NAMES = {"p_base": "U_P", "g_base": "U_G", "m_base": "U_M", "v_base": "U_V", "s_base": "U_S"}
_STATE_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: optimizer, parameter dtype, alignment, flags, GPU arch, and the
    low-precision switches: state precision ("fp32", "bf16", "8bit") and stochastic rounding."""

    name: str
    dtype: torch.dtype
    aligned: bool = True
    flags: tuple[tuple[str, bool], ...] = ()
    arch: int = 90
    state: str = "fp32"
    sr: bool = False

    def __str__(self) -> str:
        on = ",".join(k.lower() for k, v in self.flags if v) or "plain"
        lowp = ("" if self.state == "fp32" else f"-{self.state}") + ("-sr" if self.sr else "")
        return (f"{self.name}-{_TRITON_TYPES[self.dtype]}{lowp}-{'aligned' if self.aligned else 'misaligned'}"
                f"-{on}-sm{self.arch}")

    @property
    def states(self) -> tuple[str, ...]:
        """Storage of each state pointer: 'fp32', 'bf16' or '8bit'."""
        n = len(KERNELS[self.name][2])
        return STATE_8BIT[self.name] if self.state == "8bit" else (self.state,) * n

    @property
    def q8(self) -> bool:
        return "8bit" in self.states


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
        out = [Variant(n, dt, al, fl, arch) for n in KERNELS for dt in _TRITON_TYPES
               for al in (True, False) for fl in _flag_sets(n) for arch in (80, 90)]
        # low precision: bf16/fp32 parameters (stochastic rounding rounds bf16) x bf16/8-bit state x
        # round to nearest/stochastic x flags x arch, aligned
        out += [Variant(n, dt, True, fl, arch, st, sr) for n in KERNELS
                for dt in (torch.bfloat16, torch.float32) for st in STATES[1:] for sr in (False, True)
                for fl in _flag_sets(n) for arch in (80, 90)
                if not (n == "adagrad" and st == "8bit")]  # Adagrad's "8bit" sum is its bf16 variant
        out += [Variant(n, torch.bfloat16, True, fl, arch, "fp32", True) for n in KERNELS
                for fl in _flag_sets(n) for arch in (80, 90)]  # fp32 state, stochastic rounding
        return out
    out = [Variant(n, dt, True, tuple((f, False) for f in KERNELS[n][4]))
           for n in KERNELS for dt in _TRITON_TYPES]
    # low precision: every optimizer with bf16 parameters + stochastic rounding + 8-bit (Adagrad: bf16)
    # state on sm_90 (AdaX also sm_80); bf16 state rounded to nearest; fp32 parameters with 8-bit state
    out += [Variant(n, torch.bfloat16, True, (), 90, "8bit" if n != "adagrad" else "bf16", True)
            for n in KERNELS]
    out.append(Variant("adax", torch.bfloat16, True, (), 80, "8bit", True))  # the most registers
    out += [
        Variant("tiger", torch.bfloat16, True, (), 90, "bf16", False),
        Variant("lion", torch.float32, True, (), 90, "8bit", False),
        Variant("adax", torch.float32, True, (("DECOUPLED", True),), 90, "bf16", True),
        Variant("adagrad", torch.bfloat16, True, (("GLOVE", True), ("CLIP", True)), 90, "bf16", True),
    ]
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


def _config(dtype: torch.dtype, q8: bool = False, narrow_state: bool = False) -> Any:
    from ._common import launch_config

    return launch_config(torch.device("cuda"), dtype, q8, narrow_state)


def compile_variant(v: Variant) -> tuple[str, str, Any]:
    """(PTX, ptxas report, config) of variant ``v`` compiled for ``sm_<arch>`` with the shipped tiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(v.name)
    _, _, states, others, _, q8_names = KERNELS[v.name]
    cfg = _config(v.dtype, v.q8, v.states != ('fp32',) * len(v.states))
    flags = dict(v.flags)
    elem = {"p_base": v.dtype, "g_base": v.dtype,
            **{s: _STATE_TYPES[st] for s, st in zip(states, v.states)}}
    types = {**_TRITON_TYPES, torch.uint8: "u8"}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for arg in fn.arg_names:
        if arg in ("table", "gtab", "ktab"):
            signature[arg] = "*i64"
        elif arg == "work":
            signature[arg] = "*i32"
        elif arg == "k1":
            signature[arg] = "i32"
        elif arg in elem:
            signature[arg] = f"*{types[elem[arg]]}"
        elif arg in others or arg == "a_base":
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
    lowp = v.sr or v.q8
    constexprs.update(NCOLS=(2 + len(states)) * (2 if lowp else 1), BLOCK=cfg.block, CHUNK=cfg.chunk,
                      SR=v.sr, KEY_TABLE=False)
    for name, st in zip(q8_names, v.states):
        constexprs[name] = st == "8bit"
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
    # 8-bit state: each q8 role's absmax is one 32-bit load and store per thread and tile, its codes
    # 32-bit accesses with fp32 parameters (4 per thread); the tile's absmax values cross warps once
    # for their store (one 32-bit shared store and load, two barriers), and with fp32 parameters a
    # block's two warps meet once more for its maximum
    q8_roles = sum(st == "8bit" for st in v.states)
    wide = v.dtype == torch.float32
    if v.aligned:
        need = 128 if wide and all(st == "fp32" for st in v.states) else 64
        narrow = [(a, bits) for a, bits in r.accesses if bits < need]
        allowed_32 = q8_roles * (4 if wide else 2)
        if (any(bits < 32 or (bits < need and bits != 32) for _, bits in narrow)
                or sum(bits == 32 for _, bits in narrow) > allowed_32):
            r.problems.append(f"global accesses narrower than {need} bits in the loop: "
                              f"{sorted({a for a, _ in narrow})}")
    shared = {w: len(re.findall(rf"\b{re.escape(w)}\b", body)) for w in ("ld.shared", "st.shared")}
    barriers = body.count("bar.sync") + body.count("bar.warp") + body.count("barrier")
    exchanges = q8_roles * (2 if wide else 1)
    if (shared["ld.shared"] > exchanges or shared["st.shared"] > exchanges or barriers > 2 * exchanges
            or re.search(r"(ld|st)\.shared\.v", body)):
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
