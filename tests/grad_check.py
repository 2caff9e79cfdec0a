"""Runs main.py the way the gradient tests need it (tests/test_gradients.py):
- plain SGD instead of AdamW: its update is exactly -lr x the gradient, so the weight change between two
  checkpoints IS the gradient the trainer applied;
- the real rollouts (transformers or vLLM) cut to unequal lengths (8, 7, 6, 5, 8, ...), so micro-batches hold
  completions of different lengths;
- every rank's rollout saved to output_dir/rollout-step{S}-rank{R}.pt, for a naive one-process recomputation.
Everything else is the real main.main -> trainer.train (DeepSpeed ZeRO-3 when launched by accelerate).
    python tests/grad_check.py [main.py flags]"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_with_reward  # noqa: E402,F401  (registers the test rewards)
import main  # noqa: E402


def sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg.learning_rate)


def recording_rollout(cfg, *args, **kwargs):
    from transformers.integrations import is_deepspeed_zero3_enabled

    import engine
    if int(os.environ.get("RANK", "0")) == 0:  # the ZeRO stage transformers sees once the trainer is prepared, and
        # the weights' size as the colocated engine's start reads it (args[0]: the model's folder)
        with open(os.path.join(cfg.output_dir, "deepspeed_seen.json"), "w") as f:
            json.dump({"transformers_zero3": is_deepspeed_zero3_enabled(), "model_bytes": engine.model_bytes(args[0])},
                      f)
    generate, sync, llm = make_rollout(cfg, *args, **kwargs)
    calls = [0]

    def cut_and_record(prompts, n, background=False, sync_follows=False):
        if background:  # --overlap: the engine works while the trainer does; record when the result is taken
            result = generate(prompts, n, background=True, sync_follows=sync_follows)
            return lambda: cut_and_record_result(prompts, n, *result())
        return cut_and_record_result(prompts, n, *generate(prompts, n, sync_follows=sync_follows))

    def cut_and_record_result(prompts, n, samples, logps):
        keep = [[max(1, len(s) - (i * n + j) % 4) for j, s in enumerate(group)] for i, group in enumerate(samples)]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 1 and os.environ.get("RANK1_MAX_TOKENS"):  # ranks of different lengths (chunk counts)
            keep = [[min(k, int(os.environ["RANK1_MAX_TOKENS"])) for k in ks] for ks in keep]
        samples = [[s[:k] for s, k in zip(group, ks)] for group, ks in zip(samples, keep)]
        if logps is not None:
            logps = [[lp[:k] for lp, k in zip(group, ks)] for group, ks in zip(logps, keep)]
        calls[0] += 1
        torch.save({"prompts": prompts, "samples": samples, "logps": logps},
                   os.path.join(cfg.output_dir, f"rollout-step{calls[0]}-rank{rank}.pt"))
        return samples, logps
    return cut_and_record, sync, llm


make_rollout = main.make_rollout
main.make_rollout = recording_rollout
main.build_optimizer = sgd
if os.environ.get("HEAD_CHUNK_TOKENS"):  # the LM head's rows of logits at a time (4096 in main.py's runs)
    import policy
    defaults = list(policy.completion_logprobs.__defaults__)
    defaults[3] = int(os.environ["HEAD_CHUNK_TOKENS"])  # chunk_tokens
    policy.completion_logprobs.__defaults__ = tuple(defaults)

if os.environ.get("GRAD_SUM_DIR"):  # each step: the gradient DeepSpeed applied next to the float64 sum of its parts
    import trainer
    update_policy = trainer.update_policy

    def recording_update(cfg, model, *args, **kwargs):
        """Sums every micro-batch's gradient as autograd hands it to DeepSpeed (a tensor hook, in the model's
        dtype) in float64, and reads the float32 master weights before and after the step: with SGD,
        (before - after) / lr is the gradient DeepSpeed accumulated."""
        from deepspeed.utils import safe_get_full_fp32_param
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        parts = {n: torch.zeros(getattr(p, "ds_shape", p.shape), dtype=torch.float64) for n, p in params}
        def adder(name):
            def add(grad):
                parts[name].add_(grad.detach().double().cpu())
            return add
        hooks = [p.register_hook(adder(n)) for n, p in params]
        before = {n: safe_get_full_fp32_param(p).double().cpu() for n, p in params}
        out = update_policy(cfg, model, *args, **kwargs)
        after = {n: safe_get_full_fp32_param(p).double().cpu() for n, p in params}
        for h in hooks:
            h.remove()
        applied = {n: (before[n] - after[n]) / cfg.learning_rate for n in parts}
        rank = torch.distributed.get_rank()
        step = len([f for f in os.listdir(os.environ["GRAD_SUM_DIR"]) if f.endswith(f"-rank{rank}.pt")]) + 1
        torch.save({"parts": parts, "applied": applied, "weights": before},
                   os.path.join(os.environ["GRAD_SUM_DIR"], f"step{step}-rank{rank}.pt"))
        return out
    trainer.update_policy = recording_update

if __name__ == "__main__":
    main.cli()
