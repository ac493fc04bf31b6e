"""Memory safety of the C kernels' launchers: inputs the kernels must not take as they are.

Found by running the C-path tests and adversarial inputs with the library built with
``TIGEROPT_CFLAGS="-fsanitize=address,undefined,float-cast-overflow -g"`` (python under
``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``); each test here fails (or read out of bounds)
without its fix.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest
import torch

import tigeropt
from tigeropt import _cpu
from tigeropt._cpu import rows as cpu_rows

if _cpu._find_compiler() is None or not _cpu.available():
    pytest.skip("the fused CPU step cannot be built here", allow_module_level=True)


def _unplanned(cls: type) -> type:
    """The same optimizer with plans switched off (every step takes the plain route)."""
    return type(f"Unplanned{cls.__name__}", (cls,), {"_build_plan": lambda self, *args: None})


# (parameter dtype, the dtype ``p.grad.data = ...`` swaps in, options): the fp32 C plan, the fp32
# low-precision plan (8-bit state) and the bf16 one (stochastic rounding)
SWAPS = [(torch.float32, torch.bfloat16, {}),
         (torch.float32, torch.bfloat16, dict(state_precision="8bit")),
         (torch.bfloat16, torch.float32, dict(stochastic_rounding=True, sr_seed=3))]


@pytest.mark.parametrize("dtype,other,kwargs", SWAPS, ids=["fp32", "fp32-8bit", "bf16-sr"])
def test_planned_step_with_a_gradient_of_another_dtype_equals_the_plain_step(
        dtype: torch.dtype, other: torch.dtype, kwargs: dict[str, Any]) -> None:
    """``p.grad.data = t`` gives a gradient another dtype (autograd checks only ``p.grad = t``).  The
    cached C plans checked the gradients' sizes, not their dtype: a bf16 gradient was read as fp32
    (twice its bytes: a heap-buffer-overflow read under ASan), an fp32 one as bf16.  Now the plan
    does not fit and the step takes the plain route, as without plans."""
    results = []
    for cls in (tigeropt.Tiger, _unplanned(tigeropt.Tiger)):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in (4096, 300)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(params, lr=0.01, **kwargs)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                if step >= 2:  # after plans were built
                    p.grad.data = p.grad.data.to(other)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for planned, plain in zip(*results):
        assert torch.equal(planned, plain)


HYPER = dict(lr=0.1, beta=0.9, weight_decay=0.1, maximize=False)


def test_row_kernel_checks_indices_flagged_coalesced_out_of_range_inside() -> None:
    """torch trusts ``is_coalesced=True`` without a check; the kernel checked only the first and last
    index of such a gradient (sorted, they bound the others): an index out of range between them was
    written (SEGV under ASan).  Now every index is checked: IndexError, nothing changed."""
    p, m = torch.randn(6, 3), torch.randn(6, 3)
    p0, m0 = p.clone(), m.clone()
    g = torch.sparse_coo_tensor(torch.tensor([[0, 900, 5]]), torch.ones(3, 3), (6, 3), check_invariants=False,
                                is_coalesced=True)
    with pytest.raises(IndexError, match="out of range for 6 rows"):
        cpu_rows.fused_rows("tiger", p, g, [m], torch.tensor(1.0), HYPER)
    assert torch.equal(p, p0) and torch.equal(m, m0)


@pytest.mark.parametrize("rows", [[4, 1, 4, 0, 5], [0, 2, 2, 2, 5], [5, 3, 1]])
def test_row_kernel_sorts_indices_flagged_coalesced_that_are_not(rows: list[int]) -> None:
    """Indices flagged coalesced but out of order or repeated: the kernel updated each listed row as
    given (a row twice, or two threads on one row); now it takes them as uncoalesced ones (sorted,
    repeats summed), the update of the truly coalesced gradient."""
    gen = torch.Generator().manual_seed(1)
    p, m = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    values = torch.randn(len(rows), 3, generator=gen)
    results = []
    for flag in (True, False):
        g = torch.sparse_coo_tensor(torch.tensor([rows]), values, (6, 3), check_invariants=False,
                                    is_coalesced=flag)
        if not flag:
            g = g.coalesce()
        pc, mc = p.clone(), m.clone()
        assert cpu_rows.fused_rows("tiger", pc, g, [mc], torch.tensor(1.0), HYPER)
        results.append((pc, mc))
    (p1, m1), (p2, m2) = results
    assert torch.equal(p1, p2) and torch.equal(m1, m2)


def test_low_precision_c_step_hashes_huge_float64_step_counts_as_the_reference() -> None:
    """Stochastic rounding keys hash the step count mod 2^32; a float64 step count of 1e19 (a
    finite step >= 0, which load_state_dict accepts) must give the reference's bits."""
    results = []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # float64 step counts (float32 ones >= 2^56 are 0 mod 2^32)
    try:
        for kw in ({}, dict(foreach=False)):
            gen = torch.Generator().manual_seed(0)
            w = torch.nn.Parameter(torch.randn(1000, generator=gen).to(torch.bfloat16))
            opt = tigeropt.Tiger([w], stochastic_rounding=True, **kw)
            w.grad = torch.randn(1000, generator=gen).to(torch.bfloat16)
            opt.step()
            opt.state[w]["step"].fill_(1e19)
            opt.step()
            results.append(w.detach().clone())
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(sys.platform == "win32", reason="uses a /bin/sh wrapper as the compiler")
def test_extra_compile_flags_reach_the_compiler_and_name_the_build(tmp_path: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TIGEROPT_CFLAGS (the sanitizer runs' hook) is appended to every flag set and is part of the
    build's cache key (a sanitized build never replaces or shadows the plain one)."""
    log = tmp_path / "args.log"
    fake = tmp_path / "cc-log"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\necho refused >&2\nexit 1\n')
    fake.chmod(0o755)
    names = []
    for flags in ("", "-DTIGEROPT_TEST_FLAG=1 -g"):
        monkeypatch.setenv("TIGEROPT_CFLAGS", flags)
        cache = tmp_path / f"cache{len(names)}"
        with pytest.raises(RuntimeError, match="refused"):
            _cpu.build(cache=cache, compiler=str(fake))
        names.append(sorted(f.name for f in cache.glob("*.failed")))
    calls = [line.split() for line in log.read_text().splitlines() if "-shared" in line]
    n = len(_cpu._FLAG_SETS)
    assert len(calls) == 2 * n
    assert all("-DTIGEROPT_TEST_FLAG=1" not in c for c in calls[:n])
    assert all(c[c.index("-o") - 2:c.index("-o")] == ["-DTIGEROPT_TEST_FLAG=1", "-g"] for c in calls[n:])
    assert len(names[0]) == len(names[1]) == n and not set(names[0]) & set(names[1])
