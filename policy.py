"""The policy's forward as the loss sees it: the model's inputs computed on the host (multimodal RoPE positions,
vision-tower kwargs, one image's features shared by the G rows sampled from it) and the log-probs of the sampled
tokens through a chunked float32 LM head (TokenLogProbs: no (tokens x vocab) float32 logits kept for backward).
Checked against the model's own forward and naive float64 heads in tests/test_grpo_math.py and tests/test_gpu.py.
Also here: what trains (--trainable, or LoRA adapters through peft) and the weights vLLM gets from it."""
import contextlib
import os

import torch

from utils import VISUALS

GRIDS = tuple(grid for _, grid, _ in VISUALS)  # image_grid_thw, video_grid_thw


def completion_logprobs(model, batch, temperature=1.0, suppressed_ids=(), top_p=1.0, chunk_tokens=4096,
                        blank_image=False, blank_video=False):
    """(B, C) log-probs of the completion tokens (the last C columns of batch['input_ids']) under `model`, of the
    distribution the sampler draws from: logits / temperature, the tokens it may not emit (`suppressed_ids`)
    masked out and, with top_p < 1, only the nucleus kept (vLLM's and transformers' rule) plus the token scored.
    Runs the backbone once, then the LM head (scoring_head) over chunks of chunk_tokens (row, position) pairs: no
    (B, C, vocab) tensor ever exists, in forward or backward, and the head's memory stays the same for any
    micro-batch size. `blank_image`, `blank_video`: see with_blank_image."""
    B, C = batch["completion_mask"].shape
    if blank_image and ("pixel_values" not in batch or blank_video and "pixel_values_videos" not in batch) and \
            getattr(model.config, "image_token_id", None) is not None:
        batch = with_blank_image(batch, model.config, video=blank_video)
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "image_index", "video_index", "vision")}
    if "mm_token_type_ids" in inputs and "position_ids" not in inputs and any(g in inputs for g in GRIDS):
        inputs["position_ids"] = rope_positions(model.model, inputs).to(inputs["input_ids"].device)
    with shared_image_features(model.model, batch):
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[:B]  # (B, L, H)
    hidden = hidden[:, -C - 1:-1]  # (B, C, H): position t predicts token t + 1
    targets = batch["input_ids"][:B, -C:]
    suppressed = torch.tensor(list(suppressed_ids), dtype=torch.long, device=targets.device) if suppressed_ids else None
    head = scoring_head(model.get_output_embeddings())
    # one module call, whatever the lengths: under ZeRO-3 each call gathers the head's weight with every rank, so
    # a call per chunk would pair one rank's extra gathers with another rank's other modules (a hang)
    logp = head(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), temperature, suppressed, top_p,
                chunk_tokens)
    return logp.view(B, C)


def scoring_head(head, compiled=False):
    """Makes the LM head (an nn.Linear without bias; idempotent) compute in float32 and score tokens:
    head(h) -> float32 logits (transformers' generate samples from these); head(h (N, H), targets (N,),
    temperature, suppressed, top_p, chunk_rows) -> (N,) log-probs of the targets (TokenLogProbs). It stays a
    module call, so ZeRO-3's hooks still gather its weight. compiled: the passes over the (rows, vocab) logits as
    single kernels (torch.compile; CUDA only), the first call compiling them."""
    if getattr(head, "scores_tokens", False):
        return head
    if head.bias is not None:
        raise ValueError("the LM head has a bias: scoring_head does not add it")
    kernels = (logsumexp, logits_gradient)
    if compiled:
        kernels = tuple(torch.compile(k, dynamic=True) for k in kernels)

    def forward(h, targets=None, temperature=1.0, suppressed=None, top_p=1.0, chunk_rows=4096):
        if targets is None:
            return float32_logits(h.reshape(-1, h.shape[-1]), head.weight).view(*h.shape[:-1], -1)
        return TokenLogProbs.apply(h, head.weight, targets, temperature, suppressed, top_p,
                                   kernels if h.is_cuda else (logsumexp, logits_gradient), chunk_rows)
    head.forward, head.scores_tokens = forward, True
    return head


def logsumexp(z):
    return torch.logsumexp(z, -1)


