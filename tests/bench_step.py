"""One GRPO step's three phases, each measured side by side with a reference on the same GPUs in one run:

  train     our update (trainer.update_policy: DeepSpeed, chunked float32-head log-probs, the reference forward)
            vs a plain transformers forward/backward + AdamW of the same micro-batches (tokens/s, MFU)
  generate  our in-loop rollout (engine.vllm_generate on the engine main.py starts, woken and put to sleep as in the
            loop when it shares the trainer's GPU) vs a standalone vLLM LLM.generate of the same requests with the
            same sampling parameters (completion tokens/s), and vs the weight-read bound: each decode step reads
            the language model's weights once, so max_completion_length steps take at least their bytes x steps /
            the GPU's memory bandwidth (from its clock and bus width; a device copy measures what is reachable). To
            tell where a gap comes from, also the standalone with our per-request parameters (a seed each, the logit
            bias), our engine with the standalone's parameters (generate_diagnosis), and our engine with each of
            the two extras alone (generate_our_engine_seeds_only, _bias_only)
  sync      our weight copy after each rollout (engine.make_weight_sync: ZeRO-3 gather, buckets, vLLM's load), split
            into its parts, vs the same bytes copied raw: an NCCL broadcast between the two GPUs, or one device copy
            where the engine shares the trainer's GPU (GB/s)

Launch it like main.py, one training process (train runs on GPU 0; vLLM on the last GPU, GPU 0 itself with one):
  CUDA_VISIBLE_DEVICES=0 python -m accelerate.commands.launch --config_file ds_accel.yaml --num_processes 1 \\
      tests/bench_step.py --model /tmp/qwen2-vl-2b-random --trainable all --max_completion_length 512 \\
      [--phases train,generate,sync] [--iters 3] [--profile OUT.txt] [--variants no_checkpointing,eager]
      [--sync_variants direct,bucket2048] [any main.py flag]
The batch is main.py's: prompts_per_step prompts of the data x num_generations completions, here random tokens of
max_completion_length each (what a random model writes). --profile: torch profiler tables of one of our updates.
--sync_variants: the rollout and copy again with an IPC copy through vLLM's layerwise reload or straight into its
tensors (layerwise, direct), or buckets of N MB (bucketN).
"""
import argparse
import collections
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import guard  # noqa: E402
import main  # noqa: E402
import trainer  # noqa: E402
import zero  # noqa: E402
from policy import set_trainable  # noqa: E402
from utils import PromptSampler, collate  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to try the script out


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters, warmup=1):
    """Seconds of each of `iters` calls of fn() after `warmup` calls; returns (times, last result)."""
    out, times = None, []
    for i in range(warmup + iters):
        synchronize()
        t = time.perf_counter()
        out = fn()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, out


def mean(xs):
    return sum(xs) / len(xs)


def plain_update(cfg, path, prompts, completions, advantages, pad_id, suppressed, iters):
    """The reference: what one writes with transformers alone, same micro-batches: reference forward without
    gradients, policy forward/backward on full logits, fused AdamW on the bf16 weights. Seconds per update."""
    model = main.load_model(path, cfg).to(DEVICE)
    set_trainable(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = main.load_model(path, cfg).to(DEVICE).eval() if cfg.beta > 0 else None
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, fused=DEVICE == "cuda")
    G = cfg.num_generations
    flat = [p for p in prompts for _ in range(G)]
    micro = [range(i, min(i + cfg.micro_batch_size, len(completions)))
             for i in range(0, len(completions), cfg.micro_batch_size)]
    batches = [{k: v.to(DEVICE) for k, v in collate([flat[i] for i in idx], [completions[i] for i in idx],
                                                  pad_id).items()} for idx in micro]

    def logps(m, b):
        C = b["completion_mask"].shape[1]
        logits = m(**{k: v for k, v in b.items() if k != "completion_mask"}, use_cache=False).logits[:, -C - 1:-1]
        return logits.float().log_softmax(-1).gather(-1, b["input_ids"][:, -C:, None])[..., 0]

    def update():
        for idx, b in zip(micro, batches):
            mask = b["completion_mask"]
            logp = logps(model, b)
            per_token = -torch.exp(logp - logp.detach()) * advantages[list(idx)].to(DEVICE)[:, None]
            if ref is not None:
                with torch.no_grad():
                    delta = logps(ref, b) - logp.detach()
                per_token = per_token + cfg.beta * (torch.exp(delta) - delta - 1)
            ((per_token * mask).sum() / mask.sum() / len(micro)).backward()
        opt.step()
        opt.zero_grad()
    model.train()
    times, _ = timed(update, iters)
    return times  # the models go with this frame


