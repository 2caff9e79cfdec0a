"""GRPO for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: rollout -> rewards -> advantages -> loss -> step -> weight copy.

Where this departs from plain GRPO (Shao et al. 2024, DeepSeekMath), each a config switch:
- loss aggregation: `grpo` averages tokens within a sequence, then sequences; `dapo` averages all tokens of the
  batch (Yu et al. 2025, DAPO); `dr_grpo` divides the token sum by sequences x max completion length (Liu et al.
  2025, Dr. GRPO), which also suggests `--scale_rewards false`.
- asymmetric clipping [1 - eps_low, 1 + eps_high] (DAPO's clip-higher).
- KL: the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating KL divergence"),
  added per token with weight beta; beta = 0 loads no reference model. `--kl_estimator` k1 / k2 / k3 (Schulman
  2020) or k3+: k3's value with k2's gradient (verl's straight-through "+" estimators).
- `--importance_sampling_level sequence`: one ratio per sequence, exp of the mean of its tokens' log-ratios (GSPO,
  Zheng et al. 2025, arXiv 2507.18071).
- `--mask_truncated_completions`: completions cut at max_completion_length leave the loss (DAPO's overlong
  filtering; TRL's mask_truncated_completions).
- `--importance_sampling_mode`: the sampler-mismatch weight per token or per sequence, truncated or masked above
  the cap (TRL's vllm_importance_sampling_mode, after Yao et al. 2025, "Your efficient RL framework secretly
  brings you off-policy RL training").
"""
import math
import os
import time

import torch
from tqdm import tqdm

from checkpoint import save_checkpoint
from engine import gather_zero3_params
from policy import batch_on_device
from rewards import RewardError, accuracy_reward, compute_rewards, extract_answer
from utils import DataError, collate, cut_at_eos, save_thumbnail, write_jsonl, write_report