def logits_gradient(z, lse, g, targets, temperature, dtype):
    """d(sum g log softmax(z / T)[target]) / dz for logits z already divided by T (masked entries -inf): g
    (onehot(target) - softmax) / T, in `dtype`. Compiled: one pass over z; eager: in place in z."""
    scale = (g / temperature)[:, None]
    if torch.compiler.is_compiling():
        onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == targets[:, None]
        return ((onehot.to(z.dtype) - (z - lse[:, None]).exp()) * scale).to(dtype)
    grad = z.sub_(lse[:, None]).exp_().mul_(-scale)
    return grad.scatter_add_(-1, targets[:, None], scale.to(grad.dtype)).to(dtype)


def float32_logits(h, weight):
    """h (N, H) @ weight (V, H)^T in float32 (float64 stays): products of bf16 numbers are exact in float32, so
    only the output's rounding goes (bf16 logits were off by 0.002 mean / 0.013 max nats/token on a tiny model).
    On a GPU one bf16 tensor-core GEMM with float32 accumulation and output (torch.mm's out_dtype): 2x TF32's
    speed, and no float32 copy of the 150k x H weight per chunk."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == h.dtype:
        return torch.mm(h, weight.t(), out_dtype=torch.float32)
    dtype = torch.promote_types(h.dtype, torch.float32)
    return torch.mm(h.to(dtype), weight.to(dtype).t())


def scored_logits(h, weight, targets, temperature, suppressed, top_p):
    """The (N, V) float32 logits the sampler draws from: / temperature, the suppressed tokens and (top_p < 1) the
    tokens outside the nucleus at -inf, in place. The scored token stays in the nucleus: a sampled token at the
    nucleus' edge (bf16 noise), a padding target or a reference whose nucleus lacks it would otherwise get -inf
    and make the loss NaN."""
    z = float32_logits(h, weight)
    if temperature != 1:
        z.div_(temperature)
    if suppressed is not None:
        z.index_fill_(-1, suppressed, float("-inf"))
    if top_p < 1:
        z.masked_fill_(outside_nucleus(z, top_p).scatter_(-1, targets[:, None], False), float("-inf"))
    return z


class TokenLogProbs(torch.autograd.Function):
    """log softmax(scored_logits)[target] of each row of h, chunk_rows rows of logits at a time, without keeping
    them for backward: forward keeps their logsumexp, backward recomputes each chunk's logits (one GEMM) and forms
    their gradient, g (onehot(target) - softmax) / temperature (masked tokens: softmax 0). Fewer passes over
    rows x vocab than autograd through log_softmax and gather under checkpointing, and no second (rows, vocab)
    float32 tensor. Backward's GEMMs run in the weight's dtype (bf16 on a GPU, like every other layer's), the
    weight's gradient summed over the chunks in float32. `kernels`: (logsumexp, logits_gradient), compiled or
    not."""

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, suppressed, top_p, kernels, chunk_rows):
        dtype = torch.promote_types(h.dtype, torch.float32)
        out = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        lse = torch.empty_like(out)
        for s in range(0, h.shape[0], chunk_rows):
            t = targets[s:s + chunk_rows]
            z = scored_logits(h[s:s + chunk_rows], weight, t, temperature, suppressed, top_p)
            lse[s:s + chunk_rows] = kernels[0](z)
            out[s:s + chunk_rows] = z.gather(-1, t[:, None])[:, 0] - lse[s:s + chunk_rows]
        ctx.save_for_backward(h, weight, targets, lse, suppressed)
        ctx.temperature, ctx.top_p, ctx.kernels, ctx.chunk_rows = temperature, top_p, kernels, chunk_rows
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, targets, lse, suppressed = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for s in range(0, h.shape[0], ctx.chunk_rows):
            rows, t = slice(s, s + ctx.chunk_rows), targets[s:s + ctx.chunk_rows]
            z = scored_logits(h[rows], weight, t, ctx.temperature, suppressed, ctx.top_p)
            grad = ctx.kernels[1](z, lse[rows], g[rows], t, ctx.temperature, h.dtype)
            del z
            if grad_h is not None:
                grad_h[rows] = grad @ weight
            if ctx.needs_input_grad[1]:  # (V, H), summed over the chunks in float32 (float64 stays)
                part = grad.t() @ h[rows]
                grad_weight = part.to(lse.dtype) if grad_weight is None else grad_weight.add_(part)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_h, grad_weight, None, None, None, None, None, None


def rope_positions(inner, inputs):
    """The multimodal RoPE positions (3, B, L) the model's forward would compute itself (its own get_rope_index),
    on the host: on a GPU that function walks the rows in Python and reads the device about 7 times a row, each
    read a stall of the GPU's queue (224 for a micro-batch of 32)."""
    keys = ("input_ids", "mm_token_type_ids", "attention_mask", "second_per_grid_ts") + GRIDS
    return inner.get_rope_index(**{k: inputs[k].cpu() for k in keys if k in inputs})[0]


def vision_kwargs(visual, grid, device):
    """What the vision tower computes from the images' (t, h, w) grid before its blocks, computed from a host copy
    of the grid (n, 3), as transformers' vision encoders take it precomputed (transformers.vision_utils): the
    patches' 2-D RoPE positions, and each image's span of the packed patch sequence (Qwen2.5-VL: each window's
    too; Qwen3-VL: the taps and weights that resample its learned position grid). With SDPA the spans stay on
    the host: each block splits its attention per image with lengths read from them, and from a device tensor
    every block of every pass stalls the GPU's queue (32 blocks x 3 passes a micro-batch for the 2B model). None
    when this transformers has no such inputs."""
    try:
        from transformers import vision_utils
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:
        return None
    grid = grid.cpu()
    out = {"position_ids": vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size).to(device),
           "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid)}
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: windowed attention in all but a few blocks
        window_index, out["cu_window_seqlens"] = vision_utils.get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        out["window_index"] = window_index.to(device)
    if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: a learned position grid, resampled to each image's
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, visual.interpolation_mode, visual.interpolation_align_corners,
            visual.spatial_merge_size)
        out["interp_indices"], out["interp_weights"] = indices.to(device), weights.to(device)
    if is_flash_attention_requested(visual.config):  # varlen kernels take the spans on the device, and their max
        for key, longest in (("cu_seqlens", "max_seqlen"), ("cu_window_seqlens", "max_window_seqlen")):
            if key in out:
                out[longest] = int((out[key][1:] - out[key][:-1]).max())
                out[key] = out[key].to(device)
    return out


