"""How the training processes hold the model: accelerate's Accelerator over DeepSpeed, with ZeRO's stage and
offload picked from the model's size and this machine's memory (--zero_stage auto, --offload auto), DeepSpeed's
config completed from ours, and the frozen reference model wrapped alike."""
import math
import os

import torch

import checkpoint
from policy import trains
from utils import user_error


def micro_batches_per_step(cfg):
    return math.ceil(cfg.prompts_per_step * cfg.num_generations / cfg.micro_batch_size)


def make_accelerator(cfg):
    """accelerate's Accelerator (DeepSpeed as the launcher's config file says), accumulating one step's
    micro-batches."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=micro_batches_per_step(cfg)),
        log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=cfg.output_dir)
    fix_cpu_deepspeed_state(accelerator)
    return accelerator


def fix_cpu_deepspeed_state(accelerator):
    """accelerate 1.15 has no DeepSpeed-on-CPU mode: there it counts one process while DeepSpeed's gloo group
    holds them all. Give accelerate the true rank and world size (CPU tests and the smoke run only)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState
    if accelerator.device.type == "cpu" and dist.is_initialized() and accelerator.num_processes != dist.get_world_size():
        true = dict(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                    local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        PartialState._shared_state.update(true)
        AcceleratorState._shared_state.update(true)


def configure_deepspeed(cfg, accelerator, model, ref_model, resumed_stage=None):
    """DeepSpeed's config completed from ours before accelerate wraps the models: the batch shape, ZeRO's stage
    and offload (auto: from the model's size and this machine's memory), float32 gradient sums. Returns the stage,
    or None without DeepSpeed."""
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is None:
        return None
    n_micro = micro_batches_per_step(cfg)  # no dataloader is prepared: DeepSpeed learns the batch shape here
    ds_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size,
                                      gradient_accumulation_steps=n_micro, gradient_clipping=cfg.max_grad_norm,
                                      train_batch_size=cfg.micro_batch_size * n_micro * accelerator.num_processes,
                                      zero_allow_untested_optimizer=True)  # any torch optimizer
    zero = ds_plugin.deepspeed_config.setdefault("zero_optimization", {})
    import psutil
    gpu_bytes, host_bytes = 0, psutil.virtual_memory().available
    if accelerator.device.type == "cuda":  # the models still in host memory leave it for the GPU soon
        gpu_bytes = torch.cuda.get_device_properties(accelerator.device).total_memory
        host_bytes += sum(p.numel() * p.element_size() for m in (model, ref_model) if m is not None
                          for p in m.parameters() if p.device.type == "cpu")
    offload = resolve_offload(cfg, model, accelerator.num_processes, gpu_bytes, host_bytes,
                              int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
                              reference=ref_model is not None)
    zero["stage"] = zero_stage(cfg, model, ref_model, accelerator, offload, resumed_stage)
    bf16 = ds_plugin.deepspeed_config.get("bf16", {}).get("enabled") in (True, "true")
    if bf16:  # DeepSpeed adds micro-batches' (and ranks') bf16 gradients in bf16 unless told: 2^-9 per addition
        ds_plugin.deepspeed_config["data_types"] = {"grad_accum_dtype": "fp32"}
        if accelerator.num_processes > 1:
            ds_plugin.deepspeed_config["communication_data_type"] = "fp32"
    if offload != "none":  # host memory, pinned on GPUs; the torch optimizer steps there (no CPUAdam build)
        where = {"device": "cpu", "pin_memory": accelerator.device.type == "cuda"}
        zero["offload_optimizer"] = where
        if offload == "params":
            zero["offload_param"] = dict(where)
        ds_plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    elif cfg.max_grad_norm > 0 and bf16:
        # the norm DeepSpeed takes to clip shows a NaN or inf gradient as well (trainer.update_policy stops the
        # run on one), without its per-tensor check: 6 launches for each of 729 tensors, ~0.1 s a step of the
        # 2B model's update with the GPU idle
        ds_plugin.deepspeed_config["bf16"]["check_grad_overflow"] = False
    if checkpoint.OUTPUT_ON_EACH_NODE:  # each node's checkpoint holds what its ranks need to resume
        ds_plugin.deepspeed_config["checkpoint"] = {"use_node_local_storage": True}
    # transformers reads the stage from its copy of the config that accelerate made at the start, from
    # ds_accel.yaml (ZeRO-3): renewed, so that it builds, loads and generates as under the stage picked here
    ds_plugin.set_deepspeed_weakref()
    return zero["stage"]


