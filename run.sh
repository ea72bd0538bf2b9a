#!/usr/bin/env bash
# One-stop set-up + run on a fresh machine:
#   ./run.sh demo [key=value ...]   set up, then run the embedded demo
#   ./run.sh test [pytest args]      set up, then run the whole test suite
#   ./run.sh setup                   set up only (.venv with everything installed)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${TBPS_VENV:-.venv}
# timm needs torchvision; torch 2.14.1 + torchvision 0.29.1 is the pair that installs and imports together here
# (from local disk on our dev/CI machines, from PyPI elsewhere). Override for another CUDA/CPU build.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

setup() {
  local stamp="$VENV/.tbps-setup"
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[setup] creating $VENV and installing tbps (first run takes a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
}

# subprocesses (ray CLI, ray job entrypoints) must find this environment's python and ray
export PATH="$PWD/$VENV/bin:$PATH"

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # throwaway local cluster
    exec "$VENV/bin/python" -m tbps.train "$@" ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