def batch_on_device(inner, batch, device):
    """A collated batch (on the host) moved to `device` for the forwards of the update, with what the model's
    forward would otherwise compute from device tensors computed here once, from the host copies: the multimodal
    RoPE positions (rope_positions) and, as "vision", for images and videos the distinct ones' grid on the host and
    the vision tower's inputs (vision_kwargs). The *_index entries stay on the host (shared_image_features reads
    them)."""
    out = {k: v if k.endswith("_index") else v.to(device) for k, v in batch.items()}
    if "mm_token_type_ids" in batch and any(g in batch for g in GRIDS):
        out["position_ids"] = rope_positions(inner, batch).to(device)
        out["vision"] = {}
        for pixels, grid, index in VISUALS:
            if grid in batch:
                distinct = distinct_grid(batch, grid, index)
                kwargs = vision_kwargs(inner.visual, distinct, device)
                if kwargs is not None:
                    out["vision"][pixels] = distinct, kwargs
    return out


def distinct_grid(batch, grid, index):
    """The grid rows of the distinct images (or videos) of a batch, in the order of its pixels (collate)."""
    if index not in batch:
        return batch[grid]
    first = {}
    for row, i in enumerate(batch[index].tolist()):
        first.setdefault(i, row)
    return batch[grid][[first[i] for i in range(len(first))]]


