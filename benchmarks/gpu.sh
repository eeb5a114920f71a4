#!/usr/bin/env bash
# GPU validation, one command on a machine with one NVIDIA GPU (at most 8 minutes):
#   the GPU tests (pytest -m gpu), then the step, surface, Hessian-vector-product and sharpness
#   benchmarks on the GPU, each against its goal (and m = 1 sharpness of GPT-2 and Llama, reported);
#   their results replace the "GPU validation" section of benchmarks/RESULTS.md (card name, torch
#   version, date).
#
#   bash benchmarks/gpu.sh          # on the GPU machine, from the repository root or anywhere
#   bash benchmarks/gpu.sh --dry    # every part on the CPU at toy size (< 5 minutes); RESULTS.md untouched
#
# .ci/run calls the dry run, so that the script and the benchmarks' command lines cannot rot.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
if [ "${1:-}" = "--dry" ]; then
    mode=dry
elif [ -n "${1:-}" ]; then
    echo "benchmarks/gpu.sh: unknown argument ${1}; use no argument (GPU) or --dry (CPU, toy size)" >&2
    exit 2
fi
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

if [ "$mode" = gpu ]; then
    "$python" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA device here (torch " + torch.__version__ + "); run it on a GPU machine, "
             "or pass --dry to run every part on the CPU at toy size")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, flush=True)
PY
    device=(--device cuda)
    size=()
    lm_size=(--sequences 128 --repeats 3)
else
    device=(--device cpu)
    size=(--quick)
    lm_size=()
fi

part() {  # part NAME COMMAND...: run one part, its output kept for the report
    local name=$1
    shift
    echo "== $name ($((SECONDS - start)) s so far): $*"
    "$@" 2>&1 | tee "$work/$name.log"
}

# GPU tests: without a GPU they are collected and skipped, which still checks that they import and parse.
part tests "$python" -m pytest -q -m gpu -p no:cacheprovider tests
part sam_step "$python" benchmarks/bench_sam_step.py "${device[@]}" "${size[@]}" --compile --json "$work/sam_step.json"
part surface "$python" benchmarks/bench_surface.py "${device[@]}" "${size[@]}" --json "$work/surface.json"
part hessian "$python" benchmarks/bench_hessian.py "${device[@]}" "${size[@]}" --json "$work/hessian.json"
part sharpness "$python" benchmarks/bench_sharpness.py "${device[@]}" "${size[@]}" --json "$work/sharpness.json"
part sharpness_lm "$python" benchmarks/bench_sharpness_lm.py "${device[@]}" "${size[@]}" "${lm_size[@]}" \
    --json "$work/sharpness_lm.json"

report=(benchmarks/_gpu_report.py "$work" --seconds "$((SECONDS - start))")
if [ "$mode" = gpu ]; then
    report+=(--results benchmarks/RESULTS.md)
fi
"$python" "${report[@]}"
echo "benchmarks/gpu.sh ($mode): done in $((SECONDS - start)) s"