def standalone_generate(path, cfg, requests_file, out_file):
    """In a process of its own, on the engine's GPU: vLLM as one uses it alone (defaults, CUDA graphs), the same
    requests and sampling parameters as our rollout; then the same engine with our rollout's per-request extras
    (a seed per request, the logit bias on the vision tokens), to tell what those cost from what our engine's
    set-up costs."""
    from vllm import LLM, SamplingParams
    guard.start_guard()
    with open(requests_file, "rb") as f:
        requests, n, iters, ours = pickle.load(f)
    gpu = torch.cuda.is_available()
    llm = LLM(model=path, dtype="bfloat16" if gpu else "float32", seed=cfg.seed, generation_config="vllm",
              gpu_memory_utilization=0.85 if gpu else 0.1,
              max_model_len=cfg.max_prompt_length + cfg.max_completion_length, limit_mm_per_prompt={"image": 1})
    guard.guard_children()
    params = SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                            max_tokens=cfg.max_completion_length, logprobs=0, detokenize=False)
    seeded = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, seed=ours["seed"] + k * n,
                             logit_bias=ours["bias"], max_tokens=cfg.max_completion_length, logprobs=0,
                             detokenize=False) for k in range(len(requests))]
    results = {}
    for name, p in (("plain", params), ("our_params", seeded)):
        times, tokens = [], []
        for i in range(1 + iters):
            t = time.perf_counter()
            outs = llm.generate(requests, p, use_tqdm=False)
            if i:
                times.append(time.perf_counter() - t)
                tokens.append(sum(len(o.token_ids) for out in outs for o in out.outputs))
        results[name] = {"times": times, "tokens": tokens}
        with open(out_file, "w") as f:  # after each: what finished is kept if the second times out
            json.dump(results, f)
    llm.llm_engine.engine_core.shutdown()  # before os._exit: its processes would outlive this one


def weight_copy_bytes(path, cfg, itemsize):
    """Bytes of one weight copy: the trainable tensors, under each of their names as make_weight_sync sends them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
    set_trainable(model, cfg.trainable)
    return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad) * itemsize


def weight_read_bytes(path):
    """Bytes a decode step reads at least: the language model's bf16 weights and its head (the embedding's rows are
    gathered, not read whole; the vision tower runs in the prefill)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() * 2 for n, p in model.named_parameters(remove_duplicate=False)
               if "visual" not in n and "embed_tokens" not in n)


def memory_bandwidth(nbytes=2 ** 31):
    """(the GPU's memory bandwidth from its clock and bus width, what a device copy of nbytes reaches), bytes/s;
    the copy reads and writes each byte once."""
    props = torch.cuda.get_device_properties(0)
    spec = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8  # double data rate, kHz, bits
    a, b = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times, _ = timed(lambda: b.copy_(a), 5)
    reached = 2 * nbytes / min(times)
    return spec or reached, reached  # a device that reports no memory clock: the copy's rate


def raw_copy(nbytes, iters):
    """Seconds of one copy of nbytes on the device (the GPU, or host memory without one): the least a weight copy
    between two processes on the same device can take."""
    a, b = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE), torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    times, _ = timed(lambda: b.copy_(a), iters)
    return mean(times)