BOX_COLUMNS = ("image_size", "model_image_size", "box_frame")  # what build_prompt gives the box rewards


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
              max_completion_length=None, num_sequences=None, num_tokens=None, is_weight=None,
              importance_sampling_level="token", kl_estimator="k3", ended=None):
    """Clipped policy-gradient loss on (B, C) per-token log-probs. `num_sequences`/`num_tokens` are the totals of
    the whole batch when this is one micro-batch of it, so that micro-batch losses add up to the batch loss.
    `is_weight`: (B, C) importance-sampling weights against the sampler (importance_weights) on the policy-gradient
    term only (the KL term stays unweighted, as in TRL). `importance_sampling_level` sequence: GSPO's ratio.
    `kl_estimator`: k1, k2, k3 or k3+. `ended`: (B,) bool; False rows (truncated) leave the loss, still counted in
    num_sequences (as TRL's), and num_tokens must count only the kept rows' tokens. Returns (loss, stats) with
    stats as sums over this micro-batch's tokens (those kept)."""
    if ended is not None:  # its reward judges an unfinished answer, not a wrong one: it teaches nothing (DAPO)
        mask = mask * ended[:, None].to(mask.dtype)
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":  # GSPO: one ratio per sequence, length-normalised, on every token
        log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    elif importance_sampling_level != "token":
        raise ValueError(f"--importance_sampling_level {importance_sampling_level!r}: use token or sequence")
    ratio = torch.exp(log_ratio).expand_as(logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    if is_weight is not None:  # the rollout engine drew these tokens (one step behind, or bf16-noisy): reweigh
        per_token = per_token * is_weight
    kl = None
    if beta > 0:
        delta = ref_logp - logp
        if kl_estimator == "k1":  # unbiased, but negative on some samples: high variance
            kl = -delta
        elif kl_estimator in ("k2", "k3", "k3+"):
            # as a loss on the policy's own samples k2's gradient is the reverse KL's, k3's the forward KL's (Tang &
            # Munos 2025): k3+ keeps k3's value (unbiased, >= 0) with k2's gradient
            k2 = 0.5 * delta ** 2
            k3 = torch.exp(delta) - delta - 1
            kl = {"k2": k2, "k3": k3, "k3+": k2 + (k3 - k2).detach()}[kl_estimator]
        else:
            raise ValueError(f"--kl_estimator {kl_estimator!r}: use k1, k2, k3 or k3+")
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


def importance_weights(old_logp, sampler_logp, mask, cap, mode="token_truncate"):
    """(B, C) weights of the policy-gradient term correcting for the rollout engine's sampling distribution (TRL's
    vllm_importance_sampling_mode): token_* each token's ratio p_old / p_sampler, sequence_* one ratio per sequence,
    exp of the sum of its tokens' log-ratios (the sequence's likelihood ratio); *_truncate min(ratio, cap), *_mask
    the ratio where <= cap, 0 above (the sample is dropped instead of biased). Returns (weights, the raw ratios:
    (B, C) for token_*, (B, 1) for sequence_*); padding's log-ratio counts 0."""
    level, _, rule = mode.partition("_")
    if level not in ("token", "sequence") or rule not in ("truncate", "mask"):
        raise ValueError(f"--importance_sampling_mode {mode!r}: use token_truncate, token_mask, sequence_truncate or "
                         "sequence_mask")
    log_ratio = torch.where(mask > 0, old_logp - sampler_logp, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(max=cap) if rule == "truncate" else torch.where(ratio <= cap, ratio, 0.0)
    return weight.expand_as(mask), ratio


# ---------------------------------------------------------------------------------------------------------------
# Rollouts. `generate(prompts, n)` -> (for each prompt n lists of completion token ids, the same shape of their
# sampling log-probs). engine.vllm_generate is the fast one; hf_generate needs no vLLM.

@torch.no_grad()
def hf_generate(model, prompts, n, pad_id, max_new_tokens, temperature=1.0, top_p=1.0, suppressed_ids=()):
    """transformers' generate(): n samples per prompt and the log-prob each token was drawn with. Nothing comes
    from the model's generation_config but its token ids (Qwen2.5-VL ships repetition_penalty 1.05: samples from
    a distribution the loss never scores); temperature and top-p are applied last here, where the recorder sees
    the distribution each token was drawn from."""
    from transformers import GenerationConfig, TemperatureLogitsWarper, TopPLogitsWarper
    batch = collate(prompts, [[] for _ in prompts], pad_id)
    batch.pop("completion_mask")
    own = model.generation_config
    ids = {k: getattr(own, k) for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              num_return_sequences=n, suppress_tokens=list(suppressed_ids) or None, **ids)
    drawn, last = [], [None]

    def record(input_ids, scores):  # runs once per new token, after every other processor
        if last[0] is not None:
            drawn.append(last[0].gather(-1, input_ids[:, -1:])[:, 0])
        last[0] = scores.float().log_softmax(-1)
        return scores
    processors = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + [record]
    was_training = model.training
    model.eval()
    model.generation_config = GenerationConfig(**ids)  # nothing else to inherit
    try:  # ZeRO-3: gather the whole model once rather than shard by shard at every decoding step
        with gather_zero3_params(list(model.parameters())), torch.compiler.set_stance("force_eager"):  # --compile
            out = model.generate(**batch, generation_config=config, logits_processor=processors, use_cache=True)
    finally:
        model.generation_config = own
        model.train(was_training)
    drawn.append(last[0].gather(-1, out[:, -1:])[:, 0])
    completions, logps = out[:, batch["input_ids"].shape[1]:].tolist(), torch.stack(drawn, 1).tolist()
    return ([completions[i * n:(i + 1) * n] for i in range(len(prompts))],
            [logps[i * n:(i + 1) * n] for i in range(len(prompts))])


def on_every_rank(fn, error_type, accelerator=None):
    """fn() on every rank; an error_type raised on any rank is raised on every rank with that rank's message, before
    the collectives that follow (which the failed rank would never join: the others would wait there)."""
    try:
        result, failed = fn(), None
    except error_type as e:
        result, failed = None, str(e)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        failed = next((f for f in gather_object([failed]) if f is not None), None)
    if failed is not None:
        raise error_type(failed)
    return result


def rollout(sampler, generate, cfg, eos_ids, pad_id, background=False, sync_follows=False, accelerator=None):
    """This rank's prompts and G completions for each, cut at the first EOS and at max_completion_length:
    (rows, prompts, completions, ended, sampler log-probs). background=True (vLLM only): returns at once a
    function that waits for them, while the engine generates. sync_follows: the weights are copied into the
    engine before its next generate (a colocated engine may then drop its own while it sleeps)."""
    rows_prompts = on_every_rank(lambda: sampler.next(cfg.prompts_per_step), DataError, accelerator)
    rows, prompts = [r for r, _ in rows_prompts], [p for _, p in rows_prompts]
    if background:
        result = generate(prompts, cfg.num_generations, background=True, sync_follows=sync_follows)
        return lambda: cut_rollout(rows, prompts, *result(), cfg, eos_ids, pad_id)
    return cut_rollout(rows, prompts, *generate(prompts, cfg.num_generations, sync_follows=sync_follows), cfg,
                       eos_ids, pad_id)


def cut_rollout(rows, prompts, samples, sample_logps, cfg, eos_ids, pad_id):
    completions, ended, sampler_logps = [], [], []
    for i, group in enumerate(samples):
        for j, toks in enumerate(group):
            c, e = cut_at_eos(toks, eos_ids, pad_id)
            completions.append(c[:cfg.max_completion_length])
            ended.append(e)
            sampler_logps.append(sample_logps[i][j][:len(completions[-1])])
    return rows, prompts, completions, ended, sampler_logps


# ---------------------------------------------------------------------------------------------------------------
# Scoring and the update.

def score(rows, texts, reward_funcs, weights, cfg, accelerator=None, prompts=None, lengths=None):
    """Rewards of every completion ({reward name: values}, their weighted sum) and group advantages. A reward
    that returned None or a non-finite value for a sample adds 0 to its sum (compute_rewards warns); one that
    failed (RewardError) on any rank stops every rank with that rank's message, before the update's collectives.
    Besides the data's columns the rewards get each row's box frame and image sizes (from its prompt: the box
    rewards) and each completion's length in tokens with --max_completion_length and --overlong_buffer
    (overlong_reward)."""
    G = cfg.num_generations
    columns = {k: [r.get(k) for r in rows for _ in range(G)] for k in rows[0] if k != "image"}
    for k in BOX_COLUMNS:
        columns[k] = [p.get(k) for p in prompts for _ in range(G)] if prompts else [None] * len(texts)
    columns.update(completion_length=list(lengths) if lengths is not None else [None] * len(texts),
                   max_completion_length=[getattr(cfg, "max_completion_length", None)] * len(texts),
                   overlong_buffer=[getattr(cfg, "overlong_buffer", 0)] * len(texts))
    per_reward = on_every_rank(lambda: compute_rewards(reward_funcs, texts, columns), RewardError, accelerator)
    rewards = torch.stack([w * torch.tensor(v, dtype=torch.float64) for w, v in zip(weights, per_reward.values())])
    rewards = rewards.nansum(0).float()
    return per_reward, rewards, group_advantages(rewards, G, cfg.scale_rewards)


def informative_groups(rewards, group_size):
    """(N,) rewards -> (N/G,) bool: the groups whose rewards are not all equal (the others have zero advantages
    and give the policy-gradient nothing)."""
    r = torch.nan_to_num(rewards.double(), nan=0.0).view(-1, group_size)
    return (r != r[:, :1]).any(dim=1)


def keep_informative(batch, scored, draw, cfg, accelerator=None):
    """DAPO's dynamic sampling (Yu et al. 2025): keeps the groups whose rewards differ, drawing and scoring more
    rollouts (`draw()` -> (batch, scored)) until this rank has --prompts_per_step of them or --dynamic_sampling_tries
    more draws were made; what is still missing is filled with the all-equal groups drawn first, so every rank
    steps on as many groups (its micro-batches stay in step with the others'). Every rank draws as often as the
    one that needs most (a vLLM draw is collective). Returns (batch, scored, extra draws)."""
    G, P = cfg.num_generations, cfg.prompts_per_step
    groups = []  # (informative, batch of one group, scored of one group)

    def add(batch, scored):
        rows, prompts, completions, ended, logps = batch
        texts, per_reward, rewards, advantages = scored
        for i, keep in enumerate(informative_groups(rewards, G).tolist()):
            s = slice(i * G, (i + 1) * G)
            groups.append((keep, (rows[i:i + 1], prompts[i:i + 1], completions[s], ended[s], logps[s]),
                           (texts[s], {k: v[s] for k, v in per_reward.items()}, rewards[s], advantages[s])))
    add(batch, scored)
    extra = 0
    while extra < cfg.dynamic_sampling_tries:
        short = torch.tensor([float(sum(k for k, _, _ in groups) < P)])
        if accelerator is not None:
            short = accelerator.reduce(short.to(accelerator.device), "sum").cpu()
        if short.item() == 0:
            break
        add(*draw())
        extra += 1
    chosen = ([g for g in groups if g[0]] + [g for g in groups if not g[0]])[:P]
    batch = tuple(sum((list(b[j]) for _, b, _ in chosen), []) for j in range(5))
    texts = sum((list(s[0]) for _, _, s in chosen), [])
    per_reward = {k: sum((list(s[1][k]) for _, _, s in chosen), []) for k in scored[1]}
    rewards, advantages = (torch.cat([s[j] for _, _, s in chosen]) for j in (2, 3))
    return batch, (texts, per_reward, rewards, advantages), extra


def update_policy(cfg, model, ref_model, optimizer, accelerator, prompts, completions, advantages, sampler_logps,
                  pad_id, tis_cap=None, ended=None):
    """mu optimizer steps on this rollout batch, each one accumulated over micro-batches of micro_batch_size
    sequences. `model`/`ref_model` are LogProbModels (DeepSpeed engines under ZeRO-3): every forward is a call of
    them. `tis_cap`: importance sampling against the sampler's log-probs, as cfg.importance_sampling_mode says
    (None: off). `ended`: whether each completion ended with EOS: with cfg.mask_truncated_completions the others
    leave the loss (None: all stay). Returns sums over this rank's tokens: over those in the loss (tokens, clipped,
    kl) and loss, each pass's mean; over the sampled tokens, on the first pass (sampled_tokens, sampler_diff,
    mismatch_kl, entropy, tis_capped, is_masked); the raw importance ratios' sum, count (is_ratio, is_ratios: of
    tokens, or of sequences for sequence_* modes) and max (is_ratio_max)."""
    G = cfg.num_generations
    flat_prompts = [p for p in prompts for _ in range(G)]
    micro = [list(range(i, min(i + cfg.micro_batch_size, len(completions))))
             for i in range(0, len(completions), cfg.micro_batch_size)]
    batches = [collate([flat_prompts[i] for i in idx], [completions[i] for i in idx], pad_id, share_images=True)
               for idx in micro]
    seq_tokens = float(sum(b["attention_mask"].sum() for b in batches)) * cfg.mu  # prompts too
    inner = accelerator.unwrap_model(model).model.model
    batches = [batch_on_device(inner, b, accelerator.device) for b in batches]
    keep = [bool(e) for e in ended] if ended is not None and cfg.mask_truncated_completions else None
    kept = [None if keep is None else torch.tensor([keep[i] for i in idx], device=accelerator.device) for idx in micro]
    n_tokens = accelerator.reduce(torch.tensor(float(sum(len(c) for i, c in enumerate(completions)
                                                         if keep is None or keep[i])),
                                               device=accelerator.device), "mean").item()
    with torch.no_grad():  # the sampling policy (frozen before the first update of this batch) and the reference
        old_logps = [model(b) if cfg.mu > 1 else None for b in batches]
        ref_logps = [ref_model(b) if cfg.beta > 0 else None for b in batches]
    sums = dict.fromkeys(("tokens", "clipped", "kl", "loss", "sampler_diff", "tis_capped", "mismatch_kl", "entropy",
                          "is_ratio", "is_ratios", "is_masked"), 0.0)
    sums["seq_tokens"] = seq_tokens
    sums["sampled_tokens"] = float(sum(len(c) for c in completions))
    ratio_max = []  # each micro-batch's largest raw importance ratio
    per_sequence = cfg.importance_sampling_mode.startswith("sequence")
    norm_here = accelerator.state.deepspeed_plugin is None  # DeepSpeed clips itself (get_global_grad_norm)
    norms = []  # each optimizer step's gradient norm (before clipping)
    model.train()
    for it in range(cfg.mu):
        for j, (idx, b) in enumerate(zip(micro, batches)):
            with accelerator.accumulate(model):
                logp = model(b)
                old = old_logps[j] if old_logps[j] is not None else logp.detach()
                sampled = pad_rows([sampler_logps[i] for i in idx], logp.shape[1]).to(logp.device)
                tok = b["completion_mask"]
                weight = None
                if tis_cap:  # p_old / p_sampler, per token or per sequence, capped or masked above the cap
                    weight, ratio = importance_weights(old, sampled, tok, tis_cap, cfg.importance_sampling_mode)
                    if it == 0:
                        on = (tok.sum(1, keepdim=True) > 0).to(tok.dtype) if per_sequence else tok  # ratios drawn
                        sums["is_ratio"] += (ratio * on).sum()
                        sums["is_ratios"] += on.sum()
                        ratio_max.append((ratio * on).max())
                        sums["tis_capped"] += ((weight >= tis_cap).float() * tok).sum()
                        if cfg.importance_sampling_mode.endswith("_mask"):
                            sums["is_masked"] += ((ratio > tis_cap).float() * tok).sum()
                loss, st = grpo_loss(logp, old, ref_logps[j], advantages[idx].to(logp.device), tok, cfg.epsilon_low,
                                     cfg.epsilon_high, cfg.beta, cfg.loss_type, cfg.max_completion_length,
                                     num_sequences=len(completions), num_tokens=n_tokens, is_weight=weight,
                                     importance_sampling_level=cfg.importance_sampling_level,
                                     kl_estimator=cfg.kl_estimator, ended=kept[j])
                # accelerate/DeepSpeed divide by the accumulation steps; the normalisers above already did
                accelerator.backward(loss * len(micro))  # DeepSpeed steps in here at the last micro-batch
                norm = None
                if norm_here and accelerator.sync_gradients:  # max_grad_norm 0: the norm only (no clipping)
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    if norm is None and hasattr(model, "get_global_grad_norm"):  # DeepSpeed's, taken to clip
                        norm = model.get_global_grad_norm()
                    if norm is not None:
                        norms.append(float(norm))  # a read of the device, once per optimizer step
                        if not math.isfinite(norms[-1]) or norms[-1] < 0:  # DeepSpeed: < 0 marks a non-finite norm
                            raise NonFiniteGradient(
                                f"the gradient is not finite (norm {norms[-1]}; loss {float(loss.detach())}): this "
                                "step's weights are not saved. Resume from the last checkpoint (--resume auto) once "
                                "the cause is found (a learning rate too high, a sampled token scored -inf)")
            # summed where they are and read once at the end: a read per micro-batch would stall the GPU's queue
            sums["loss"] += loss.detach() / cfg.mu
            for k in ("tokens", "clipped", "kl"):
                sums[k] += st[k] / cfg.mu
            if it == 0:  # the trainer's and the sampler's view of the same tokens
                sums["sampler_diff"] += ((logp.detach() - sampled).abs() * tok).sum()
                log_r = torch.where(tok > 0, old - sampled, 0.0)  # log p_old / p_sampler
                sums["mismatch_kl"] += ((log_r.exp() - 1 - log_r) * tok).sum()  # k3 of KL(sampler || trainer)
                sums["entropy"] += (-sampled * tok).sum()  # the sampler's per-token entropy, sampled
    out = {k: float(v) for k, v in sums.items()}
    out["is_ratio_max"] = float(torch.stack(ratio_max).max()) if ratio_max else 0.0
    if norms:
        out["grad_norm"] = sum(norms) / len(norms)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The loop.

def evaluate(eval_prompts, generate, tok, eos_ids, accelerator, reward=accuracy_reward):
    """Accuracy (or, with a box reward, its mean: IoU) of one sampled completion per held-out prompt, averaged over
    all processes, and this process's (row, completion, score) for the report."""
    rows, prompts = [r for r, _ in eval_prompts], [p for _, p in eval_prompts]
    samples, _ = generate(prompts, 1)
    texts = tok.batch_decode([cut_at_eos(s[0], eos_ids)[0] for s in samples], skip_special_tokens=True)
    columns = {"solution": [r["solution"] for r in rows],
               **{k: [p.get(k) for p in prompts] for k in BOX_COLUMNS}}
    # as training scores: a reward that fails stops every rank with its name; None (no image to box) counts 0
    correct = on_every_rank(lambda: compute_rewards({"eval": reward}, texts, columns), RewardError,
                            accelerator)["eval"]
    correct = [0.0 if math.isnan(v) else v for v in correct]
    acc = torch.tensor(correct, device=accelerator.device)
    return accelerator.gather(acc).float().mean().item(), list(zip(rows, texts, correct))


STOP = []  # [signal, time] of the SIGINT/SIGTERM that asked this process to stop after the current step


class NonFiniteGradient(FloatingPointError):
    """A step's gradient norm is NaN or infinite: raised by update_policy on every rank at once (the norm is of the
    whole batch), before that step's weights are saved."""


class Stopped(Exception):
    """Raised by train() after a stop signal, once the step in progress is done and a checkpoint written."""

    def __init__(self, history, signum):
        super().__init__(f"stopped after step {history[-1]['step'] if history else 0}")
        self.history, self.signum = history, signum


def train(cfg, model, ref_model, processor, sampler, reward_funcs, generate, accelerator, optimizer,
          eval_prompts=(), sync_weights=None, eval_source="", history=None, overlap=False, tis_cap=None,
          pending=None):
    """Runs GRPO steps up to cfg.steps: rollout, score, update, weight copy. `model`/`ref_model` are LogProbModels
    from accelerator.prepare; `reward_funcs` {name: fn}; `generate` a rollout function as above; `eval_prompts`
    (row, prompt) pairs never trained on (`eval_source` says where from); `sync_weights()` (optional) copies the
    new policy into the rollout engine; `history` the metrics of the steps done before (a resumed run).
    overlap: one-step-off, the engine generates step t+1's rollout while step t trains (it samples from the
    weights before step t's update); `pending` is such a rollout saved in the checkpoint a resumed run starts
    from. `tis_cap`: truncated importance sampling (update_policy). After a stop signal (STOP) it finishes the
    step, writes a checkpoint and raises Stopped."""
    tok = processor.tokenizer
    eos_ids = set(model_eos_ids(accelerator.unwrap_model(model).model, tok))
    G = cfg.num_generations
    out_dir = cfg.output_dir
    metrics_path, samples_path = os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "completions.jsonl")
    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(reward_funcs)
    accuracy_name = next((n for n, f in reward_funcs.items() if f is accuracy_reward), None)
    # what eval_accuracy scores: accuracy, or the first box reward for grounding (mean IoU with iou)
    eval_reward = next((f for f in reward_funcs.values() if getattr(f, "reads_boxes", False)), accuracy_reward)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).model.parameters())
    history = list(history or [])

    def evaluation(step):  # after step's update and weight copy; draws from the rollouts' RNG
        acc, samples = evaluate(eval_prompts, generate, tok, eos_ids, accelerator, eval_reward)
        if accelerator.is_main_process:
            tqdm.write(f"step {step}: eval_accuracy {acc:.3f} ({eval_source})")
            write_jsonl(os.path.join(out_dir, "eval_completions.jsonl"), [
                {"step": step, "problem": r.get("problem"), "solution": r.get("solution"), "completion": text,
                 "answer": extract_answer(text), "correct": c} for r, text, c in samples[:8]])
        return {"eval_accuracy": acc, "eval_source": eval_source}

    def eval_due(step):
        return bool(eval_prompts) and cfg.eval_steps > 0 and (step % cfg.eval_steps == 0 or step == cfg.steps)
    if history and eval_due(history[-1]["step"]) and "eval_accuracy" not in history[-1]:
        # a stop signal came in that step, and its eval waits for the weight copy a stop skips: it runs now, on
        # the weights and the RNG state its checkpoint saved, as the uninterrupted run ran it
        history[-1] = {**history[-1], **evaluation(history[-1]["step"])}
        accelerator.log({"eval_accuracy": history[-1]["eval_accuracy"]}, step=history[-1]["step"])
        if accelerator.is_main_process:
            open(metrics_path, "w").close()
            write_jsonl(metrics_path, history)
    def scored(batch):  # (texts, {reward: values}, rewards, advantages) of a rollout batch
        texts = tok.batch_decode(batch[2], skip_special_tokens=True)
        return texts, *score(batch[0], texts, reward_funcs, weights, cfg, accelerator, batch[1],
                             [len(c) for c in batch[2]])
    first = history[-1]["step"] + 1 if history else 1
    bar = tqdm(range(first, cfg.steps + 1), desc="GRPO", disable=not accelerator.is_main_process,
               dynamic_ncols=True, initial=first - 1, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        # every rollout is followed by the weight copy at the end of this step (or by no generate at all: a stop)
        batch = pending or rollout(sampler, generate, cfg, eos_ids, tok.pad_token_id,  # (more may follow: dynamic
                                   sync_follows=sync_weights is not None and not cfg.dynamic_sampling,  # sampling)
                                   accelerator=accelerator)
        rows, prompts, completions, ended, sampler_logps = batch
        # one step off: the engine samples the next step's batch with the weights it holds (before this update)
        next_batch = None
        if overlap and step < cfg.steps:
            before_next = sampler.state_dict(), torch.get_rng_state()  # to undo it if the engine dies meanwhile
            next_batch = rollout(sampler, generate, cfg, eos_ids, tok.pad_token_id, background=True,
                                 sync_follows=sync_weights is not None, accelerator=accelerator)
        t_gen = time.time()
        texts, per_reward, rewards, advantages = scored(batch)
        zero_std_frac = 1 - informative_groups(rewards, G).float().mean().item()
        draws, t_draws = 0, 0.0
        if cfg.dynamic_sampling:
            def draw():
                nonlocal t_draws
                t = time.time()
                more = rollout(sampler, generate, cfg, eos_ids, tok.pad_token_id, accelerator=accelerator)
                t_draws += time.time() - t
                return more, scored(more)
            batch, (texts, per_reward, rewards, advantages), draws = keep_informative(
                batch, (texts, per_reward, rewards, advantages), draw, cfg, accelerator)
            rows, prompts, completions, ended, sampler_logps = batch
        t_rew = time.time()
        try:
            sums = update_policy(cfg, model, ref_model, optimizer, accelerator, prompts, completions, advantages,
                                 sampler_logps, tok.pad_token_id, tis_cap, ended)
        except NonFiniteGradient as e:  # every rank has the same global norm: main.py prints it once
            raise NonFiniteGradient(f"step {step}: {e}") from None
        t_train = time.time()
        try:  # the engine must be done before the weight copy (and a checkpoint)
            pending = next_batch and next_batch()
        except Exception:
            if not STOP:
                raise
            # a signal for the whole job (a scheduler's TERM) stopped the engine mid-rollout: checkpoint this step
            # as if that rollout had never started (its prompts and seeds are drawn again on resume)
            pending = None
            sampler.load_state_dict(before_next[0])
            torch.set_rng_state(before_next[1])
        t_wait = time.time()
        # a rank was asked to stop (SIGINT/SIGTERM): all stop after this step, together, without the weight copy
        # (the engine may have had the signal too; no rollout follows)
        stop = accelerator.reduce(torch.tensor([float(bool(STOP))], device=accelerator.device), "sum").item() > 0 \
            and step < cfg.steps
        if sync_weights is not None and not stop:
            sync_weights()
        t_end = time.time()

        # metrics, gathered over ranks
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        local = {f"reward/{k}": torch.tensor(v) for k, v in per_reward.items()}
        local.update(reward=rewards, length=lengths, truncated=torch.tensor([float(not e) for e in ended]))
        g = {k: accelerator.gather(v.float().to(accelerator.device)).cpu() for k, v in local.items()}
        tot = accelerator.reduce(torch.tensor([sums[k] for k in ("tokens", "clipped", "kl", "loss", "sampler_diff",
                                                                 "seq_tokens", "tis_capped", "sampled_tokens",
                                                                 "mismatch_kl", "entropy", "is_ratio", "is_ratios",
                                                                 "is_masked")],
                                              device=accelerator.device), "sum").cpu().tolist()
        n_tok = max(tot[0], 1)  # the tokens in the loss (--mask_truncated_completions drops some)
        n_sampled = max(tot[7], 1)
        m = {"step": step, "loss": tot[3] / accelerator.num_processes,
             "reward_mean": g["reward"].mean().item(), "reward_std": g["reward"].std().item(),
             **{k: v.nanmean().item() for k, v in g.items() if k.startswith("reward/")},
             "kl": tot[2] / n_tok, "clip_frac": tot[1] / n_tok,
             "completion_len_mean": g["length"].mean().item(), "completion_len_max": g["length"].max().item(),
             "truncated_frac": g["truncated"].mean().item(), "completions": len(g["length"]),
             "tokens_per_s": g["length"].sum().item() / (t_end - t0), "step_s": t_end - t0,
             # generate_s: the time the loop waited for rollouts (overlapped: what the update did not hide)
             "generate_s": t_gen - t0 + t_wait - t_train + t_draws, "reward_s": t_rew - t_gen - t_draws,
             "train_s": t_train - t_rew,
             "sync_s": t_end - t_wait,
             "skipped_rows": sum(sampler.skipped.values()),
             # groups whose rewards were all equal (zero advantage: no policy gradient), of the first draw
             "zero_std_frac": accelerator.reduce(torch.tensor(zero_std_frac, device=accelerator.device),
                                                 "mean").item(),
             # mean |log p_sampler - log p_trainer| per sampled token: ~0 when both score the same distribution
             "sampler_logp_diff": tot[4] / n_sampled,
             # k3 estimate of KL(sampler || trainer) per sampled token (Yao et al. 2025's mismatch measure)
             "mismatch_kl": tot[8] / n_sampled,
             "entropy": tot[9] / n_sampled}  # the sampler's per-token entropy, estimated as mean -log p_sampler
        if "grad_norm" in sums:  # of the whole batch (every rank's, before clipping): the same on each rank
            m["grad_norm"] = sums["grad_norm"]
        if cfg.dynamic_sampling:
            m["dynamic_sampling_draws"] = draws  # rollouts drawn beyond the first (the same on every rank)
        if tis_cap:  # the raw ratios p_old / p_sampler (per token, or per sequence for sequence_* modes)
            m["is_ratio_mean"] = tot[10] / max(tot[11], 1)
            m["is_ratio_max"] = accelerator.gather(torch.tensor([sums["is_ratio_max"]],
                                                                device=accelerator.device)).max().item()
            m["is_masked_frac"] = tot[12] / n_sampled  # tokens a *_mask mode dropped (ratio above the cap)
            if cfg.importance_sampling_mode.endswith("_truncate"):
                m["tis_capped_frac"] = tot[6] / n_sampled  # tokens whose importance weight hit the cap
        if m["sampler_logp_diff"] > 0.1 and accelerator.is_main_process:
            tqdm.write(f"warning: step {step}: the sampler and the trainer disagree by {m['sampler_logp_diff']:.3f} "
                       "nats/token on the sampled tokens (bf16 noise is ~0.02; temperature, top_p and the suppressed "
                       "tokens are scored as sampled; with --overlap add one update's change): the rollout engine "
                       "is sampling from other weights - check that the weight copy is complete")
        if torch.cuda.is_available():
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30  # this process (rank 0 on the console)
            m["reserved_mem_gb"] = torch.cuda.memory_reserved() / 2 ** 30  # what it holds, its allocator's cache too
            peak = peak_bf16_flops()
            if peak:  # model FLOPs utilisation of the update: 6 x parameters x tokens trained on
                m["mfu"] = 6 * n_params * tot[5] / (t_train - t_rew) / (peak * accelerator.num_processes)
        if eval_due(step) and not stop:  # a stop skips the weight copy: the resumed run evaluates first
            m.update(evaluation(step))
        if accuracy_name is not None:
            m["accuracy"] = m[f"reward/{accuracy_name}"]
        history.append(m)
        if accelerator.is_main_process:
            write_jsonl(metrics_path, [m])
            if cfg.log_completions_steps and (step % cfg.log_completions_steps == 0 or step == 1):
                images = [save_thumbnail(rows[j].get("image"), out_dir, f"step{step}-{j}") for j in range(2)
                          if j < len(rows)]
                write_jsonl(samples_path, [{"step": step, "problem": rows[i // G].get("problem"),
                                            "solution": rows[i // G].get("solution"), "image": images[i // G],
                                            "completion": texts[i], "answer": extract_answer(texts[i]),
                                            **{k: v[i] for k, v in per_reward.items()},
                                            "total": rewards[i].item(), "advantage": advantages[i].item()}
                                           for i in range(min(len(texts), 2 * G))])
                write_report(out_dir, history, cfg.steps)
            # the weighted total, then each reward's mean (what a run learns first is often one of them)
            bar.set_postfix({"reward": f"{m['reward_mean']:.3f}",
                             **{k[len("reward/"):]: f"{m[k]:.2f}" for k in m if k.startswith("reward/")},
                             "kl": f"{m['kl']:.4f}", "len": f"{m['completion_len_mean']:.0f}", "s": f"{m['step_s']:.1f}"})
        accelerator.log(m, step=step)
        if stop or (cfg.save_steps and (step % cfg.save_steps == 0 or step == cfg.steps)):
            save_checkpoint(model, processor, accelerator, sampler, history, cfg, pending,
                            {"overlap": overlap, "importance_sampling": tis_cap is not None})
        if stop:
            import signal
            raise Stopped(history, STOP[0] if STOP else signal.SIGTERM)
    return history


# ---------------------------------------------------------------------------------------------------------------
# Helpers the loop needs.

def model_eos_ids(model, tok):
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return [e for e in eos + [tok.eos_token_id] if e is not None]


def peak_bf16_flops():
    """Dense bf16 peak of this GPU (H100/H200 SXM: 989 TFLOP/s, A100: 312), or None when unknown."""
    name = torch.cuda.get_device_name()
    return next((v for k, v in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)) if k in name), None)


def pad_rows(rows, width):
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r[:width], dtype=torch.float32)
    return out
