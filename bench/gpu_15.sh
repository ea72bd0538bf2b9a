#!/usr/bin/env bash
# Issue #15's GPU measurement for the device tool (one H100; 10 minutes a command, 30 device minutes a session):
#   bash bench/gpu_15.sh [irra] [ivt] [pcc] [clip] [max] [profile]   (default: all but profile, in that order)
# Results under $OUT: train_step_<preset>.json (rows written as they are measured, so a run cut off by the time
# limit keeps what it has), train_step.md (the table), max_batch.json, env.txt. Split the presets over calls when
# one call cannot hold them all. The device image has torch, timm and transformers but no Ray, DeepSpeed or
# webdataset: bench/train_step.py needs none of them (synthetic batches; tbps.methods imports without them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/tbps-inductor}   # never under $OUT (many files)
python - > "$OUT/env.txt" <<'PY'
import platform, torch, timm, transformers
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), timm.__version__, transformers.__version__,
      platform.python_version())
PY
what=("$@")
[ ${#what[@]} -gt 0 ] || what=(irra ivt pcc clip max)
for p in "${what[@]}"; do
  if [ "$p" = profile ]; then
    # where a step's time goes (host syncs, graph breaks, kernels per step, device busy time, top kernels)
    python bench/train_step.py --paper --profile irra pcc clip --batches 64 --compile both --steps 5 \
        --json "$OUT/profile.json" | tee -a "$OUT/profile.md"
  elif [ "$p" = max ]; then
    # the largest IRRA batch with and without activation checkpointing / grad_cache
    python bench/train_step.py --paper --max-batch --max-batch-limit 4096 --json "$OUT/max_batch.json" \
        | tee -a "$OUT/train_step.md"
  else
    # eager and compiled, batch 64/128/256, bf16 autocast
    python bench/train_step.py --paper --presets "$p" --steps 10 --warmup 3 --json "$OUT/train_step_$p.json" \
        | tee -a "$OUT/train_step.md"
  fi
done
