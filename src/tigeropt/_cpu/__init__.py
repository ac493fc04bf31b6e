"""The fused CPU step: one C call updates every tensor of a parameter group.

An optimizer step is memory-bound, and the foreach path on CPU makes one pass
over memory per elementary operation (7 to 10 passes).  The C kernels in
``kernels.c`` read p, g and the state once and write p and the state once, for
the whole tensor list in one OpenMP parallel region (the elements of all tensors
are split into one contiguous range per thread).

Mechanism: ``kernels.c`` is compiled on first use with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) as
``-O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno -shared -fPIC``
(dropping ``-march=native`` and then ``-fopenmp`` if the compiler refuses them)
into ``$TIGEROPT_CACHE`` (default ``$XDG_CACHE_HOME/tigeropt`` or
``~/.cache/tigeropt``), under a name that hashes the source, the compiler and
its version, the flags and the CPU model, so a shared home directory never
hands one machine another machine's instructions.  The file is written under
a temporary name and renamed atomically, so concurrent processes never load a
half-written library.  It is loaded with :mod:`ctypes`; no torch headers are
needed and a build takes about a second.  ``TIGEROPT_CFLAGS`` (a test hook, e.g.
``-fsanitize=address,undefined -g`` for a sanitizer run or ``-mno-avx512f`` for the generic
low-precision loop) is appended to every flag set, so it is part of the build's name.
Without a compiler, or if the build fails, :func:`available` is False (one
``RuntimeWarning`` says why) and the optimizers use the foreach path.
``TIGEROPT_CPU_FUSED=0`` switches the fused CPU step off.

Numerics are those of the reference (``_single_tensor_<name>``) functions,
operation by operation (see ``kernels.c``): math in the state dtype (fp32 for
bf16/fp16 parameters), parameters rounded once, to nearest even, at the store.

Low-precision groups (bf16 parameters with stochastic rounding, bf16 or 8-bit state) take
:func:`lowp_step`: the same one pass, with the loads (8-bit state decoded per 256-element
block) and the rounded stores of :mod:`tigeropt._lowp` inside the kernel.  Where the compiler
targets AVX-512 with bf16 conversions (:func:`lowp_simd`), a hand-vectorized block loop does
loads, math and stores 16 elements at a time; elsewhere a generic one; both give the same bits.

The launchers :func:`fused_tiger`, :func:`fused_lion`, :func:`fused_adax` and
:func:`fused_adagrad` take the arguments of the foreach functions
``_multi_tensor_<name>`` plus ``fallback``: the function (chosen by the caller,
normally the optimizer base, which knows every path) that runs what the kernels
cannot take.  Tensors the kernels cannot take (non-contiguous, sparse, not on
the CPU, an unsupported dtype or a state dtype other than the parameter's
optimizer-state dtype) and options they do not implement (Tiger's
``lr_scaling``/``accumulation_steps``/``nan_guard``, Adagrad's
``skip_nonfinite_rows``) go to ``fallback``; without one they raise
``ValueError``.  This package imports nothing from the optimizer modules.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import operator
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._math import adax_scalars
from .._ops import compiling, join_lr, split_lr

__all__ = ["supports", "available", "status", "build", "cache_dir", "fused_tiger", "fused_lion",
           "fused_adax", "fused_adagrad", "StepPlan", "SOURCE", "NAMES", "lowp_step", "lowp_absmax_len",
           "LowpStepPlan", "lowp_simd"]

SOURCE = Path(__file__).with_name("kernels.c")
NAMES = ("tiger", "lion", "adax", "adagrad")
ABI = 1

_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_STATE = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
          torch.float16: torch.float32}
_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
# Tried in order; the first that builds wins.
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_STRIDED = torch.strided
_IS_CPU = operator.attrgetter("is_cpu")
_DTYPE = operator.attrgetter("dtype")
# Tensor subclasses (DTensor, FakeTensor under torch.compile, quantized wrappers) have no plain
# storage to hand to C: they take the foreach path.
_PLAIN = frozenset({Tensor, torch.nn.Parameter})
_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- build
def cache_dir() -> Path:
    """Where builds live: ``$TIGEROPT_CACHE``, else ``$XDG_CACHE_HOME/tigeropt`` or ``~/.cache/tigeropt``."""
    env = os.environ.get("TIGEROPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tigeropt"


def _find_compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.cache
def _cpu_identity() -> str:
    """The CPU model and feature flags (``-march=native`` code only runs on the same kind of CPU)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


_TRANSIENT = ("killed signal", "internal compiler error", "out of memory", "cannot allocate memory",
              "no space left", "virtual memory exhausted", "resource temporarily unavailable", "interrupt")


def _transient(message: str) -> bool:
    """Whether a failed compile says the compiler was stopped (a signal, memory, disk, a crash) rather
    than that it refuses the flags or the source: such failures are not remembered."""
    text = message.lower()
    return any(t in text for t in _TRANSIENT)


