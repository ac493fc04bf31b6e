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
This is the one checker of every Triton kernel: a variant source (:class:`VariantBase`) says what
to compile and what the check allows; the dense step kernels' :class:`Variant` is here, the row
kernels' (lazy rows, sparse gradients) :class:`tigeropt.kernels._aot_rows.RowVariant` beside it.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["Variant", "variants", "compile_variant", "check", "run", "main", "loop_body", "loop_bodies",
           "ptxas_paths", "KERNELS"]

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

#: (kernel, signature, constexprs, the arguments divisible by 16, num_warps): what triton.compile needs
Source = tuple[Any, dict[str, str], dict[str, Any], list[str], int]


@dataclass(frozen=True)
class VariantBase:
    """One compiled form of a kernel: optimizer, parameter dtype, alignment, flags, GPU arch.

    A variant source (:class:`Variant` here, :class:`tigeropt.kernels._aot_rows.RowVariant`) says
    what to compile (:meth:`source`) and what :func:`check` allows: the bits a loop access needs
    (:meth:`limits`), every loop or the first one only (``EVERY_LOOP``), shared memory looked for in
    that loop or anywhere in the kernel (``SHARED_SCOPE``), spills refused from which arch on
    (``SPILL_ARCH``), and a register cap."""

    name: str
    dtype: torch.dtype
    aligned: bool = True
    flags: tuple[tuple[str, bool], ...] = ()
    arch: int = 90

    WHAT: ClassVar[str] = ""  # "row " for the row kernels: in the command line's texts
    PREFIX: ClassVar[str] = ""
    EVERY_LOOP: ClassVar[bool] = False
    SHARED_SCOPE: ClassVar[str] = "loop"
    SPILL_ARCH: ClassVar[int] = 90
    MAX_REGISTERS: ClassVar[int | None] = None

    def __str__(self) -> str:
        on = ",".join(k.lower() for k, v in self.flags if v) or "plain"
        return (f"{self.PREFIX}{self.name}-{_TRITON_TYPES[self.dtype]}{self._lowp()}"
                f"-{'aligned' if self.aligned else 'misaligned'}-{on}-sm{self.arch}")

    def _lowp(self) -> str:
        return ""

    def limits(self) -> tuple[int, int, int]:
        """(bits a loop access needs, how many 32-bit accesses may stay below that, shared-memory
        exchanges allowed)."""
        raise NotImplementedError

    def source(self) -> Source:
        raise NotImplementedError

    @staticmethod
    def summary(reports: list[Report]) -> str:
        """The tail of the command line's last line."""
        raise NotImplementedError


