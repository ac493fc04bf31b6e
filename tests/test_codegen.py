"""The Triton kernels compiled ahead of time for sm_80/sm_90 with the installed Triton: no GPU needed.

The compilation runs in a fresh interpreter (this test session runs Triton under TRITON_INTERPRET=1,
where ``@triton.jit`` makes interpreted functions that cannot be compiled); see
``tigeropt.kernels._aot`` for what is checked.  The default run compiles a representative subset
(26 variants, the low-precision ones included: about 30 s on one loaded core);
``python -m tigeropt.kernels._aot --full`` compiles every variant (optimizer x dtype x alignment x
flags x arch, and the low-precision variants: about 1,250) and is also run by
``pytest -m codegen_full``.  The row kernels (lazy rows, sparse gradients, row-wise Adagrad) have
their own variant source of the same checker, ``tigeropt.kernels._aot_rows`` (same options).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the GPU kernels cannot be compiled ahead of time",
                allow_module_level=True)

import tigeropt  # noqa: E402
from tigeropt import kernels  # noqa: E402

SRC = str(Path(tigeropt.__file__).resolve().parents[1])


def _python(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter without TRITON_INTERPRET, this checkout's tigeropt first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _aot(*args: str) -> subprocess.CompletedProcess:
    return _python("-m", "tigeropt.kernels._aot", *args)


@pytest.fixture(scope="module")
def _ptxas() -> None:
    from tigeropt.kernels import _aot as aot  # finds the ptxas binaries; compiles nothing

    if not aot.ptxas_paths():
        pytest.skip("triton has no ptxas here (set TRITON_PTXAS_PATH): cannot compile for sm_80/sm_90")


def test_representative_variants_compile_to_vector_loops_without_spills(_ptxas: None) -> None:
    out = _aot()
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ok ", "FAIL"))]
    assert len(lines) >= 15 and all(ln.startswith("ok ") for ln in lines)
    # fp32 launches: only 128-bit accesses in the loop; 16-bit ones: 64-bit (16-bit streams) and 128-bit
    assert any("fp32-aligned" in ln and "loop access bits [128]," in ln for ln in lines)
    assert any("bf16-aligned" in ln and "loop access bits [64, 128]," in ln for ln in lines)


def test_the_checker_rejects_the_old_16_bit_tiles(_ptxas: None) -> None:
    """BLOCK=2048 with 8 warps for bf16 puts the fp32 state stores through shared memory: the check
    must see it (otherwise the test above could pass on any code)."""
    code = ("import torch\nfrom tigeropt.kernels import _aot, _common\n"
            "with _common.use_launch_config(_common.LaunchConfig(2048, 8192, 8)):\n"
            "    r = _aot.run([_aot.Variant('tiger', torch.bfloat16)], verbose=False)[0]\n"
            "print('PROBLEMS', r.problems)\n")
    out = _python("-c", code, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shared" in out.stdout and "bar.sync" in out.stdout


@pytest.mark.codegen_full
def test_every_variant(_ptxas: None) -> None:
    out = _aot("--full")
    assert out.returncode == 0, out.stdout[-8000:]


@pytest.mark.skipif(not kernels.triton_usable(), reason=kernels.triton_status())
def test_misaligned_tensor_gets_an_aligned_copy_and_the_others_keep_vector_units() -> None:
    from tigeropt.kernels import _common
    from tigeropt.kernels.lion import fused_lion
    from tigeropt.lion import _single_tensor_lion

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flat = torch.randn(1 + 300 + 64, device=device)
    params = [flat[1:301], torch.randn(64, device=device)]  # params[0] starts 4 bytes past a 16-byte boundary
    assert params[0].data_ptr() % 16 and params[1].data_ptr() % 16 == 0
    grads = [torch.randn(p.shape, device=device) for p in params]
    m = [torch.zeros_like(p) for p in params]
    launch = _common.prepare(params, grads, [m])
    assert launch is not None and launch.units[0] == 4 and launch.units[2] == 4  # 16-byte units kept
    ref_p, ref_m = [p.clone() for p in params], [t.clone() for t in m]
    steps = [torch.tensor(1.0) for _ in params]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    with _common.use_launch_config(_common.LaunchConfig(block=64, chunk=128, num_warps=4)):
        fused_lion(params, grads, m, steps, **kw)
    _single_tensor_lion(ref_p, grads, ref_m, steps, **kw)
    for a, b in zip(params + m, ref_p + ref_m):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ row kernels
def _aot_rows(*args: str) -> subprocess.CompletedProcess:
    return _python("-m", "tigeropt.kernels._aot_rows", *args)


def test_row_kernels_compile_to_vector_loops_without_shared_memory_or_spills(_ptxas: None) -> None:
    """tigeropt.kernels.rows (lazy rows, sparse gradients, row-wise Adagrad) for sm_80/sm_90: 128-bit
    accesses in every loop when the row length is a multiple of 16, no shared memory, no spills,
    at most 64 registers."""
    out = _aot_rows()
    print(out.stdout[-4000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ok ", "FAIL"))]
    assert len(lines) >= 7 and all(ln.startswith("ok ") for ln in lines)
    assert any("-aligned-" in ln and "access bits [128]," in ln for ln in lines)
    assert any("rowwise" in ln and "3 loops" in ln for ln in lines)  # scan + row-wise Adagrad's two passes


def test_the_row_checker_rejects_the_old_row_tile(_ptxas: None) -> None:
    """The first row tile (128 elements over 4 warps: one 32-bit element per thread, each scan block
    reduced through shared memory) must fail the check (otherwise the test above could pass on any code)."""
    code = ("import torch\nfrom tigeropt.kernels import _aot_rows, rows\n"
            "rows.ROW_BLOCK, rows.ROW_WARPS = 128, 4\n"
            "v = _aot_rows.RowVariant('tiger', torch.float32, True, (('HAS_IDX', True),))\n"
            "print('PROBLEMS', _aot_rows.run([v], verbose=False)[0].problems)\n")
    out = _python("-c", code, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "narrower than 128 bits" in out.stdout and "shared" in out.stdout


@pytest.mark.codegen_full
def test_every_row_variant(_ptxas: None) -> None:
    out = _aot_rows("--full")
    assert out.returncode == 0, out.stdout[-8000:]
