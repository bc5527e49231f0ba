#!/usr/bin/env bash
# The GPU checks, as one prepared run (under 8 minutes on an H100/H200): the GPU tests, the GRPO step against TRL's
# default at the Qwen2.5-Math-1.5B shape, decode throughput at batch 256 (hf vs static, and vLLM if it imports), and
# the Qwen2.5-Math-7B memory check. Each step's JSON lands in $OUT (default ./bench-out); the console shows a summary.
#
#   bash bench/gpu.sh            # on a GPU node, in an environment with the project installed
#   bash bench/gpu.sh --tiny     # the same steps at tiny shapes on CPU (seconds): checks the script itself
#
# Figures go to BENCHMARKS.md with the date, the device and this command. Nothing here has run on a GPU yet.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
python="${PYTHON:-python}"
status=0
step() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local start=$(date +%s)
  "$@" || { echo "=== $name FAILED (exit $?)"; status=1; }
  echo "=== $name: $(( $(date +%s) - start )) s"
}

if [ "${1:-}" = "--tiny" ]; then
  shape=(--shape tiny --device cpu)
  step gpu-tests "$python" -m pytest -q -m gpu -p no:cacheprovider   # skip cleanly on CPU
  step grpo-step "$python" -m train.benchmark "${shape[@]}" --backend static --out "$out/grpo.json"
  step decode "$python" -m train.benchmark "${shape[@]}" --mode generate --backend hf,static --out "$out/decode.json"
  step memory "$python" -m train.benchmark --shape tiny --device cpu --memory-check --new-tokens 32 --prompt-len 16 \
    --out "$out/memory.json"
else
  step gpu-tests "$python" -m pytest -q -m gpu -p no:cacheprovider
  step grpo-step "$python" -m train.benchmark --shape qwen2.5-math-1.5b --backend static --out "$out/grpo.json"
  backends=hf,static
  "$python" -c "import vllm" 2>/dev/null && backends=hf,static,vllm
  step decode "$python" -m train.benchmark --shape qwen2.5-math-1.5b --mode generate --backend "$backends" \
    --prompts 256 --generations 1 --new-tokens 256 --steps 2 --out "$out/decode.json"
  step memory "$python" -m train.benchmark --memory-check --out "$out/memory.json"
fi
exit $status
