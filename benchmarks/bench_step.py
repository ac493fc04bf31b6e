"""Optimizer step benchmark: tigeropt's paths against torch.optim and peer libraries.

    python benchmarks/bench_step.py                          # CUDA if present, else CPU
    python benchmarks/bench_step.py --device cpu --threads 2 # 24M parameters on CPU, and small tensors
    python benchmarks/bench_step.py --device cuda --layouts gpt2,1b,small,small-flat
    python benchmarks/bench_step.py --quick                  # a smoke run (tiny layouts, few steps)
    python benchmarks/bench_step.py --out benchmarks/results # also write the tables and charts
    python benchmarks/bench_step.py --precision --threads 1 --thread-time  # low-precision rows

An optimizer step is memory-bound: its floor is the bytes it must move over the device's copy
bandwidth.  Bytes per fp32 parameter: Tiger, Lion and Adagrad 20 (read p, g, state; write p,
state), AdamW and AdaX 28.  For every row this script reports ms/step (median of ``--steps`` timed
steps after ``--warmup`` untimed ones, over ``--rounds`` rounds), the effective bandwidth
(bytes per parameter x parameters / time) and that bandwidth as a percentage of a large
device-to-device copy measured in the same run.  CUDA steps are timed with CUDA events, CPU
steps with ``time.perf_counter``.  Gradients are random normal (never zero); when a layout is
smaller than ``--min-bytes`` (default: 4x the last-level cache or 256 MiB), several copies of
the parameters, gradients and states are stepped in turn so no step finds its data in cache.

Layouts (``--layouts``):
  cpu24m      24M fp32 parameters in 50 tensors (a mid-sized model on CPU; the CPU targets)
  gpt2        GPT-2-small-like tensor list (124M parameters, 148 tensors)
  1b          ~1B-parameter LLaMA-like transformer (d=2048, 18 layers, untied head)
  small       2,000 small tensors (``--small-size`` elements each)
  small-flat  one tensor with the same number of elements as ``small``
  host        2,000 tiny tensors (64 elements each), two sets of gradients alternating (new gradient
              buffers every step): the host overhead of a step, in microseconds per tensor
Defaults: CPU ``cpu24m,host,small,small-flat`` (small-size 4096), CUDA ``gpt2,1b,host,small,small-flat``
(small-size 16384).  Every table has a ``us/tensor`` column (ms/step over the number of tensors):
on ``host`` it is the per-tensor host cost of every optimizer and path.

Rows: tigeropt Tiger, Lion, AdaX, Adagrad, Adagrad GloVe-style (default path, which is the
Triton kernel on CUDA and the fused C step on CPU, then foreach and reference);
torch.optim.AdamW (fused, foreach); torch.optim.Adagrad (fused, foreach); lion-pytorch (plain,
and triton on CUDA); bitsandbytes Lion/Adagrad 32-bit; pytorch_optimizer Lion/Tiger: each where
installed, otherwise listed as skipped with the reason.

Precision rows (``--precision``, instead of the rows above; default layout ``flat4m``, one tensor of
4M elements, on CPU, ``gpt2`` on CUDA; ``flat64m``, one tensor of 64M elements, needs about 3 GB
per optimizer: pick some with ``--only``): per optimizer, the default path with fp32 parameters
and state; bf16 parameters rounded to nearest with fp32, bf16 and 8-bit state; bf16 parameters
with stochastic rounding and fp32, bf16 and 8-bit state.  The table gives each row's time relative
to the same parameters with fp32 state and to fp32 parameters and state, the bytes per parameter
the step moves, and the time those bytes take at the bandwidth the fp32 row reached ("at fp32
GB/s": a row far above it is bound by its arithmetic, not by memory); the target checked: bf16
and 8-bit state no slower than fp32 state.  On Linux, ``THP_MEM_ALLOC_ENABLE=1`` (read by torch's
CPU allocator) backs large tensors with transparent huge pages: large steps then spend less time on
TLB misses (the run's header says so and its file name ends in ``-thp``).

Prints the tables and the speed targets checked (tigeropt's fused steps against torch's fused
AdamW/Adagrad and the copy bandwidth).  With ``--out DIR`` (e.g. ``benchmarks/results``) it also
writes ``DIR/<date>-<device>[-<layouts>].md`` (the layouts named when ``--layouts`` is given; the
tables, with device, torch/triton versions, thread count, copy bandwidth and the targets checked)
and ``.png`` (bar charts; needs matplotlib, skipped with a note otherwise); without ``--out``
nothing is written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import tigeropt

RESULTS = Path(__file__).resolve().parent / "results"
THP = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"  # torch's CPU allocator then madvises huge pages


# --------------------------------------------------------------------------------------------- layouts
def layout_shapes(name: str, small_size: int) -> list[tuple[int, ...]]:
    """The tensor shapes of a layout (see the module docstring)."""
    if name == "cpu24m":
        return [(480_000,)] * 50
    if name == "gpt2":
        d, vocab, ctx, layers = 768, 50257, 1024, 12
        shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
        for _ in range(layers):
            shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                       (4 * d, d), (d,)]
        return shapes + [(d,), (d,)]
    if name == "1b":
        d, vocab, layers, ffn = 2048, 32000, 18, 5504
        shapes = [(vocab, d)]
        for _ in range(layers):
            shapes += [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
        return shapes + [(d,), (vocab, d)]
    if name == "small":
        return [(small_size,)] * 2000
    if name == "small-flat":
        return [(small_size * 2000,)]
    if name == "host":
        return [(64,)] * 2000
    if name == "flat4m":  # --precision on CPU
        return [(4 * 2**20,)]
    if name == "flat64m":  # --precision on CPU, 16x more memory per row
        return [(64 * 2**20,)]
    if name == "tiny":  # --quick
        return [(1000,), (33, 17), (4096,)] * 4
    raise ValueError(f"Invalid layout: {name!r} (one of cpu24m, gpt2, 1b, host, small, small-flat, flat4m, "
                     "flat64m)")


def layout_copies(layout: str, nparams: int, min_bytes: int) -> int:
    """Copies of a layout rotated so that no step finds its data in cache ('host': two, so every
    step sees new gradient buffers; it measures host time, not memory)."""
    if layout == "host":
        return 2
    return max(1, math.ceil(min_bytes / (20 * nparams)))


# --------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    group: str            # "Tiger", "Lion", ... (the chart's colour)
    label: str
    bytes_per_param: int
    make: Callable[[list[Tensor]], Any] | None  # params -> object with .step(); None: skipped
    note: str = ""
    path: Callable[[Any], str] | None = None


@dataclass
class Result:
    row: Row
    ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    note: str = ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tigeropt_path(opt: Any) -> str:
    group = opt.param_groups[0]
    p = group["params"][0]
    if tigeropt._lowp_step.low_precision(group):  # the low-precision step: fused C on CPU by default
        default = group["fused"] is None and group["foreach"] is None
        if default and p.device.type == "cpu" and tigeropt.kernels.cpu_fused_usable(opt.kernel, p.dtype):
            return "cpu (low precision)"
        return f"{opt._path(group, p.device, torch.float32)} + rounded stores"
    return opt._path(group, p.device, p.dtype)


class CopyStep:
    """A pseudo-optimizer whose step is ``dst.copy_(src)`` over as many fp32 elements as the params.

    Timed among the optimizers, it gives the copy bandwidth under the same conditions (the
    denominator of "% of copy"); 8 bytes per element (read 4, write 4).
    """

    def __init__(self, params: list[Tensor]) -> None:
        n = sum(p.numel() for p in params)
        self.src = torch.randn(n, device=params[0].device)
        self.dst = torch.empty_like(self.src)

    def step(self) -> None:
        self.dst.copy_(self.src)


COPY_LABEL = "copy: dst.copy_(src), same number of fp32 elements"


def make_rows(device: torch.device, with_reference: bool) -> list[Row]:
    cuda = device.type == "cuda"
    rows: list[Row] = [Row("copy", COPY_LABEL, 8, CopyStep)]
    ours: list[tuple[str, type, dict[str, Any], int]] = [
        ("Tiger", tigeropt.Tiger, dict(lr=1e-3, weight_decay=0.01), 20),
        ("Lion", tigeropt.Lion, dict(lr=1e-4, weight_decay=0.1), 20),
        ("AdaX", tigeropt.AdaX, dict(lr=1.5e-3), 28),
        ("Adagrad", tigeropt.Adagrad, dict(lr=1e-2), 20),
        ("Adagrad GloVe", tigeropt.Adagrad, dict(lr=0.05, glove=True), 20),
    ]
    for group, cls, kw, nbytes in ours:
        paths = [("default", {})]
        paths.append(("foreach", dict(foreach=True)))
        if with_reference:
            paths.append(("reference", dict(foreach=False)))
        for name, extra in paths:
            rows.append(Row(group, f"tigeropt {group} [{name}]", nbytes,
                            (lambda ps, cls=cls, kw=kw, extra=extra: cls(ps, **kw, **extra)),
                            path=_tigeropt_path))

    def torch_opt(cls: type, kw: dict[str, Any]) -> Callable[[list[Tensor]], Any]:
        return lambda ps: cls(ps, **kw)

    for mode in ("fused", "foreach"):
        rows.append(Row("AdamW", f"torch.optim.AdamW [{mode}]", 28,
                        torch_opt(torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01, mode: True})))
    for mode in ("fused", "foreach"):
        rows.append(Row("Adagrad", f"torch.optim.Adagrad [{mode}]", 20,
                        torch_opt(torch.optim.Adagrad, {"lr": 1e-2, mode: True})))

    if _installed("lion_pytorch"):
        from lion_pytorch import Lion as LionPT

        rows.append(Row("Lion", "lion-pytorch Lion [plain]", 20,
                        torch_opt(LionPT, dict(lr=1e-4, weight_decay=0.1))))
        if cuda and _installed("triton"):
            rows.append(Row("Lion", "lion-pytorch Lion [triton]", 20,
                            torch_opt(LionPT, dict(lr=1e-4, weight_decay=0.1, use_triton=True))))
        else:
            rows.append(Row("Lion", "lion-pytorch Lion [triton]", 20, None, "CUDA only"))
    else:
        rows.append(Row("Lion", "lion-pytorch Lion", 20, None, "lion-pytorch not installed"))

    if _installed("bitsandbytes") and cuda:
        import bitsandbytes as bnb

        rows.append(Row("Lion", "bitsandbytes Lion32bit", 20,
                        torch_opt(bnb.optim.Lion32bit, dict(lr=1e-4, weight_decay=0.1))))
        rows.append(Row("Adagrad", "bitsandbytes Adagrad32bit", 20,
                        torch_opt(bnb.optim.Adagrad32bit, dict(lr=1e-2))))
    else:
        why = "bitsandbytes not installed" if not _installed("bitsandbytes") else "CUDA only here"
        rows.append(Row("Lion", "bitsandbytes Lion32bit / Adagrad32bit", 20, None, why))

    if _installed("pytorch_optimizer"):
        import pytorch_optimizer as po

        rows.append(Row("Lion", "pytorch_optimizer Lion", 20,
                        torch_opt(po.Lion, dict(lr=1e-4, weight_decay=0.1))))
        rows.append(Row("Tiger", "pytorch_optimizer Tiger", 20,
                        torch_opt(po.Tiger, dict(lr=1e-3, weight_decay=0.01))))
    else:
        rows.append(Row("Lion", "pytorch_optimizer Lion / Tiger", 20, None,
                        "pytorch_optimizer not installed"))
    return rows


# (label, parameter dtype, low-precision options) of the precision rows, in table order
PRECISION_SETTINGS: list[tuple[str, torch.dtype, dict[str, Any]]] = [
    ("fp32 | fp32", torch.float32, {}),
    ("bf16 RTN | fp32", torch.bfloat16, {}),
    ("bf16 RTN | bf16", torch.bfloat16, dict(state_precision="bf16")),
    ("bf16 RTN | 8-bit", torch.bfloat16, dict(state_precision="8bit")),
    ("bf16 SR | fp32", torch.bfloat16, dict(stochastic_rounding=True)),
    ("bf16 SR | bf16", torch.bfloat16, dict(stochastic_rounding=True, state_precision="bf16")),
    ("bf16 SR | 8-bit", torch.bfloat16, dict(stochastic_rounding=True, state_precision="8bit")),
]


def precision_bytes(nstates: int, pdtype: torch.dtype, options: dict[str, Any], eight_bit_keys: int) -> int:
    """Bytes per parameter a step moves: read p, g and the state, write p and the state (8-bit state:
    1 byte each way plus its absmax, 4 bytes per 256 elements, rounded to whole bytes)."""
    pb = 4 if pdtype == torch.float32 else 2
    precision = options.get("state_precision")
    per_state = []
    for k in range(nstates):
        if precision == "8bit" and k < eight_bit_keys:
            per_state.append(1)
        elif precision in ("bf16", "8bit"):
            per_state.append(2)
        else:
            per_state.append(4)
    return round(3 * pb + 2 * sum(per_state))


def make_precision_rows() -> list[Row]:
    """The precision rows (module docstring): tigeropt's default path per parameter/state setting."""
    rows: list[Row] = [Row("copy", COPY_LABEL, 8, CopyStep)]
    ours: list[tuple[str, type, dict[str, Any], int, int]] = [  # group, class, kw, states, 8-bit states
        ("Tiger", tigeropt.Tiger, dict(lr=1e-3, weight_decay=0.01), 1, 1),
        ("Lion", tigeropt.Lion, dict(lr=1e-4, weight_decay=0.1), 1, 1),
        ("AdaX", tigeropt.AdaX, dict(lr=1.5e-3), 2, 1),
        ("Adagrad", tigeropt.Adagrad, dict(lr=1e-2), 1, 0),
    ]
    for group, cls, kw, nstates, eight in ours:
        for label, pdtype, options in PRECISION_SETTINGS:
            def make(ps: list[Tensor], cls: type = cls, kw: dict[str, Any] = kw, pdtype: torch.dtype = pdtype,
                     options: dict[str, Any] = options) -> Any:
                params = []
                for p in ps:
                    q = torch.nn.Parameter(p.detach().to(pdtype))
                    q.grad = p.grad.to(pdtype) if p.grad is not None else None
                    params.append(q)
                return cls(params, **kw, **options)

            nbytes = precision_bytes(nstates, pdtype, options, eight)
            rows.append(Row(group, f"tigeropt {group} [{label}]", nbytes, make, path=_tigeropt_path))
    return rows


