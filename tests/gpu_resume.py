"""Kill-and-resume on 2 GPUs (1 ZeRO-3 rank on GPU 0, vLLM on GPU 1, NCCL weight copy), as tests/test_resume.py
does on CPU: an uninterrupted run twice (bf16 on GPUs is not bit-reproducible: the pair gives the noise floor), a
run killed with kill -9 of its whole tree after checkpoint-2 and resumed with --resume auto, and kill -9 of the
launcher alone (every process gone, GPU memory freed, no staging file).
    CUDA_VISIBLE_DEVICES=0,1 python tests/gpu_resume.py OUT"""
import json
import os
import subprocess
import sys
import time

import psutil
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_resume import RUN, env, metrics, start, tree, wait_for  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu_resume"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes",
          "1", "tests/run_with_reward.py"]
ARGS = [*RUN, "--rollout", "vllm", "--steps", "8", "--max_completion_length", "32", "--learning_rate", "1e-4",
        "--vllm_enforce_eager", "true"]  # the engine starts faster; the comparison is the same


def launch(name, extra=()):
    return [*LAUNCH, *ARGS, "--output_dir", f"/tmp/resume_{name}", "--overwrite", "true", *extra]


def whole(name):
    t = time.time()
    p = subprocess.run(launch(name), env=env(), capture_output=True, text=True)
    open(f"{OUT}/{name}.log", "w").write(p.stdout + p.stderr)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    print(f"{name}: done in {time.time() - t:.0f} s", flush=True)
    return f"/tmp/resume_{name}"


def compare(a, b):
    wa, wb = load_file(f"{a}/final/model.safetensors"), load_file(f"{b}/final/model.safetensors")
    base = load_file(f"{a}/base_model/model.safetensors")
    diff = torch.cat([(wa[k].float() - wb[k].float()).flatten() for k in wa])
    moved = torch.cat([(wa[k].float() - base[k].float()).flatten() for k in wa])
    ra, rb = [m["reward_mean"] for m in metrics(a)], [m["reward_mean"] for m in metrics(b)]
    return dict(max_abs=diff.abs().max().item(), rel_to_training_update=(diff.norm() / moved.norm()).item(),
                reward_mean_a=[round(r, 4) for r in ra], reward_mean_b=[round(r, 4) for r in rb],
                sampler_logp_diff_max=max(m["sampler_logp_diff"] for m in metrics(b)))


os.makedirs(OUT, exist_ok=True)
a, a2 = whole("a"), whole("a2")
report = {"noise_floor (two uninterrupted runs)": compare(a, a2)}

with open(f"{OUT}/killed.log", "w") as log:
    proc = start(launch("k"), log)
    wait_for(lambda: os.path.exists("/tmp/resume_k/checkpoint-2/trainer_state.json"), 900, proc, "checkpoint-2")
    time.sleep(1.0)
    procs = tree(proc)
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)
print(f"killed after step {max(m['step'] for m in metrics('/tmp/resume_k'))}", flush=True)
p = subprocess.run([*launch("k")[:-2], "--resume", "auto"], env=env(), capture_output=True, text=True)
open(f"{OUT}/resumed.log", "w").write(p.stdout + p.stderr)
assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
report["killed and resumed vs uninterrupted"] = compare(a, "/tmp/resume_k")

with open(f"{OUT}/orphans.log", "w") as log:
    proc = start(launch("o", ["--steps", "200"]), log)
    wait_for(lambda: os.path.exists("/tmp/resume_o/metrics.jsonl"), 900, proc, "the first step")
    procs = tree(proc)
    staging = [f for f in os.listdir("/dev/shm") if f.startswith("grpo_vl_weights_")]
    os.kill(proc.pid, 9)
    t0 = time.time()
    gone, alive = psutil.wait_procs(procs[1:], timeout=10)
    report["kill -9 of the launcher"] = dict(
        processes=len(procs), left_after_10s=[p.pid for p in alive], seconds=round(time.time() - t0, 1),
        staging_files_before=staging, staging_left=[f for f in os.listdir("/dev/shm") if f.startswith("grpo_vl_")],
        gpu_memory_used_mib_after=subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                                                 capture_output=True, text=True).stdout.split("\n")[:2])
print(json.dumps(report, indent=1))
json.dump(report, open(f"{OUT}/report.json", "w"), indent=1)
