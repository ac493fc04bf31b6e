#!/usr/bin/env bash
# One-shot GPU validation of tigeropt: one command on a CUDA machine, no network, under 10 minutes.
#
#   bash benchmarks/gpu_check.sh              # from anywhere; uses $PYTHON (default: python)
#
# 1. pytest -m gpu: CUDA parity of every kernel with the reference, CUDA-graph capture (kernels and a
#    compiled capturable step), no recompilation when lr changes, compiled steps, 2,000 small tensors,
#    and (tests/test_lowp_triton.py) the low-precision kernel variants (stochastic rounding, bf16 and
#    8-bit state) bit for bit against the reference low-precision step on the GPU
# 2. the AOT codegen check of the Triton kernels with this machine's Triton (tigeropt.kernels._aot,
#    and tigeropt.kernels._aot_rows for the row kernels of lazy rows and sparse gradients)
# 3. benchmarks/bench_step.py on the GPT-2-small, ~1B-parameter, 2,000-tiny-tensor (host) and
#    2,000-small-tensor layouts: every tigeropt path against torch's fused/foreach AdamW and Adagrad
#    and the installed peers (lion-pytorch, bitsandbytes, pytorch_optimizer)
# 4. benchmarks/bench_lazy.py on a 1M x 512 table (1% of rows touched): dense vs lazy steps of every
#    optimizer on the Triton kernels, each lazy step first checked against the reference path
# 5. compute-sanitizer (memcheck) on one fused step of each optimizer (plain and low precision:
#    bf16 parameters with stochastic rounding and 8-bit state), where it is installed
#
# Writes benchmarks/results/<date>-<gpu>.md (device, driver, python/torch/triton versions, each
# stage's result and the benchmark tables) and prints its path.  Each stage has its own time limit,
# so the whole run stays under 10 minutes even when a stage hangs; a failing stage is reported, and
# the script exits non-zero, but the other stages still run.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
START=$(date +%s)
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
STATUS=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    exit 2
fi

SLUG=$("$PY" -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
DATE=$(date +%F)
OUTDIR="$ROOT/benchmarks/results"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/$DATE-$SLUG.md"

elapsed() { echo $(( $(date +%s) - START )); }

stage() {  # stage <title> <seconds> <log> <command...>: run with a time limit, record the outcome
    local title="$1" limit="$2" log="$3"
    shift 3
    echo "== $title (limit ${limit}s, at $(elapsed)s)" >&2
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -eq 0 ]; then
        echo "- $title: PASS (${took}s)" >>"$TMP/summary"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "- $title: TIMEOUT after ${limit}s" >>"$TMP/summary"; STATUS=1
    else
        echo "- $title: FAIL (exit $rc, ${took}s)" >>"$TMP/summary"; STATUS=1
    fi
    tail -n 5 "$log" >&2
}

# ------------------------------------------------------------------------------------ 0. versions
"$PY" - >"$TMP/versions" 2>&1 <<'EOF'
import platform, subprocess, torch
lines = [f"- device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
         f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)",
         f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
try:
    import triton
    lines.append(f"- triton {triton.__version__}")
except ImportError:
    lines.append("- triton: not installed")
for mod in ("lion_pytorch", "bitsandbytes", "pytorch_optimizer"):
    try:
        from importlib.metadata import version
        lines.append(f"- {mod} {version(mod.replace('_', '-'))}")
    except Exception:
        lines.append(f"- {mod}: not installed")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    lines.append(f"- driver, max SM/memory clocks: {smi.stdout.strip()}")
except Exception as exc:
    lines.append(f"- nvidia-smi: unavailable ({exc})")
print("\n".join(lines))
EOF
cat "$TMP/versions" >&2

# ------------------------------------------------------------------------------------ 1. pytest -m gpu
stage "pytest -m gpu" 190 "$TMP/pytest.log" \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --no-header -rfE tests

# ------------------------------------------------------------------------------------ 2. AOT codegen
stage "AOT codegen check (tigeropt.kernels._aot)" 45 "$TMP/codegen.log" \
    "$PY" -m tigeropt.kernels._aot

