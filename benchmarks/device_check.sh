#!/usr/bin/env bash
# One GPU call's checks and timings (correctness first, then the timings by priority),
# for the device machine of this workplace (one command, at most 10 minutes):
#   bash benchmarks/device_check.sh            # results under $OUT (default ./device-out)
# Uses the checkout in place (nothing can be installed there). Each step has its own time
# limit and the whole script a budget (BUDGET seconds, default 470, under 8 minutes): steps that would not
# fit are skipped and say so, and every step writes its own file as soon as it ends, so a
# cut-off run still returns what it finished. Copy $OUT/*.json into benchmarks/results/
# (rename to the device slug) and run `python benchmarks/plot.py` afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/device-out}"
BUDGET="${BUDGET:-470}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
step() {  # step SECONDS_LIMIT MIN_SECONDS_LEFT NAME COMMAND...
  local limit=$1 need=$2 name=$3; shift 3
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$need" ]; then echo "== $name: SKIPPED (${left}s of the budget left, needs ${need}s)" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, t=${SECONDS}s)" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: exit $? (t=${SECONDS}s)" | tee -a "$LOG"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python - <<'PY'
import torch, timm, transformers, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "triton", triton.__version__)
print("timm", timm.__version__, "transformers", transformers.__version__)
PY
  cat COMMIT 2>/dev/null
} 2>&1 | tee "$OUT/versions.txt"
# 1. Correctness on CUDA (the CUDA-only tests skip everywhere else).
tests=$(ls tests/test_flex_auto.py tests/test_kernels.py tests/test_soft.py tests/test_blocked_cuda.py 2>/dev/null)
step 150 60 "CUDA tests" python -m pytest -q -p no:cacheprovider -m "" -k "cuda" $tests
# 1a. The fused Triton kernel on the GPU: the same tests as the interpreter runs on CPU.
step 120 40 "Triton kernel tests" python -m pytest -q -p no:cacheprovider -m "" tests/test_fused.py
# 1b. Where FlexAttention's per-call floor goes, the direct cuDNN one_call path, and every masked
#     kernel (blocked included) side by side with dense SDPA (benchmarks/gpu_profile.py).
step 200 90 "GPU profile" python benchmarks/gpu_profile.py --device cuda --budget 180 --out "$OUT/gpu_profile.json"
# 2. The done-when figures: timm ViT-B/16 inference at 224 and 1024 px, half and all heads masked, bf16,
#    every backend (triton's first call per shape tunes its tile: a few seconds).
step 170 90 "ViT-B/16 done-when" python benchmarks/run.py --device cuda --only models --models vit_base_patch16_224 \
  --sizes 224,1024 --modes inference --model-heads half,all --max-seconds 5 --out "$OUT/models_vit_done_when.json"
# 3. Attention level, forward: every backend and FlexAttention variant at 197/1025/4097 tokens.
step 160 60 "attention forward" python benchmarks/run.py --device cuda --only attention --tokens 197,1025,4097 \
  --passes forward --out "$OUT/attention.json"
# 4. Each SDPA change on its own.
step 40 25 "SDPA changes" python benchmarks/sdpa_changes.py --device cuda --out "$OUT/sdpa_changes_cuda.json"
# 5. Training and the other model cells (Swin-T; 512 px), then attention forward+backward.
step 120 50 "models: training and Swin-T" python benchmarks/run.py --device cuda --only models \
  --models vit_base_patch16_224,swin_tiny_patch4_window7_224 --sizes 224,512,1024 --modes train,inference \
  --repeats 10 --max-seconds 8 --out "$OUT/models.json"
step 100 40 "attention forward+backward" python benchmarks/run.py --device cuda --only attention --tokens 197,1025,4097 \
  --passes forward+backward --no-flex-variants --out "$OUT/attention_train.json"
tail -40 "$LOG"
ls -l "$OUT"
