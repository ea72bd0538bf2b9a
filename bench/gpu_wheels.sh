#!/usr/bin/env bash
# The wheels that bench/gpu_15.sh's `engine` and `data` steps need on the GPU machine, whose image has torch, timm,
# transformers, numpy, psutil, ninja, msgpack, einops, py-cpuinfo and pyyaml but not DeepSpeed (nor its pydantic and
# hjson) or webdataset (nor braceexpand). Run here, once; it fills .whl/ (git-ignored, about 5 MB) at the versions
# requirements-lock.txt pins, for the device's CPython 3.12 on manylinux x86_64:
#   bash bench/gpu_wheels.sh
# then name .whl in the device call's `carry` (bench/gpu_15.sh installs what it finds there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOCK=requirements-lock.txt  # as a constraints file: each wheel at its locked version
rm -rf .whl && mkdir -p .whl
# DeepSpeed is published as a source distribution: build its (pure Python) wheel here; its ops are compiled
# just in time where they are used, and tbps uses none on a GPU (a torch optimizer, no DeepSpeed kernels)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -c "$LOCK" -w .whl deepspeed
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -c "$LOCK" -d .whl hjson pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions webdataset braceexpand
ls -1 .whl
du -sh .whl
