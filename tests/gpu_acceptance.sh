#!/usr/bin/env bash
# The GPU runs behind the README's measured numbers, as made on the device machines (H100/H200, 1 to 4 GPUs):
#   bash tests/gpu_acceptance.sh tests    OUT   # GPU tests: vLLM parity (colocated: CUDA IPC; own GPU: NCCL), colocate training
#   bash tests/gpu_acceptance.sh two_gpu  OUT   # Qwen2-VL-2B shape: 1 training rank on GPU 0 + vLLM on GPU 1, 20 steps
#   bash tests/gpu_acceptance.sh colocate OUT   # the same run, training and vLLM sharing GPU 0
#   bash tests/gpu_acceptance.sh ranks2   OUT   # the same run on 3 GPUs: 2 training ranks + vLLM
#   bash tests/gpu_acceptance.sh ranks3   OUT   # the same run on 4 GPUs: 3 training ranks + vLLM
#   bash tests/gpu_acceptance.sh 7b       OUT   # Qwen2.5-VL-7B shape on 4 GPUs (3 ranks + vLLM), 10 steps
#   bash tests/gpu_acceptance.sh mixed    OUT   # 4 GPUs: 3 ranks + vLLM, every other row text-only, 5 steps
#   bash tests/gpu_acceptance.sh bench    OUT   # tests/bench_step.py on 2 GPUs (GPUS=0: colocated): the side-by-side ratios, a profile
#   bash tests/gpu_acceptance.sh lora     OUT   # one GPU, colocated, LoRA r16 (10 steps): --vllm_lora merge, then adapter; the ratio
#                                               # (~5 minutes a run on a fresh machine, most of it vLLM's compile)
# GPUS=2,3 runs a layout on other GPUs (several layouts side by side on one machine); BENCH_ARGS adds flags to the
# bench (e.g. "--phases train --skip_plain --micro_batch_size 32": one GPU, our update alone at another size), TRAIN_ARGS
# to a layout's train.sh (e.g. "--compile false"), MODEL another shape of tests/make_random_model.py (e.g.
# qwen3-vl-2b, or a folder of the assets: Qwen2.5-VL-3B-Instruct); one GPU: GPUS=0 with 7b (TRAIN_ARGS="--trainable
# language --lora_rank 16": LoRA) or colocate (TRAIN_ARGS="--offload optimizer"). Each leaves its log, metrics.jsonl
# and nvidia-smi samples in OUT and prints the step split, completions/s and per-GPU peaks.
# A layout refuses to start on GPUs that other processes hold (a run killed by `timeout` leaves its launcher and
# engine behind: stop runs with kill -- -PGID, or let them end). The device tool returns few files: tar OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
what=$1; out=${2:-/tmp/gpu_acceptance}; mkdir -p "$out"
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
assets=../shared/assets; [ -d "$assets" ] || assets=.assets
declare -A default_gpus=([tests]=0,1,2 [two_gpu]=0,1 [colocate]=0 [ranks2]=0,1,2 [ranks3]=0,1,2,3 [7b]=0,1,2,3
                         [mixed]=0,1,2,3 [bench]=0,1 [lora]=0)
[ -n "${default_gpus[$what]+x}" ] || { echo "usage: $0 tests|two_gpu|colocate|ranks2|ranks3|7b|mixed|bench|lora OUT"; exit 2; }
gpus=${GPUS:-${default_gpus[$what]}}
first=${gpus%%,*}
busy=$(nvidia-smi -i "$gpus" --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null)
if [ -n "$busy" ]; then
  echo "GPUs $gpus are in use by other processes (pid, memory): $busy - wait for them or stop them first" >&2
  exit 3
fi
src=$assets/Qwen2-VL-2B-Instruct; model=/tmp/qwen2-vl-2b-random
[ "$what" = 7b ] && src=$assets/Qwen2.5-VL-7B-Instruct && model=/tmp/qwen2.5-vl-7b-random
if [ -n "${MODEL:-}" ]; then  # MODEL=qwen3-vl-2b: another make_random_model shape; or a folder of $assets
  src=$MODEL; [ -d "$assets/$MODEL" ] && src=$assets/$MODEL; model=/tmp/$MODEL-random
fi
if [ "$what" != tests ] && [ ! -f $model/config.json ]; then
  CUDA_VISIBLE_DEVICES=$first $py tests/make_random_model.py $src $model.tmp && mv $model.tmp $model
fi

nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$out/smi_$what.csv" &
smi=$!
# each process's GPU memory and host RSS every 2 s (the engine's must stay flat over a long run: an encoder or
# multimodal cache that keeps every image would grow here)
(while sleep 2; do t=$(date +%s)
   nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | sed "s/^/$t, gpu, /"
   ps -eo pid=,rss=,comm= | awk -v t=$t '$3 ~ /python|VLLM|vllm/ {print t", rss, "$1", "$2}'
 done) > "$out/procs_$what.csv" 2>/dev/null &
procs=$!
args=(--model $model --steps 20 --num_generations 8 --prompts_per_step 4 --max_completion_length 512
      --trainable all --eval_steps 0 --save_steps 0 --output_dir /tmp/run_${what}_$first --overwrite true ${TRAIN_ARGS:-})
