#!/usr/bin/env bash
# One-shot GPU check, for a machine with a GPU and no network: the ops' tests on CUDA (with an
# M*K > 2^31 GEMM), the sm_90 codegen report, the gemm, attention, decode and rope benchmarks,
# and the whole model (e2e: NeMo-12B with random weights, fp8 / bf16 reference / HF eager /
# HF + quantize_), in under 8 minutes (the stage limits add up to 480 s; each benchmark suite
# stops starting cases when its budget runs out and lists the rest as not run). Writes logs,
# CSVs and summary.md to RESULTS_DIR (default benchmarks/results/), prints short tables last,
# and exits non-zero if any stage failed.
#
# e2e writes NeMo-12B's random weights once as a 24 GB bf16 checkpoint (to /dev/shm when it has
# room, else $TMPDIR), which all four implementations read: the same weights for each, at the
# cost of ~15-25 s of its 80 s; it needs ~80 GB of GPU memory (the fp32 reference its checks
# compare with stays loaded). The e2e fp8 case runs first, reusing the configs the gemm stage
# tuned (the autotuner's JSON cache).
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
start=$SECONDS
marker=$(mktemp)
STATUS=()
FAILED=0

stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to RESULTS/NAME.log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && FAILED=1
    STATUS+=("$name: exit $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (timed out)')")
    tail -n 3 "$RESULTS/$name.log"
}

{
    date -u +"date %Y-%m-%dT%H:%MZ"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
} >"$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

# Kernel compiles dominate the tests' time: spread them over processes where xdist is there.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage tests 190 env FP8NEMO_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
    tests/test_quantize.py tests/test_fp8_gemm.py tests/test_rope.py tests/test_attention.py \
    tests/test_decode.py tests/test_norm.py tests/test_swiglu.py tests/test_ops.py \
    tests/test_generate.py tests/test_compile.py tests/test_hf.py tests/test_tune.py \
    --junitxml="$RESULTS/tests.xml"
stage inspect 50 "$PY" -m fp8nemo.cli inspect --arch sm_90
for spec in gemm:90:70 attention:40:28 decode:30:20 rope:15:8 e2e:65:45; do
    IFS=: read -r suite limit budget <<<"$spec"
    stage "bench-$suite" "$limit" "$PY" -m fp8nemo.cli bench --suite "$suite" --budget "$budget" \
        --out "$RESULTS" --markdown
done
# A killed e2e run removes its temporary checkpoint as it exits; sweep what a SIGKILL left.
rm -rf /dev/shm/fp8nemo-e2e-* "${TMPDIR:-/tmp}"/fp8nemo-e2e-*

# This run's CSVs (a timed-out suite leaves the rows it finished in a .partial file).
csvs=$(find "$RESULTS" -maxdepth 1 -newer "$marker" \( -name 'bench_*.csv' -o -name 'bench_*.csv.partial' \) | sort)
rm -f "$marker"
{
    echo "# GPU check $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    cat "$RESULTS/environment.txt"
    echo '```'
    echo
    echo "## Stages"
    for s in "${STATUS[@]}"; do echo "- $s"; done
    echo
    echo "## Tests (CUDA)"
    echo '```'
    tail -n 15 "$RESULTS/tests.log"
    echo '```'
    echo
    echo "## Codegen problems (sm_90)"
    echo '```'
    grep -vE "  ok$" "$RESULTS/inspect.log" | tail -n 20
    echo '```'
    echo
    echo "## GEMM main loops (sm_90: wgmma wait depths, TMA loads, shared stores per iteration)"
    echo '```'
    grep -E "^(op|fp8_gemm) .*(_fp8_gemm_kernel|_fp8_gemm_tma_kernel|kernel  )" "$RESULTS/inspect.log"
    echo '```'
    echo
    echo "## Benchmarks"
    for csv in $csvs; do
        md="${csv%.partial}"
        md="${md%.csv}.md"
        echo
        echo "### $(basename "$csv")"
        [ -f "$md" ] && cat "$md"
    done
} >"$RESULTS/summary.md"

echo
for s in "${STATUS[@]}"; do echo "$s"; done
echo "total $((SECONDS - start))s; logs, CSV and summary.md in $RESULTS"
for csv in $csvs; do
    "$PY" -c "import sys; from fp8nemo import bench; print(bench.format_compare(bench.read_csv(sys.argv[1])))" "$csv"
done
exit $FAILED
