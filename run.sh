#!/usr/bin/env bash
# One-stop set-up + run on a fresh machine:
#   ./run.sh demo [key=value ...]   set up, then run the embedded demo
#   ./run.sh test [pytest args]      set up, then run the whole test suite
#   ./run.sh setup                   set up only (.venv with everything installed)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${TBPS_VENV:-.venv}
# timm needs torchvision; torch 2.14.1 + torchvision 0.29.1 is a pair that installs and imports together. PyPI's
# Linux wheels are CUDA builds (about 7 GB installed with the nvidia-* packages); PyPI has no CPU torchvision, and
# PyPI's torchvision does not import beside a CPU-only torch, so that is what a fresh machine gets. Override for
# another build, e.g. TORCH_SPEC="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
TORCH_DISK_GB=${TORCH_DISK_GB:-9}   # free space the torch step needs (installed size plus one wheel being unpacked)
# every other package at the exact version CI tests with (.ci/relock re-resolves it); TBPS_LOCK= installs the newest
LOCK=${TBPS_LOCK-requirements-lock.txt}

setup() {
  local stamp="$VENV/.tbps-setup"
  local want
  want=$(cat pyproject.toml run.sh ${LOCK:+"$LOCK"} | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[setup] creating $VENV and installing tbps (first run takes a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    local free_gb
    free_gb=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
    if [ "$free_gb" -lt "$TORCH_DISK_GB" ]; then
      echo "[setup] error: installing torch ($TORCH_SPEC) needs about $TORCH_DISK_GB GB free beside $VENV;" \
           "$free_gb GB are free. Free some space, or set TORCH_SPEC to a smaller (CPU) build." >&2
      exit 2
    fi
  fi
  # no pip cache for torch: the cached wheels would double its footprint on disk
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --no-cache-dir $TORCH_SPEC
  if [ -z "$LOCK" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[all,test]"
  elif ! "$VENV/bin/python" -m pip install -q -c "$LOCK" -e ".[all,test]"; then
    # the lock is resolved for one Python and platform (its header says which); another may lack some pinned wheel
    echo "[setup] warning: the versions pinned in $LOCK do not install here (see pip's message above);" \
         "installing the newest compatible releases instead -- they are not the set CI tests with" >&2
    "$VENV/bin/python" -m pip install -q -e ".[all,test]"
  fi
  # the checkout as a sys.path entry too, not only through setuptools' editable import hook (which Python consults
  # after every path entry): a folder named shards/ or tune/ in the directory a command runs from is then a mere
  # namespace portion that our regular packages take precedence over, instead of shadowing them
  "$VENV/bin/python" -c 'import os, sysconfig; open(os.path.join(sysconfig.get_paths()["purelib"], "tbps-checkout.pth"), "w").write(os.getcwd() + "\n")'

  echo "$want" > "$stamp"
}

# the search page's test drives a real headless browser: Debian's chromium and its chromedriver
browser() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then return; fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null; then
    echo "[setup] installing chromium and chromium-driver (Debian packages) for the search page's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
      { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium chromium-driver >/dev/null; } || \
      echo "[setup] could not install chromium (apt-get install chromium chromium-driver as root)" >&2
  fi
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
    browser
    export TBPS_REQUIRE_BROWSER=${TBPS_REQUIRE_BROWSER:-1}  # the browser test fails rather than skips (0: may skip)
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [args]" >&2; exit 2 ;;
esac
