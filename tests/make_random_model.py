"""A model of a real shape with random weights: the real config, tokenizer and processor (no weights needed).

    python tests/make_random_model.py ../shared/assets/Qwen2-VL-2B-Instruct /tmp/qwen2-vl-2b-random [LAYERS]

LAYERS (optional) cuts the language model and the vision tower to that many layers each (widths unchanged): a
model that fits a CPU benchmark.

Speed and memory measured on it hold for the real model; answers do not."""
import os
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

src, out = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(src)
if len(sys.argv) > 3:
    config.text_config.num_hidden_layers = config.vision_config.depth = int(sys.argv[3])
    config.text_config.layer_types = config.text_config.layer_types[:int(sys.argv[3])]
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(out)
AutoProcessor.from_pretrained(src).save_pretrained(out)
if os.path.exists(os.path.join(src, "generation_config.json")):  # the real EOS ids (<|im_end|>, <|endoftext|>)
    shutil.copy(os.path.join(src, "generation_config.json"), out)
print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, random")
