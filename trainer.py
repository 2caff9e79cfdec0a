"""GRPO for Qwen2-VL / Qwen2.5-VL: rollout -> rewards -> advantages -> loss -> step -> weight copy.

Where this departs from plain GRPO (Shao et al. 2024, DeepSeekMath), each a config switch:
- loss aggregation: `grpo` averages tokens within a sequence, then sequences; `dapo` averages all tokens of the
  batch (Yu et al. 2025, DAPO); `dr_grpo` divides the token sum by sequences x max completion length (Liu et al.
  2025, Dr. GRPO), which also suggests `--scale_rewards false`.
- asymmetric clipping [1 - eps_low, 1 + eps_high] (DAPO's clip-higher).
- KL: the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating KL divergence"),
  added per token with weight beta; beta = 0 loads no reference model.
"""
import math
import os
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from utils import accuracy_reward, collate, compute_rewards, cut_at_eos, gather_zero3_params, write_jsonl


# ---------------------------------------------------------------------------------------------------------------
# The numerical core: pure functions, checked against naive loops in tests/test_grpo_math.py.

def group_advantages(rewards, group_size, scale_std=True, eps=1e-4):
    """(N,) rewards of N/G groups of G consecutive samples -> (N,) advantages. A group whose rewards are all
    equal gets exactly zero (never NaN); NaN rewards (a reward that returned None) count as 0."""
    r = torch.nan_to_num(rewards.double(), nan=0.0).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # rounding leaves mean(r) != r in an all-equal group, and /eps would blow that up: zero such groups exactly
    adv = torch.where((r == r[:, :1]).all(dim=1, keepdim=True), torch.zeros_like(adv), adv)
    return adv.float().view(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.2, beta=0.0, loss_type="grpo",
              max_completion_length=None, num_sequences=None, num_tokens=None):
    """Clipped policy-gradient loss on (B, C) per-token log-probs. `num_sequences`/`num_tokens` are the totals of
    the whole batch when this is one micro-batch of it, so that micro-batch losses add up to the batch loss.
    Returns (loss, stats) with stats as sums over this micro-batch's tokens."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = None
    if beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    B = logp.shape[0]
    num_sequences = num_sequences or B
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / max(num_tokens if num_tokens is not None else mask.sum().item(), 1)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    else:
        raise ValueError(f"--loss_type {loss_type!r}: use grpo, dapo or dr_grpo")
    with torch.no_grad():
        stats = {"tokens": mask.sum(), "clipped": ((clipped < unclipped).float() * mask).sum(),
                 "kl": (kl * mask).sum() if kl is not None else torch.zeros(())}
    return loss, stats


def completion_logprobs(model, batch, temperature=1.0, suppressed_ids=(), chunk_size=256):
    """(B, C) log-probs of the completion tokens (the last C columns of batch['input_ids']) under `model`, at the
    sampling temperature and with the tokens the sampler may not emit (`suppressed_ids`) masked out, so that
    they are the sampler's own probabilities. Runs the backbone once, then the LM head over chunks of positions,
    each under activation checkpointing: no (B, C, vocab) float32 tensor ever exists, in forward or backward."""
    C = batch["completion_mask"].shape[1]
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state  # (B, L, H)
    hidden = hidden[:, -C - 1:-1]  # (B, C, H): position t predicts token t + 1
    targets = batch["input_ids"][:, -C:]
    suppressed = torch.tensor(list(suppressed_ids), dtype=torch.long, device=targets.device) if suppressed_ids else None

    def chunk_logprobs(h, t):
        logits = model.lm_head(h)  # (B, c, V) for one chunk only, in float32 at least (bf16 log-probs are coarse)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
        if suppressed is not None:
            logits = logits.index_fill(-1, suppressed, float("-inf"))
        return torch.gather(logits.log_softmax(-1), -1, t[..., None])[..., 0]

    out = []
    for s in range(0, C, chunk_size):
        h, t = hidden[:, s:s + chunk_size], targets[:, s:s + chunk_size]
        out.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
                   else chunk_logprobs(h, t))
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts. `generate(prompts, n)` -> (for each prompt n lists of completion token ids, and the same shape of
# sampling log-probs or None). utils.vllm_generate is the fast one; hf_generate needs no vLLM.

@torch.no_grad()
def hf_generate(model, prompts, n, pad_id, max_new_tokens, temperature=1.0, top_p=1.0, suppressed_ids=()):
    """transformers' generate(): n samples per prompt, never emitting `suppressed_ids`."""
    batch = collate(prompts, [[] for _ in prompts], pad_id)
    batch.pop("completion_mask")
    was_training = model.training
    model.eval()
    # ZeRO-3: gather the whole model once rather than shard by shard at every decoding step
    with gather_zero3_params(list(model.parameters())):
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=n, use_cache=True,
                             suppress_tokens=list(suppressed_ids) or None)
    model.train(was_training)
    completions = out[:, batch["input_ids"].shape[1]:].tolist()
    return [completions[i * n:(i + 1) * n] for i in range(len(prompts))], None