stage "AOT codegen check of the row kernels (tigeropt.kernels._aot_rows)" 30 "$TMP/codegen_rows.log" \
    "$PY" -m tigeropt.kernels._aot_rows

# ------------------------------------------------------------------------------------ 3. benchmark
stage "bench_step.py (gpt2, 1b, host, small, small-flat)" 150 "$TMP/bench.log" \
    "$PY" benchmarks/bench_step.py --device cuda --layouts gpt2,1b,host,small,small-flat --steps 20 \
    --warmup 5 --row-seconds 3 --no-reference --out "$TMP/bench"

# ------------------------------------------------------------------------------------ 4. lazy rows
stage "bench_lazy.py (1M x 512 table, 1% of rows touched)" 90 "$TMP/lazy.log" \
    "$PY" benchmarks/bench_lazy.py --devices cuda --reps 10 --warmup 2

# ------------------------------------------------------------------------------------ 5. compute-sanitizer
if command -v compute-sanitizer >/dev/null 2>&1; then
    cat >"$TMP/one_step.py" <<'EOF'
import torch, tigeropt
LOWP = dict(stochastic_rounding=True, state_precision="8bit")
for cls, kw in ((tigeropt.Tiger, {}), (tigeropt.Lion, {}), (tigeropt.AdaX, {}), (tigeropt.Adagrad, {}),
                (tigeropt.Adagrad, {"glove": True})):
    for dtype, lowp in ((torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, LOWP)):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in (4097, (33, 65), 1)]
        opt = cls(params, **kw, **lowp)
        assert opt._path(opt.param_groups[0], params[0].device, dtype) == "fused"
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
torch.cuda.synchronize()
print("one fused step per optimizer and dtype: done")
EOF
    stage "compute-sanitizer memcheck (one fused step per optimizer)" 60 "$TMP/sanitizer.log" \
        compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" "$TMP/one_step.py"
else
    echo "- compute-sanitizer: not installed here (skipped)" >>"$TMP/summary"
    echo "no compute-sanitizer" >"$TMP/sanitizer.log"
fi

# ------------------------------------------------------------------------------------ report
{
    echo "# GPU check: $(head -n 1 "$TMP/versions" | sed 's/^- device: //')"
    echo
    echo "- date: $DATE; command: \`bash benchmarks/gpu_check.sh\`; total $(elapsed) s"
    cat "$TMP/versions"
    echo
    echo "## Stages"
    echo
    cat "$TMP/summary"
    echo
    echo "## pytest -m gpu"
    echo
    echo '```'
    tail -n 25 "$TMP/pytest.log"
    echo '```'
    echo
    echo "## AOT codegen check"
    echo
    echo '```'
    tail -n 25 "$TMP/codegen.log"
    tail -n 10 "$TMP/codegen_rows.log"
    echo '```'
    echo
    echo "## Lazy rows (bench_lazy.py)"
    echo
    grep -E '^(\||[0-9]|FAIL)' "$TMP/lazy.log" || tail -n 20 "$TMP/lazy.log"
    echo
    echo "## compute-sanitizer"
    echo
    echo '```'
    tail -n 15 "$TMP/sanitizer.log"
    echo '```'
    echo
    echo "## Step benchmark"
    echo
    BENCH_MD=$(ls "$TMP"/bench/*.md 2>/dev/null | head -n 1)
    if [ -n "$BENCH_MD" ]; then
        sed '1s/^# /### /' "$BENCH_MD"
        PNG="${BENCH_MD%.md}.png"
        [ -f "$PNG" ] && cp "$PNG" "${REPORT%.md}.png"
    else
        echo "No benchmark table was written; the end of its log:"
        echo '```'
        tail -n 40 "$TMP/bench.log"
        echo '```'
    fi
} >"$REPORT"

echo "wrote $REPORT ($(elapsed) s)"
cat "$TMP/summary"
exit $STATUS
