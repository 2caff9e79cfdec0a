"""Runs main.py with the weight copy failing on rank 0 after step 1's update, as a vLLM error or a full /dev/shm
there would: every rank must stop with the message instead of waiting in its next collective. WEIGHT_COPY_FAULT=nan:
the copy goes through but brings vLLM a NaN weight instead (the trainer's own weights stay finite).
    python tests/fail_weight_copy.py [main.py flags]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_with_reward  # noqa: E402,F401  (registers the test rewards)
import main  # noqa: E402
import trainer  # noqa: E402
import engine  # noqa: E402

staging_file, update_policy, hf_weights, updated = (engine.weight_staging_file, trainer.update_policy,
                                                    main.hf_weights, [])
NAN = os.environ.get("WEIGHT_COPY_FAULT") == "nan"


def failing_staging_file(llm, nbytes):  # rank 0 only, once per bucket of the copy
    if updated and not NAN:
        raise OSError("injected failure: no space left for the weight staging file")
    return staging_file(llm, nbytes)


def update_then_fail(*args, **kwargs):
    out = update_policy(*args, **kwargs)
    updated.append(True)
    return out


def nan_weights(model, merge=True):  # what the copy to vLLM sends (a saved model is not touched): one trained
    # tensor NaN after step 1's update
    out = hf_weights(model, merge)
    if NAN and updated:
        k = next(i for i, (_, p) in enumerate(out) if p.requires_grad)
        out[k] = (out[k][0], torch.full_like(out[k][1], float("nan")).requires_grad_(True))
    return out


engine.weight_staging_file, trainer.update_policy, main.hf_weights = failing_staging_file, update_then_fail, \
    nan_weights
if __name__ == "__main__":
    main.cli()