def shared_image_features(inner, batch):
    """Context: the model's vision tower runs once per distinct image (and video) of a batch from
    collate(share_images=True) (its pixels hold each once) and every image of every row reads the features of
    its own. The G rows of a prompt share its images, so this saves (G - 1) / G of the vision work, forward and
    backward; the gradient is the same (each row's gradient flows back into the shared features and adds up
    there). Everything else (placement, multimodal RoPE, Qwen3-VL's DeepStack: its per-level features are handed
    out the same way) stays the model's own forward. batch["vision"] (batch_on_device): per modality, the distinct
    grid on the host (the features are split by sizes read from it) and the tower's inputs precomputed from it."""
    if not any(index in batch for *_, index in VISUALS) and not batch.get("vision"):
        return contextlib.nullcontext()
    own = type(inner).get_image_features  # (a video's features are an image's: Qwen3-VL's own calls this)

    def features_of(pixels, grid, index):
        rows = batch[index].tolist() if index in batch else None
        distinct, precomputed = batch.get("vision", {}).get(pixels) or (
            distinct_grid(batch, grid, index) if grid in batch else None, {})

        def features(pixel_values, _grid=None, **kwargs):
            out = own(inner, pixel_values, distinct, **kwargs, **precomputed)
            if rows is not None:
                sizes = [len(x) for x in out.pooler_output]
                out.pooler_output = tuple(out.pooler_output[i] for i in rows)
                if getattr(out, "deepstack_features", None):  # Qwen3-VL: each level's features, packed
                    out.deepstack_features = [torch.cat([parts[i] for i in rows])
                                              for parts in (level.split(sizes) for level in out.deepstack_features)]
            return out
        return features

    @contextlib.contextmanager
    def scope():
        inner.get_image_features = features_of(*VISUALS[0])
        inner.get_video_features = features_of(*VISUALS[1])
        try:
            yield
        finally:
            del inner.get_image_features, inner.get_video_features
    return scope()


def with_blank_image(batch, config, video=False):
    """The batch plus one row holding only a blank 2x2-patch image (one image token) and no completion, whose
    output the caller drops. With several ZeRO-3 ranks every rank must run the same modules in the same order
    (each gathers its shards collectively, and DeepSpeed checks the ranks' module traces agree): a rank whose
    micro-batch has no image while another's has one would skip the vision tower and wait forever (seen on 4
    GPUs). Under ZeRO-3 one process needs it too: a vision tower that gets no gradient in a micro-batch keeps the
    gradient partition of the last one that had (DeepSpeed 0.19.8 copies a partition at the first micro-batch
    and adds after), and the step would apply it again; the blank row gives it an exact zero. The row goes
    through the model's own image path, so nothing else changes. video=True (the run has videos): a blank video
    too where the micro-batch has none, so every rank runs the tower twice, images then videos."""
    ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    P = ids.shape[1] - completion_mask.shape[1]  # the blank ones sit at the end of the prompt columns
    missing = [(pixels, grid, token, kind) for (pixels, grid, _), token, kind in
               zip(VISUALS[:1 + video], (config.image_token_id, config.video_token_id), (1, 2)) if pixels not in batch]
    row, attn = torch.zeros_like(ids[:1]), torch.zeros_like(batch["attention_mask"][:1])
    types = torch.zeros_like(row)
    out = {k: v for k, v in batch.items() if k not in ("position_ids", "vision")}  # computed without the row
    v = config.vision_config
    for k, (pixels, grid, token, kind) in enumerate(missing):  # <|vision_start|> token <|vision_end|> each
        at = P - 3 * (len(missing) - k)
        row[0, at:at + 3] = torch.tensor([config.vision_start_token_id, token, config.vision_end_token_id])
        attn[0, at:at + 3], types[0, at + 1] = 1, kind
        out[pixels] = torch.zeros(4, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, device=ids.device)
        out[grid] = torch.tensor([[1, 2, 2]], device=ids.device)  # 2x2 patches, one frame pair: one token
    out.update({"input_ids": torch.cat([ids, row]), "attention_mask": torch.cat([batch["attention_mask"], attn]),
                "completion_mask": torch.cat([completion_mask, torch.zeros_like(completion_mask[:1])])})
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], types])
    return out