def resolve_offload(cfg, model, world, gpu_bytes, host_bytes, on_node=1, reference=False):
    """--offload, with auto resolved: the optimizer's state (fp32 master weights, Adam's two moments: 12 bytes a
    trained weight) to host memory where, with the bf16 weights (the `reference` model's too) and the fp32
    gradients DeepSpeed accumulates, it would take over 0.6 of each GPU (`gpu_bytes`; 0: no GPU) even sharded over
    the `world` ranks (ZeRO-3), leaving too little for activations and a colocated vLLM; else none. LoRA's few
    trained weights never need it. Offloaded, the node's `on_node` ranks keep 16 bytes a trained weight in host
    memory (master weights, their fp32 gradients, Adam): where `host_bytes` (available) cannot hold them, the run
    stops here with the sizes and the ways out."""
    trained = sum(p.numel() for name, p in model.named_parameters() if trains(name, cfg.trainable))
    offload = cfg.offload
    if offload == "auto":
        need = ((2 + 2 * reference) * sum(p.numel() for p in model.parameters()) + 16 * trained) / world
        offload = "optimizer" if gpu_bytes and not cfg.lora_rank and need > 0.6 * gpu_bytes else "none"
    host = 16 * trained / world * on_node
    if offload != "none" and not cfg.lora_rank and host > host_bytes:
        user_error(f"--offload {cfg.offload}: the optimizer's state of {trained / 1e9:.2f}B trained weights takes "
                   f"{host / 1e9:.0f} GB of host memory here ({on_node} training process(es) on this machine), "
                   f"{host_bytes / 1e9:.0f} GB is available: train fewer weights (--lora_rank, --trainable "
                   "language or mlp) or spread the run over more machines")
    return offload


def zero_stage(cfg, model, ref_model, accelerator, offload, resumed_stage=None):
    """--zero_stage, with auto resolved: ZeRO-2 where a rank's whole copy takes under half of its GPU (bf16
    weights, its share of the fp32 gradients, weights and Adam state, the reference's bf16 weights), leaving
    the rest to activations; else ZeRO-3. ZeRO-2 skips ZeRO-3's per-module gathers, whose Python hooks made the 2B model's
    update 2.8x slower on one H200 (tests/bench_step.py: 7.8 s vs 2.8 s; at 5c57bf3 1.74 s vs 0.86 s, for 44.6 vs 49.4
    GiB of peak memory). CPU runs keep ZeRO-3."""
    if cfg.zero_stage != "auto":
        return int(cfg.zero_stage)
    if offload == "params":  # the weights in host memory: ZeRO-3's partitions
        return 3
    if cfg.lora_rank:  # the base is frozen and whole on each rank (check_flags refuses ZeRO-3 with LoRA)
        return 2
    if resumed_stage:  # the checkpoint's DeepSpeed shards are of the stage it was written with
        return resumed_stage
    if accelerator.device.type != "cuda":
        return 3
    n = sum(p.numel() for p in model.parameters())
    state_bytes = 0 if offload == "optimizer" else 16 / accelerator.num_processes  # fp32 grads, master, Adam
    need = n * (2 + state_bytes + (2 if ref_model is not None else 0))  # resolve_offload's 18 bytes, per rank
    return 2 if need < 0.5 * torch.cuda.get_device_properties(accelerator.device).total_memory else 3


def prepare_reference(ref_model, accelerator):
    """A frozen copy for the KL term; under ZeRO-3 it is sharded like the policy (no optimizer)."""
    ref_model.requires_grad_(False).eval()
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is None:
        return ref_model.to(accelerator.device)
    import copy
    import deepspeed
    ds_config = copy.deepcopy(ds_plugin.deepspeed_config)
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        ds_config["zero_optimization"] = {"stage": 0}
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=ref_model, config=ds_config)
    engine.eval()
    return engine