port=$((29500 + ${first} * 10))  # layouts side by side need a rendezvous port each
export MASTER_PORT=$port
case $what in
  tests)  # test_vllm.py on the first two GPUs (colocated, and vLLM on its own GPU), test_gpu.py on the third
    IFS=, read -r g0 g1 g2 <<< "$gpus"
    CUDA_VISIBLE_DEVICES=$g0,$g1 $py -m pytest -q -rs tests/test_vllm.py > "$out/test_vllm.log" 2>&1 &
    vllm_tests=$!
    CUDA_VISIBLE_DEVICES=${g2:-$g0} $py -m pytest -q -rs tests/test_gpu.py > "$out/test_gpu.log" 2>&1
    rc2=$?
    wait $vllm_tests; rc=$((rc2 | $?))
    tail -n 5 "$out"/test_*.log ;;
  two_gpu|colocate|ranks2|ranks3)
    CUDA_VISIBLE_DEVICES=$gpus bash train.sh "${args[@]}" > "$out/$what.log" 2>&1; rc=$? ;;
  7b)
    CUDA_VISIBLE_DEVICES=$gpus bash train.sh "${args[@]}" --steps 10 > "$out/$what.log" 2>&1; rc=$? ;;
  lora)  # the two ways vLLM gets a LoRA policy, one run after the other on the same GPU (MODEL=... for the 7B shape)
    rc=0
    for way in merge adapter; do
      CUDA_VISIBLE_DEVICES=$gpus bash train.sh "${args[@]}" --steps 10 --trainable language --lora_rank 16 \
        --vllm_lora $way --output_dir /tmp/run_lora_$way > "$out/lora_$way.log" 2>&1 || rc=1
      cp /tmp/run_lora_$way/metrics.jsonl "$out/metrics_lora_$way.jsonl" 2>/dev/null
      tail -n 2 "$out/lora_$way.log"
    done ;;
  bench)
    CUDA_VISIBLE_DEVICES=$gpus $py -m accelerate.commands.launch --config_file ds_accel.yaml --num_processes 1 \
      --main_process_port $port tests/bench_step.py --model $model --trainable all --max_completion_length 512 \
      --iters 2 --variants no_checkpointing --profile "$out/profile.txt" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1; rc=$?
    grep -h "BENCH\|ratio\|^our \|^plain \|standalone\|rollout\|bound\|raw" "$out/bench.log" ;;
  mixed)  # rank r gets rows r, r+3, ...: with every other row text-only, ranks differ in having an image
    $py -c "
import json, os, sys
sys.path.insert(0, '.')
from utils import make_counting_dataset
os.makedirs('/tmp/mixed', exist_ok=True)
with open('/tmp/mixed/data.jsonl', 'w') as f:
    for i, r in enumerate(make_counting_dataset(64, seed=3)):
        image = None
        if i % 2:
            image = f'/tmp/mixed/{i}.png'
            r['image'].save(image)
        f.write(json.dumps({'problem': r['problem'], 'solution': r['solution'], 'image': image}) + chr(10))"
    CUDA_VISIBLE_DEVICES=$gpus timeout 420 bash train.sh "${args[@]}" --dataset /tmp/mixed/data.jsonl --steps 5 \
      --max_completion_length 256 --micro_batch_size 4 > "$out/mixed.log" 2>&1; rc=$? ;;
esac
kill $smi $procs 2>/dev/null
case $what in tests|bench) exit $rc ;; esac
if [ $what = lora ]; then
  $py - "$out"/metrics_lora_merge.jsonl "$out"/metrics_lora_adapter.jsonl <<'EOF'
import json, sys
mean = {}
for path in sys.argv[1:]:
    ms = [json.loads(l) for l in open(path)][1:]  # step 1 holds the warm-ups
    mean[path] = {k: sum(m[k] for m in ms) / len(ms) for k in ("step_s", "generate_s", "train_s", "sync_s")}
    print(path.rsplit("_", 1)[1].removesuffix(".jsonl"), " ".join(f"{k}={v:.3f}" for k, v in mean[path].items()),
          f"sampler_logp_diff_max={max(m['sampler_logp_diff'] for m in ms):.4f}")
merge, adapter = mean.values()
print(f"ratio merge/adapter s/step: {merge['step_s'] / adapter['step_s']:.3f} (above 1: vLLM's own LoRA is faster)")
EOF
  exit $rc
fi
tail -n 3 "$out/$what.log"
cp /tmp/run_${what}_$first/metrics.jsonl "$out/metrics_$what.jsonl" 2>/dev/null
grep -m1 "^grpo-vl:" "$out/$what.log"
$py - "$out/metrics_$what.jsonl" "$out/smi_$what.csv" "$gpus" <<'EOF'
import json, sys
ms = [json.loads(l) for l in open(sys.argv[1])]
keys = ["step_s", "generate_s", "reward_s", "train_s", "sync_s", "tokens_per_s", "mfu", "sampler_logp_diff",
        "peak_mem_gb", "reserved_mem_gb"]
print("step " + " ".join(f"{k:>17}" for k in keys))
for m in ms:
    print(f"{m['step']:>4} " + " ".join(f"{m.get(k, float('nan')):>17.4g}" for k in keys))
later = ms[1:] or ms  # step 1 includes vLLM's first-batch warm-up
mean = {k: sum(m.get(k, 0) for m in later) / len(later) for k in keys}
completions_per_s = sum(m["completions"] for m in later) / sum(m["step_s"] for m in later)
print("mean of steps 2.. " + " ".join(f"{k}={mean[k]:.3g}" for k in keys[:7])
      + f" sampler_logp_diff_max={max(m['sampler_logp_diff'] for m in ms):.3g}"
      + f" completions_per_s={completions_per_s:.2f} ({later[0]['completions']} a step)")
peak, mine = {}, set(sys.argv[3].split(","))
for line in open(sys.argv[2]):
    i, mib = [s.strip() for s in line.split(",")][:2]
    if mib.isdigit() and i in mine:
        peak[i] = max(peak.get(i, 0), int(mib))
print("nvidia-smi peak memory used per GPU (GiB): " + ", ".join(f"GPU {i}: {v / 1024:.1f}" for i, v in sorted(peak.items())))
EOF
exit $rc
