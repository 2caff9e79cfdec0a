"""tests/bench_step.py runs end to end here (vLLM's CPU backend, gloo, a tiny model) under the same launcher as on
the GPU machine (sharing the trainer's device, as on one GPU), and prints its three side-by-side ratios: a reference that never returns (the raw broadcast once
waited forever for the launcher's store) shows here, not as a lost GPU call."""
import json
import sys

import pytest

from conftest import run

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


def test_the_bench_prints_its_three_ratios_under_the_launcher(tiny_qwen2_vl):
    p = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes",
             "1", "tests/bench_step.py", "--model", tiny_qwen2_vl, "--iters", "1", "--max_completion_length", "16",
             "--reference_timeout", "300", "--variants", "eager",
             "--sync_variants", "bucket1"], timeout=420)
    results = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("BENCH {"))[len("BENCH "):])
    for key in ("train_ratio_ours_over_plain", "generate_ratio_ours_over_standalone", "sync_ratio_ours_over_raw"):
        assert results[key] > 0, key
        assert f"{key}: " in p.stdout
    assert results["generate_ours"]["tokens_per_s"] > 0 and results["sync_raw_copy"]["s"] > 0
    assert results["generate_bucket1"]["tokens_per_s"] > 0 and results["sync_bucket1"]["s"] > 0
    assert results["sync_ours"]["parts"]["copy: rpc load_hf_weights"] > 0, results["sync_ours"]["parts"]
    assert all(v > 0 for v in results["generate_diagnosis"].values()), results["generate_diagnosis"]
    assert results["train_ours_eager"]["s"] > 0