def outside_nucleus(logits, top_p):
    """Mask of the tokens top-p sampling never draws: sorted by probability, those whose cumulative probability
    from the least likely up stays <= 1 - top_p (the rule of vLLM's sampler and transformers' TopPLogitsWarper;
    the most likely token is always kept)."""
    sorted_logits, order = logits.sort(dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False
    return drop.scatter(-1, order, drop)


class LogProbModel(torch.nn.Module):
    """The policy (or reference) as DeepSpeed wraps it: forward(batch) -> (B, C) completion log-probs of the
    Hugging Face model inside (`.model`). Every training forward must be a call of DeepSpeed's engine: in
    DeepSpeed 0.19.8 its forward's per-micro-batch bookkeeping is what makes ZeRO-3 add a micro-batch's
    gradient to the ones before instead of overwriting them. Calling the inner model directly made every step
    apply only the last micro-batch's gradient (tests/test_gradients.py)."""

    def __init__(self, model, temperature=1.0, suppressed_ids=(), top_p=1.0, blank_image=False, blank_video=False,
                 compiled=False):
        super().__init__()
        self.model, self.config = model, model.config
        self.temperature, self.suppressed_ids, self.top_p = temperature, tuple(suppressed_ids), top_p
        self.blank_image, self.blank_video = blank_image, blank_video  # several ranks: see with_blank_image
        scoring_head(model.get_output_embeddings(), compiled)  # transformers' generate gets float32 logits too

    def forward(self, batch):
        return completion_logprobs(self.model, batch, self.temperature, self.suppressed_ids, self.top_p,
                                   blank_image=self.blank_image, blank_video=self.blank_video)


# ---------------------------------------------------------------------------------------------------------------
# LoRA (peft): adapters injected into the Hugging Face model in place, so everything else sees the same model.

LORA_TARGETS = {  # module names (peft's target_modules: a regex matched whole) of each --lora_targets choice
    "language": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "all": r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|"
           r"visual\.blocks.*\.(qkv|proj|fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))"}


def add_lora(model, rank, alpha, targets):
    """LoRA adapters of `rank` on the `targets` linear layers (a LORA_TARGETS key or a regex), scaled by alpha /
    rank (alpha 0: 2 x rank); they alone train (B starts at zero: the model starts as the base). Returns the
    peft LoraConfig (saved with the adapter)."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS.get(targets, targets))
    try:
        inject_adapter_in_model(config, model)  # freezes everything but the adapters
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ValueError("it matches no linear layer of this model") from e
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("it matches no linear layer of this model")
    return config


def lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(model):
    """Context: the model without its adapters: the base weights, which a LoRA run's KL term compares against
    (the reference model, with no second copy in memory)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def without_adapters(policy, model):
    """A LoRA run's reference: the policy's own forward (a call of its engine, as update_policy's every forward)
    with the adapters of `model`, the Hugging Face model inside, disabled."""
    def forward(batch):
        with adapters_disabled(model):
            return policy(batch)
    return forward


def save_adapter(model, folder):
    """The adapters of `model` as peft's own files in `folder` (adapter_config.json, adapter_model.safetensors under
    PeftModel's names): what PeftModel.from_pretrained and vLLM's LoRA load. ZeRO-2: whole on every rank."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    model.peft_config["default"].save_pretrained(folder)
    save_file({f"base_model.model.{k}": v.detach().cpu().contiguous()
               for k, v in get_peft_model_state_dict(model).items()}, os.path.join(folder, "adapter_model.safetensors"))


def hf_weights(model, merge=True):
    """(name, tensor) of the Hugging Face model as its own files name them: each LoRA layer's base weight with its
    adapter merged in (W + alpha / r x B A, summed in float32 and rounded once to the weight's dtype; as trainable:
    it changes with every step), the adapters themselves left out; without adapters,
    model.named_parameters(remove_duplicate=False). What vLLM and a saved model get. merge=False (a rank that
    sends nothing): the base weights under those names, no merged copies made. In bf16 a merged weight keeps
    only what of the adapter's change is over its rounding (2^-9 of the weight): README, LoRA."""
    lora = dict(lora_layers(model))
    if not lora:
        return list(model.named_parameters(remove_duplicate=False))
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if ".lora_" in name:
            continue
        if owner.endswith(".base_layer") and owner.removesuffix(".base_layer") in lora:
            layer = lora[owner.removesuffix(".base_layer")]
            if leaf == "weight" and merge:
                with torch.no_grad():
                    delta = layer.get_delta_weight(layer.active_adapters[0]).float()
                    p = (p.float() + delta).to(p.dtype).requires_grad_(True)
            elif leaf == "weight":
                p = p.detach().requires_grad_(True)  # (a view: no copy)
            name = f"{owner.removesuffix('.base_layer')}.{leaf}"
        out.append((name, p))
    return out


def set_trainable(model, trainable):
    """all | language (vision tower frozen) | mlp (language-model MLPs only, as the seed repo did)."""
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, trainable))


def trains(name, trainable):
    """Whether --trainable `trainable` trains the parameter `name`."""
    vision = ".visual." in f".{name}"
    return trainable == "all" or (trainable == "language" and not vision) or (".mlp." in name and not vision)
