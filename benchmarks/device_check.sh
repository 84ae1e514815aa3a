#!/usr/bin/env bash
# One GPU session's checks and timings (issue 4's "done when"), for the device machine:
#   bash benchmarks/device_check.sh 1   then   bash benchmarks/device_check.sh 2
# (two calls: each fits the device tool's 10-minute command limit; results under $OUT,
# default ./device-out)
# Uses the checkout in place (no install: nothing can be downloaded there). Each step has its
# own time limit so one slow step cannot eat the session; copy $OUT/*.json into
# benchmarks/results/ and run `python benchmarks/plot.py` afterwards.
# NOT YET RUN: no GPU has been lent to the sessions that wrote it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
python - <<'EOF' | tee "$OUT/versions.txt"
import torch, timm, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("timm", timm.__version__, "transformers", transformers.__version__)
EOF
stage="${1:-1}"
if [ "$stage" = 1 ]; then
# Correctness on CUDA first (the CUDA-only tests skip everywhere else).
if python -c "import pytest, hypothesis" 2>/dev/null; then
  timeout 150 python -m pytest -q -p no:cacheprovider -m "" tests/test_flex_auto.py tests/test_kernels.py \
    2>&1 | tail -25 | tee "$OUT/pytest_cuda.txt"
else
  echo "pytest/hypothesis missing on this image: CUDA tests not run" | tee "$OUT/pytest_cuda.txt"
fi
# The done-when figures: ViT-B/16 inference at 224 and 1024 px, half the heads masked, bf16.
timeout 180 python benchmarks/run.py --device cuda --only models --models vit_base_patch16_224 \
  --sizes 224,1024 --modes inference --out "$OUT/models_vit_done_when.json" 2>&1 | tail -8
# Each SDPA change on its own.
timeout 60 python benchmarks/sdpa_changes.py --device cuda --out "$OUT/sdpa_changes_cuda.json" 2>&1 | tail -26
fi
if [ "$stage" = 2 ]; then
# The attention-level table (flex variants included) and the remaining model cells.
timeout 200 python benchmarks/run.py --device cuda --only attention --out "$OUT/attention.json" 2>&1 | tail -20
timeout 200 python benchmarks/run.py --device cuda --only models --out "$OUT/models.json" 2>&1 | tail -14
fi
ls -l "$OUT"
