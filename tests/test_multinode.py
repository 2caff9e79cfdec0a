"""Two "nodes" on one machine: train.sh launched twice with NNODES=2 and NODE_RANK 0 and 1 on localhost, one
ZeRO-3 rank each over gloo, each node with its own vLLM (CPU) engine and its own output_dir (as nodes without a
shared disk): the weight copy reaches both engines (sampler log-probs match the trainer's on every step), and each
node's final model is the trained one: the float32 optimizer partitions both nodes' checkpoints hold, assembled by
DeepSpeed's own zero_to_fp32 (a node that wrote anything else, its own shard or a stale copy, fails)."""
import os
import socket
import subprocess

import pytest
from safetensors.torch import load_file

from conftest import ROOT


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_each_with_its_own_engine_train_the_same_model(tmp_path):
    pytest.importorskip("vllm")
    port = free_port()
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "NPROC_PER_NODE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
        log = open(tmp_path / f"node{rank}.log", "w")
        nodes.append((subprocess.Popen(
            ["bash", os.path.join(ROOT, "train.sh"), "--output_dir", str(tmp_path / f"node{rank}"), "--steps", "3",
             "--save_steps", "3", "--eval_steps", "0", "--max_completion_length", "16", "--rollout", "vllm",
             "--learning_rate", "1e-3", "--verbose", "true"],
            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in nodes:
        proc.wait(timeout=900)
        log.close()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    for (proc, _), text in zip(nodes, logs):
        assert proc.returncode == 0, text[-4000:]
        assert text.count("Initializing a V1 LLM engine") == 1, "each node runs one engine of its own"
    assert "node 1 of 2, 2 training processes in all" in logs[1]

    import json
    with open(tmp_path / "node0" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert len(metrics) == 3
    # each rank compares its own engine's sampling log-probs with the trainer's; the metric is their token mean
    assert max(m["sampler_logp_diff"] for m in metrics) < 1e-4, [m["sampler_logp_diff"] for m in metrics]

    finals = [load_file(tmp_path / f"node{r}" / "final" / "model.safetensors") for r in (0, 1)]
    base = load_file(tmp_path / "node0" / "base_model" / "model.safetensors")
    assert any(not (finals[0][k] == base[k]).all() for k in base), "training changed nothing"
    for r in (0, 1):  # each node's resumable checkpoint is complete on its own disk
        assert (tmp_path / f"node{r}" / "checkpoint-3" / "trainer_state.json").exists()
    # Each node wrote final/ from the weights gathered layer by layer on every rank. An independent assembly of the
    # same step: the float32 optimizer partitions each rank keeps in its node's checkpoint-3 (DeepSpeed's own
    # zero_to_fp32 over both nodes' shards put together). Each node's final model is that, tensor for tensor.
    import shutil
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    merged = tmp_path / "both_nodes_shards"
    shutil.copytree(tmp_path / "node0" / "checkpoint-3" / "state", merged)
    for f in (tmp_path / "node1" / "checkpoint-3" / "state" / "pytorch_model").glob("*rank_1*"):
        shutil.copy(f, merged / "pytorch_model")
    master = get_fp32_state_dict_from_zero_checkpoint(str(merged), tag="pytorch_model")
    master = {k.removeprefix("model."): v for k, v in master.items()}  # LogProbModel.model: the HF model
    from transformers import AutoModelForImageTextToText
    for r in (0, 1):
        final = AutoModelForImageTextToText.from_pretrained(tmp_path / f"node{r}" / "final").state_dict()
        shared = final.keys() & master.keys()
        assert len(shared) >= len(final) - 1, sorted(final.keys() - master.keys())  # a tied head is kept once
        assert all((final[k] == master[k]).all() for k in shared), \
            [k for k in shared if not (final[k] == master[k]).all()][:5]
