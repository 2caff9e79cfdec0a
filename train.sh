#!/usr/bin/env bash
# Launches main.py under accelerate + DeepSpeed (ZeRO-2 or 3, main.py's --zero_stage): one training process per GPU but the last, which vLLM
# takes. With no GPU: a short CPU smoke run (tiny random model, built-in data, 2 processes). Flags pass through;
# relative paths in them (--dataset, --output_dir, ...) are taken from the folder you run this from.
# Several machines: run it on each with NNODES, NODE_RANK (0 on the first), MASTER_ADDR (the first's address) and
# MASTER_PORT set, as torchrun takes them; each node runs its own vLLM engine on its last GPU. NPROC_PER_NODE
# overrides the training processes per node.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"  # the vLLM engine's processes import engine.py from here
py=python3; [ -x "$here/.venv/bin/python" ] && py="$here/.venv/bin/python"
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
fi
for a in "$@"; do case $a in -h|--help) exec "$py" "$here/main.py" --help;; esac; done  # once, not per process
nodes=${NNODES:-1}
# accelerate's launcher without its own tracebacks (ChildFailedError, SignalException after Ctrl-C) and error log
# lines: each rank prints its own message; the exit code is passed on, a rank killed by a signal named
launcher='import sys
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from accelerate.commands.launch import main
sys.argv[0] = "accelerate launch"
try:
    main()
except ChildFailedError as e:
    for rank, failure in e.failures.items():  # a rank killed by a signal printed nothing itself
        if failure.exitcode < 0:
            print(f"train.sh: training process {rank} was killed by {failure.signal_name()}", file=sys.stderr)
    rank, failure = e.get_first_failure()
    sys.exit(failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode)
except SignalException as e:
    sys.exit(128 + int(e.sigval))'
[[ " $* " == *" --verbose"* ]] || export LOGLEVEL=${LOGLEVEL:-CRITICAL}  # torch's launcher logs
launch=("$py" -c "$launcher" --config_file "$here/ds_accel.yaml")
if [ "$gpus" -eq 0 ]; then
  echo "train.sh: no GPU found, so this is the CPU smoke run: tiny random Qwen2-VL, built-in counting data, ZeRO-3 processes on gloo"
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # the smoke run starts over in its own folder, outputs/smoke, unless resumed; a folder of yours (--output_dir) has the
  # rule of main.py: an earlier run there stops it, naming --resume auto and --overwrite true
  fresh=(--overwrite true)
  for a in "$@"; do case $a in --resume|--resume=*|--output_dir|--output_dir=*|--overwrite|--overwrite=*) fresh=();; esac; done
  set -- --model tiny --output_dir outputs/smoke "${fresh[@]}" --steps 16 --prompts_per_step 4 --num_generations 8 \
    --max_completion_length 24 --rewards accuracy,format,number --learning_rate 3e-3 --save_steps 8 --eval_steps 8 \
    --eval_size 8 --log_completions_steps 4 "$@"
  procs=${NPROC_PER_NODE:-2}; launch+=(--mixed_precision no)
else
  procs=${NPROC_PER_NODE:-$(( gpus > 1 ? gpus - 1 : 1 ))}
  echo "train.sh: $gpus GPU(s): $procs DeepSpeed training process(es), vLLM on the last GPU"
fi
if [ "$nodes" -eq 1 ] && [ -n "${MASTER_PORT:-}" ]; then
  launch+=(--main_process_port "$MASTER_PORT")  # two runs on one machine need a rendezvous port each
fi
if [ "$nodes" -gt 1 ]; then
  : "${NODE_RANK:?set NODE_RANK: 0 on the first node}" "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
  echo "train.sh: node $NODE_RANK of $nodes, $((nodes * procs)) training processes in all, rendezvous at $MASTER_ADDR:${MASTER_PORT:-29500}"
  launch+=(--num_machines "$nodes" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR"
           --main_process_port "${MASTER_PORT:-29500}" --deepspeed_multinode_launcher standard)
fi
# bad flags, a missing dataset or an earlier run in --output_dir: one message from one process, before any launch
"$py" "$here/main.py" --check_only true "$@"
exec "${launch[@]}" --num_processes $((nodes * procs)) "$here/main.py" "$@"