def build(cache: Path | None = None, compiler: str | None = None) -> Path:
    """Compile ``kernels.c`` (or reuse the cached build) and return the library's path.

    Raises ``RuntimeError`` with the compiler's message when no flag set builds.
    """
    cc = compiler or _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install cc/gcc/clang)")
    if cache is None:
        cache = cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            if not os.access(cache, os.W_OK):
                raise OSError(f"{cache} is not writable")
        except OSError:  # e.g. a read-only home directory
            cache = Path(tempfile.gettempdir()) / f"tigeropt-{os.getuid() if hasattr(os, 'getuid') else 0}"
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    errors = []
    user = shlex.split(os.environ.get("TIGEROPT_CFLAGS", ""))  # test hook (sanitizers, -mno-avx512f)
    for extra in _FLAG_SETS:
        flags = _BASE_FLAGS + extra + user
        key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                                         _cpu_identity().encode()])).hexdigest()[:20]
        lib = cache / f"kernels-{key}.so"
        failed = cache / f"kernels-{key}.failed"
        if lib.exists():
            return lib
        if failed.exists():
            errors.append(f"{' '.join(extra) or 'plain'}: failed before (see {failed})")
            continue
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache)
        os.close(fd)
        refused = False
        try:
            out = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if out.returncode == 0:
                os.replace(tmp, lib)  # atomic: other processes see no file or a whole one
                return lib
            message = (out.stderr or out.stdout).strip()
            refused = out.returncode > 0 and not _transient(message)
        except (OSError, subprocess.SubprocessError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        errors.append(f"{' '.join(extra) or 'plain'}: {message[-500:]}")
        if refused:  # the compiler said no: remember it, so later processes skip this flag set at once
            # (not a compiler killed by a signal, out of memory or disk, or crashed: the next try may build)
            try:
                failed.write_text(message)
            except OSError:
                pass
    raise RuntimeError(f"building {SOURCE.name} with {cc} failed: " + " | ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    for name, nlists in (("tiger", 3), ("lion", 3), ("adax", 4), ("adagrad", 3)):
        fn = getattr(lib, f"tigeropt_{name}")
        per = [vp] if name in ("adax", "adagrad") else []
        fn.argtypes = [i32, i32] + [vp] * nlists + [vp, vp] + per + [i32]
        fn.restype = None
    lib.tigeropt_steps.argtypes = [i32, vp, i32, vp]
    lib.tigeropt_steps.restype = None
    for name in ("tigeropt_abi", "tigeropt_has_openmp", "tigeropt_has_f16", "tigeropt_lowp_simd"):
        getattr(lib, name).restype = i32
        getattr(lib, name).argtypes = []


_state: dict[str, Any] = {}


def _load() -> ctypes.CDLL | None:
    """The loaded library, or None (the reason is in ``status()``); builds on first call."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, "ok"
        if os.environ.get("TIGEROPT_CPU_FUSED", "1") == "0":
            why = "switched off by TIGEROPT_CPU_FUSED=0"
        else:
            try:
                lib = ctypes.CDLL(str(build()))
                _declare(lib)
                if lib.tigeropt_abi() != ABI:
                    raise RuntimeError(f"library ABI {lib.tigeropt_abi()} != {ABI}")
            except Exception as exc:  # never crash: fall back to foreach
                lib, why = None, f"{type(exc).__name__}: {exc}"
                warnings.warn(f"tigeropt: the fused CPU step is unavailable ({why}); using the foreach "
                              "path", RuntimeWarning, stacklevel=3)
        _state["why"] = why
        _state["lib"] = lib
        return lib


def status() -> str:
    """'ok', or why the fused CPU step cannot be used (builds the library on first call)."""
    _load()
    return _state["why"]


def available() -> bool:
    """Whether the fused CPU step can run here (builds it on first call; False warns once why)."""
    return _load() is not None


def lowp_simd() -> bool:
    """Whether the low-precision step runs its AVX-512 block loop (the compiler targets AVX-512 with bf16
    conversions, e.g. ``-march=native`` on Zen 4 or Sapphire Rapids) rather than the generic one; the
    two give the same bits."""
    lib = _load()
    return bool(lib is not None and lib.tigeropt_lowp_simd())


def has_openmp() -> bool:
    """Whether the built library runs on several threads."""
    lib = _load()
    return bool(lib is not None and lib.tigeropt_has_openmp())


def supports(name: str, dtype: torch.dtype) -> bool:
    """Whether the fused CPU step implements optimizer ``name`` for parameters of ``dtype``.

    fp32, fp64 and bf16 always; fp16 when the compiler has fp16 conversions.
    """
    if name not in NAMES or dtype not in _CODES:
        return False
    if dtype == torch.float16:
        lib = _load()
        return bool(lib is not None and lib.tigeropt_has_f16())
    return True


# ---------------------------------------------------------------------------------------------- launch
def _ptrs(tensors: Sequence[Tensor]) -> array:
    return array("Q", map(Tensor.data_ptr, tensors))


def _addr(a: array) -> int:
    return a.buffer_info()[0]


def _uniform(lists: Sequence[Sequence[Tensor]], f16: bool) -> int | None:
    """The dtype code when the kernels take every tensor (the common case, checked list-wise), else None."""
    params, grads, *states = lists
    dtype = params[0].dtype
    code = _CODES.get(dtype)
    if code is None or (code == 3 and not f16):
        return None
    sd = _STATE[dtype]
    try:
        for lst, want in ((params, dtype), (grads, dtype), *((s, sd) for s in states)):
            if (not all(map(_PLAIN.__contains__, map(type, lst))) or any(t.dtype is not want for t in lst)
                    or not all(map(_IS_CPU, lst)) or not all(map(Tensor.is_contiguous, lst))):
                return None
    except RuntimeError:  # is_contiguous() of a sparse tensor
        return None
    numel = list(map(Tensor.numel, params))
    for lst in lists[1:]:
        if list(map(Tensor.numel, lst)) != numel:
            return None
    return code


def _split(lists: Sequence[Sequence[Tensor]], f16: bool) -> tuple[dict[int, list[int]], list[int]]:
    """Indices per dtype code of the tensors the kernels take, and the others."""
    params, grads, *states = lists
    code = _uniform(lists, f16)
    if code is not None:
        return {code: list(range(len(params)))}, []
    groups: dict[int, list[int]] = {}
    other: list[int] = []
    for i, (p, g) in enumerate(zip(params, grads)):
        code = _CODES.get(p.dtype)
        ok = (code is not None and (code != 3 or f16) and type(p) in _PLAIN and type(g) in _PLAIN
              and g.layout is _STRIDED and p.layout is _STRIDED
              and g.dtype is p.dtype and p.is_cpu and g.is_cpu and p.is_contiguous() and g.is_contiguous()
              and g.numel() == p.numel())
        if ok:
            sd = _STATE[p.dtype]
            for s in states:
                t = s[i]
                if not (type(t) in _PLAIN and t.dtype is sd and t.layout is _STRIDED and t.is_cpu
                        and t.is_contiguous()
                        and t.numel() == p.numel()):
                    ok = False
                    break
        if ok:
            groups.setdefault(code, []).append(i)  # type: ignore[arg-type]
        else:
            other.append(i)
    return groups, other


def _pick(lst: Sequence[Any], idx: list[int]) -> list[Any]:
    return [lst[i] for i in idx]


def _launch(name: str, lists: list[Sequence[Tensor]], state_steps: Sequence[Tensor], hp: list[float],
            per: Callable[[array], array] | None,
            fallback: Callable[..., None] | None, kwargs: dict[str, Any]) -> None:
    """Run the C kernel ``name`` on the tensors it takes and ``fallback`` on the rest."""
    lib = _load()
    if lib is None:
        _fallback(fallback, name, "the library is unavailable")(*lists, state_steps, **kwargs)
        return
    groups, other = _split(lists, bool(lib.tigeropt_has_f16()))
    if other:
        _fallback(fallback, name, f"tensors {other} are not plain contiguous CPU tensors of the kernel's "
                  "dtypes")(*[_pick(lst, other) for lst in lists], _pick(state_steps, other), **kwargs)
    if not groups:
        return
    fn = getattr(lib, f"tigeropt_{name}")
    hp_arr = array("d", hp)
    nthreads = torch.get_num_threads()
    for code, idx in groups.items():
        sub = lists if len(idx) == len(lists[0]) else [_pick(lst, idx) for lst in lists]
        ptrs = [_ptrs(lst) for lst in sub]
        numel = array("q", map(Tensor.numel, sub[0]))
        args: list[Any] = [len(idx), code, *[_addr(a) for a in ptrs], _addr(numel), _addr(hp_arr)]
        if per is not None:
            steps = state_steps if len(idx) == len(state_steps) else _pick(state_steps, idx)
            per_arr = per(array("d", map(Tensor.item, steps)))
            args.append(_addr(per_arr))
        fn(*args, nthreads)
        # Writes through raw pointers: tell autograd the tensors changed, as an in-place op would.
        try:
            torch.autograd.graph.increment_version([t for lst in sub[:1] + sub[2:] for t in lst])
        except RuntimeError:  # inference tensors have no version counter
            pass


def _fallback(fallback: Callable[..., None] | None, name: str, why: str) -> Callable[..., None]:
    if fallback is None:
        raise ValueError(f"fused_{name}: {why}, and no fallback was given (pass fallback=, e.g. the "
                         "optimizer's foreach function)")
    return fallback


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def fused_tiger(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], state_steps: list[Tensor],
                *, lr: float | Tensor, beta: float, weight_decay: float, maximize: bool,
                lr_scaling: bool = False, accumulation_steps: int = 1, nan_guard: bool = False,
                shrink_ratio: float = 0.99, kind: str = "auto",
                fallback: Callable[..., None] | None = None) -> None:
    """Tiger, ``m = beta*m + (1-beta)*g; p = p - lr*(sign(m) + wd*p)``, in one C call.

    Same arguments and numbers as :func:`tigeropt.tiger._multi_tensor_tiger`; the
    original's extras (lr_scaling, accumulation_steps > 1, nan_guard) run in ``fallback``.
    """
    kwargs = dict(lr=lr, beta=beta, weight_decay=weight_decay, maximize=maximize, lr_scaling=lr_scaling,
                  accumulation_steps=accumulation_steps, nan_guard=nan_guard, shrink_ratio=shrink_ratio,
                  kind=kind)
    if not params:
        return
    if lr_scaling or accumulation_steps > 1 or nan_guard:
        _fallback(fallback, "tiger", "lr_scaling/accumulation_steps/nan_guard are not in the kernel")(
            params, grads, exp_avgs, state_steps, **kwargs)
        return
    if compiling():
        torch.ops.tigeropt.cpu_tiger(params, grads, exp_avgs, state_steps, *split_lr(lr), beta, weight_decay,
                                     maximize)
        return
    hp, per, _ = _kernel_args("tiger", kwargs)  # type: ignore[misc]
    _launch("tiger", [params, grads, exp_avgs], state_steps, hp, per, fallback, kwargs)


def fused_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], state_steps: list[Tensor],
               *, lr: float | Tensor, beta1: float, beta2: float, weight_decay: float,
               maximize: bool, fallback: Callable[..., None] | None = None) -> None:
    """Lion, ``c = b1*m + (1-b1)*g; p = p*(1-lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g``, in one C call.

    Same arguments and numbers as :func:`tigeropt.lion._multi_tensor_lion`.
    """
    if not params:
        return
    if compiling():
        torch.ops.tigeropt.cpu_lion(params, grads, exp_avgs, state_steps, *split_lr(lr), beta1, beta2,
                                    weight_decay, maximize)
        return
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)
    hp, per, _ = _kernel_args("lion", kwargs)  # type: ignore[misc]
    _launch("lion", [params, grads, exp_avgs], state_steps, hp, per, fallback, kwargs)


def fused_adax(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               state_steps: list[Tensor], *, lr: float | Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
               fallback: Callable[..., None] | None = None) -> None:
    """AdaX (stable form) in one C call; per-tensor (bhat, 1-bhat, eps/sqrt(bc)) from ``adax_scalars``.

    ``m = b1*m + (1-b1)*g; vhat = bhat*vhat + (1-bhat)*g^2; p -= lr*m/(sqrt(vhat) + eps/sqrt(bc))``,
    with L2 (``g += wd*p``) or decoupled (``p *= 1-lr*wd``) weight decay.  Same arguments and
    numbers as :func:`tigeropt.adax._multi_tensor_adax`.
    """
    if not params:
        return
    if compiling():
        torch.ops.tigeropt.cpu_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, *split_lr(lr), beta1,
                                    beta2, eps, weight_decay, decoupled_weight_decay, maximize)
        return
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                  decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    hp, per, _ = _kernel_args("adax", kwargs)  # type: ignore[misc]
    _launch("adax", [params, grads, exp_avgs, exp_avg_sqs], state_steps, hp, per, fallback, kwargs)


def fused_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                  state_steps: list[Tensor], *, lr: float | Tensor, lr_decay: float, weight_decay: float,
                  eps: float, glove: bool, grad_clip_value: float | None, skip_nonfinite_rows: bool,
                  maximize: bool, rowwise: bool = False,
                  fallback: Callable[..., None] | None = None) -> None:
    """Adagrad, standard (== ``torch.optim.Adagrad``) or GloVe-style, in one C call.

    Standard: ``G += g^2; p -= clr*g/(sqrt(G) + eps)``; GloVe-style: ``u = clr*clip(g);
    p -= u/sqrt(G); G += u^2``; ``clr = lr/(1 + (t-1)*lr_decay)`` per tensor.  Same arguments
    and numbers as :func:`tigeropt.adagrad._multi_tensor_adagrad`; ``skip_nonfinite_rows`` runs in
    ``fallback``.
    ``rowwise=True`` (one accumulator per row) runs the row kernel of :mod:`tigeropt._cpu.rows`.
    """
    kwargs = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, glove=glove,
                  grad_clip_value=grad_clip_value, skip_nonfinite_rows=skip_nonfinite_rows, maximize=maximize)
    if not params:
        return
    if rowwise:  # one C call per tensor (rows kernel, every row); the others run the reference
        from .rows import fused_rows

        hyper = dict(kwargs, rowwise=True)
        rest = [i for i, (p, g, acc, s) in enumerate(zip(params, grads, state_sums, state_steps))
                if not fused_rows("adagrad", p, g, [acc], s, hyper, all_rows=True)]
        if rest:
            lists = [_pick(lst, rest) for lst in (params, grads, state_sums, state_steps)]
            _fallback(fallback, "adagrad", f"tensors {rest} are not plain contiguous CPU tensors of the "
                      "kernel's dtypes")(*lists, **hyper)
        return
    if glove and skip_nonfinite_rows:
        _fallback(fallback, "adagrad", "skip_nonfinite_rows is not in the kernel")(
            params, grads, state_sums, state_steps, **kwargs)
        return
    if compiling():
        torch.ops.tigeropt.cpu_adagrad(params, grads, state_sums, state_steps, *split_lr(lr), lr_decay,
                                       weight_decay, eps, glove, grad_clip_value, maximize)
        return
    hp, per, _ = _kernel_args("adagrad", dict(kwargs, rowwise=False))  # type: ignore[misc]
    _launch("adagrad", [params, grads, state_sums], state_steps, hp, per, fallback, kwargs)


# ---------------------------------------------------------------------------------------------- plans
def _kernel_args(name: str, hyper: dict[str, Any]
                 ) -> tuple[list[float], Callable[[array], array] | None, bool] | None:
    """(hp, per, needs_steps) of kernel ``name`` for these hyperparameters; None when it lacks an option.

    ``per`` maps the step values (after the increment) to the per-tensor scalars, ``needs_steps``
    says whether it reads them.  The same numbers as the launchers above compute.
    """
    lr_f = _scalar(hyper["lr"])
    gs = -1.0 if hyper["maximize"] else 1.0
    wd = hyper["weight_decay"]
    if name == "tiger":
        if hyper.get("lr_scaling") or hyper.get("accumulation_steps", 1) > 1 or hyper.get("nan_guard"):
            return None
        beta = hyper["beta"]
        return [beta, 1 - beta, wd, -lr_f, gs], None, False
    if name == "lion":
        b1, b2 = hyper["beta1"], hyper["beta2"]
        return [b1, 1 - b1, b2, 1 - b2, 1 - lr_f * wd, -lr_f, gs], None, False
    if name == "adax":
        b1, b2, eps, dec = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["decoupled_weight_decay"]
        l2, decoupled = float(wd != 0.0 and not dec), float(wd != 0.0 and dec)
        hp = [b1, 1 - b1, wd, l2, 1 - lr_f * wd, decoupled, -lr_f, gs]

        def adax_per(values: array) -> array:
            if values.count(values[0]) == len(values):  # the usual case: every tensor at the same step
                return array("d", adax_scalars(values[0], b2, eps)) * len(values)
            memo: dict[float, tuple[float, float, float]] = {}
            out = array("d")
            for t in values:
                sc = memo.get(t)
                if sc is None:
                    sc = memo[t] = adax_scalars(t, b2, eps)
                out.extend(sc)
            return out

        return hp, adax_per, True
    if name == "adagrad":
        if hyper.get("rowwise") or (hyper["glove"] and hyper["skip_nonfinite_rows"]):
            return None
        clip = hyper["grad_clip_value"]
        hp = [wd, float(wd != 0.0), hyper["eps"], gs, float(hyper["glove"]), float(clip) if clip is not None
              else 0.0, float(clip is not None)]
        decay = hyper["lr_decay"]

        def adagrad_per(values: array) -> array:
            if decay == 0.0:
                return array("d", [lr_f]) * len(values)
            return array("d", [lr_f / (1 + (t - 1) * decay) for t in values])

        return hp, adagrad_per, decay != 0.0
    return None


_STEP_CODES = {torch.float32: 0, torch.float64: 1}


def _plain_step_counts(steps: list[Tensor]) -> bool:
    """Whether a plan's C step counter takes these step counts (one-element contiguous CPU tensors of
    one dtype in _STEP_CODES)."""
    sd = steps[0].dtype
    return sd in _STEP_CODES and all(type(s) in _PLAIN and s.dtype is sd and s.is_cpu and s.numel() == 1
                                     and s.is_contiguous() for s in steps)


def _grads_fit(grads: list[Tensor], numel: array, dtype: torch.dtype) -> bool:
    """Whether a plan's kernel takes these gradients: dense, contiguous, the parameters' sizes and dtype
    (autograd gives them the parameters' dtype, but ``p.grad.data = t`` can change it, and the kernel
    must not read another dtype's bytes).  Gradients of plain tensors are plain: their type is not checked."""
    try:
        if not all(map(Tensor.is_contiguous, grads)):
            return False
    except RuntimeError:  # a sparse gradient
        return False
    return (array("q", map(Tensor.numel, grads)) == numel
            and all(map(operator.is_, map(_DTYPE, grads), itertools.repeat(dtype))))


class StepPlan:
    """The fused C step of one fixed list of tensors, with its pointer tables built once.

    :meth:`build` takes the parameters, states and step counts of a bucket (None when the kernels
    cannot take them all); :meth:`run` then reads only the gradients each step: it checks that
    they fit (contiguous, same sizes), increments the step counts in C and launches the kernel.
    The caller (the optimizer base) owns invalidation: a plan is only valid while the parameters
    and state tensors it holds are the ones in use, at the addresses it recorded (``p_ptrs``).
    """

    def __init__(self, name: str, lib: Any, code: int, params: list[Tensor], states: list[list[Tensor]],
                 steps: list[Tensor]) -> None:
        self.name = name
        self.n = len(params)
        self.fn = getattr(lib, f"tigeropt_{name}")
        self.steps_fn = lib.tigeropt_steps
        self.code = code
        self.dtype = params[0].dtype
        self.p_ptrs = _ptrs(params)
        self.state_ptrs = [_ptrs(s) for s in states]
        self.numel = array("q", map(Tensor.numel, params))
        self.step_ptrs = _ptrs(steps)
        self.step_code = _STEP_CODES[steps[0].dtype]
        self.values = array("d", bytes(8 * self.n))
        self.bump = [*params, *(t for s in states for t in s)]  # version counters to increment
        self.keep = (params, states, steps)  # the plan's pointers stay valid while it lives

    @staticmethod
    def build(name: str, params: list[Tensor], states: list[list[Tensor]],
              steps: list[Tensor]) -> StepPlan | None:
        lib = _load()
        if lib is None or not params or name not in NAMES:
            return None
        dummy_grads = params  # same dtype/sizes/layout as the gradients the kernels require
        groups, other = _split([params, dummy_grads, *states], bool(lib.tigeropt_has_f16()))
        if other or len(groups) != 1:
            return None
        if not _plain_step_counts(steps):
            return None
        return StepPlan(name, lib, next(iter(groups)), params, states, steps)

    def fits(self, grads: list[Tensor]) -> bool:
        """Whether the kernel takes these gradients (:func:`_grads_fit`)."""
        return _grads_fit(grads, self.numel, self.dtype)

    def run(self, grads: list[Tensor], hyper: dict[str, Any]) -> bool:
        """One step (step counts included); False (nothing done) when the options or gradients do not fit."""
        args = _kernel_args(self.name, hyper)
        if args is None or not self.fits(grads):
            return False
        hp, per, needs_steps = args
        values = self.values
        self.steps_fn(self.n, _addr(self.step_ptrs), self.step_code, _addr(values) if needs_steps else None)
        hp_arr = array("d", hp)
        g_ptrs = _ptrs(grads)  # (held in a name: the C call reads it)
        call: list[Any] = [self.n, self.code, _addr(self.p_ptrs), _addr(g_ptrs),
                           *[_addr(a) for a in self.state_ptrs], _addr(self.numel), _addr(hp_arr)]
        if per is not None:
            per_arr = per(values)
            call.append(_addr(per_arr))
        self.fn(*call, torch.get_num_threads())
        try:
            torch.autograd.graph.increment_version(self.bump)
        except RuntimeError:  # inference tensors have no version counter
            pass
        return True


# ---------------------------------------------------------------------------------------------- custom ops
# The launchers above as opaque torch.library ops (see tigeropt._ops): what torch.compile sees.  Inside
# an op the tensors are real; tensors the kernels cannot take directly (non-contiguous, another dtype,
# a tensor subclass) go through dense working copies in the kernels' dtypes, written back afterwards.


def _via_copies(launcher: Callable[..., None], nstates: int) -> Callable[..., None]:
    def run(params: list[Tensor], grads: list[Tensor], *rest: Any, **kwargs: Any) -> None:
        states, steps = [list(s) for s in rest[:nstates]], rest[nstates]
        if not params:
            return
        lists = [params, grads, *states]
        copies = []
        for i, p in enumerate(params):
            sd = _STATE.get(p.dtype, torch.float32)
            want = [p.dtype, p.dtype] + [sd] * nstates
            copies.append([torch.empty(p.shape, dtype=dt).copy_(lst[i]) for lst, dt in zip(lists, want)])
        launcher(*[[c[k] for c in copies] for k in range(len(lists))], steps, **kwargs)
        for i, c in enumerate(copies):
            for k in (0, *range(2, len(lists))):  # params and states (grads are read only)
                lists[k][i].copy_(c[k])

    return run


_MUT1 = ("params", "states")
_MUT2 = ("params", "exp_avgs", "exp_avg_sqs")


@torch.library.custom_op("tigeropt::cpu_tiger", mutates_args=_MUT1, device_types="cpu")
def _cpu_tiger_op(params: list[Tensor], grads: list[Tensor], states: list[Tensor], state_steps: list[Tensor],
                  lr: float, lr_tensor: Tensor | None, beta: float, weight_decay: float,
                  maximize: bool) -> None:
    fused_tiger(params, grads, states, state_steps, lr=join_lr(lr, lr_tensor), beta=beta,
                weight_decay=weight_decay, maximize=maximize, fallback=_via_copies(fused_tiger, 1))


@torch.library.custom_op("tigeropt::cpu_lion", mutates_args=_MUT1, device_types="cpu")
def _cpu_lion_op(params: list[Tensor], grads: list[Tensor], states: list[Tensor], state_steps: list[Tensor],
                 lr: float, lr_tensor: Tensor | None, beta1: float, beta2: float, weight_decay: float,
                 maximize: bool) -> None:
    fused_lion(params, grads, states, state_steps, lr=join_lr(lr, lr_tensor), beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, maximize=maximize, fallback=_via_copies(fused_lion, 1))


@torch.library.custom_op("tigeropt::cpu_adax", mutates_args=_MUT2, device_types="cpu")
def _cpu_adax_op(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 state_steps: list[Tensor], lr: float, lr_tensor: Tensor | None, beta1: float, beta2: float,
                 eps: float, weight_decay: float, decoupled_weight_decay: bool, maximize: bool) -> None:
    fused_adax(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=join_lr(lr, lr_tensor), beta1=beta1,
               beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
               maximize=maximize, fallback=_via_copies(fused_adax, 2))


@torch.library.custom_op("tigeropt::cpu_adagrad", mutates_args=_MUT1, device_types="cpu")
def _cpu_adagrad_op(params: list[Tensor], grads: list[Tensor], states: list[Tensor],
                    state_steps: list[Tensor],
                    lr: float, lr_tensor: Tensor | None, lr_decay: float, weight_decay: float, eps: float,
                    glove: bool, grad_clip_value: float | None, maximize: bool) -> None:
    fused_adagrad(params, grads, states, state_steps, lr=join_lr(lr, lr_tensor), lr_decay=lr_decay,
                  weight_decay=weight_decay, eps=eps, glove=glove, grad_clip_value=grad_clip_value,
                  skip_nonfinite_rows=False, maximize=maximize, fallback=_via_copies(fused_adagrad, 1))


for _op in (_cpu_tiger_op, _cpu_lion_op, _cpu_adax_op, _cpu_adagrad_op):
    _op.register_fake(lambda *args, **kwargs: None)  # in-place updates only: nothing to describe


# ---------------------------------------------------------------------------------------------- low precision
# The stores of tigeropt._lowp (stochastic rounding to bf16, block-scaled fp8 e4m3 encoding) in C, bit for
# bit as the torch code there; the low-precision step of the optimizer base uses them on its default path.
def _lowp_lib() -> Any:
    lib = _load()
    if lib is None:
        return None
    if not getattr(lib, "_lowp_declared", False):
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        lib.tigeropt_sr_bf16.argtypes = [i32, vp, vp, vp, vp, i32]
        lib.tigeropt_sr_bf16.restype = None
        lib.tigeropt_encode_e4m3.argtypes = [i32, vp, vp, vp, vp, vp, i32]
        lib.tigeropt_encode_e4m3.restype = None
        lib._lowp_declared = True
    return lib


def _plain(t: Tensor, dtype: torch.dtype) -> bool:
    return t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() and not t.is_sparse


def sr_bf16(src: Tensor, dst: Tensor, key: int) -> bool:
    """``dst.copy_(tigeropt._lowp.round_bf16(src, key))`` in C; False (nothing done) if it cannot."""
    lib = _lowp_lib()
    if lib is None or not (_plain(src, torch.float32) and _plain(dst, torch.bfloat16)
                           and src.numel() == dst.numel()):
        return False
    keep = (_ptrs([src]), _ptrs([dst]), array("q", [src.numel()]), array("Q", [key]))  # alive during the call
    lib.tigeropt_sr_bf16(1, *map(_addr, keep), torch.get_num_threads())
    return True


def encode_e4m3(src: Tensor, codes: Tensor, absmax: Tensor, key: int | None) -> bool:
    """``codes, absmax = tigeropt._lowp.encode_8bit(src, key)`` in place, in C; False if it cannot."""
    lib = _lowp_lib()
    if lib is None or not (_plain(src, torch.float32) and _plain(codes, torch.uint8)
                           and _plain(absmax, torch.float32) and codes.numel() == src.numel()
                           and absmax.numel() == -(-src.numel() // 256)):
        return False
    keep = (_ptrs([src]), _ptrs([codes]), _ptrs([absmax]), array("q", [src.numel()]))  # alive during the call
    keys = array("I", [key]) if key is not None else None
    lib.tigeropt_encode_e4m3(1, *map(_addr, keep), _addr(keys) if keys is not None else None,
                             torch.get_num_threads())
    return True


# ------------------------------------------------------------------------------------- low-precision step
# tigeropt_lowp_step (kernels.c): the whole low-precision step (bf16 parameters rounded stochastically,
# bf16 or 8-bit state) in one pass, bit for bit the reference low-precision step of the optimizer base.
_OPT_CODES = {"tiger": 0, "lion": 1, "adax": 2, "adagrad": 3}
_LOWP_PARAM_CODES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3}
_STATE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2}


def _lowp_step_lib() -> Any:
    lib = _load()
    if lib is None:
        return None
    if not getattr(lib, "_lowp_step_declared", False):
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        lib.tigeropt_lowp_step.argtypes = [i32, i32, i32, vp, vp, vp, vp, vp, vp, i32, i32, i32,
                                           ctypes.c_uint32, vp, vp, vp, vp, vp, vp, i32, i32]
        lib.tigeropt_lowp_step.restype = i32
        lib._lowp_step_declared = True
    return lib


@functools.cache
def _torch_bf16_nan() -> int:
    """The bf16 bits torch's fp32 -> bf16 conversion gives a NaN (0xffff from the vectorized x86 code,
    0x7fc0 from c10's scalar rounding): the kernel's round-to-nearest stores give the same."""
    return int(torch.full((64,), float("nan")).to(torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def lowp_absmax_len(numel: int, offset: int = 0) -> int:
    """Blocks of the 256-element grid of global element indices that ``numel`` elements starting at
    ``offset`` touch: the length of their 8-bit state's absmax (``nblocks(numel)`` for offset 0)."""
    return (offset + numel + 255) // 256 - offset // 256 if numel else 0


def _lowp_kind(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
               absmax: Sequence[Sequence[Tensor | None]], offsets: Sequence[int], i: int, f16: bool
               ) -> tuple[int, ...] | None:
    """(parameter dtype code, state kinds...) of tensor ``i`` when the kernel takes it, else None."""
    p, g = params[i], grads[i]
    code = _LOWP_PARAM_CODES.get(p.dtype)
    if (code is None or (code == 3 and not f16) or type(p) not in _PLAIN or type(g) not in _PLAIN
            or p.layout is not _STRIDED or g.layout is not _STRIDED or g.dtype is not p.dtype
            or not (p.is_cpu and g.is_cpu and p.is_contiguous() and g.is_contiguous())
            or g.numel() != p.numel() or offsets[i] < 0):
        return None
    kinds = [code]
    for s, am in zip(states, absmax):
        t, a = s[i], am[i]
        kind = _STATE_KINDS.get(t.dtype)
        if (kind is None or type(t) not in _PLAIN or t.layout is not _STRIDED or not t.is_cpu
                or not t.is_contiguous() or t.numel() != p.numel()):
            return None
        if kind == 2 and (a is None or type(a) not in _PLAIN or a.dtype is not torch.float32 or not a.is_cpu
                          or not a.is_contiguous() or a.numel() != lowp_absmax_len(p.numel(), offsets[i])):
            return None
        kinds.append(kind)
    return tuple(kinds)


def _lowp_uniform(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
                  absmax: Sequence[Sequence[Tensor | None]], offsets: Sequence[int], f16: bool
                  ) -> tuple[int, ...] | None:
    """The kinds of :func:`_lowp_kind` when every tensor has the same ones (the usual case, checked
    list-wise: microseconds per tensor less), else None."""
    dtype = params[0].dtype
    code = _LOWP_PARAM_CODES.get(dtype)
    if code is None or (code == 3 and not f16) or min(offsets) < 0:
        return None
    numel = list(map(Tensor.numel, params))
    kinds = [code]
    checks: list[tuple[Sequence[Any], torch.dtype]] = [(params, dtype), (grads, dtype)]
    for s, am in zip(states, absmax):
        kind = _STATE_KINDS.get(s[0].dtype)
        if kind is None or list(map(Tensor.numel, s)) != numel:
            return None
        kinds.append(kind)
        checks.append((s, s[0].dtype))
        if kind == 2:
            if any(a is None for a in am) or list(map(Tensor.numel, am)) != list(map(lowp_absmax_len, numel,
                                                                                      offsets)):
                return None
            checks.append((am, torch.float32))
    try:
        for lst, want in checks:
            if (not all(map(_PLAIN.__contains__, map(type, lst))) or any(t.dtype is not want for t in lst)
                    or not all(map(_IS_CPU, lst)) or not all(map(Tensor.is_contiguous, lst))):
                return None
    except RuntimeError:  # is_contiguous() of a sparse tensor
        return None
    if list(map(Tensor.numel, grads)) != numel:
        return None
    return tuple(kinds)


def lowp_step(name: str, params: Sequence[Tensor], grads: Sequence[Tensor],
              states: Sequence[Sequence[Tensor]], absmax: Sequence[Sequence[Tensor | None]],
              state_steps: Sequence[Tensor], hyper: dict[str, Any], *,
              param_index: Sequence[int], seed: int, stochastic_rounding: bool,
              offsets: Sequence[int] | None = None) -> list[int]:
    """One low-precision step of optimizer ``name`` in C on the tensors the kernel takes; returns the
    indices of the others (untouched: their step counts not incremented either).

    ``states[k][i]``: state ``k`` (the optimizer's ``state_keys`` order) of parameter ``i``, stored in
    fp32, bf16 or 8-bit codes (uint8, with ``absmax[k][i]`` its fp32 block maxima; None for the
    others); ``hyper``: the optimizer's keyword arguments (as for its foreach function); the step
    counts are incremented here.  The parameters (fp32, bf16 or fp16) and bf16/8-bit state are
    stored as :mod:`tigeropt._lowp` says, with the rounding bits of (``seed``, step after the
    increment, ``param_index[i]``, stream, element index) when ``stochastic_rounding``.
    ``offsets[i]`` (default 0): the global index of tensor ``i``'s first element, e.g. a DTensor
    shard's offset in the whole tensor: it is added to the element index of the hash, and the 8-bit
    blocks are the 256-element grid of global indices (a shard whose offset is not a multiple of 256
    has partial blocks at its ends; its ``absmax`` holds :func:`lowp_absmax_len` values).
    Bit for bit :meth:`tigeropt._base.TigerOptimizer._step_low_precision` (a shard: that step on the
    whole tensor, restricted to the shard, when its blocks do not straddle its ends).
    """
    n = len(params)
    everything = list(range(n))
    lib = _lowp_step_lib()
    if lib is None or n == 0 or name not in _OPT_CODES or compiling():
        return everything
    args = _kernel_args(name, hyper)
    if args is None:
        return everything
    hp, per, _ = args
    offs = [0] * n if offsets is None else [int(o) for o in offsets]
    f16 = bool(lib.tigeropt_has_f16())
    groups: dict[tuple[int, ...], list[int]] = {}
    other: list[int] = []
    steps_ok = (all(type(s) in _PLAIN and s.is_cpu and s.numel() == 1 and s.is_contiguous()
                    for s in state_steps)
                and len({s.dtype for s in state_steps}) == 1 and state_steps[0].dtype in _STEP_CODES)
    uniform = _lowp_uniform(params, grads, states, absmax, offs, f16) if steps_ok else None
    if uniform is not None and not (stochastic_rounding and uniform[0] == 3):
        groups[uniform] = everything
    else:
        for i in everything:
            kinds = _lowp_kind(params, grads, states, absmax, offs, i, f16) if steps_ok else None
            if kinds is None or (stochastic_rounding and kinds[0] == 3):
                other.append(i)
            else:
                groups.setdefault(kinds, []).append(i)
    hp_arr = array("d", hp)
    nstates = len(states)
    for kinds, idx in groups.items():
        code, k1, k2 = kinds[0], kinds[1], kinds[2] if nstates > 1 else 0
        steps = _pick(state_steps, idx)
        step_ptrs = _ptrs(steps)
        values = array("d", bytes(8 * len(idx)))
        lib.tigeropt_steps(len(idx), _addr(step_ptrs), _STEP_CODES[steps[0].dtype], _addr(values))
        per_arr = per(values) if per is not None else None
        p_ptrs, g_ptrs = _ptrs(_pick(params, idx)), _ptrs(_pick(grads, idx))
        s_ptrs = [_ptrs(_pick(s, idx)) for s in states]
        a_ptrs = [array("Q", [0 if a[i] is None else a[i].data_ptr() for i in idx]) for a in absmax]
        none = None
        keep = (array("q", [params[i].numel() for i in idx]), array("q", [offs[i] for i in idx]),
                array("q", [param_index[i] for i in idx]))
        rc = lib.tigeropt_lowp_step(
            _OPT_CODES[name], len(idx), code, _addr(p_ptrs), _addr(g_ptrs), _addr(s_ptrs[0]),
            _addr(a_ptrs[0]) if k1 == 2 else none, _addr(s_ptrs[1]) if nstates > 1 else none,
            _addr(a_ptrs[1]) if nstates > 1 and k2 == 2 else none, k1, k2, int(stochastic_rounding),
            seed & 0xFFFFFFFF, _addr(keep[0]), _addr(keep[1]), _addr(keep[2]), _addr(values),
            _addr(hp_arr), _addr(per_arr) if per_arr is not None else none, _torch_bf16_nan(),
            torch.get_num_threads())
        if rc != 0:  # not expected (checked above): undo the step counts, hand the tensors back
            torch._foreach_sub_(steps, 1)
            other.extend(idx)
            continue
        bump = [*_pick(params, idx), *(s[i] for s in states for i in idx),
                *(a[i] for a in absmax for i in idx if a[i] is not None)]
        try:
            torch.autograd.graph.increment_version(bump)
        except RuntimeError:  # inference tensors have no version counter
            pass
    return sorted(other)


class LowpStepPlan:
    """:func:`lowp_step` of one fixed list of tensors, its pointer tables built once (the cached step
    plans of the optimizer base, for groups with low-precision state or stochastic rounding).

    :meth:`build` takes what :func:`lowp_step` takes but the gradients and the hyperparameters, and
    returns None unless the kernel takes every tensor in one launch (one parameter dtype, one storage
    per state key: the usual group); :meth:`run` then reads only the gradients each step: it checks
    that they fit (dense, contiguous, the parameters' sizes), increments the step counts in C and
    launches the kernel, bit for bit :func:`lowp_step`.  As for :class:`StepPlan`, the caller owns
    invalidation (the tensors it holds must stay the ones in use, at the addresses it recorded).
    """

    def __init__(self, name: str, lib: Any, kinds: tuple[int, ...], params: list[Tensor],
                 states: list[list[Tensor]], absmax: list[list[Tensor | None]], steps: list[Tensor],
                 param_index: Sequence[int], offsets: Sequence[int], seed: int, stochastic_rounding: bool
                 ) -> None:
        self.name = name
        self.n = n = len(params)
        self.fn = lib.tigeropt_lowp_step
        self.steps_fn = lib.tigeropt_steps
        self.opt = _OPT_CODES[name]
        self.code, self.k1 = kinds[0], kinds[1]
        self.k2 = kinds[2] if len(states) > 1 else 0
        self.two = len(states) > 1
        self.dtype = params[0].dtype
        self.p_ptrs = _ptrs(params)
        self.s_ptrs = [_ptrs(s) for s in states]
        self.a_ptrs = [_ptrs(a) if k == 2 else None for a, k in zip(absmax, kinds[1:])]  # type: ignore[arg-type]
        self.numel = array("q", map(Tensor.numel, params))
        self.offsets = array("q", [int(o) for o in offsets])
        self.pidx = array("q", param_index)
        self.step_ptrs = _ptrs(steps)
        self.step_code = _STEP_CODES[steps[0].dtype]
        self.values = array("d", bytes(8 * n))
        self.sr = int(stochastic_rounding)
        self.seed = seed & 0xFFFFFFFF
        self.bf16_nan = _torch_bf16_nan()
        self.bump = [*params, *(t for s in states for t in s),
                     *(a for am in absmax for a in am if a is not None)]
        self.keep = (params, states, absmax, steps)  # the plan's pointers stay valid while it lives

    @staticmethod
    def build(name: str, params: list[Tensor], states: list[list[Tensor]], absmax: list[list[Tensor | None]],
              steps: list[Tensor], *, param_index: Sequence[int], seed: int, stochastic_rounding: bool,
              offsets: Sequence[int] | None = None) -> LowpStepPlan | None:
        lib = _lowp_step_lib()
        if lib is None or not params or name not in _OPT_CODES:
            return None
        offs = [0] * len(params) if offsets is None else [int(o) for o in offsets]
        f16 = bool(lib.tigeropt_has_f16())
        kinds = _lowp_uniform(params, params, states, absmax, offs, f16)  # the params stand in for the grads
        if kinds is None or (stochastic_rounding and kinds[0] == 3):
            return None
        if not _plain_step_counts(steps):
            return None
        return LowpStepPlan(name, lib, kinds, params, states, absmax, steps, param_index, offs, seed,
                            stochastic_rounding)

    def fits(self, grads: list[Tensor]) -> bool:
        """Whether the kernel takes these gradients (:func:`_grads_fit`)."""
        return _grads_fit(grads, self.numel, self.dtype)

    def run(self, grads: list[Tensor], hyper: dict[str, Any]) -> bool:
        """One step (step counts included); False (nothing done) when the options or gradients do not fit."""
        args = _kernel_args(self.name, hyper)
        if args is None or not self.fits(grads):
            return False
        hp, per, _ = args
        values = self.values
        self.steps_fn(self.n, _addr(self.step_ptrs), self.step_code, _addr(values))
        per_arr = per(values) if per is not None else None
        hp_arr = array("d", hp)
        g_ptrs = _ptrs(grads)  # (held in a name: the C call reads it)
        a1, a2 = self.a_ptrs[0], self.a_ptrs[1] if self.two else None
        rc = self.fn(self.opt, self.n, self.code, _addr(self.p_ptrs), _addr(g_ptrs), _addr(self.s_ptrs[0]),
                     _addr(a1) if a1 is not None else None, _addr(self.s_ptrs[1]) if self.two else None,
                     _addr(a2) if a2 is not None else None, self.k1, self.k2, self.sr, self.seed,
                     _addr(self.numel), _addr(self.offsets), _addr(self.pidx), _addr(values), _addr(hp_arr),
                     _addr(per_arr) if per_arr is not None else None, self.bf16_nan, torch.get_num_threads())
        if rc != 0:  # not expected (checked at build): undo the step counts
            torch._foreach_sub_(list(self.keep[3]), 1)
            return False
        try:
            torch.autograd.graph.increment_version(self.bump)
        except RuntimeError:  # inference tensors have no version counter
            pass
        return True
