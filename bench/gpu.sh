#!/usr/bin/env bash
# GPU checks of smoothmax in one go (issue 4).
#
#   bench/gpu.sh --compile-only   compile every CUDA kernel instantiation with
#                                 nvcc for sm_90 (no GPU needed); non-zero exit
#                                 on a compile error
#   bench/gpu.sh                  on a GPU machine: install carried wheels if
#                                 needed, build the package in place, run the
#                                 GPU engine tests, the shared suite (not slow)
#                                 on the CuPy / torch-CUDA backends, then the GPU
#                                 benchmark; JSON and logs go to $OUT when set.
#
# Environment: SMX_ARCH (default sm_90), SMX_WHEELS (default .whl: a folder of
# wheels for packages the GPU image lacks, e.g. array-api-compat, pysdtw,
# torch-struct, pytorch-crf; nothing is fetched from the network),
# SMX_BENCH_ARGS (extra arguments for bench/bench_gpu.py), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}

if [[ "${1:-}" == "--compile-only" ]]; then
    exec "$PY" -m smoothmax._cuda.compile_check --arch "${SMX_ARCH:-sm_90}"
fi

T0=$(date +%s)
# JAX must not take most of the GPU memory in each of the test workers
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUTDIR=${OUT:-}
LOG=/dev/null
if [[ -n "$OUTDIR" ]]; then mkdir -p "$OUTDIR"; LOG="$OUTDIR/gpu_log.txt"; : >"$LOG"; fi
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
STATUS=0

say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

# 1. packages the image may lack, from carried wheels only
WHEELS=${SMX_WHEELS:-.whl}
if [[ -d "$WHEELS" ]]; then
    for pkg in array-api-compat array-api-strict pysdtw pytorch-crf torch-struct tslearn; do
        mod=${pkg//-/_}; [[ $pkg == pytorch-crf ]] && mod=torchcrf
        if ! "$PY" -c "import $mod" 2>/dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$pkg" >>"$LOG" 2>&1 \
                && say "installed $pkg from $WHEELS" || say "could not install $pkg (skipped)"
        fi
    done
fi

# 2. build the compiled CPU core in place (the shared suite imports it)
say "building the package in place"
if ! "$PY" setup.py build_ext --inplace -j 16 >>"$LOG" 2>&1; then
    say "build_ext failed; trying pip install -e . --no-build-isolation"
    "$PY" -m pip install -q -e . --no-build-isolation --no-deps >>"$LOG" 2>&1 || { say "BUILD FAILED"; STATUS=1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 3. compile the kernels once (NVRTC through CuPy, then CuPy's disk cache)
say "compiling kernels through CuPy"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import time, cupy
from smoothmax._cuda import engine, _source
t = time.perf_counter()
for dt in ("float32", "float64"):
    for name in _source.name_expressions(dt):
        engine._kernel(cupy.cuda.Device().id, dt, name)
print(f"compiled {2 * len(_source.name_expressions('float32'))} kernels in {time.perf_counter() - t:.1f} s")
PYEOF
[[ ${PIPESTATUS[0]} -ne 0 ]] && { say "KERNEL COMPILATION FAILED"; STATUS=1; }

JUNIT=()
# 4. the GPU engine tests (the CPU emulation tests are skipped here: CPU-only)
say "pytest tests/test_cuda_engine.py tests/test_engine_contract.py -m gpu"
[[ -n "$OUTDIR" ]] && JUNIT=(--junitxml "$OUTDIR/junit_cuda_engine.xml")
timeout 120 "$PY" -m pytest -q --maxfail=5 -m gpu tests/test_cuda_engine.py tests/test_engine_contract.py \
    -p no:cacheprovider "${JUNIT[@]}" 2>&1 \
    | tail -n 40 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} -ne 0 ]] && { say "GPU ENGINE TESTS FAILED"; STATUS=1; }

# 5. the shared suite (its fixtures add the cupy and torch-cuda backends when CUDA is present)
say "pytest tests -m 'not slow' (shared suite)"
[[ -n "$OUTDIR" ]] && JUNIT=(--junitxml "$OUTDIR/junit_shared.xml")
XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))")
# about 130-160 s with 15 workers on the 16-core H200 machine (bench/results/gpu_tests_h200.md)
timeout 240 "$PY" -m pytest -q -m "not slow" -k "not emulated" tests -p no:cacheprovider \
    "${XDIST[@]}" "${JUNIT[@]}" 2>&1 | tail -n 40 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} -ne 0 ]] && { say "SHARED SUITE FAILED (or timed out)"; STATUS=1; }

# 6. the benchmark
say "bench/bench_gpu.py"
BENCH_JSON=()
[[ -n "$OUTDIR" ]] && BENCH_JSON=(--json "$OUTDIR/bench_gpu.json")
timeout 100 "$PY" bench/bench_gpu.py "${BENCH_JSON[@]}" ${SMX_BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} -ne 0 ]] && { say "BENCHMARK FAILED (or timed out)"; STATUS=1; }

say "done, status $STATUS"
exit $STATUS
