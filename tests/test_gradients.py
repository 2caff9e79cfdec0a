"""One real GRPO step equals the naive full-batch gradient of the same loss.

tests/grad_check.py runs the real main.main -> trainer.train (2 ZeRO-3 CPU processes under accelerate, or one
process without DeepSpeed) with plain SGD, so `checkpoint-1 -> final` is exactly -lr x the gradient that step 2
applied, and saves every rank's step-2 rollout. Here one process recomputes that step the naive way, from the
loss's definition: each sequence alone (no padding, no micro-batches, the model's own full-vocabulary forward),
advantages per group by a loop, the whole batch of every rank at once, and the same SGD update(s). Step 2, not 1:
at step 1 the policy equals the reference, and the KL term's gradient is zero whatever the code does."""
import os
import sys

import pytest
import torch

from conftest import run
from test_grpo_math import naive_advantages

PY = sys.executable
LR = 1.0


def naive_logps(model, prompt, completion, temperature, suppressed):
    """(C,) log-probs of one completion after its own prompt: one unpadded sequence, the full logits."""
    P, C = prompt["input_ids"].shape[1], len(completion)
    ids = torch.cat([prompt["input_ids"][0], torch.tensor(completion)])[None]
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in prompt:
        kw["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"][0], torch.zeros(C, dtype=torch.long)])[None]
    if prompt.get("pixel_values") is not None:
        kw.update(pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
    logits = model(**kw).logits[0, P - 1:P + C - 1].double() / temperature
    logits[:, suppressed] = float("-inf")
    return logits.log_softmax(-1).gather(-1, ids[0, P:, None])[:, 0]


def naive_step(out, step, loss_type, mu, beta, max_len, G, temperature=1.0, eps=0.2, max_grad_norm=0.0, lr=LR,
               tis_cap=None, lora=False, sequence_ratio=False, kl="k3"):
    """The weights after `step` done by hand, starting from the checkpoint before it. tis_cap: each token's
    policy-gradient term weighs min(p_old / p_sampler, tis_cap), p_sampler from the rollout engine's log-probs.
    lora: the model is peft's own PeftModel of the base and the checkpoint's adapter (its trainable parameters
    the adapters); the reference is the base. sequence_ratio: GSPO's ratio, exp of the mean of the sequence's
    log-ratios, on each of its tokens; kl: k1, k2 or k3 (the estimator beta weighs)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import run_with_reward
    from utils import cut_at_eos, vision_token_ids
    start = os.path.join(out, f"checkpoint-{step - 1}")
    if lora:
        from peft import PeftModel
        base = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "base_model"), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(start, "adapter"), is_trainable=True)
    else:
        model = AutoModelForImageTextToText.from_pretrained(start, dtype=torch.float32)
    ref = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "base_model"), dtype=torch.float32) if beta else None
    tok = AutoProcessor.from_pretrained(start).tokenizer
    eos = set(model.generation_config.eos_token_id) | {tok.eos_token_id}
    suppressed = vision_token_ids(model.config, tok)
    ranks = sorted(f for f in os.listdir(out) if f.startswith(f"rollout-step{step}-"))
    seqs, sampler = [], []  # (prompt, completion ids) of every rank, in rank order; the engine's log-probs
    for f in ranks:
        r = torch.load(os.path.join(out, f), weights_only=False)
        for i, (p, group) in enumerate(zip(r["prompts"], r["samples"])):
            seqs += [(p, cut_at_eos(s, eos, tok.pad_token_id)[0][:max_len]) for s in group]
            sampler += [torch.tensor(lp[:len(seqs[-len(group) + j][1])], dtype=torch.float64)
                        for j, lp in enumerate(r["logps"][i])] if r.get("logps") else []
    texts = tok.batch_decode([c for _, c in seqs], skip_special_tokens=True)
    adv = naive_advantages(run_with_reward.uppercase_reward(texts), G, True)
    n_seq, n_tok = len(seqs), sum(len(c) for _, c in seqs)
    with torch.no_grad():
        old = [naive_logps(model, p, c, temperature, suppressed) for p, c in seqs]
        refs = [naive_logps(ref, p, c, temperature, suppressed) for p, c in seqs] if beta else None
    params = [p for p in model.parameters() if p.requires_grad]
    # each tensor's sum over sequences (and iterations) of the norms of their gradients: the size of the terms
    # before the group advantages (which sum to zero) cancel most of them: what float32 round-off is relative to
    magnitude = {n: 0.0 for n, _ in model.named_parameters()}
    for _ in range(mu):
        model.zero_grad()
        for i, (p, c) in enumerate(seqs):
            before = {n: w.grad.clone() if w.grad is not None else None for n, w in model.named_parameters()}
            logp = naive_logps(model, p, c, temperature, suppressed)
            ratio = torch.exp((logp - old[i]).mean() if sequence_ratio else logp - old[i])
            per_tok = -torch.minimum(ratio * adv[i], ratio.clamp(1 - eps, 1 + eps) * adv[i]) * torch.ones_like(logp)
            if tis_cap:
                per_tok = per_tok * torch.exp(old[i] - sampler[i]).clamp(max=tis_cap)
            if beta:
                d = refs[i] - logp
                per_tok = per_tok + beta * {"k1": -d, "k2": d ** 2 / 2, "k3": torch.exp(d) - d - 1}[kl]
            norm = {"grpo": len(c) * n_seq, "dapo": n_tok, "dr_grpo": n_seq * max_len}[loss_type]
            (per_tok.sum() / norm).backward()
            for n, w in model.named_parameters():
                if w.grad is not None:
                    magnitude[n] += lr * (w.grad - (before[n] if before[n] is not None else 0)).norm().item()
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
        scale = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm else 1.0
        assert not max_grad_norm or scale < 0.5, f"the gradient norm {norm:.3g} must be well over the clip"
        with torch.no_grad():
            for w, g in zip(params, grads):
                w -= lr * scale * g
    return dict(model.named_parameters()), n_seq, magnitude


def weights(path):
    from transformers import AutoModelForImageTextToText
    return dict(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).named_parameters())


def assert_update_is_the_full_batch_gradient(out, loss_type, mu, beta, max_len, G, n_expected, step=2,
                                             max_grad_norm=0.0, lr=LR, tis_cap=None, **options):
    before = weights(os.path.join(out, f"checkpoint-{step - 1}"))
    after = weights(os.path.join(out, "final") if not os.path.isdir(os.path.join(out, f"checkpoint-{step}"))
                    else os.path.join(out, f"checkpoint-{step}"))
    naive, n_seq, magnitude = naive_step(out, step, loss_type, mu, beta, max_len, G, max_grad_norm=max_grad_norm,
                                         lr=lr, tis_cap=tis_cap, **options)
    assert n_seq == n_expected
    got = torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)]).double()
    want = torch.cat([(naive[k].detach() - before[k]).flatten() for k in sorted(before)]).double()
    assert want.norm() > 1e-4, "the naive step moved nothing: the test would prove nothing"
    rel = ((got - want).norm() / want.norm()).item()
    # Each tensor's error against the size of the terms its update sums, not against the update: the G samples of
    # a group have advantages summing to zero, so a tensor's update can be a small remainder of large terms (a
    # layer norm's weight: 1.2e-4 of its update, 1e-8 of its terms). float32 sums of n terms are off by at most
    # n u of the sum of their sizes (u = 2^-24 = 6e-8; Higham, Accuracy and Stability, 4.2); here n is the
    # tokens of the batch (~128) times the terms of each backward product (the tiny model's width 64, a few
    # layers): ~1e4, a bound of 6e-4 of the terms (measured: up to 2.3e-5). The whole update's error against its
    # norm stays under 1e-5: there the small remainders weigh nothing (measured: up to 3.5e-7). The bugs these
    # tests caught were off by 0.1 to 10 (a micro-batch's gradient dropped, a stale gradient re-applied).
    per_tensor = {k: ((after[k] - naive[k].detach()).norm().item() / magnitude[k]) if magnitude[k] else
                  (after[k] - before[k]).norm().item() for k in sorted(before)}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"step {step}: relative error {rel:.3g}, worst tensor {worst} {per_tensor[worst]:.3g} of its terms' size")
    assert rel < 1e-5 and per_tensor[worst] < 6e-4, \
        f"update vs the naive full-batch gradient: relative error {rel:.3g} (worst tensor {worst}: {per_tensor[worst]:.3g} " \
        "of its terms' size)"
    return rel, per_tensor


def grad_check(out, processes, loss_type, mu, beta, extra=(), steps=2, max_grad_norm=0.0, lr=LR, env=None,
               deepspeed=None, mixed_precision="no"):
    """Runs tests/grad_check.py: on `processes` ZeRO processes under accelerate, or one process without
    DeepSpeed (deepspeed=False; the default for one process)."""
    args = ["tests/grad_check.py", "--model", "tiny", "--output_dir", out, "--rewards", "uppercase",
            "--steps", str(steps), "--save_steps", "1", "--eval_steps", "0", "--prompts_per_step", str(4 // processes),
            "--num_generations", "4", "--micro_batch_size", "3", "--max_completion_length", "8",
            "--learning_rate", str(lr), "--max_grad_norm", str(max_grad_norm), "--trainable", "all",
            "--loss_type", loss_type, "--mu", str(mu), "--beta", str(beta), *extra]
    if not (processes > 1 if deepspeed is None else deepspeed):
        return run([PY, *args], env=env)
    return run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes",
                str(processes), "--mixed_precision", mixed_precision, *args], env=env, timeout=300)


# each loss type (its denominator over both ranks' tokens), mu 1 and 2 (the old log-probs of a sharded model) and
# beta 0 and > 0 (the sharded reference) on 2 ZeRO-3 processes (micro-batches of 3, 3 and 2 sequences of unequal
# lengths on each), and on one process without DeepSpeed (the same loss code, torch's accumulation and clipping):
# each loss type, mu and beta value at least once in each set (the loss's algebra for every combination is
# test_grpo_math's)
CASES = [("grpo", 1, 0.0), ("dapo", 2, 0.1), ("dr_grpo", 2, 0.1)]
ONE_PROCESS = [("grpo", 2, 0.1), ("dapo", 2, 0.0), ("dr_grpo", 1, 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,mu,beta,processes",
                         [pytest.param(*c, 2, id=f"{c[0]}-{c[1]}-{c[2]}-zero3") for c in CASES] +
                         [pytest.param(*c, 1, id=f"{c[0]}-{c[1]}-{c[2]}-one_process") for c in ONE_PROCESS])
def test_step_equals_the_naive_full_batch_gradient(tmp_path, processes, loss_type, mu, beta):
    out = str(tmp_path / "run")
    grad_check(out, processes, loss_type, mu, beta, ["--rollout", "hf"])
    assert_update_is_the_full_batch_gradient(out, loss_type, mu, beta, 8, 4, n_expected=16)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_max_grad_norm_clips_the_full_batch_gradient(tmp_path, processes):
    """--max_grad_norm clips the global norm of the whole step's gradient, with DeepSpeed (2 processes) and
    without (1 process: it was ignored there)."""
    out = str(tmp_path / "clip")
    # lr x clip = 1: a clipped update as large as the unclipped ones, well above the weights' float32 round-off
    grad_check(out, processes, "grpo", 1, 0.0, ["--rollout", "hf"], max_grad_norm=0.01, lr=100.0)
    assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.0, 8, 4, n_expected=16, max_grad_norm=0.01, lr=100.0)


def rows_drawn(n, rank, world, per_step, step, seed=0):
    """The row numbers utils.PromptSampler gives `rank` of `world` at `step` (1, 2, ...), from n rows (its order
    depends on neither the images nor the processor's output while no row is skipped)."""
    import main
    from utils import PromptSampler, tiny_processor
    rows = [{"problem": f"row {i}", "solution": "1", "image": None} for i in range(n)]
    sampler = PromptSampler(rows, tiny_processor(), main.Config(), rank, world, seed)
    for _ in range(step):
        drawn = sampler.next(per_step)
    return {int(r["problem"].split()[1]) for r, _ in drawn}


def mixed_dataset(tmp_path, n=8, with_image=lambda i: i % 2):
    """Rows with an image where with_image(row) (default: every other row), the others text-only."""
    import json
    from utils import make_counting_dataset
    lines = []
    for i, r in enumerate(make_counting_dataset(n, seed=5)):
        image = None
        if with_image(i):
            image = str(tmp_path / f"image{i}.png")
            r["image"].save(image)
        lines.append(json.dumps({"problem": r["problem"], "solution": r["solution"], "image": image}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_zero3_with_a_rank_without_images_runs_and_its_step_is_the_full_batch_gradient(tmp_path):
    """2 ZeRO-3 processes, vLLM rollouts, rank 0's prompts all text-only and rank 1's all with an image: the vision
    tower's shards are gathered on one rank only unless the other runs it too (a hang before). 3 steps run, the
    sampler agrees with the trainer, and step 2 is the naive full-batch gradient, vision tower included."""
    pytest.importorskip("vllm")
    out = str(tmp_path / "mixed")
    with_image = rows_drawn(8, 1, 2, per_step=2, step=2).__contains__  # rank 1's rows of step 2, no other row
    grad_check(out, 2, "grpo", 1, 0.04, ["--rollout", "vllm", "--dataset", mixed_dataset(tmp_path, 8, with_image)],
               steps=3)
    import json
    ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert all(m["sampler_logp_diff"] < 1e-4 for m in ms), [m["sampler_logp_diff"] for m in ms]
    for rank, has_image in ((0, False), (1, True)):
        prompts = torch.load(os.path.join(out, f"rollout-step2-rank{rank}.pt"), weights_only=False)["prompts"]
        assert all((p.get("pixel_values") is not None) == has_image for p in prompts)
    assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.04, 8, 4, n_expected=16)


@pytest.mark.slow
def test_zero2_compiled_step_equals_the_naive_full_batch_gradient(tmp_path):
    """--zero_stage 2 (whole weights on each rank, no per-layer gathers) with --compile true (torch.compile of the
    decoder layers, as on GPUs by default) applies the same full-batch gradient, through the policy's and the
    reference's compiled layers, with mu 2 (a no-grad forward of the policy too)."""
    out = str(tmp_path / "z2")
    p = grad_check(out, 2, "dapo", 2, 0.1, ["--rollout", "hf", "--zero_stage", "2", "--compile", "true"])
    assert "ZeRO-2, compiled layers" in p.stdout
    assert_update_is_the_full_batch_gradient(out, "dapo", 2, 0.1, 8, 4, n_expected=16)
    assert_transformers_sees_the_stage(out, zero3=False)


def sampled_from(out, step, G=4):
    """Mean |recorded sampler log-prob - the naive log-prob under each saved model| over step's sampled tokens, for
    each model the engine could have sampled with: {"base_model" (step 0), "checkpoint-1", ...}."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from utils import vision_token_ids
    tok = AutoProcessor.from_pretrained(os.path.join(out, "base_model")).tokenizer
    seqs = []
    for f in sorted(f for f in os.listdir(out) if f.startswith(f"rollout-step{step}-")):
        r = torch.load(os.path.join(out, f), weights_only=False)
        seqs += [(p, s, lp) for p, group, lps in zip(r["prompts"], r["samples"], r["logps"])
                 for s, lp in zip(group, lps)]
    diff = {}
    for name in ["base_model"] + [f"checkpoint-{s}" for s in range(1, step)]:
        model = AutoModelForImageTextToText.from_pretrained(os.path.join(out, name), dtype=torch.float32)
        suppressed = vision_token_ids(model.config, tok)
        with torch.no_grad():
            d = [(naive_logps(model, p, s, 1.0, suppressed) - torch.tensor(lp, dtype=torch.float64)).abs()
                 for p, s, lp in seqs]
        diff[name] = torch.cat(d).mean().item()
    return diff


@pytest.mark.slow
def test_overlapped_step_with_importance_sampling_is_the_full_batch_gradient(tmp_path):
    """--overlap true (vLLM's CPU engine): step t trains on completions the engine sampled, while step t-1
    trained, from the weights before step t-1's update, the weights of checkpoint t-2; each token's
    policy-gradient term weighs min(p_old / p_sampler, 2) (truncated importance sampling, on by default with the
    overlap). The sampler's log-probs are checked against each saved model's own (naive, float64): step 3's are
    checkpoint 1's, not the base's (two steps behind) nor checkpoint 2's. SGD at lr 1 moves the policy far
    between the two (0.29 nats/token apart), so the weights are far from 1: step 3 equals the naive full-batch
    gradient with them, and not without them."""
    pytest.importorskip("vllm")
    out = str(tmp_path / "overlap")
    grad_check(out, 2, "grpo", 1, 0.04, ["--rollout", "vllm", "--overlap", "true"], steps=3)
    import json
    ms = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in ms] == [1, 2, 3], ms
    assert ms[0]["sampler_logp_diff"] < 1e-4 < ms[1]["sampler_logp_diff"], "step 2's batch is one update old"
    diff = sampled_from(out, 3)
    # float32 engine against a float64 forward: ~1e-6 a token; one SGD step at lr 1 apart: ~0.3
    assert diff["checkpoint-1"] < 1e-4 < 0.01 < min(diff["base_model"], diff["checkpoint-2"]), diff
    assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.04, 8, 4, n_expected=16, step=3, tis_cap=2.0)
    with pytest.raises(AssertionError, match="relative error"):
        assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.04, 8, 4, n_expected=16, step=3)


@pytest.mark.slow
def test_zero3_ranks_of_different_lengths_score_in_chunks_and_step_the_full_batch_gradient(tmp_path):
    """2 ZeRO-3 processes whose completions differ in length (rank 1's cut to 2 tokens), the LM head scoring 4
    rows of logits at a time: rank 0 needs more chunks than rank 1. Each chunk called the head module, and under
    ZeRO-3 each call gathers its weight with every rank: the ranks' gathers went out of step and the run hung. The
    head is one call now; the step is the naive full-batch gradient."""
    out = str(tmp_path / "chunks")
    grad_check(out, 2, "grpo", 1, 0.1, ["--rollout", "hf"], env={"HEAD_CHUNK_TOKENS": "4", "RANK1_MAX_TOKENS": "2"})
    lengths = [[len(s) for g in torch.load(os.path.join(out, f"rollout-step2-rank{r}.pt"), weights_only=False)["samples"]
                for s in g] for r in (0, 1)]
    assert max(lengths[1]) <= 2 < max(lengths[0]), lengths
    assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.1, 8, 4, n_expected=16)


def has_image(out, step, rank=0):
    prompts = torch.load(os.path.join(out, f"rollout-step{step}-rank{rank}.pt"), weights_only=False)["prompts"]
    return [p.get("pixel_values") is not None for p in prompts]


@pytest.mark.slow
def test_one_zero3_process_steps_the_full_batch_gradient_when_micro_batches_lack_images(tmp_path):
    """One ZeRO-3 process (--zero_stage 3 on one GPU, auto for a large model, CPU runs), --trainable all, rows with
    and without an image. Step 2's first micro-batch has no image, step 3 none at all: the vision tower gets no
    gradient there, and DeepSpeed 0.19.8 kept its gradient partition from the last micro-batch that gave one
    (it copies at the first micro-batch and adds after), so step 3 re-applied step 2's vision update and step 2
    added step 1's. Both steps equal the naive full-batch gradient, vision tower included."""
    out = str(tmp_path / "one_zero3")
    # the sampler's order for seed 0 and 12 rows: step 1 rows 6, 11, 0, 4; step 2 rows 7, 3, 2, 10; step 3 5, 8, 9, 1
    data = mixed_dataset(tmp_path, 12, with_image=lambda i: i in (0, 2, 6))
    p = grad_check(out, 1, "grpo", 1, 0.0, ["--rollout", "hf", "--dataset", data, "--zero_stage", "3"], steps=3,
                   deepspeed=True)
    assert "1 training process(es) on cpu, ZeRO-3" in p.stdout, p.stdout[-2000:]
    assert has_image(out, 1) == [True, False, True, False], has_image(out, 1)
    assert has_image(out, 2) == [False, False, True, False], has_image(out, 2)  # micro-batch 1: rows 0-2, no image
    assert has_image(out, 3) == [False] * 4, has_image(out, 3)
    for step in (2, 3):
        assert_update_is_the_full_batch_gradient(out, "grpo", 1, 0.0, 8, 4, n_expected=16, step=step)
    assert_transformers_sees_the_stage(out, zero3=True)


def assert_transformers_sees_the_stage(out, zero3):
    """ds_accel.yaml says ZeRO-3; main.py picks the stage after accelerate started. transformers must see the one
    picked (under a stale ZeRO-3 it built every model through zero.Init: the colocated engine's start, which sizes
    vLLM's share from the weights, failed on the meta device), and the weights' size must be the model's."""
    import json

    from transformers import AutoModelForImageTextToText
    with open(os.path.join(out, "deepspeed_seen.json")) as f:
        seen = json.load(f)
    assert seen["transformers_zero3"] is zero3, seen
    model = AutoModelForImageTextToText.from_pretrained(os.path.join(out, "base_model"))
    assert seen["model_bytes"] == 2 * sum(p.numel() for p in model.parameters()), seen


@pytest.mark.slow
@pytest.mark.parametrize("stage,processes", [(2, 1), (2, 2), (3, 2)])
def test_bf16_zero_adds_the_micro_batches_and_ranks_gradients_in_float32(tmp_path, stage, processes):
    """bf16 under ZeRO-2 (the GPU default for models that fit) or 3, 16 micro-batches of one sequence a step on
    one process, or 8 on each of 2: the gradient DeepSpeed applies is the float64 sum of the bf16 gradients
    autograd gave it, micro-batch by micro-batch and rank by rank, to float32 accuracy. DeepSpeed's default adds
    them in bf16, 2^-9 of the running sum lost at each addition: 4e-3 to 5e-3 off here."""
    sums = tmp_path / "sums"
    sums.mkdir()
    grad_check(str(tmp_path / "bf16"), processes, "grpo", 1, 0.0,
               ["--rollout", "hf", "--zero_stage", str(stage), "--micro_batch_size", "1"], steps=1,
               env={"GRAD_SUM_DIR": str(sums)}, deepspeed=True, mixed_precision="bf16")
    ranks = [torch.load(sums / f"step1-rank{r}.pt") for r in range(processes)]
    names = sorted(ranks[0]["parts"])
    want = torch.cat([sum(r["parts"][n] for r in ranks).flatten() / processes for n in names])
    got = torch.cat([ranks[0]["applied"][n].flatten() for n in names])
    weights = torch.cat([ranks[0]["weights"][n].flatten() for n in names])
    rel = ((got - want).norm() / want.norm()).item()
    print(f"bf16 ZeRO-{stage}, {processes} process(es): applied vs the float64 sum of the parts: {rel:.3g}; "
          f"|update| / |weights| {(want.norm() / weights.norm()).item():.3g}")
    # float32: 16 additions, 16 u = 1e-6 of the sum at most, and the master weights' rounding when the step is
    # applied, u |w| / |update| = 6e-8 / 0.05 = 1.2e-6 (measured: 4.7e-7 to 4.9e-7)
    assert rel < 3e-6


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_lora_step_equals_the_naive_peft_step(tmp_path, processes):
    """--lora_rank 4 --lora_targets all (the vision blocks' too), beta 0.1: step 2 moves the adapters as peft's own
    PeftModel (the base and checkpoint-1's adapter) does under the naive loss and the same SGD update, the KL
    against the base (adapters off) included; on one process without DeepSpeed and on 2 ZeRO-2 processes.
    Tolerance as assert_update_is_the_full_batch_gradient's (float32, the same sums)."""
    from safetensors.torch import load_file
    out = str(tmp_path / "run")
    grad_check(out, processes, "grpo", 1, 0.1, ["--rollout", "hf", "--lora_rank", "4", "--lora_targets", "all",
                                                "--trainable", "language"])
    before, after = (load_file(os.path.join(out, c, "adapter", "adapter_model.safetensors"))
                     for c in ("checkpoint-1", "checkpoint-2"))
    naive, n_seq, magnitude = naive_step(out, 2, "grpo", 1, 0.1, 8, 4, lora=True)
    assert n_seq == 16
    want = {k.replace(".default.", "."): v.detach() for k, v in naive.items() if ".lora_" in k}  # peft's file names
    assert sorted(want) == sorted(after) and any(".visual." in k for k in after), (sorted(want)[:3], sorted(after)[:3])
    got = torch.cat([(after[k] - before[k]).flatten() for k in sorted(after)]).double()
    moved = torch.cat([(want[k] - before[k]).flatten() for k in sorted(after)]).double()
    assert moved.norm() > 1e-4 and all(before[k].abs().sum() > 0 for k in before if "lora_B" in k), \
        "B moved at step 1: step 2 trains A and B"
    rel = ((got - moved).norm() / moved.norm()).item()
    print(f"LoRA step 2 on {processes} process(es): relative error {rel:.3g}")
    assert rel < 1e-5, rel


@pytest.mark.slow
def test_offloaded_step_equals_the_naive_full_batch_gradient(tmp_path):
    """--offload params (ZeRO-Offload: the float32 master weights, the optimizer's state and step, and the weights
    between uses in host memory) on 2 ZeRO-3 processes: the same step as without it. On this CPU machine the
    device memory is host memory too, so this proves the wiring and the update, not the memory saved (README,
    Measured)."""
    out = str(tmp_path / "run")
    p = grad_check(out, 2, "dapo", 1, 0.0, ["--rollout", "hf", "--offload", "params"])
    assert "offload" in p.stdout + p.stderr  # DeepSpeed took the offload config (it logs it)
    assert_update_is_the_full_batch_gradient(out, "dapo", 1, 0.0, 8, 4, n_expected=16)


@pytest.mark.slow
def test_a_gspo_step_with_the_k2_estimator_equals_the_naive_full_batch_gradient(tmp_path):
    """--importance_sampling_level sequence (GSPO) and --kl_estimator k2 through the real loop (one process, mu 2
    so the ratio moves from 1, beta > 0): the step is the naive one of those formulas. With the flags dropped on
    their way to the loss (update_policy), the step is the token-level k3 one and this fails."""
    out = str(tmp_path / "run")
    grad_check(out, 1, "grpo", 2, 0.1, ["--rollout", "hf", "--importance_sampling_level", "sequence",
                                         "--kl_estimator", "k2"])
    assert_update_is_the_full_batch_gradient(out, "grpo", 2, 0.1, 8, 4, n_expected=16, sequence_ratio=True, kl="k2")