# ---------------------------------------------------------------------------------------------------------------
# The loop.

def evaluate(eval_prompts, generate, tok, eos_ids, accelerator):
    """Accuracy of one sampled completion per held-out prompt, averaged over all processes."""
    rows, prompts = [r for r, _ in eval_prompts], [p for _, p in eval_prompts]
    samples, _ = generate(prompts, 1)
    texts = tok.batch_decode([cut_at_eos(s[0], eos_ids)[0] for s in samples], skip_special_tokens=True)
    acc = torch.tensor(accuracy_reward(texts, [r["solution"] for r in rows]), device=accelerator.device)
    return accelerator.gather(acc).float().mean().item()


def train(cfg, model, ref_model, processor, sampler, reward_funcs, generate, accelerator, optimizer,
          eval_prompts=(), sync_weights=None, suppressed=()):
    """Runs cfg.steps GRPO steps. `model`/`optimizer` come from accelerator.prepare; `generate` is a rollout
    function as above; `eval_prompts` (row, prompt) pairs from the test split; `sync_weights()` (optional)
    copies the new policy into the rollout engine; `suppressed` token ids the sampler never emits."""
    tok = processor.tokenizer
    pad_id = tok.pad_token_id
    eos_ids = set(model_eos_ids(accelerator.unwrap_model(model), tok))
    G, n_prompts = cfg.num_generations, cfg.prompts_per_step
    n_micro = math.ceil(n_prompts * G / cfg.micro_batch_size)
    out_dir = cfg.output_dir
    metrics_path, samples_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "completions.jsonl")
    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(reward_funcs)
    history = []
    bar = tqdm(range(1, cfg.steps + 1), desc="GRPO", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        # 1. rollout: G samples for each of this rank's prompts
        rows_prompts = sampler.next(n_prompts)
        rows, prompts = [r for r, _ in rows_prompts], [p for _, p in rows_prompts]
        samples, sample_logps = generate(prompts, G)
        completions, ended, sampler_logps = [], [], []
        for i, group in enumerate(samples):
            for j, toks in enumerate(group):
                c, e = cut_at_eos(toks, eos_ids, pad_id)
                completions.append(c[:cfg.max_completion_length])
                ended.append(e)
                if sample_logps is not None:
                    sampler_logps.append(sample_logps[i][j][:len(completions[-1])])
        t_gen = time.time()
        # 2. rewards and advantages (groups are whole on each rank: no communication needed)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "image"}
        per_reward = compute_rewards(reward_funcs, texts, columns)
        rewards = sum(w * torch.tensor(v) for w, v in zip(weights, per_reward.values()))
        advantages = group_advantages(rewards, G, cfg.scale_rewards)
        t_rew = time.time()
        # 3. policy update: mu passes over the batch, each one optimizer step made of n_micro micro-batches
        flat_prompts = [p for p in prompts for _ in range(G)]
        micro = [list(range(i, min(i + cfg.micro_batch_size, len(completions))))
                 for i in range(0, len(completions), cfg.micro_batch_size)]
        batches = [collate([flat_prompts[i] for i in idx], [completions[i] for i in idx], pad_id) for idx in micro]
        batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in batches]
        n_tokens = accelerator.reduce(torch.tensor(float(sum(len(c) for c in completions)),
                                                   device=accelerator.device), "mean").item()
        old_logps, ref_logps = [None] * len(batches), [None] * len(batches)
        with torch.no_grad():
            for j, b in enumerate(batches):
                if cfg.mu > 1:  # the sampling policy, frozen before the first update of this batch
                    old_logps[j] = completion_logprobs(accelerator.unwrap_model(model), b, cfg.temperature, suppressed)
                if cfg.beta > 0:
                    ref_logps[j] = completion_logprobs(unwrap(ref_model), b, cfg.temperature, suppressed)
        stats_sum = {"tokens": 0.0, "clipped": 0.0, "kl": 0.0, "sampler_diff": 0.0}
        loss_sum = 0.0
        model.train()
        for it in range(cfg.mu):
            for j, (idx, b) in enumerate(zip(micro, batches)):
                with accelerator.accumulate(model):
                    logp = completion_logprobs(accelerator.unwrap_model(model), b, cfg.temperature, suppressed)
                    old = old_logps[j] if old_logps[j] is not None else logp.detach()
                    loss, st = grpo_loss(logp, old, ref_logps[j], advantages[idx].to(logp.device),
                                         b["completion_mask"], cfg.epsilon_low, cfg.epsilon_high, cfg.beta,
                                         cfg.loss_type, cfg.max_completion_length,
                                         num_sequences=len(completions), num_tokens=n_tokens)
                    # accelerate/DeepSpeed divide by the accumulation steps; the normalisers above already did
                    accelerator.backward(loss * n_micro)
                    optimizer.step()
                    optimizer.zero_grad()
                loss_sum += loss.item() / cfg.mu
                for k in ("tokens", "clipped", "kl"):
                    stats_sum[k] += st[k].item() / cfg.mu
                if it == 0 and sampler_logps:  # the trainer's and the sampler's view of the same tokens
                    sampled = pad_rows([sampler_logps[i] for i in idx], logp.shape[1]).to(logp.device)
                    stats_sum["sampler_diff"] += ((logp.detach() - sampled).abs() * b["completion_mask"]).sum().item()
        t_train = time.time()
        if sync_weights is not None:
            sync_weights()
        t_end = time.time()

        # 4. metrics, gathered over ranks
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        local = {f"reward/{k}": torch.tensor(v) for k, v in per_reward.items()}
        local.update(reward=rewards, length=lengths, truncated=torch.tensor([float(not e) for e in ended]))
        g = {k: accelerator.gather(v.float().to(accelerator.device)).cpu() for k, v in local.items()}
        tot = accelerator.reduce(torch.tensor([stats_sum["tokens"], stats_sum["clipped"], stats_sum["kl"],
                                               loss_sum, stats_sum["sampler_diff"]], device=accelerator.device),
                                 "sum").cpu()
        m = {"step": step, "loss": tot[3].item() / accelerator.num_processes,
             "reward_mean": g["reward"].nanmean().item(), "reward_std": g["reward"].std().item(),
             **{k: v.nanmean().item() for k, v in g.items() if k.startswith("reward/")},
             "kl": tot[2].item() / max(tot[0].item(), 1), "clip_frac": tot[1].item() / max(tot[0].item(), 1),
             "completion_len_mean": g["length"].mean().item(), "completion_len_max": g["length"].max().item(),
             "truncated_frac": g["truncated"].mean().item(),
             "tokens_per_s": g["length"].sum().item() / (t_end - t0), "step_s": t_end - t0,
             "generate_s": t_gen - t0, "reward_s": t_rew - t_gen, "train_s": t_train - t_rew, "sync_s": t_end - t_train,
             "skipped_rows": sum(sampler.skipped.values())}
        if sampler_logps:  # mean |log p_vLLM - log p_trainer| per token: ~0 when the weight copy is exact
            m["sampler_logp_diff"] = tot[4].item() / max(tot[0].item(), 1)
            if m["sampler_logp_diff"] > 0.1 and accelerator.is_main_process:
                tqdm.write(f"warning: step {step}: vLLM and the trainer disagree by {m['sampler_logp_diff']:.3f} "
                           "nats/token on the sampled tokens (bf16 noise is ~0.01): is the weight copy complete?")
        if torch.cuda.is_available():
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30  # this process (rank 0 on the console)
        if eval_prompts and cfg.eval_steps and (step % cfg.eval_steps == 0 or step == cfg.steps):
            m["eval_accuracy"] = evaluate(eval_prompts, generate, tok, eos_ids, accelerator)
        if "reward/accuracy_reward" in g:
            m["accuracy"] = m["reward/accuracy_reward"]
        history.append(m)
        if accelerator.is_main_process:
            write_jsonl(metrics_path, [m])
            if step % cfg.log_completions_steps == 0 or step == 1:
                write_jsonl(samples_path, [{"step": step, "problem": rows[i // G].get("problem"),
                                            "solution": rows[i // G].get("solution"), "completion": texts[i],
                                            **{k: v[i] for k, v in per_reward.items()}, "advantage": advantages[i].item()}
                                           for i in range(min(len(texts), 2 * G))])
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", acc=f"{m.get('accuracy', float('nan')):.2f}",
                            kl=f"{m['kl']:.4f}", len=f"{m['completion_len_mean']:.0f}", s=f"{m['step_s']:.1f}")
        accelerator.log(m, step=step)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.steps:
            save_model(model, processor, accelerator, os.path.join(out_dir, f"checkpoint-{step}"))
    return history


# ---------------------------------------------------------------------------------------------------------------
# Helpers the loop needs.

def model_eos_ids(model, tok):
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return [e for e in eos + [tok.eos_token_id] if e is not None]


def pad_rows(rows, width):
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r[:width], dtype=torch.float32)
    return out


def unwrap(model):
    return getattr(model, "module", model)


def save_model(model, processor, accelerator, path):
    """save_pretrained of the full model (ZeRO-3 shards gathered) + processor: loadable by transformers and vLLM."""
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards into rank 0
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path, state_dict=state, safe_serialization=True)
        processor.save_pretrained(path)
    accelerator.wait_for_everyone()


def plot_curves(history, path):
    """reward and accuracy per step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ["reward_mean", "eval_accuracy"] + sorted(k for k in history[0] if k.startswith("reward/")):
        points = [(m["step"], m[key]) for m in history if key in m]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key == "eval_accuracy" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("mean over samples")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