@dataclass(frozen=True)
class Variant(VariantBase):
    """A dense step kernel's variant, with the low-precision switches: state precision ("fp32",
    "bf16", "8bit") and stochastic rounding."""

    state: str = "fp32"
    sr: bool = False

    def _lowp(self) -> str:
        return ("" if self.state == "fp32" else f"-{self.state}") + ("-sr" if self.sr else "")

    @property
    def states(self) -> tuple[str, ...]:
        """Storage of each state pointer: 'fp32', 'bf16' or '8bit'."""
        n = len(KERNELS[self.name][2])
        return STATE_8BIT[self.name] if self.state == "8bit" else (self.state,) * n

    @property
    def q8(self) -> bool:
        return "8bit" in self.states

    def limits(self) -> tuple[int, int, int]:
        """(bits every loop access needs, how many 32-bit accesses may stay below that, shared-memory
        exchanges allowed).  8-bit state: each q8 role's absmax is one 32-bit load and store per
        thread and tile, its codes 32-bit accesses with fp32 parameters (4 per thread); the tile's
        absmax values cross warps once for their store (one 32-bit shared store and load, two
        barriers), and with fp32 parameters a block's two warps meet once more for its maximum."""
        q8_roles = sum(st == "8bit" for st in self.states)
        wide = self.dtype == torch.float32
        need = 128 if wide and all(st == "fp32" for st in self.states) else 64
        return need, q8_roles * (4 if wide else 2), q8_roles * (2 if wide else 1)

    def source(self) -> Source:
        """What to compile for this variant, with the tile configuration shipped for its dtype."""
        from ._common import launch_config

        fn = _kernel(self.name)
        _, _, states, others, names, q8_names = KERNELS[self.name]
        cfg = launch_config(torch.device("cuda"), self.dtype, self.q8, self.states != ("fp32",) * len(states))
        flags = dict(self.flags)
        elem = {"p_base": self.dtype, "g_base": self.dtype,
                **{s: _STATE_TYPES[st] for s, st in zip(states, self.states)}}
        types = {**_TRITON_TYPES, torch.uint8: "u8"}
        signature = _signature(fn, {"table": "*i64", "gtab": "*i64", "ktab": "*i64", "work": "*i32",
                                    "k1": "i32", **{a: f"*{types[t]}" for a, t in elem.items()},
                                    **{a: "*fp32" for a in (*others, "a_base")}}, flags.get("LR_PTR", False))
        constexprs: dict[str, Any] = {
            unit: (16 // torch.empty((), dtype=elem[ptr]).element_size()) if self.aligned else 1
            for ptr, unit in _UNIT_NAMES.items() if ptr in elem}
        constexprs.update(NCOLS=(2 + len(states)) * (2 if self.sr or self.q8 else 1), BLOCK=cfg.block,
                          CHUNK=cfg.chunk, SR=self.sr, KEY_TABLE=False)
        constexprs.update({q: st == "8bit" for q, st in zip(q8_names, self.states)})
        constexprs.update({k: bool(flags.get(k, False)) for k in names})
        # Pointers are 16-byte aligned (the witness bases and the tables), as the JIT specializes them.
        pointers = [a for a, t in signature.items() if t.startswith("*")]
        return fn, signature, constexprs, pointers, cfg.num_warps

    @staticmethod
    def summary(reports: list[Report]) -> str:
        return f"spills on sm_80: {sum(1 for r in reports if r.variant.arch == 80 and r.spills)}"


def flag_sets(names: tuple[str, ...], allowed: Callable[[dict[str, bool]], bool]
              ) -> list[tuple[tuple[str, bool], ...]]:
    """Every combination of the boolean constexprs ``names`` that ``allowed`` accepts."""
    combos = (dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names)))
    return [tuple(f.items()) for f in combos if allowed(f)]


def _flag_sets(name: str) -> list[tuple[tuple[str, bool], ...]]:
    return flag_sets(KERNELS[name][4], lambda f: not (f.get("CLIP") and not f.get("GLOVE")))  # CLIP: GloVe


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


def _signature(fn: Any, types: dict[str, str], lr_ptr: bool) -> dict[str, str]:
    """Triton signature of ``fn``: the ``types`` given, ``lr`` a pointer or a float, constexpr for the
    upper-case arguments, fp32 for the other scalars."""
    def kind(arg: str) -> str:
        if arg in types:
            return types[arg]
        if arg == "lr":
            return "*fp32" if lr_ptr else "fp32"
        return "constexpr" if arg.isupper() else "fp32"

    return {arg: kind(arg) for arg in fn.arg_names}


