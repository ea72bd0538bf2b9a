#!/usr/bin/env bash
# Issue #15's GPU measurement for the device tool (one H100; 10 minutes a command; a session's device time, 15 minutes
# in December 2026 with the machine's start counted, is what `status` says):
#   bash bench/gpu_15.sh [irra] [ivt] [pcc] [clip] [max] [profile] [modes] [engine] [data] [precision]
#                        (default: irra ivt pcc clip max, in that order)
# Results under $OUT: train_step_<preset>.json (rows written as they are measured, so a run cut off by the time
# limit keeps what it has), train_step.md (the tables), max_batch.json, profile.json/.md, train_step_modes.json,
# train_step_copy.json, engine.json/.md, data.md, train_step_precision_{irra,ivt}.json, env.txt, steps.txt (each
# step's exit status and wall time: a step that fails does not stop the next). At most 8 files come back from one
# call; none of the calls below writes more. Split the steps over calls where one call cannot hold them all (10
# minutes each). The next session's plan, for 15 device minutes: `precision engine data` in one call (8 files,
# carrying .whl; precision first: the presets' own precisions, IRRA's fp16 weights and IVT's torch AMP, have never
# run on a GPU), then at once `irra profile` (the re-measure since IRRA's MLM head scores masked positions only; a
# machine still warm keeps the inductor cache in /tmp), then `modes` if time is left.
# The device image has torch, timm and transformers but no Ray, DeepSpeed or webdataset: bench/train_step.py needs
# none of them (synthetic batches; tbps.methods imports without them). `engine` (the step through DeepSpeed's engine
# against the plain step) and `data` (the loader on the machine's 16 cores) need DeepSpeed and webdataset: run
# `bash bench/gpu_wheels.sh` here first and name .whl in the call's carry (WHEELS=DIR: another folder of wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
what=("$@")
[ ${#what[@]} -gt 0 ] || what=(irra ivt pcc clip max)
for p in "${what[@]}"; do  # every name checked before any device time is spent
  case "$p" in
  irra|ivt|pcc|clip|max|profile|modes|engine|data|precision) ;;
  *) echo "bench/gpu_15.sh: unknown step '$p' (irra ivt pcc clip max profile modes engine data precision)" >&2
     exit 2 ;;
  esac
done
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # a call stopped at its time limit keeps the lines printed so far
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/tbps-inductor}   # never under $OUT (many files)
python - > "$OUT/env.txt" <<'PY'
import platform, torch, timm, transformers
print(torch.__version__, torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device", timm.__version__,
      transformers.__version__, platform.python_version())
PY
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then  # carried wheels (bench/gpu_wheels.sh)
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tbps-site \
      "$WHEELS"/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/tbps-site  # ahead of the image's site-packages, as every PYTHONPATH entry
fi
# one step: its output appended to $OUT/<log>; a step that fails (out of memory, a missing wheel) is recorded in
# $OUT/steps.txt with its exit status and wall time, and the call goes on to the next step
step() {
  local name=$1 log=$2 t0=$SECONDS rc
  shift 2
  echo "[gpu_15] $name: $*" >&2
  set +e
  "$@" 2>&1 | tee -a "$OUT/$log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt" >&2
  [ "$rc" -eq 0 ] || failed+=("$name")
}
failed=()
for p in "${what[@]}"; do
  case "$p" in
  profile)
    # where a step's time goes (host syncs, graph breaks, kernels per step, device busy time, top kernels)
    step profile profile.md python bench/train_step.py --paper --profile irra pcc clip --batches 64 --compile both \
        --steps 5 --json "$OUT/profile.json" ;;
  modes)
    # CUDA graphs against a launch-bound step: IRRA and CLIP compiled with mode=reduce-overhead (the default-mode
    # rows are the irra/clip steps')
    step modes train_step.md python bench/train_step.py --paper --presets irra clip --batches 64 128 --compile on \
        --compile-mode reduce-overhead --steps 10 --warmup 3 --json "$OUT/train_step_modes.json"
    # the training loop's per-step copy of its batch to the GPU: from pageable memory (before) or pinned (now)
    step copy train_step.md python bench/train_step.py --paper --presets irra --batches 128 --compile on \
        --copy pageable pinned --steps 10 --warmup 3 --json "$OUT/train_step_copy.json" ;;
  engine)
    # the same compiled IRRA step at batch 128, plain against DeepSpeed's engine (ZeRO-0) in one process
    step engine engine.md python bench/train_step.py --paper --engine --rounds 10 --block 5 --json "$OUT/engine.json" ;;
  data)
    # the training loader at 384x128 with 7 (train.cpus_per_worker: 8) and 15 loader processes
    step data data.md python bench/data.py --image-size 384 128 --samples 1000 --repeats 1 --no-s3 \
        --loader-workers 7 15 --images-per-id 16 ;;
  precision)
    # the presets' own precisions (the official codes': IRRA's fp16 weights, IVT's torch AMP) against bf16 autocast,
    # eager and compiled at the paper batch
    step precision-irra train_step.md python bench/train_step.py --paper --presets irra --batches 128 \
        --precision bf16-autocast fp16-weights --steps 10 --warmup 3 --json "$OUT/train_step_precision_irra.json"
    step precision-ivt train_step.md python bench/train_step.py --paper --presets ivt --batches 64 \
        --precision bf16-autocast fp16-autocast --steps 10 --warmup 3 --json "$OUT/train_step_precision_ivt.json" ;;
  max)
    # the largest IRRA batch with and without activation checkpointing / grad_cache
    step max train_step.md python bench/train_step.py --paper --max-batch --max-batch-limit 4096 \
        --json "$OUT/max_batch.json" ;;
  irra|ivt|pcc|clip)
    # eager and compiled, batch 64/128/256, bf16 autocast
    step "$p" train_step.md python bench/train_step.py --paper --presets "$p" --steps 10 --warmup 3 \
        --json "$OUT/train_step_$p.json" ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[gpu_15] failed: ${failed[*]} (exit statuses and times in $OUT/steps.txt)" >&2
  exit 1
fi