def raw_broadcast(rank, nbytes, devices, port, iters, out_file):
    """Two processes, one per GPU, NCCL broadcast of nbytes from the trainer's GPU to the engine's (gloo between
    two CPU processes, to try it out)."""
    import torch.distributed as dist
    for k in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:  # the launcher's: with them set, this
        os.environ.pop(k)  # group waits forever for the launcher's store instead of making its own (measured)
    if DEVICE == "cuda":
        torch.cuda.set_device(devices[rank])
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    times = []
    for i in range(2 + iters):
        dist.barrier()
        synchronize()
        t = time.perf_counter()
        dist.broadcast(buf, src=0)
        synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def profile_update(update, path):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])) as prof:
        update()
        synchronize()
    averages = prof.key_averages()
    with open(path, "w") as f:
        f.write("by CUDA time\n" + averages.table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=40, max_name_column_width=70))
        f.write("\n\nby self CPU time\n" + averages.table(sort_by="self_cpu_time_total", row_limit=40,
                                                           max_name_column_width=70))


def main_bench():
    guard.start_guard()  # the engines started here end with this process, however it ends
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--phases", default="train,generate,sync")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", default="")
    parser.add_argument("--skip_plain", action="store_true")
    parser.add_argument("--reference_timeout", type=int, default=400, help="seconds for the standalone vLLM")
    parser.add_argument("--sync_variants", default="", help="layerwise or direct (an IPC copy through vLLM's "
                        "layerwise reload, or straight into its tensors), bucketN (buckets of N MB): the rollout and "
                        "copy again with it")
    parser.add_argument("--variants", default="", help="no_checkpointing, eager (no torch.compile): our update "
                        "again without it")
    args, rest = parser.parse_known_args()
    sync_variants = [v for v in args.sync_variants.split(",") if v]
    for v in sync_variants:  # checked before anything runs: a misspelt one would re-measure the default copy
        mb = v.removeprefix("bucket")
        if not (v in ("layerwise", "direct") or v.startswith("bucket") and mb.isdigit() and int(mb) > 0):
            parser.error(f"--sync_variants: {v!r} is none of layerwise, direct, bucketN (N MB > 0)")
        if v in ("layerwise", "direct") and torch.cuda.device_count() != 1:
            parser.error(f"--sync_variants {v}: only the colocated IPC copy (one GPU) has a layerwise and a direct "
                         "load; the NCCL and file copies have one way")
    cfg = main.parse_config(rest + ["--output_dir", tempfile.mkdtemp(prefix="bench_step_"), "--overwrite", "true"])
    phases = args.phases.split(",")
    main.quiet_libraries()
    torch.set_float32_matmul_precision("high")
    path = cfg.model
    rows, _, _ = main.load_data(cfg)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "gpus": torch.cuda.device_count(), "config": {
        k: getattr(cfg, k) for k in ("model", "prompts_per_step", "num_generations", "max_completion_length",
                                     "micro_batch_size", "zero_stage", "trainable", "beta", "gradient_checkpointing")}}

    processor = main.load_processor(path, cfg)
    prompts = [p for _, p in PromptSampler(rows, processor, cfg, seed=cfg.seed).next(cfg.prompts_per_step)]
    pad_id, G = processor.tokenizer.pad_token_id, cfg.num_generations
    from transformers import AutoConfig

    from utils import vision_token_ids
    suppressed = vision_token_ids(AutoConfig.from_pretrained(path), processor.tokenizer)
    vocab = len(processor.tokenizer)
    gen = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(min(vocab, 150000)) if t not in set(suppressed)])
    completions = [allowed[torch.randint(len(allowed), (cfg.max_completion_length,), generator=gen)].tolist()
                   for _ in range(len(prompts) * G)]
    advantages = torch.randn(len(completions), generator=gen)
    sampler_logps = [[0.0] * len(c) for c in completions]
    tokens = G * sum(int(p["input_ids"].shape[1]) + cfg.max_completion_length for p in prompts)  # no padding

    # the references first, on GPUs nothing else holds yet
    n_gpu = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(n_gpu)))).split(",")
    shared = n_gpu <= 1  # the engine shares the trainer's device: colocated on one GPU, or the CPU
    rolls = "generate" in phases or "sync" in phases  # measured together: a rollout, then the copy the loop makes
    work = tempfile.mkdtemp(prefix="bench_step_")
    if rolls:
        with open(f"{work}/requests.pkl", "wb") as f:
            ours = {"seed": 12345, "bias": {t: -1e9 for t in suppressed} or None}  # as vllm_generate sets them
            pickle.dump(([engine.vllm_prompt(p) for p in prompts], G, args.iters, ours), f)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible[-1] if n_gpu else ""}
        for k in [k for k in env if k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC",
                                                   "GROUP_", "ROLE_", "LOCAL_WORLD", "ACCELERATE_"))]:
            env.pop(k)
        try:
            subprocess.run([sys.executable, __file__, "--standalone_generate", f"{work}/requests.pkl",
                            f"{work}/standalone.json", *rest], env=env, check=True, timeout=args.reference_timeout)
        except subprocess.TimeoutExpired:
            print(f"standalone vLLM: not done in {args.reference_timeout} s", flush=True)
        alone = json.load(open(f"{work}/standalone.json")) if os.path.exists(f"{work}/standalone.json") else {}
        for name, key in (("plain", "generate_standalone"), ("our_params", "generate_standalone_our_params")):
            if name in alone:
                r = alone[name]
                results[key] = dict(s=mean(r["times"]), tokens_per_s=mean(r["tokens"]) / mean(r["times"]))
                print(f"standalone vLLM ({name}): {mean(r['times']):.3f} s, {mean(r['tokens']):.0f} tokens", flush=True)
    nbytes = weight_copy_bytes(path, cfg, 2 if n_gpu else 4)
    if rolls and n_gpu:
        spec, reached = memory_bandwidth()
        read = weight_read_bytes(path)
        bound_s = read * cfg.max_completion_length / spec
        results["generate_weight_read_bound"] = dict(
            s=bound_s, tokens_per_s=len(prompts) * G * cfg.max_completion_length / bound_s, weight_gb=read / 1e9,
            bandwidth_spec_tb_per_s=spec / 1e12, bandwidth_copy_tb_per_s=reached / 1e12)
        print(f"weight-read bound: {bound_s:.3f} s ({read / 1e9:.2f} GB x {cfg.max_completion_length} decode steps at "
              f"{spec / 1e12:.2f} TB/s; a device copy reaches {reached / 1e12:.2f} TB/s, reads and writes counted)",
              flush=True)
    if rolls and shared:
        results["sync_raw_copy"] = dict(s=raw_copy(nbytes, args.iters), gb=nbytes / 1e9)
        results["sync_raw_copy"]["gb_per_s"] = nbytes / 1e9 / results["sync_raw_copy"]["s"]
        print(f"raw device copy: {results['sync_raw_copy']['s']:.4f} s for {nbytes / 1e9:.2f} GB", flush=True)
    if rolls and not shared:
        import socket
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(raw_broadcast, args=(nbytes, [0, n_gpu - 1], port, args.iters, f"{work}/raw.json"), nprocs=2)
        with open(f"{work}/raw.json") as f:
            raw = json.load(f)
        results["sync_raw_nccl"] = dict(s=mean(raw), gb_per_s=nbytes / 1e9 / mean(raw))
        print(f"raw NCCL broadcast: {mean(raw):.3f} s for {nbytes / 1e9:.2f} GB", flush=True)
    print("BENCH so far " + json.dumps(results), flush=True)

    if "train" in phases and not args.skip_plain:
        times = plain_update(cfg, path, prompts, completions, advantages, pad_id, suppressed, args.iters)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["train_plain"] = dict(s=mean(times), tokens_per_s=tokens / mean(times))
        print(f"plain transformers update: {mean(times):.3f} s ({[round(t, 3) for t in times]})", flush=True)

    model = main.load_model(path, cfg)
    ref_model = hf_ref = main.load_model(path, cfg) if cfg.beta > 0 else None
    accelerator = zero.make_accelerator(cfg)
    policy, ref_model, optimizer, processor, suppressed = main.prepare_training(cfg, path, accelerator, model,
                                                                               ref_model)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    peak = (trainer.peak_bf16_flops() if torch.cuda.is_available() else None) or float("nan")

    def update():
        return trainer.update_policy(cfg, policy, ref_model, optimizer, accelerator, prompts, completions,
                                     advantages, sampler_logps, pad_id)
    def measure(key, label):  # our update's time, MFU and its own memory peak
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # not the plain update's, nor the previous variant's
        times, _ = timed(update, args.iters)
        r = results[key] = dict(s=mean(times), tokens_per_s=tokens / mean(times),
                                mfu=6 * n_params * tokens / mean(times) / peak)
        if torch.cuda.is_available():
            r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"{label}: {r['s']:.3f} s ({[round(t, 3) for t in times]}), MFU {r['mfu']:.3f}, peak "
              f"{r.get('peak_mem_gb', 0):.1f} GiB", flush=True)

    if "train" in phases:
        measure("train_ours", "our update")
        if "train_plain" in results:
            results["train_plain"]["mfu"] = 6 * n_params * tokens / results["train_plain"]["s"] / peak
            results["train_ratio_ours_over_plain"] = results["train_ours"]["tokens_per_s"] / \
                results["train_plain"]["tokens_per_s"]
        if args.profile:
            profile_update(update, args.profile)
        if "eager" in args.variants.split(","):  # what --compile gains: the same update without it
            layers = [layer for m in (model, hf_ref) if m is not None for layer in m.model.language_model.layers]
            compiled = [layer._compiled_call_impl for layer in layers]
            for layer in layers:
                layer._compiled_call_impl = None
            measure("train_ours_eager", "our update without torch.compile")
            for layer, c in zip(layers, compiled):
                layer._compiled_call_impl = c
        if cfg.gradient_checkpointing and "no_checkpointing" in args.variants.split(","):
            model.gradient_checkpointing_disable()  # what recomputing activations costs, in time and in memory
            measure("train_ours_no_checkpointing", "our update without gradient checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if rolls:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the updates cached goes back before a colocated engine checks what is free
        # the engine as main.make_rollout starts it: sharing the trainer's GPU, a KV cache for one step's sequences
        llm = engine.start_vllm(path, cfg, visible[-1] if n_gpu else None, colocate=n_gpu == 1, copy_bytes=nbytes,
                                sequences=len(prompts) * G if shared else 0)
        spent = collections.defaultdict(float)  # seconds in each part of a rollout and a copy
        rpc = llm.collective_rpc

        def timed_rpc(method, *a, **k):
            t = time.perf_counter()
            try:
                return rpc(method, *a, **k)
            finally:
                spent[f"rpc {method}"] += time.perf_counter() - t
        llm.collective_rpc = timed_rpc
        for name in ("vllm_wake_up", "vllm_sleep", "reset_caches"):
            def part(*a, _fn=getattr(engine, name), _name=name, **k):
                t = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    spent[_name] += time.perf_counter() - t
            setattr(engine, name, part)  # the module's functions look these up at each call

        def rollouts_and_copies(key, sync):
            """Rollout then weight copy, as the loop makes them: (generate, copy) seconds, tokens, parts."""
            sync()  # a new sync function's first call copies everything
            engine.vllm_sleep(llm)
            gen, sent, loaded, counted, parts = [], [], [], [], collections.defaultdict(float)
            for i in range(1 + args.iters):
                spent.clear()
                synchronize()
                t0 = time.perf_counter()
                samples, _ = engine.vllm_generate(llm, prompts, G, cfg, suppressed, sync_follows=True)
                t1 = time.perf_counter()
                generate_parts = dict(spent)
                spent.clear()
                sync()
                synchronize()
                t2 = time.perf_counter()
                engine.settle_weight_copy(llm)
                t3 = time.perf_counter()
                if i:
                    gen.append(t1 - t0)
                    sent.append(t2 - t1)
                    loaded.append(t3 - t1)
                    counted.append(sum(len(s) for group in samples for s in group))
                    for k, v in generate_parts.items():
                        parts["generate: " + k] += v / args.iters
                    for k, v in spent.items():
                        parts["copy: " + k] += v / args.iters
            results[f"generate_{key}"] = dict(s=mean(gen), tokens_per_s=mean(counted) / mean(gen))
            results[f"sync_{key}"] = dict(s=mean(sent), gb=nbytes / 1e9, gb_per_s=nbytes / 1e9 / mean(sent),
                                          loaded_s=mean(loaded), parts={k: round(v, 4) for k, v in parts.items()})
            print(f"{key}: rollout {mean(gen):.3f} s ({mean(counted):.0f} tokens); weight copy {mean(sent):.3f} s for "
                  f"{nbytes / 1e9:.2f} GB (the trainer's wait), {mean(loaded):.3f} s until loaded; parts "
                  f"{results[f'sync_{key}']['parts']}", flush=True)

        def weight_sync(bucket_mb):
            return engine.make_weight_sync(llm, lambda: model.named_parameters(remove_duplicate=False), bucket_mb,
                                           True, torch.bfloat16 if n_gpu else torch.float32)
        rollouts_and_copies("ours", weight_sync(cfg.vllm_sync_bucket_mb))
        default = getattr(llm, "layerwise_copy", False)
        for variant in sync_variants:
            llm.layerwise_copy = {"direct": False, "layerwise": True}.get(variant, default)
            bucket = int(variant.removeprefix("bucket")) if variant.startswith("bucket") else cfg.vllm_sync_bucket_mb
            rollouts_and_copies(variant, weight_sync(bucket))
            llm.layerwise_copy = default

        from vllm import SamplingParams  # our engine, the standalone's plain parameters, no wrapper around it
        plain = SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                               max_tokens=cfg.max_completion_length, logprobs=0, detokenize=False)
        requests = [engine.vllm_prompt(p) for p in prompts]
        engine.vllm_wake_up(llm)
        times, outs = timed(lambda: llm.generate(requests, plain, use_tqdm=False), args.iters)
        n_tok = sum(len(o.token_ids) for out in outs for o in out.outputs)
        results["generate_our_engine_plain"] = dict(s=mean(times), tokens_per_s=n_tok / mean(times))
        print(f"our engine, plain parameters: {mean(times):.3f} s, {n_tok} tokens", flush=True)
        # each of our two per-request extras alone, on the same engine: what a seed per request costs (vLLM's V1
        # model runner samples seeded rows one at a time, its V2 runner all in one seeded kernel) apart from the bias
        bias = {t: -1e9 for t in suppressed} or None
        for key, extra in (("seeds", lambda k: dict(seed=1000 + k * G)), ("bias", lambda k: dict(logit_bias=bias))):
            params = [SamplingParams(n=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, detokenize=False,
                                     max_tokens=cfg.max_completion_length, logprobs=0, **extra(k))
                      for k in range(len(requests))]
            # no warm-up call: the plain run just above warmed this engine
            times, outs = timed(lambda: llm.generate(requests, params, use_tqdm=False), args.iters, warmup=0)
            n_tok = sum(len(o.token_ids) for out in outs for o in out.outputs)
            results[f"generate_our_engine_{key}_only"] = dict(s=mean(times), tokens_per_s=n_tok / mean(times))
            print(f"our engine, plain parameters and our {key} only: {mean(times):.3f} s, {n_tok} tokens", flush=True)
        ours = results["generate_ours"]["tokens_per_s"]
        if "generate_weight_read_bound" in results:
            results["generate_ratio_ours_over_bound"] = ours / results["generate_weight_read_bound"]["tokens_per_s"]
        if "generate_standalone" in results:
            alone = results["generate_standalone"]["tokens_per_s"]
            results["generate_ratio_ours_over_standalone"] = ours / alone
            # where a shortfall comes from: our per-request parameters, our engine's set-up, our wrapper
            results["generate_diagnosis"] = {
                "standalone_with_our_params": results.get("generate_standalone_our_params", {}).get(
                    "tokens_per_s", float("nan")) / alone,
                "our_engine_with_plain_params": results["generate_our_engine_plain"]["tokens_per_s"] / alone}
        raw = results.get("sync_raw_nccl") or results["sync_raw_copy"]
        results["sync_ratio_ours_over_raw"] = results["sync_ours"]["gb_per_s"] / raw["gb_per_s"]
        results["sync_ratio_loaded_over_raw"] = raw["s"] / results["sync_ours"]["loaded_s"]
    print("BENCH " + json.dumps(results), flush=True)
    for key in [k for k in results if "ratio" in k]:
        print(f"{key}: {results[key]:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--standalone_generate":
        cfg = main.parse_config(sys.argv[4:] + ["--output_dir", tempfile.mkdtemp()])
        standalone_generate(cfg.model, cfg, sys.argv[2], sys.argv[3])
        os._exit(0)
    main_bench()
    os._exit(0)
