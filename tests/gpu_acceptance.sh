#!/usr/bin/env bash
# The GPU runs behind the README's measured numbers, as made on the device machines (H100, H200, 2x H200):
#   bash tests/gpu_acceptance.sh tests    OUT   # GPU tests: vLLM parity on GPU 0, colocate training test on GPU 1 (or 0)
#   bash tests/gpu_acceptance.sh two_gpu  OUT   # Qwen2-VL-2B shape: 1 ZeRO-3 rank on GPU 0 + vLLM on GPU 1, 20 steps
#   bash tests/gpu_acceptance.sh colocate OUT   # the same model and run, training and vLLM sharing GPU 0
#   bash tests/gpu_acceptance.sh mixed    OUT   # 4 GPUs: 3 ZeRO-3 ranks + vLLM, every other row text-only, 5 steps
# Each leaves its log, metrics.jsonl and nvidia-smi samples in OUT and prints the step split and per-GPU peaks.
set -uo pipefail
cd "$(dirname "$0")/.."
what=$1; out=${2:-/tmp/gpu_acceptance}; mkdir -p "$out"
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
assets=../shared/assets; [ -d "$assets" ] || assets=.assets
model=/tmp/qwen2-vl-2b-random
[ "$what" = tests ] || [ -d $model ] || CUDA_VISIBLE_DEVICES=0 $py tests/make_random_model.py "$assets/Qwen2-VL-2B-Instruct" $model

nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$out/smi_$what.csv" &
smi=$!
args=(--model $model --steps 20 --num_generations 8 --prompts_per_step 4 --max_completion_length 512
      --trainable all --eval_steps 0 --save_steps 0 --output_dir /tmp/run_$what)
case $what in
  tests)  # test_vllm.py on GPUs 0,1 (colocated, and vLLM on its own GPU over NCCL), test_gpu.py on GPU 2 (or 0)
    n=$(nvidia-smi -L | grep -c GPU); second=0; [ "$n" -ge 3 ] && second=2
    CUDA_VISIBLE_DEVICES=0,1 $py -m pytest -q -rs tests/test_vllm.py > "$out/test_vllm.log" 2>&1 &
    vllm_tests=$!
    [ $second = 0 ] && { wait $vllm_tests; rc=$?; } 
    CUDA_VISIBLE_DEVICES=$second $py -m pytest -q -rs tests/test_gpu.py > "$out/test_gpu.log" 2>&1
    rc2=$?
    [ $second = 2 ] && { wait $vllm_tests; rc=$?; }
    rc=$((rc | rc2))
    tail -n 5 "$out"/test_*.log ;;
  two_gpu)  CUDA_VISIBLE_DEVICES=0,1 bash train.sh "${args[@]}" > "$out/two_gpu.log" 2>&1; rc=$? ;;
  colocate) CUDA_VISIBLE_DEVICES=0 bash train.sh "${args[@]}" > "$out/colocate.log" 2>&1; rc=$? ;;
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
    CUDA_VISIBLE_DEVICES=0,1,2,3 timeout 420 bash train.sh "${args[@]}" --dataset /tmp/mixed/data.jsonl --steps 5 \
      --max_completion_length 256 --micro_batch_size 4 > "$out/mixed.log" 2>&1; rc=$? ;;
  *) echo "usage: $0 tests|two_gpu|colocate|mixed OUT"; exit 2 ;;
esac
kill $smi 2>/dev/null
[ "$what" = tests ] && exit $rc
tail -n 3 "$out/$what.log"
cp /tmp/run_$what/metrics.jsonl "$out/metrics_$what.jsonl" 2>/dev/null
$py - "$out/metrics_$what.jsonl" "$out/smi_$what.csv" <<'EOF'
import json, sys
ms = [json.loads(l) for l in open(sys.argv[1])]
keys = ["step_s", "generate_s", "reward_s", "train_s", "sync_s", "tokens_per_s", "sampler_logp_diff", "peak_mem_gb"]
print("step " + " ".join(f"{k:>17}" for k in keys))
for m in ms:
    print(f"{m['step']:>4} " + " ".join(f"{m.get(k, float('nan')):>17.4g}" for k in keys))
later = ms[1:] or ms  # step 1 includes vLLM's first-batch warm-up
print("mean of steps 2.. " + " ".join(f"{k}={sum(m[k] for m in later) / len(later):.3g}" for k in keys[:6]))
peak = {}
for line in open(sys.argv[2]):
    i, mib = [s.strip() for s in line.split(",")][:2]
    if mib.isdigit():
        peak[i] = max(peak.get(i, 0), int(mib))
print("nvidia-smi peak memory used per GPU (GiB): " + ", ".join(f"GPU {i}: {v / 1024:.1f}" for i, v in sorted(peak.items())))
EOF
exit $rc