def compile_variant(v: VariantBase) -> tuple[str, str]:
    """(PTX, ptxas report) of variant ``v`` (or a row variant) compiled for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, divisible, num_warps = v.source()
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", v.arch, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    return ptx, _ptxas_report(ptx)


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
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            report = out.stdout + out.stderr
            if out.returncode == 0:
                return report
    return report


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


def loop_body(ptx: str) -> str:
    """The PTX of the kernel's full-block loop, its first loop (the kernels have one loop:
    ``for i in range(n_full)``)."""
    bodies = loop_bodies(ptx)
    if not bodies:
        raise ValueError("no loop found in the PTX")
    return bodies[0]


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z]+)*?)\.(v[248]\.)?([bfsu]\d+)\b")


def _access_bits(body: str) -> list[tuple[str, int]]:
    out = []
    for m in _ACCESS.finditer(body):
        width = int(m.group(3)[1]) if m.group(3) else 1
        out.append((m.group(0), width * int(m.group(4)[1:])))
    return out


@dataclass
class Report:
    variant: VariantBase
    problems: list[str] = field(default_factory=list)
    accesses: list[tuple[str, int]] = field(default_factory=list)
    loops: int = 0
    registers: int | None = None
    spills: int | None = None
    seconds: float = 0.0


def check(v: VariantBase, ptx: str, report: str) -> Report:
    """The codegen properties of the module docstring (of :mod:`tigeropt.kernels._aot_rows` for a row
    variant) for variant ``v``: its loops' global access widths, shared memory, registers, spills."""
    r = Report(v)
    bodies = loop_bodies(ptx) if v.EVERY_LOOP else [loop_body(ptx)]
    where = "loops" if v.EVERY_LOOP else "loop"
    r.loops = len(bodies)
    r.accesses = [a for body in bodies for a in _access_bits(body)]
    if not r.accesses:
        r.problems.append(f"no global access found in the {where}")
    need, allowed_32, exchanges = v.limits()
    if v.aligned:
        narrow = [(a, bits) for a, bits in r.accesses if bits < need]
        if (any(bits < 32 or (bits < need and bits != 32) for _, bits in narrow)
                or sum(bits == 32 for _, bits in narrow) > allowed_32):
            r.problems.append(f"global accesses narrower than {need} bits in the {where}: "
                              f"{sorted({a for a, _ in narrow})}")
    text = bodies[0] if v.SHARED_SCOPE == "loop" else ptx
    shared = {w: len(re.findall(rf"\b{re.escape(w)}\b", text)) for w in ("ld.shared", "st.shared")}
    barriers = text.count("bar.sync") + text.count("bar.warp") + text.count("barrier")
    if (shared["ld.shared"] > exchanges or shared["st.shared"] > exchanges or barriers > 2 * exchanges
            or re.search(r"(ld|st)\.shared\.v", text)):
        for what in ("bar.sync", "bar.warp", "barrier", "ld.shared", "st.shared"):
            if what in text:
                r.problems.append(f"{what} in the {v.SHARED_SCOPE} (a reduction or layout conversion "
                                  "through shared memory)")
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = re.findall(r"Used (\d+) registers", report)
    if regs:
        r.registers = max(map(int, regs))
        if v.MAX_REGISTERS is not None and r.registers > v.MAX_REGISTERS:
            r.problems.append(f"{r.registers} registers per thread (> {v.MAX_REGISTERS}: fewer than "
                              "32 one-warp programs fit an SM)")
    if spill:
        r.spills = max(int(a) + int(b) for a, b in spill)
        if r.spills and v.arch >= v.SPILL_ARCH:
            r.problems.append(f"{r.spills} bytes of register spills on sm_{v.arch}")
    elif v.arch >= v.SPILL_ARCH:
        r.problems.append("no ptxas report (ptxas not found?)")
    return r


def run(vs: list[VariantBase], verbose: bool = True) -> list[Report]:
    reports = []
    for v in vs:
        t = time.perf_counter()
        r = check(v, *compile_variant(v))
        r.seconds = time.perf_counter() - t
        reports.append(r)
        if verbose:
            widths = sorted({bits for _, bits in r.accesses})
            loops = f"{r.loops} loops, access bits" if v.EVERY_LOOP else "loop access bits"
            print(f"{'ok  ' if not r.problems else 'FAIL'} {v}: {loops} {widths}, "
                  f"{r.registers} registers, {r.spills} spill bytes ({r.seconds:.1f} s)"
                  + "".join(f"\n      {p}" for p in r.problems), flush=True)
    return reports


def main(argv: list[str] | None = None, kind: type[VariantBase] = Variant,
         source: Callable[[bool], list[VariantBase]] = variants) -> int:
    """The command line of a variant source: ``kind`` its variant class, ``source(full)`` its variants."""
    ap = argparse.ArgumentParser(description=f"Compile the Triton {kind.WHAT}kernels for sm_80/sm_90 ahead "
                                             "of time and check the generated code (no GPU needed).")
    ap.add_argument("--full", action="store_true", help="every optimizer x dtype x alignment x flag x arch")
    ap.add_argument("--only", default=None, help="regex on the variant name")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    vs = source(args.full)
    if args.only:
        vs = [v for v in vs if re.search(args.only, str(v))]
    reports = run(vs)
    bad = [r for r in reports if r.problems]
    print(f"\n{len(reports)} {kind.WHAT}variants, {len(bad)} with problems, "
          f"{sum(r.seconds for r in reports):.0f} s; {kind.summary(reports)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
