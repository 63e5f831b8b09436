#!/usr/bin/env bash
# One GPU session in one command: install the wheels brought along, build the CUDA extension, run the tests
# (GPU-marked ones included) and the benchmarks, writing logs and JSON into OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [STAGE ...]
#     stages: build test bench-lce bench-attention bench-norm bench-lora bench-nf4 demo (the default set),
#             test-grid (the whole GPU test grids, ``-m grid``, on FASTSFT_GRID_WORKERS pytest workers, default 12),
#             sanitize (every Triton and CUDA kernel on a small grid under compute-sanitizer's memcheck),
#             tune-attention (before bench-attention: measures and stores the attention kernels' launch
#             configurations), bench-offload, bench-kernels (the pytest-benchmark suite), bench-sft-1b
#             bench-sft-8b, bench-suite (python -m bench.suite: FASTSFT_SUITE_PRESET quick | full with
#             FASTSFT_SUITE_PART 1-3, FASTSFT_SUITE_TIME_LIMIT seconds; results in OUTDIR/suite)
# FASTSFT_TESTS picks test files and FASTSFT_TEST_MARK their marker expression (default: all but the full grids);
# FASTSFT_BENCH_QUICK=1 the quick benchmark presets; FASTSFT_STAGE_TIMEOUT caps
# each stage (seconds, default 540).
#
# Fits one 10-minute call on an H100/H200 (build ~1-2 min with 16 cores). Bring the wheels that the GPU image
# lacks in .whl/ (../shared/tools/gpu-wheels.sh fetches them). Every stage runs even if an earlier one failed;
# the exit status is that of the first failure, and SUMMARY.txt lists each stage's status and duration.
# Unsloth: bring its wheels in .uwhl/ too (../shared/tools/unsloth-wheels.sh; in a call of their own if they do not fit
# beside .whl, a warm machine keeping what an earlier call brought). They go into a site of their own, /tmp/usite
# (Unsloth pins an older trl), named by FASTSFT_UNSLOTH_SITE, and the end-to-end stages (bench-sft-1b, bench-sft-8b,
# bench-suite) then run Unsloth beside the other providers; without .uwhl its rows say it was skipped.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [STAGE ...]}
shift
stages=${*:-build test bench-lce bench-attention bench-norm bench-lora bench-nf4 demo}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
summary="$out/SUMMARY.txt"
: > "$summary"

stage() {  # stage NAME COMMAND...: run, log to OUTDIR/NAME.log, record status and time
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$out/$name.log"
  timeout "${FASTSFT_STAGE_TIMEOUT:-540}" "$@" >> "$out/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
  tail -n 15 "$out/$name.log"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 scripts/install_wheels.py .whl /tmp/site \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if compgen -G ".uwhl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite .uwhl/*.whl \
    && export FASTSFT_UNSLOTH_SITE=/tmp/usite
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv > "$out/gpu.txt" 2>&1

for s in $stages; do
  case $s in
    build) stage build env MAX_JOBS=16 FASTSFT_CUDA_ARCHS="80;90a" \
             python3 -m pip install --no-build-isolation --no-deps --no-index -v -e . ;;
    test) stage test env FASTSFT_REQUIRE_EXTENSION=1 python3 -m pytest ${FASTSFT_TESTS:-tests} -q -p no:cacheprovider -m "${FASTSFT_TEST_MARK:-not grid}" --durations=15 \
             --junitxml="$out/pytest.xml" ;;
    test-grid) stage test-grid env FASTSFT_REQUIRE_EXTENSION=1 python3 -m pytest tests -q -p no:cacheprovider -m grid \
             -n "${FASTSFT_GRID_WORKERS:-12}" --junitxml="$out/pytest-grid.xml" ;;
    sanitize) stage sanitize-planted bash -c '! PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
             --error-exitcode 1 python3 scripts/sanitize_kernels.py --planted-fault'  # must be caught
             stage sanitize env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
             --error-exitcode 1 --print-limit 20 python3 scripts/sanitize_kernels.py ;;
    bench-lce) stage bench-lce python3 -m bench.bench_linear_cross_entropy --out "$out" --write-table \
             ${FASTSFT_BENCH_QUICK:+--quick} ;;
    tune-attention) stage tune-attention python3 -m bench.tune_attention --out "$out" --write-table \
             ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-attention) stage bench-attention python3 -m bench.bench_attention --out "$out/attention.json" \
             --write-table ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-norm) stage bench-norm python3 -m bench.bench_norm_rope_act --out "$out" --write-table \
             ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-lora) stage bench-lora python3 -m bench.bench_lora --out "$out" ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-nf4) stage bench-nf4 python3 -m bench.bench_nf4 --out "$out" ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-offload) stage bench-offload python3 -m bench.bench_offload --out "$out" ${FASTSFT_BENCH_QUICK:+--quick} ;;
    bench-kernels) stage bench-kernels python3 -m pytest bench/kernels -q -p no:cacheprovider -rs \
             --benchmark-json "$out/kernels.json" --benchmark-columns=median,rounds
             python3 -m bench.kernels.collect "$out/kernels.json" --out "$out" >> "$out/bench-kernels.log" 2>&1 ;;
    bench-suite) stage bench-suite python3 -m bench.suite --preset "${FASTSFT_SUITE_PRESET:-quick}" \
             --part "${FASTSFT_SUITE_PART:-1}" --out "$out/suite" \
             ${FASTSFT_SUITE_TIME_LIMIT:+--time-limit "$FASTSFT_SUITE_TIME_LIMIT"} ;;
    demo) stage demo python3 -m fastsft demo --json "$out/demo.json" ;;
    bench-sft-1b) stage bench-sft-1b python3 -m bench.bench_sft --model llama-1b --packing --batch 4 --out "$out" ;;
    bench-sft-8b) stage bench-sft-8b python3 -m bench.bench_sft --model llama-8b --packing --batch 2 --out "$out" ;;
    *) echo "unknown stage $s" | tee -a "$summary"; status=2 ;;
  esac
done
cp fastsft/card_table.json "$out/" 2>/dev/null  # what the --write-table stages measured
cat "$summary"
exit $status