def precision_table(layout: str, nparams: int, results: list[Result]) -> list[str]:
    """The precision rows with their time relative to fp32 state (same parameters) and to fp32."""
    lines = [f"### {layout}: {nparams / 1e6:.1f}M parameters, low-precision settings", "",
             "| optimizer | parameters | state | ms/step | min ms | vs fp32 state | vs fp32 params+state "
             "| bytes/param | GB/s | at fp32 GB/s | path |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.row.group == "copy" or r.ms is None:
            continue
        setting = r.row.label[r.row.label.index("[") + 1:-1]
        params, state = (x.strip() for x in setting.split("|"))
        same_params = find(results, f"tigeropt {r.row.group} [{params} | fp32]")
        fp32 = find(results, f"tigeropt {r.row.group} [fp32 | fp32]")
        gbs = r.row.bytes_per_param * nparams / (r.ms * 1e-3) / 1e9
        rel = f"{r.ms / same_params:.2f}x" if same_params else "-"
        rel32 = f"{r.ms / fp32:.2f}x" if fp32 else "-"
        fp32_bytes = next(x.row.bytes_per_param for x in results
                          if x.row.label == f"tigeropt {r.row.group} [fp32 | fp32]")
        floor = fmt(r.row.bytes_per_param / fp32_bytes * fp32) if fp32 else "-"
        lines.append(f"| {r.row.group} | {params} | {state} | {fmt(r.ms)} | {fmt(min(r.ms_all))} | {rel} | "
                     f"{rel32} | {r.row.bytes_per_param} | {fmt(gbs, 1)} | {floor} | {r.note} |")
    lines += ["", "at fp32 GB/s: the ms this row's bytes take at the fp32 row's bandwidth (its memory time "
              "if it streamed as fast; well below ms/step: the row's arithmetic bounds it)"]
    return lines


def precision_targets(by_layout: dict[str, tuple[int, list[Result]]]) -> list[str]:
    """bf16 and 8-bit state no slower than fp32 state (same parameters), per optimizer and layout."""
    lines = []
    for layout, (_, res) in by_layout.items():
        for group in ("Tiger", "Lion", "AdaX", "Adagrad"):
            for params in ("bf16 RTN", "bf16 SR"):
                base = find(res, f"tigeropt {group} [{params} | fp32]")
                for state in ("bf16", "8-bit"):
                    ms = find(res, f"tigeropt {group} [{params} | {state}]")
                    if base is None or ms is None:
                        continue
                    ok = ms <= base
                    lines.append(f"- {layout}: {group} {params} params, {state} state {fmt(ms)} ms vs fp32 "
                                 f"state {fmt(base)} ms: {ms / base:.2f}x (target <= 1x) "
                                 f"{'PASS' if ok else 'FAIL'}")
    return lines


# --------------------------------------------------------------------------------------------- timing
class Timer:
    """Per-step wall time: CUDA events on CUDA, perf_counter on CPU (``THREAD_TIME``: the calling
    thread's CPU time, time.thread_time, which other processes on the cores do not inflate; it
    misses the work of other threads, so it is meaningful with one torch thread only)."""

    THREAD_TIME = False

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.clock = time.thread_time if Timer.THREAD_TIME else time.perf_counter
        self.pending: list[tuple[Any, Any]] = []
        self.times: list[float] = []

    def time(self, fn: Callable[[], Any]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((start, end))
        else:
            t = self.clock()
            fn()
            self.times.append((self.clock() - t) * 1e3)

    def results(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.times += [s.elapsed_time(e) for s, e in self.pending]
            self.pending = []
        return self.times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` (2 x size bytes moved) on ``nbytes``-byte float32 buffers."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    for _ in range(repeats):
        timer.time(lambda: dst.copy_(src))
    ms = statistics.median(timer.results())
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def cache_bytes(device: torch.device) -> int:
    """The last-level cache size (L2 on CUDA, the largest CPU cache), or a guess."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def make_sets(shapes: list[tuple[int, ...]], copies: int, device: torch.device,
              seed: int) -> list[list[Tensor]]:
    """``copies`` independent parameter lists with random normal (never zero) gradients."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(copies):
        params = []
        for s in shapes:
            p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02)
            g = torch.randn(s, generator=gen).to(device)
            g[g == 0] = 1e-3
            p.grad = g
            params.append(p)
        sets.append(params)
    return sets


def run_row(row: Row, sets: list[list[Tensor]], device: torch.device, warmup: int, steps: int,
            budget_s: float | None) -> tuple[list[float], str]:
    """Time ``steps`` steps (after ``warmup``), cycling over the parameter sets.

    With ``budget_s``, stop early (after at least 3 timed steps) once the row has used that much
    wall time: slow rows (the reference path on CPU) then do not dominate the run time.
    """
    assert row.make is not None
    opts = [row.make(ps) for ps in sets]
    path = row.path(opts[0]) if row.path is not None else ""
    start = time.perf_counter()
    for i in range(warmup):
        opts[i % len(opts)].step()
    sync(device)
    timer = Timer(device)
    for i in range(steps):
        timer.time(opts[i % len(opts)].step)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s:
            break
    times = timer.results()
    del opts
    return times, path


def _failed(exc: Exception) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def run_rows(results: list[Result], sets: list[list[Tensor]], device: torch.device, warmup: int, steps: int,
             rounds: int, budget: float | None, layout: str) -> None:
    """Each row on its own (its optimizer state alone in memory), the whole list ``rounds`` times."""
    for rnd in range(rounds):
        for res in results:
            if res.row.make is None or (res.note and not res.ms_all and rnd > 0):
                continue
            try:
                times, path = run_row(res.row, sets, device, warmup, steps, budget)
            except Exception as exc:  # a peer that does not run here: listed, not fatal
                res.note = _failed(exc)
                continue
            res.ms_all += times
            res.note = path
            print(f"    {res.row.label}: {statistics.median(times):.2f} ms ({len(times)} steps)", flush=True)
            gc.collect()
        print(f"  {layout}: round {rnd + 1}/{rounds} done", flush=True)


def run_interleaved(results: list[Result], sets: list[list[Tensor]], device: torch.device, warmup: int,
                    steps: int, budget: float | None) -> None:
    """Every row's optimizer alive at once; step i of every row, then step i+1 of every row, ...

    On a machine whose load drifts (other processes on the cores), this compares rows under the
    same conditions.  A row that has used ``budget`` seconds (after at least 3 timed steps) sits
    out the remaining iterations.
    """
    live: list[tuple[Result, list[Any]]] = []
    for res in results:
        if res.row.make is None:
            continue
        try:
            opts = [res.row.make(ps) for ps in sets]
            for i in range(warmup):
                opts[i % len(opts)].step()
            res.note = res.row.path(opts[0]) if res.row.path is not None else ""
            live.append((res, opts))
        except Exception as exc:
            res.note = _failed(exc)
    sync(device)
    timers = {id(res): Timer(device) for res, _ in live}
    spent = {id(res): 0.0 for res, _ in live}
    for i in range(steps):
        for res, opts in live:
            if budget is not None and spent[id(res)] > budget and i >= 3:
                continue
            t = time.perf_counter()
            timers[id(res)].time(opts[i % len(opts)].step)
            spent[id(res)] += time.perf_counter() - t
        if (i + 1) % 5 == 0:
            print(f"    step {i + 1}/{steps}", flush=True)
    for res, _ in live:
        res.ms_all = timers[id(res)].results()
    live.clear()
    gc.collect()


# --------------------------------------------------------------------------------------------- report
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "lion_pytorch", "pytorch_optimizer", "bitsandbytes"):
        if _installed(mod):
            try:
                from importlib.metadata import version

                out[mod] = version(mod.replace("_", "-"))
            except Exception:
                out[mod] = getattr(__import__(mod), "__version__", "?")
    out["tigeropt"] = getattr(tigeropt, "__version__", "?")
    return out


def device_name(device: torch.device, threads: int) -> tuple[str, str]:
    """(human-readable description, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {threads} threads (of {os.cpu_count()})", f"cpu-{threads}threads"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def layout_copy_gbs(nparams: int, results: list[Result], fallback: float) -> float:
    """The copy bandwidth measured among this layout's rows (else the standalone measurement)."""
    ms = find(results, COPY_LABEL)
    return 8 * nparams / (ms * 1e-3) / 1e9 if ms else fallback


def layout_table(layout: str, nparams: int, ntensors: int, copies: int, results: list[Result],
                 copy_gbs: float) -> list[str]:
    copy_gbs = layout_copy_gbs(nparams, results, copy_gbs)
    adamw = find(results, "torch.optim.AdamW [fused]")
    adagrad = find(results, "torch.optim.Adagrad [fused]")
    lines = [f"### {layout}: {nparams / 1e6:.1f}M parameters in {ntensors} tensors"
             + (f" ({copies} copies rotated)" if copies > 1 else ""), "",
             f"Copy bandwidth during this layout's run: {copy_gbs:.1f} GB/s.", "",
             "| optimizer | path | ms/step | min ms | us/tensor | GB/s | % of copy | vs torch fused* "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.ms is None:
            lines.append(f"| {r.row.label} | | | | | | | | {r.note or r.row.note} |")
            continue
        gbs = r.row.bytes_per_param * nparams / (r.ms * 1e-3) / 1e9
        base = adagrad if r.row.group.startswith("Adagrad") else adamw
        rel = f"{r.ms / base:.2f}x" if base and r.row.group != "copy" else "-"
        pct = fmt(100 * gbs / copy_gbs, 0)
        best = fmt(min(r.ms_all))
        per_tensor = fmt(r.ms * 1e3 / ntensors)
        lines.append(f"| {r.row.label} | {r.note} | {fmt(r.ms)} | {best} | {per_tensor} | {fmt(gbs, 1)} "
                     f"| {pct} | {rel} | {len(r.ms_all)} steps |")
    return lines


def find(results: list[Result], label: str) -> float | None:
    return next((r.ms for r in results if r.row.label == label), None)


# The CPU targets on cpu24m: (ours, torch baseline, limit on the time ratio).
CPU_TARGETS = [("tigeropt Tiger [default]", "torch.optim.AdamW [fused]", 0.8),
               ("tigeropt Lion [default]", "torch.optim.AdamW [fused]", 0.8),
               ("tigeropt AdaX [default]", "torch.optim.AdamW [fused]", 1.05),
               ("tigeropt Adagrad [default]", "torch.optim.Adagrad [fused]", 1.05),
               ("tigeropt Adagrad GloVe [default]", "torch.optim.Adagrad [fused]", 1.05)]
CPU_TARGET_ROWS = {label for pair in CPU_TARGETS for label in pair[:2]}


def paired_ratios(results: list[Result]) -> dict[str, tuple[float, float, float]]:
    """ours -> (median of per-iteration time ratios ours/baseline, median ms ours, median ms baseline).

    In an interleaved run every row takes its i-th step within the same sweep, so the ratio of
    the i-th steps compares the two under the same load; its median is robust to load drift.
    """
    by_label = {r.row.label: r.ms_all for r in results if r.ms_all}
    out = {}
    for ours, base, _ in CPU_TARGETS:
        a, b = by_label.get(ours), by_label.get(base)
        if a and b:
            ratios = [x / y for x, y in zip(a, b)]
            out[ours] = (statistics.median(ratios), statistics.median(a), statistics.median(b))
    return out


def check_targets(device: torch.device, by_layout: dict[str, tuple[int, list[Result]]], copy_gbs: float,
                  paired: dict[str, tuple[float, float, float]], target_steps: int) -> list[str]:
    """The issue's targets that this run can check, each with PASS/FAIL."""
    lines: list[str] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def ratio_line(what: str, a: float | None, b: float | None, limit: float, layout: str) -> None:
        if a is None or b is None:
            lines.append(f"- {layout}: {what}: not measured")
            return
        lines.append(f"- {layout}: {what}: {a / b:.2f}x (target <= {limit}x) {verdict(a / b <= limit)}")

    if device.type == "cpu" and "cpu24m" in by_layout:
        _, res = by_layout["cpu24m"]
        lines.append("From the table above (ratio of medians):")
        for ours, base, limit in CPU_TARGETS:
            ratio_line(f"{ours} / {base}", find(res, ours), find(res, base), limit, "cpu24m")
        if paired:
            lines += ["", f"Head-to-head: only these rows, interleaved, {target_steps} steps each; ratio = "
                      "median over steps of the per-sweep time ratio (robust to load drift):"]
            for ours, base, limit in CPU_TARGETS:
                if ours in paired:
                    r, a, b = paired[ours]
                    lines.append(f"- cpu24m: {ours} {a:.2f} ms / {base} {b:.2f} ms: {r:.2f}x "
                                 f"(target <= {limit}x) {verdict(r <= limit)}")
    if device.type == "cuda":
        for layout, (nparams, res) in by_layout.items():
            if layout in ("small-flat", "host"):  # host: tiny tensors measure host time, not bandwidth
                continue
            copy_here = layout_copy_gbs(nparams, res, copy_gbs)
            for group in ("Tiger", "Lion", "Adagrad"):
                ms = find(res, f"tigeropt {group} [default]")
                if ms is not None:
                    pct = 100 * 20 * nparams / (ms * 1e-3) / 1e9 / copy_here
                    lines.append(f"- {layout}: {group} fused at {pct:.0f}% of copy bandwidth (target >= 90%) "
                                 f"{verdict(pct >= 90)}")
            adamw = find(res, "torch.optim.AdamW [fused]")
            if nparams >= 100e6:
                tiger = find(res, "tigeropt Tiger [default]")
                if tiger and adamw:
                    lines.append(f"- {layout}: Tiger {adamw / tiger:.2f}x faster than AdamW fused "
                                 f"(target >= 1.3x) {verdict(adamw / tiger >= 1.3)}")
            ratio_line("AdaX fused / AdamW fused", find(res, "tigeropt AdaX [default]"), adamw, 1.05, layout)
            ours = find(res, "tigeropt Lion [default]")
            peers = [r for r in res if r.row.group == "Lion" and not r.row.label.startswith("tigeropt")
                     and r.ms is not None]
            if ours is not None and peers:
                best = min(peers, key=lambda r: r.ms or math.inf)
                lines.append(f"- {layout}: Lion fused {fmt(ours)} ms vs fastest peer {best.row.label} "
                             f"{fmt(best.ms)} ms {verdict(ours < (best.ms or 0))}")
    if "host" in by_layout:
        _, res = by_layout["host"]
        adamw = find(res, "torch.optim.AdamW [fused]")
        for group in ("Tiger", "Lion", "AdaX", "Adagrad", "Adagrad GloVe"):
            ours = find(res, f"tigeropt {group} [default]")
            if ours is not None and adamw:
                lines.append(f"- host: {group} default {ours * 1e3 / 2000:.2f} us/tensor vs "
                             f"torch.optim.AdamW [fused] {adamw * 1e3 / 2000:.2f}: {ours / adamw:.2f}x "
                             "(target <= 0.5x) "
                             f"{verdict(ours / adamw <= 0.5)}")
    if "small" in by_layout and "small-flat" in by_layout:
        for group in ("Tiger", "Lion", "AdaX", "Adagrad"):
            a = find(by_layout["small"][1], f"tigeropt {group} [default]")
            b = find(by_layout["small-flat"][1], f"tigeropt {group} [default]")
            if device.type == "cuda":
                ratio_line(f"{group} default, 2,000 tensors / one tensor", a, b, 2.0, "small")
            elif a is not None and b is not None:  # the issue sets this target for the GPU kernels only
                lines.append(f"- small: {group} default, 2,000 tensors / one tensor: {a / b:.2f}x "
                             "(informational on CPU: the <= 2x target is a GPU one)")
    return lines


def write_png(path: Path, by_layout: dict[str, tuple[int, list[Result]]], title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed: no chart written"
    layouts = list(by_layout)
    fig, axes = plt.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 8), squeeze=False)
    colours = {"Tiger": "tab:orange", "Lion": "tab:blue", "AdaX": "tab:green", "Adagrad": "tab:purple",
               "Adagrad GloVe": "tab:pink", "AdamW": "tab:gray"}
    for ax, layout in zip(axes[0], layouts):
        nparams, res = by_layout[layout]
        done = [r for r in res if r.ms is not None]
        labels = [r.row.label for r in done][::-1]
        values = [r.ms for r in done][::-1]
        ax.barh(labels, values, color=[colours.get(r.row.group, "tab:olive") for r in done][::-1])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("ms / step (log scale, lower is better)")
        ax.set_title(f"{layout} ({nparams / 1e6:.0f}M params)")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path.name}"


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", default=None, help="comma-separated (default depends on the device)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: 2 or fewer)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row and round")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="repeat every row this many times, interleaved (CPU default 3: load drifts)")
    ap.add_argument("--small-size", type=int, default=None, help="elements per tensor of 'small'")
    ap.add_argument("--min-bytes", type=int, default=None,
                    help="rotate copies of a layout until a step over all of them moves this many bytes")
    ap.add_argument("--row-seconds", type=float, default=None,
                    help="stop timing a row after this many seconds per round (>= 3 steps; CPU default 3)")
    ap.add_argument("--interleave", choices=("steps", "rows"), default=None,
                    help="steps: all rows' optimizers alive, one step of each in turn (CPU default: fair "
                         "under drifting load); rows: one row after the other (CUDA default: less memory)")
    ap.add_argument("--target-steps", type=int, default=100,
                    help="CPU: steps of the head-to-head run of the rows the speed targets compare, on "
                         "cpu24m (0: skip)")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow reference rows")
    ap.add_argument("--only", default=None, help="regex: run only rows whose label matches")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny layout, 3 steps")
    ap.add_argument("--thread-time", action="store_true",
                    help="CPU with --threads 1: time steps by the thread's CPU time (time.thread_time), "
                         "robust to other processes on the cores, instead of wall time")
    ap.add_argument("--precision", action="store_true",
                    help="run the low-precision rows instead (bf16 parameters, stochastic rounding, bf16 "
                         "and 8-bit state; default layout flat4m on CPU, gpt2 on CUDA)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="write the .md tables and .png charts into DIR, e.g. benchmarks/results "
                         "(default: print only, write nothing)")
    ap.add_argument("--no-write", action="store_true", help="write nothing even with --out")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.thread_time:
        if not cpu or (args.threads or 0) != 1:
            ap.error("--thread-time needs --device cpu and --threads 1 (it misses other threads' work)")
        Timer.THREAD_TIME = True
    if cpu:
        torch.set_num_threads(args.threads or min(2, os.cpu_count() or 1))
    threads = torch.get_num_threads()
    default_layouts = (["cpu24m", "host", "small", "small-flat"] if cpu else
                       ["gpt2", "1b", "host", "small", "small-flat"])
    if args.precision:
        default_layouts = ["flat4m"] if cpu else ["gpt2"]
    layouts = ["tiny"] if args.quick else (args.layouts.split(",") if args.layouts else default_layouts)
    small_size = args.small_size or (4096 if cpu else 16384)
    steps = args.steps or (3 if args.quick else (20 if cpu else 50))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (3 if cpu else 10))
    rounds = args.rounds or (1 if args.quick or not cpu else 3)
    interleave = args.interleave or ("steps" if cpu else "rows")
    budget = args.row_seconds if args.row_seconds is not None else (3.0 if cpu else None)
    llc = cache_bytes(device)
    min_bytes = args.min_bytes or max(4 * llc, 256 * 2**20)
    if args.quick:
        min_bytes = 0

    rows = (make_precision_rows() if args.precision else
            make_rows(device, with_reference=not args.no_reference))
    if args.only:
        rows = [r for r in rows if r.group == "copy" or re.search(args.only, r.label)]
    desc, slug = device_name(device, threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    copy_gbs = copy_bandwidth(device, max(min_bytes, 64 * 2**20) if not args.quick else 2**20)
    print(f"# {desc}; copy bandwidth {copy_gbs:.1f} GB/s; last-level cache {llc / 2**20:.0f} MiB", flush=True)

    by_layout: dict[str, tuple[int, list[Result]]] = {}
    paired: dict[str, tuple[float, float, float]] = {}
    for layout in layouts:
        shapes = layout_shapes(layout, small_size)
        nparams = sum(math.prod(s) for s in shapes)
        copies = layout_copies(layout, nparams, min_bytes)
        sets = make_sets(shapes, copies, device, seed=0)
        results = [Result(r, note=r.note) for r in rows]
        if interleave == "steps":
            total_budget = budget * rounds if budget else None
            run_interleaved(results, sets, device, warmup, steps * rounds, total_budget)
        else:
            run_rows(results, sets, device, warmup, steps, rounds, budget, layout)
        for res in results:
            if res.ms_all:
                res.ms = statistics.median(res.ms_all)
        by_layout[layout] = (nparams, results)
        table = (precision_table(layout, nparams, results) if args.precision else
                 layout_table(layout, nparams, len(shapes), copies, results, copy_gbs))
        print("\n".join(table), flush=True)
        if cpu and layout == "cpu24m" and args.target_steps > 0 and not args.precision:
            head_to_head = [Result(r) for r in rows if r.label in CPU_TARGET_ROWS]
            run_interleaved(head_to_head, sets, device, warmup, args.target_steps, None)
            paired = paired_ratios(head_to_head)
        del sets
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    targets = (precision_targets(by_layout) if args.precision else
               check_targets(device, by_layout, copy_gbs, paired, args.target_steps))
    date = dt.date.today().isoformat()
    vers = versions()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    clock_name = ("CUDA events" if not cpu else
                  "time.thread_time" if args.thread_time else "time.perf_counter")
    header = [f"# Optimizer step benchmark: {desc}", "",
              f"- date: {date}; command: `python benchmarks/{Path(__file__).name} {command}`",
              f"- versions: {', '.join(f'{k} {v}' for k, v in vers.items())}",
              f"- device-to-device copy bandwidth: {copy_gbs:.1f} GB/s before the runs (dst.copy_(src), 2 x "
              f"size bytes); each layout also times a copy row among its rows, which is what '% of copy' "
              f"uses; last-level cache {llc / 2**20:.0f} MiB",
              f"- ms/step: median of {rounds} x {steps} timed steps after {warmup} warm-up steps per row "
              f"({clock_name}); "
              + ("all rows alive at once, one step of each row in turn" if interleave == "steps" else
                 f"rows one after another, {rounds} round(s)")
              + (f"; a row stops after {budget:g} s per round (at least 3 timed steps)" if budget else ""),
              "- GB/s: bytes per parameter (Tiger/Lion/Adagrad 20, AdamW/AdaX 28 for fp32) x parameters "
              "/ time",
              ]
    if cpu:
        header.append(f"- torch threads: {threads}; load average at start {fmt(load[0] if load else None)}, "
                      f"at end {fmt(load_end[0] if load_end else None)} (other processes share the cores)")
    if THP:
        header.append("- THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator asks for transparent huge pages "
                      "(fewer TLB misses on large tensors)")
    body = []
    for layout, (nparams, results) in by_layout.items():
        body += [""] + (precision_table(layout, nparams, results) if args.precision else
                        layout_table(layout, nparams, len(layout_shapes(layout, small_size)),
                                     layout_copies(layout, nparams, min_bytes), results, copy_gbs))
    body += ["", "ms/step is the median; GB/s, % of copy and the ratio use it.  *time relative to "
             "torch.optim.AdamW(fused=True), or to torch.optim.Adagrad(fused=True) for Adagrad rows"]
    text = "\n".join(header + body + ["", "## Targets", ""] + (targets or ["- none checked by this run"]))
    text += "\n"
    print("\n## Targets\n" + "\n".join(targets), flush=True)
    if args.out is not None and not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "-precision" if args.precision else ""
        if args.layouts:  # not the default layouts: say which, so files do not collide
            tag += "-" + "-".join(layouts)
        if THP:
            tag += "-thp"
        md = args.out / f"{date}-{slug}{tag}.md"
        png_note = write_png(md.with_suffix(".png"), by_layout, desc)
        md.write_text(text + f"\n{png_note}\n")
        print(f"wrote {md} ({png_note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
