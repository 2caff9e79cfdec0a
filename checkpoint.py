"""A run's folder: what it holds (checkpoints, the final model, logs), writing a checkpoint so that a half-written
one is never resumed from, and, before anything loads, whether this run continues the one there, starts over
(--overwrite) or stops saying so."""
import contextlib
import dataclasses
import json
import os
import pickle
import shutil

import torch
from safetensors import SafetensorError

from engine import gather_zero3_params, weight_groups
from policy import hf_weights, lora_layers, save_adapter
from utils import user_error, write_jsonl


RUN_OUTPUTS = ("config.json", "run.json", "metrics.jsonl", "completions.jsonl", "eval_completions.jsonl",
               "curves.png", "report.html", "prompt_images", "final", "final.tmp")  # and checkpoint-*
# what a run killed before its first checkpoint leaves (and checkpoint-N.tmp): --resume auto starts over on it
STARTED_ONLY = set(RUN_OUTPUTS) - {"final"}
BEFORE_THEIR_FLAGS = {"overlap": "false", "importance_sampling": "false", "importance_sampling_cap": 2.0,
                      "importance_sampling_level": "token", "kl_estimator": "k3", "mask_truncated_completions": False,
                      "importance_sampling_mode": "token_truncate", "overlong_buffer": 0,
                      "dynamic_sampling": False, "dynamic_sampling_tries": 4, "offload": "none"}
# flags that change nothing in the math of a run: a resumed run may change them
# (not eval_*: evaluation draws from the same RNG as the rollouts; not attn_implementation: other numerics)
RESUMABLE_CHANGES = {"output_dir", "steps", "epochs", "save_steps", "save_total_limit", "resume", "overwrite",
                     "log_completions_steps", "report_to", "strict", "debug", "gradient_checkpointing",
                     "vllm_gpu_memory_utilization", "offload",  # where the optimizer's state lives, not its math
                     "vllm_sync_bucket_mb", "vllm_weight_transfer", "vllm_enforce_eager", "check_only", "verbose"}


