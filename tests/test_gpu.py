"""On a GPU only (skipped elsewhere): the trainer with vLLM sharing its GPU (colocate mode, sleep/wake), bf16."""
import json
import os
import sys

import pytest

from conftest import run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_one_gpu_colocate_run_keeps_vllm_in_step_with_the_trainer(tmp_path):
    """1 training process + vLLM on the same GPU (asleep while training); vision tower trained; every step's
    sampled tokens scored by the trainer within 0.02 nats/token of vLLM's own log-probs (bf16). Everything trains,
    so the rollouts' sleeps drop vLLM's weights (level 2) and the copy brings them back; the evaluations' sleeps
    (at step 3 and 6, no copy before the next rollout) must keep them."""
    out = str(tmp_path / "colocate")
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "1",
         "tests/run_with_reward.py", "--model", "tiny", "--rollout", "vllm", "--output_dir", out,
         "--rewards", "uppercase", "--steps", "6", "--prompts_per_step", "4", "--num_generations", "8",
         "--max_completion_length", "32", "--learning_rate", "3e-3", "--trainable", "all", "--save_steps", "0",
         "--eval_steps", "3"], env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]})
    with open(os.path.join(out, "metrics.jsonl")) as f:
        ms = [json.loads(line) for line in f]
    assert len(ms) == 6
    assert all(m["sampler_logp_diff"] < 0.02 for m in ms), [m["sampler_logp_diff"] for m in ms]
    assert ms[-1]["peak_mem_gb"] > 0
    assert [m["step"] for m in ms if "eval_accuracy" in m] == [3, 6]
