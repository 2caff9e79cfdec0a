"""A model of a real shape with random weights: the real config, tokenizer and processor (no weights needed).

    python tests/make_random_model.py ../shared/assets/Qwen2-VL-2B-Instruct /tmp/qwen2-vl-2b-random [LAYERS]
    python tests/make_random_model.py qwen3-vl-2b /tmp/qwen3-vl-2b-random [LAYERS]

LAYERS (optional) cuts the language model and the vision tower to that many layers each (widths unchanged): a
model that fits a CPU benchmark. Qwen3-VL's files are not in ../shared/assets: its config is built from
transformers' Qwen3VLConfig and the public config.json values below, its processor from Qwen3-VL's processor
classes (16-pixel patches, mean and std 0.5) around the Qwen2.5-VL tokenizer (the same vocabulary and the same ids
for <|vision_start|> 151652, <|vision_end|> 151653, <|image_pad|> 151655 and <|video_pad|> 151656; Qwen3's
<think> tokens are missing: random weights never need them).

Speed and memory measured on it hold for the real model; answers do not."""
import os
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

ROPE = {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
TEXT = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, max_position_embeddings=262144,
            rms_norm_eps=1e-6, hidden_act="silu", rope_parameters=ROPE, bos_token_id=151643, eos_token_id=151645)
VISION = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_heads=16,
              num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
QWEN3_VL = {  # Qwen/Qwen3-VL-{2B,4B,8B}-Instruct's config.json
    "qwen3-vl-2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16), tie=True,
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                                    deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-4b": dict(text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32), tie=True,
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2560,
                                    deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-8b": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32), tie=False,
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                                    deepstack_visual_indexes=[8, 16, 24])),
}


def qwen3_vl(name, tokenizer_from):
    """(config, processor) of a Qwen3-VL shape in QWEN3_VL."""
    from transformers import AutoTokenizer, Qwen3VLConfig
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from utils import tiny_processor
    shape = QWEN3_VL[name]
    config = Qwen3VLConfig(text_config={**TEXT, **shape["text"], "tie_word_embeddings": shape["tie"]},
                           vision_config={**VISION, **shape["vision"]}, tie_word_embeddings=shape["tie"],
                           image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653)
    return config, tiny_processor("qwen3_vl", AutoTokenizer.from_pretrained(tokenizer_from))


if __name__ == "__main__":
    src, out = sys.argv[1], sys.argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    assets = next(p for p in (os.path.join(here, "..", "..", "shared", "assets"), os.path.join(here, "..", ".assets"))
                  if os.path.isdir(p))
    tokenizer_from = os.path.join(assets, "Qwen2.5-VL-3B-Instruct")
    if src in QWEN3_VL:
        config, processor = qwen3_vl(src, tokenizer_from)
        generation_from = tokenizer_from
    else:
        config, processor, generation_from = AutoConfig.from_pretrained(src), AutoProcessor.from_pretrained(src), src
    if len(sys.argv) > 3:
        config.text_config.num_hidden_layers = config.vision_config.depth = int(sys.argv[3])
        if getattr(config.text_config, "layer_types", None):
            config.text_config.layer_types = config.text_config.layer_types[:int(sys.argv[3])]
        if hasattr(config.vision_config, "deepstack_visual_indexes"):
            config.vision_config.deepstack_visual_indexes = list(range(min(3, int(sys.argv[3]))))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if os.path.exists(os.path.join(generation_from, "generation_config.json")):  # the real EOS ids
        shutil.copy(os.path.join(generation_from, "generation_config.json"), out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, random")
