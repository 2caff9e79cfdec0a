#!/usr/bin/env bash
# Launches main.py under accelerate + DeepSpeed ZeRO-3: one training process per GPU but the last, which vLLM
# takes. With no GPU: a short CPU smoke run (tiny random model, built-in data, 2 processes). Flags pass through;
# relative paths in them (--dataset, --output_dir, ...) are taken from the folder you run this from.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # the vLLM engine's processes import utils from here
py=python3; [ -x "$here/.venv/bin/python" ] && py="$here/.venv/bin/python"
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
fi
launch=("$py" -m accelerate.commands.launch --config_file "$here/ds_accel.yaml")
if [ "$gpus" -eq 0 ]; then
  echo "train.sh: no GPU found, so this is the CPU smoke run: tiny random Qwen2-VL, built-in counting data, 2 ZeRO-3 processes on gloo"
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  set -- --model tiny --output_dir outputs/smoke --overwrite true --steps 8 --prompts_per_step 2 --num_generations 4 \
    --max_completion_length 48 --learning_rate 1e-4 --save_steps 4 --eval_steps 4 --eval_size 8 --log_completions_steps 2 "$@"
  procs=2; launch+=(--mixed_precision no)
else
  procs=$(( gpus > 1 ? gpus - 1 : 1 ))
  echo "train.sh: $gpus GPU(s): $procs ZeRO-3 training process(es), vLLM on the last GPU"
fi
# bad flags, a missing dataset or an earlier run in --output_dir: one message from one process, before any launch
"$py" "$here/main.py" --check_only true "$@"
exec "${launch[@]}" --num_processes $procs "$here/main.py" "$@"