def check_output_dir(out, model, lora=False):
    """output_dir (or the folder it would be made in) can be written: a probe file there, before anything loads.
    Warns when its disk has less free space than a checkpoint of a local model takes (weights, and float32 master
    weights and Adam state: 7x the bf16 weights, 8x under ZeRO-2, whose module state holds the weights once more;
    with LoRA the merged model and the adapters' small state: 1x)."""
    import tempfile
    here = os.path.abspath(os.path.expanduser(out))
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        user_error(f"--output_dir {out}: {here} is a file: name a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=here, prefix=".grpo-vl-probe-"):
            pass
    except OSError as e:
        user_error(f"--output_dir {out}: cannot write in {here} ({e.strerror or e}): choose a folder you can write to")
    weights = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors")) \
        if os.path.isdir(model) else 0
    free = shutil.disk_usage(here).free
    need = (1 if lora else 8) * weights
    if need > free:
        import warnings
        warnings.warn(f"--output_dir {out}: {free / 1e9:.1f} GB free, and a checkpoint of {model} takes about "
                      f"{need / 1e9:.1f} GB: free space, or save fewer (--save_total_limit, --save_steps)")


def resolve_output_dir(cfg, is_main):
    """Decided before anything is written: the checkpoint to resume from, or '' for a run from step 1. An earlier
    run in output_dir is continued (--resume), deleted (--overwrite true), or the run stops saying so: never
    silently mixed with this one."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        user_error(f"--output_dir {out} is a file: name a folder")
    earlier = sorted(e for e in (os.listdir(out) if os.path.isdir(out) else []) if e != "base_model")
    found = checkpoints(out)
    not_restartable = [e for e in earlier if e not in STARTED_ONLY and not e.endswith(".tmp")]
    if cfg.resume and cfg.resume != "auto":
        if not os.path.exists(os.path.join(cfg.resume, "trainer_state.json")):
            user_error(f"--resume {cfg.resume}: not a complete checkpoint (no trainer_state.json); complete ones in "
                       f"{out}: {[os.path.basename(c) for c in found] or 'none'}")
        resume_from = cfg.resume
    elif cfg.resume == "auto" and found:
        resume_from = found[-1]
    elif cfg.resume == "auto" and not_restartable:
        user_error(f"--resume auto: {out} holds {', '.join(not_restartable[:6])}"
                   f"{' ...' if len(not_restartable) > 6 else ''} but no "
                   "complete checkpoint to continue from (a finished run without checkpoints, an older version's "
                   "checkpoints, or other files): start over with --overwrite true, or choose another --output_dir")
    elif earlier and not (cfg.overwrite or cfg.resume == "auto"):
        user_error(f"--output_dir {out} already holds {', '.join(earlier[:6])}{' ...' if len(earlier) > 6 else ''}: "
                   "continue that run with --resume auto, start over with --overwrite true (deletes its "
                   "checkpoints, final/ and logs), or choose another --output_dir")
    else:
        if earlier and is_main:  # --overwrite, or --resume auto with no complete checkpoint: start over
            # (is_main: each node's first process; on a shared disk they may race, so nothing here must fail)
            if cfg.resume == "auto":
                print(f"--resume auto: no complete checkpoint in {out}; starting from step 1")
            for e in earlier:
                if e in RUN_OUTPUTS or e.startswith("checkpoint-"):
                    target = os.path.join(out, e)
                    if os.path.isdir(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        try:
                            os.remove(target)
                        except FileNotFoundError:
                            pass
        return ""
    saved = saved_state(resume_from)
    now = dataclasses.asdict(cfg)
    # a run saved before a flag existed ran as that flag's "off" value
    was = {**BEFORE_THEIR_FLAGS, **saved["config"]}
    changed = {k: (v, now.get(k)) for k, v in was.items()
               if k not in RESUMABLE_CHANGES and str(now.get(k)) != str(v)}  # str: 3 from an older run == "3"
    if changed:
        user_error(f"--resume {resume_from}: these flags differ from the run it continues (saved -> now): "
                   + ", ".join(f"--{k} {a} -> {b}" for k, (a, b) in changed.items())
                   + "; give the saved values, or start over with --overwrite true")
    return resume_from


OUTPUT_ON_EACH_NODE = []  # [True] when the nodes do not share output_dir (main.py checks): each keeps its own


def writes_checkpoints(accelerator):
    """Rank 0 writes the models and checkpoint files; so does each node's first process when nodes have disks of
    their own (a resumed run on that node needs them there)."""
    return accelerator.is_main_process or (accelerator.is_local_main_process and bool(OUTPUT_ON_EACH_NODE))


def save_model(model, processor, accelerator, path):
    """save_pretrained of the Hugging Face model inside `model` (ZeRO-3 shards gathered) + processor: loadable by
    transformers and vLLM. With LoRA: the model with its adapters merged (hf_weights), and the adapter alone in
    path/adapter/ (peft's files: PeftModel.from_pretrained(base, path/adapter))."""
    hf = accelerator.unwrap_model(model).model
    if lora_layers(hf):  # (ZeRO-2: the tensors are whole on every rank)
        copies = {}  # tied weights stay one tensor under both names
        state = {n: copies.setdefault(id(t), t.detach().to("cpu", copy=True)) for n, t in hf_weights(hf)} \
            if writes_checkpoints(accelerator) else {}
        if writes_checkpoints(accelerator):
            save_adapter(hf, os.path.join(path, "adapter"))
    elif OUTPUT_ON_EACH_NODE:  # every node's writer needs the whole model: gathered layer by layer on every rank
        state = {}
        writer = writes_checkpoints(accelerator)
        for _, group in weight_groups(list(hf.named_parameters())):
            with gather_zero3_params([p for _, p in group]):  # collective: every rank
                if writer:
                    state.update({n: p.detach().to("cpu", copy=True) for n, p in group})
    else:
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards into rank 0; keys are "model.<hf name>"
        state = state and {k.removeprefix("model."): v for k, v in state.items()}
    if writes_checkpoints(accelerator):
        if OUTPUT_ON_EACH_NODE:  # transformers writes from global rank 0 only; here each node's writer must
            hf.should_save_on_this_rank = lambda is_main_process: True
        hf.save_pretrained(path, state_dict=state, safe_serialization=True)
        hf.__dict__.pop("should_save_on_this_rank", None)
        processor.save_pretrained(path)
    accelerator.wait_for_everyone()


class SaveError(OSError):
    """Writing a checkpoint or the final model failed (a full disk, a folder gone read-only): one line."""


@contextlib.contextmanager
def saving(what, path):
    """Context: an OSError while writing `what` becomes a SaveError saying what and how to go on; the half-written
    folder `path` is removed (it would hold the space that ran out)."""
    try:
        yield
    except SaveError:
        raise
    except (OSError, SafetensorError, RuntimeError) as e:  # safetensors' and torch.save's own write errors
        if isinstance(e, RuntimeError) and "writ" not in str(e):  # torch.save: "... failed writing file ..."
            raise
        shutil.rmtree(path, ignore_errors=True)
        folder = os.path.dirname(path)
        free = f", {shutil.disk_usage(folder).free / 1e9:.1f} GB free" if os.path.isdir(folder) else ""
        reason = getattr(e, "strerror", None) or str(e).split("I/O error: ")[-1].split(" (os error")[0]
        raise SaveError(f"{reason} writing {what} in {folder}{free}: free space or fix the folder, then run the "
                        "same command with --resume auto") from None


def save_final(model, processor, accelerator, out_dir):
    """out_dir/final/: the trained model (save_model), written as final.tmp and renamed once complete."""
    path, tmp = os.path.join(out_dir, "final"), os.path.join(out_dir, "final.tmp")
    with saving("the final model", tmp):
        if writes_checkpoints(accelerator):  # a run killed while writing it left one
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        save_model(model, processor, accelerator, tmp)
        if writes_checkpoints(accelerator):
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
    accelerator.wait_for_everyone()


def save_checkpoint(model, processor, accelerator, sampler, history, cfg, pending=None, rollout=None):
    """output_dir/checkpoint-{step}/: the Hugging Face model (loadable by transformers and vLLM) and what a resumed
    run needs: state/ (accelerate's save_state: DeepSpeed's model and optimizer shards, or torch's; every rank's
    RNG states), each rank's data position (state/sampler_{rank}.pkl) and, with --overlap, the next step's
    rollout already generated (state/pending_{rank}.pkl), and trainer_state.json (step, config, process
    count, the metrics so far, `rollout`: overlap and importance sampling as resolved). Written as
    checkpoint-{step}.tmp and renamed once every rank is done: a half-written checkpoint is never resumed from (a
    failed write is removed: SaveError). Keeps the last cfg.save_total_limit (0: all)."""
    step = history[-1]["step"]
    path = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = path + ".tmp"
    writer = writes_checkpoints(accelerator)
    with saving(f"checkpoint-{step}", tmp):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        save_model(model, processor, accelerator, tmp)
        # LoRA: DeepSpeed's state holds the adapters alone (the frozen base is --model's, loaded again on resume);
        # with the base it took as much space as the merged model beside it
        lora = cfg.lora_rank and accelerator.state.deepspeed_plugin is not None
        accelerator.save_state(os.path.join(tmp, "state"), **({"exclude_frozen_parameters": True} if lora else {}))
        os.makedirs(os.path.join(tmp, "state"), exist_ok=True)
        with open(os.path.join(tmp, "state", f"sampler_{accelerator.process_index}.pkl"), "wb") as f:
            pickle.dump(sampler.state_dict(), f)
        if pending is not None:
            with open(os.path.join(tmp, "state", f"pending_{accelerator.process_index}.pkl"), "wb") as f:
                pickle.dump(pending, f)
        accelerator.wait_for_everyone()
        if writer:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:  # written last: marks the state complete
                ds = accelerator.state.deepspeed_plugin
                json.dump({"step": step, "num_processes": accelerator.num_processes, "config": dataclasses.asdict(cfg),
                           "zero_stage": ds.deepspeed_config["zero_optimization"]["stage"] if ds else None,
                           "rollout": rollout, "history": history}, f)
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
            for old in checkpoints(cfg.output_dir)[:-cfg.save_total_limit] if cfg.save_total_limit else []:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(out_dir):
    """The complete checkpoints in out_dir, oldest first."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        step = name.removeprefix("checkpoint-")
        if step.isdigit() and os.path.exists(os.path.join(out_dir, name, "trainer_state.json")):
            found.append((int(step), os.path.join(out_dir, name)))
    return [path for _, path in sorted(found)]


def load_checkpoint(path, accelerator, sampler):
    """Restores what save_checkpoint wrote into the prepared model, optimizer, RNGs and sampler; returns the
    metrics of the steps done and the pending rollout (None if none was saved)."""
    state = saved_state(path)
    lora = state["config"].get("lora_rank") and accelerator.state.deepspeed_plugin is not None
    accelerator.load_state(os.path.join(path, "state"), **({"load_module_strict": False} if lora else {}))
    with open(os.path.join(path, "state", f"sampler_{accelerator.process_index}.pkl"), "rb") as f:
        sampler.load_state_dict(pickle.load(f))
    pending = None
    if os.path.exists(os.path.join(path, "state", f"pending_{accelerator.process_index}.pkl")):
        with open(os.path.join(path, "state", f"pending_{accelerator.process_index}.pkl"), "rb") as f:
            pending = pickle.load(f)
    return state["history"], pending


def saved_state(path):
    """A checkpoint's trainer_state.json: step, num_processes, config, zero_stage (DeepSpeed's), rollout (overlap and
    importance sampling as resolved; None in older checkpoints), history."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def resume(path, cfg, accelerator, sampler, sync):
    """Loads the checkpoint at `path` into the prepared model, optimizer, RNGs and sampler, copies the weights into
    the rollout engine and puts the logs back to that step; returns the metrics of the steps done and the
    rollout generated ahead (--overlap), or None."""
    saved = saved_state(path)["num_processes"]
    if saved != accelerator.num_processes:
        user_error(f"--resume {path}: it was written by {saved} training processes and this run has "
                   f"{accelerator.num_processes}: resume with the same GPU count")
    history, pending = load_checkpoint(path, accelerator, sampler)
    if sync is not None:
        sync()
    done = history[-1]["step"]
    if writes_checkpoints(accelerator):  # later checkpoints belong to the abandoned run: never resumed
        for later in checkpoints(cfg.output_dir):
            if int(later.rsplit("-", 1)[1]) > done:
                print(f"resuming from step {done}: removing {later} (from the run that went on from there)")
                shutil.rmtree(later, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
        trimmed = [(metrics, history)]
        for name in ("completions.jsonl", "eval_completions.jsonl"):  # the steps after the checkpoint's are gone
            log = os.path.join(cfg.output_dir, name)
            if os.path.exists(log):
                with open(log) as f:
                    trimmed.append((log, [r for r in map(json.loads, filter(str.strip, f)) if r.get("step", 0) <= done]))
        for name, rows in trimmed:
            if os.path.exists(name):
                os.remove(name)
            write_jsonl(name, rows)
        print(f"resumed from {path}: step {done} of {cfg.steps} done", flush=True)
    return history, pending


def check_resumed_layout(saved, overlap, tis, resume_from):
    """A checkpoint records whether its rollouts ran one step ahead and were importance-weighted (--overlap and
    --importance_sampling as resolved): auto may resolve otherwise on other GPUs, and a saved rollout of the
    step ahead trained without its importance weights, or a run that changes its algorithm halfway, is not
    the run that was started."""
    was = saved.get("rollout")
    now = {"overlap": overlap, "importance_sampling": tis}
    if was is not None and was != now:
        def say(d):
            return (f"rollouts {'one step ahead' if d['overlap'] else 'in step'}, importance sampling "
                    f"{'on' if d['importance_sampling'] else 'off'}")
        user_error(f"--resume {resume_from}: that run had {say(was)}; here --overlap "
                   f"{saved['config']['overlap']} and --importance_sampling {saved['config']['importance_sampling']} "
                   f"give {say(now)}: resume on the GPU layout it was saved on (vLLM "
                   f"{'on a GPU of its own' if was['overlap'] else 'colocated or on CPU'})")


def output_dir_is_shared(out, accelerator):
    """Whether all nodes see one output_dir (a shared file system) or each its own disk: each node's first process
    leaves a mark there and looks for the others'."""
    import glob

    import torch.distributed as dist
    nodes = accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    if nodes <= 1:
        return True
    mark = os.path.join(out, f".node-mark-{accelerator.process_index}")
    if accelerator.is_local_main_process:
        os.makedirs(out, exist_ok=True)
        open(mark, "w").close()
    accelerator.wait_for_everyone()
    seen = torch.tensor([len(glob.glob(os.path.join(out, ".node-mark-*")))], device=accelerator.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        os.remove(mark)
    return int(seen.item()) >= nodes
