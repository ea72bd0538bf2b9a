#!/usr/bin/env bash
# Issue #15's GPU measurement in one run, for the device tool (one H100, 30 device minutes per session):
#   run: bash bench/gpu_15.sh        (results under $OUT: train_step.json/.md, max_batch.json/.md, env.txt)
# The device image has torch, timm and transformers but no Ray, DeepSpeed or webdataset: bench/train_step.py needs
# none of them (synthetic batches; tbps.methods imports without the data pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/.inductor}
python - > "$OUT/env.txt" <<'PY'
import platform, torch, timm, transformers
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), timm.__version__, transformers.__version__,
      platform.python_version())
PY
# eager and compiled, batch 64/128/256, the four paper configs (IRRA first: the MFU goal)
python bench/train_step.py --paper --presets irra ivt pcc clip --steps 10 --warmup 3 \
    --json "$OUT/train_step.json" | tee "$OUT/train_step.md"
# the largest IRRA batch with and without activation checkpointing / grad_cache
python bench/train_step.py --paper --max-batch --max-batch-limit 4096 --json "$OUT/max_batch.json" \
    | tee "$OUT/max_batch.md"
