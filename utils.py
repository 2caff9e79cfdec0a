"""Data (built-in counting and grounding tasks, user datasets, collation), model helpers (tiny models) and the run's report
(curves.png, report.html)."""
import io
import itertools
import json
import math
import os
import random
import signal
import time
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------------------------------------------
# Data. A sample is {"image": PIL or None, "problem": str, "solution": str, ...other columns}.

SYSTEM_PROMPT = ("A conversation between User and Assistant. The user asks a question about an image, and the "
                 "Assistant solves it. The Assistant first thinks about the reasoning process and then gives the "
                 "answer, enclosed in <think> </think> and <answer> </answer> tags: "
                 "<think> reasoning here </think><answer> answer here </answer>")
SHAPES, COLORS = ("circle", "square", "triangle"), {"red": (220, 40, 40), "green": (40, 170, 60),
                                                     "blue": (40, 80, 220)}


def draw_shape(draw, shape, color, x, y, r):
    """A circle, square or triangle of `color` centred at (x, y), r from its centre to its box's sides; its box."""
    box = [x - r, y - r, x + r, y + r]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    return box


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
            draw_shape(draw, shape, color, (cx + 0.5) * image_size / 4, (cy + 0.5) * image_size / 4, r)
        count = sum(o == target for o in objects)
        rows.append({"image": img, "problem": f"How many {target[0]} {target[1]}s are there?",
                     "solution": str(count)})
    return rows


def make_grounding_dataset(n, seed=0, size=(112, 84), radius=10, grid=(4, 3), objects=(3, 4)):
    """Synthetic grounding: objects[0] to objects[1] shapes of different colour and kind in the cells of a grid;
    'Where is the red square?' -> its box '[x1, y1, x2, y2]' in the image's pixels (the frame of a solution's
    boxes)."""
    rng = random.Random(seed)
    (w, h), (gw, gh) = size, grid
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    rows = []
    for _ in range(n):
        img = Image.new("RGB", size, (245, 245, 240))
        draw = ImageDraw.Draw(img)
        shapes = rng.sample(kinds, rng.randint(*objects))  # each (colour, shape) once: the question names one box
        cells = rng.sample([(x, y) for x in range(gw) for y in range(gh)], len(shapes))
        boxes = []
        for (color, shape), (cx, cy) in zip(shapes, cells):
            boxes.append(draw_shape(draw, shape, color, round((cx + 0.5) * w / gw), round((cy + 0.5) * h / gh),
                                    radius))
        rows.append({"image": img, "problem": f"Where is the {shapes[0][0]} {shapes[0][1]}? Give its box.",
                     "solution": json.dumps(boxes[0])})
    return rows


BUILT_IN = {"counting": make_counting_dataset, "grounding": make_grounding_dataset}  # --dataset names


def load_image(value, min_pixels, max_pixels, patch=14):
    """A PIL image from a path, a file:// or http(s):// URL, a data:image/...;base64 URI, bytes, {'bytes'|'path': ...}
    (datasets' Image feature) or PIL, in RGB (to_rgb), resized within [min_pixels, max_pixels] to multiples of
    2 x patch pixels the way qwen-vl-utils does. Raises ValueError if it cannot be read."""
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
            import requests  # the bytes as served (qwen-vl-utils' own fetch resizes before the size is known: the
            response = requests.get(value, timeout=30)  # frame of the row's boxes)
            response.raise_for_status()
            value = response.content
        elif isinstance(value, str):
            value = Image.open(value.removeprefix("file://"))
        if isinstance(value, (bytes, bytearray)):
            value = Image.open(io.BytesIO(value))
        if not isinstance(value, Image.Image):
            raise ValueError(f"unreadable image (expected a path, URL, bytes or PIL image, got {type(value).__name__})")
        value.load()
        image = fetch_image({"image": to_rgb(value), "min_pixels": min_pixels, "max_pixels": max_pixels},
                            image_patch_size=patch)
        image.info["original_size"] = value.size  # the frame of a solution's boxes
        return image
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
    if image.mode in ("P", "RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_video(value, cfg, patch=14):
    """A video as (frames: uint8 array (T, H, W, 3), metadata: {fps, frames_indices, total_num_frames}) from a file
    (path or URL, read with transformers' PyAV reader at --video_fps) or a list of frames (anything load_image
    reads, taken as sampled at --video_fps); at most --video_max_frames, evenly spaced, an even count (the towers
    pack frames in pairs: of an odd count the last is dropped, a single frame doubled). Each frame is resized as
    an image, to at most --video_max_pixels (and --max_pixels). The metadata gives Qwen2.5-VL and Qwen3-VL each
    frame's time.
    Raises ValueError ('unreadable video (...)')."""
    max_pixels = min(cfg.video_max_pixels or cfg.max_pixels, cfg.max_pixels)
    if isinstance(value, dict):  # datasets' Video feature, undecoded
        value = value.get("path") or value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("unreadable video (an empty list of frames)")
        keep = np.linspace(0, len(value) - 1, min(len(value), cfg.video_max_frames)).round().astype(int).tolist()
        fps, total, raw = cfg.video_fps, len(value), [value[i] for i in keep]
    else:
        from transformers.video_utils import load_video as read

        def sample(metadata, **_):
            n = int(metadata.total_num_frames / metadata.fps * cfg.video_fps)
            return np.linspace(0, metadata.total_num_frames - 1, max(1, min(n, cfg.video_max_frames))).round()

        try:
            if not isinstance(value, str):
                raise TypeError(f"expected a video file's path or URL, or a list of frames, got {type(value).__name__}")
            value = value.removeprefix("file://")
            if not value.startswith(("http://", "https://")) and not os.path.isfile(value):
                raise FileNotFoundError(f"no such file: {value}")
            array, metadata = read(value, backend="pyav", sample_indices_fn=sample)
        except Exception as e:
            raise ValueError(f"unreadable video ({type(e).__name__}: {e})") from e
        keep = [int(i) for i in metadata.frames_indices]
        fps, total, raw = metadata.fps, metadata.total_num_frames, [Image.fromarray(f) for f in array]
    frames = []
    for i, frame in enumerate(raw):
        try:
            frames.append(load_image(frame, cfg.min_pixels, max_pixels, patch))
        except ValueError as e:
            raise ValueError(f"unreadable video (frame {keep[i]}: {e})") from e
    if len({f.size for f in frames}) > 1:
        raise ValueError(f"unreadable video (frames of different sizes: {sorted({f.size for f in frames})[:2]})")
    if len(frames) % 2:  # one frame is doubled; of an odd count the last is dropped (the count stays within
        frames, keep = (frames * 2, keep * 2) if len(frames) == 1 else (frames[:-1], keep[:-1])  # the cap, the
        # frames' times true)
    return np.stack([np.asarray(f) for f in frames]), {"fps": fps, "frames_indices": keep, "total_num_frames": total}


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def looks_like_an_image(value):
    """An image file name or URL, a data: URI, bytes, a datasets image dict or a PIL image, or a list of them: what
    load_image reads (a column's name alone says nothing: 'image_caption', 'num_images')."""
    if isinstance(value, list):
        return bool(value) and all(map(looks_like_an_image, value))
    if isinstance(value, str):
        return value.lower().split("?")[0].endswith(IMAGE_EXTENSIONS) or value.startswith("data:image/")
    return isinstance(value, (bytes, bytearray, Image.Image)) or (isinstance(value, dict) and "bytes" in value)


def load_rows(name, split, question_column, solution_column, image_column, seed=0, video_column="video"):
    """Rows of a dataset: 'counting' (built in), a local json/jsonl/parquet file, or a hub dataset name.
    Renames the user's columns to problem/solution/image/video and checks they exist (a missing 'video' column
    means no videos; another name given with --video_column must exist)."""
    if name in BUILT_IN:
        return BUILT_IN[name](512 if split == "train" else 64, seed=seed + (split != "train"))
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
    if image_column == "none":  # text-only by the user's choice
        image_column = None
    elif image_column not in ds.column_names:
        others = [c for c in ds.column_names if c not in (question_column, solution_column, video_column)
                  and not isinstance(ds.features[c], datasets.Video)]  # (videos are not images; never decoded)
        stored = [c for c in others if isinstance(ds.features[c], datasets.Image) or
                  isinstance(getattr(ds.features[c], "feature", None), datasets.Image)]
        plain = [c for c in others if c not in stored]
        first = ds.select_columns(plain)[0] if plain and len(ds) else {}  # (stored images are not decoded)
        looks = stored + [c for c in plain if looks_like_an_image(first.get(c))]
        if looks:
            raise ValueError(f"--dataset {name}: no column '{image_column}', but '{looks[0]}' looks like images: name "
                             f"it with --image_column {looks[0]}, or give --image_column none to train text-only")
        warnings.warn(f"--dataset {name}: no image column '{image_column}' ({ds.column_names}): text-only prompts "
                      "(--image_column none says so and silences this)")
        image_column = None
    if video_column not in ds.column_names and video_column not in ("video", "none"):
        raise ValueError(f"--dataset {name}: no column '{video_column}' (columns: {ds.column_names}); name the "
                         "videos' column with --video_column, or give --video_column none")
    video_column = video_column if video_column in ds.column_names else None
    if "completions" in ds.column_names:
        raise ValueError(f"--dataset {name} has a column named 'completions', the argument every reward takes the "
                         "completions by: rename that column")
    if len(ds) == 0:
        raise ValueError(f"--dataset {name} split '{split}' is empty: point --dataset at data with rows")
    if video_column and isinstance(ds.features[video_column], datasets.Video):  # stored videos: their files,
        ds = ds.cast_column(video_column, datasets.Video(decode=False))  # read by load_video when used
    feature = ds.features.get(image_column)
    if isinstance(feature, datasets.Image):  # stored images: bytes, decoded when used
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of them per row
        ds = ds.cast_column(image_column, datasets.List(datasets.Image(decode=False)))
    folder = os.path.dirname(os.path.abspath(name)) if os.path.exists(name) else None
    return DatasetRows(ds, question_column, solution_column, image_column, folder, video_column=video_column)


def first_bad_json_line(path):
    """'line N: <the JSON error>' for the first line of a JSON-lines file that does not parse, or for the whole
    file if it is one JSON document; None if it parses."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        if path.lower().endswith(".json") and text.lstrip().startswith("["):  # one document over many lines
            line = lines[e.lineno - 1] if e.lineno <= len(lines) else ""
            return f"line {e.lineno} is not valid JSON ({e.msg}): {line[:120]!r}"
    for i, line in enumerate(lines, 1):
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

    def __init__(self, ds, question_column, solution_column, image_column, folder, indices=None, video_column=None):
        self.ds, self.columns, self.folder = ds, (question_column, solution_column, image_column), folder
        self.video_column = video_column
        self.indices = range(len(ds)) if indices is None else indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self.indices))[i])  # positions in this view, not dataset rows
        question, solution, image_column = self.columns
        row = self.ds[self.indices[i]]
        image = row.get(image_column)
        image = [self.located(v) for v in image] if isinstance(image, list) else self.located(image)
        row.update(problem=row[question], solution=row[solution], image=image)
        if self.video_column:
            video = row.get(self.video_column)
            row["video"] = [self.located(v) for v in video] if isinstance(video, list) else self.located(video)
        return row

    def located(self, image):
        """A relative path is relative to the data file (join keeps an absolute path as it is)."""
        if self.folder and isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
            return os.path.join(self.folder, image.removeprefix("file://"))
        return image

    def take(self, indices):
        """The rows at these positions, still unread."""
        return DatasetRows(self.ds, *self.columns, self.folder, [self.indices[j] for j in indices], self.video_column)


def tiny_processor(kind="qwen2_vl", tokenizer=None):
    """The family's own processor classes (Qwen3-VL: 16-pixel patches, normalised to [-1, 1], and its released
    processor's pixel bounds: at least 256x256, which load_processor and the engine override) with the local BPE
    tokenizer (no hub): the tiny models' processor. Qwen3-VL with another `tokenizer` and its chat template:
    tests/make_random_model.py's real shapes."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    if kind == "qwen3_vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
        image = Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      size={"shortest_edge": 65536, "longest_edge": 16777216})
        return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer or build_tiny_tokenizer(),
                                video_processor=Qwen3VLVideoProcessor(),
                                chat_template=tokenizer.chat_template if tokenizer else CHAT_TEMPLATE)
    if kind == "qwen2_5_vl":  # (its processor gives each video's seconds per frame pair: second_per_grid_ts)
        from transformers import Qwen2_5_VLProcessor as Qwen2VLProcessor  # noqa: F811
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=build_tiny_tokenizer(),
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def patch_size(processor):
    """The pixels of a vision patch side (Qwen2/2.5-VL 14, Qwen3-VL 16): images are resized to multiples of twice
    it (a 2x2 merge of patches is one token)."""
    return getattr(processor.image_processor, "patch_size", 14)


IMAGE_MARKER = "<image>"  # where a question places its images (LLaVA's convention); without one they come first


def row_images(value):
    """A row's image column as a list: none (None), one image, or a list of them."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def user_content(question, n_images):
    """The user turn: the question with its images where its <image> markers are, else all images first."""
    if IMAGE_MARKER not in question:
        return [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    parts = question.split(IMAGE_MARKER)
    if len(parts) - 1 != n_images:
        raise ValueError(f"{IMAGE_MARKER} markers and images differ in number ({len(parts) - 1} markers in the "
                         f"question, {n_images} images)")
    content = []
    for i, part in enumerate(parts):
        content += [{"type": "text", "text": part}] if part else []
        content += [{"type": "image"}] if i < n_images else []
    return content


# The frame each family writes boxes in: Qwen2-VL and Qwen3-VL 0-1000 relative to the image, Qwen2.5-VL pixels of
# the image as resized for it (its processor's class names the family)
BOX_FRAMES = {"Qwen2VLProcessor": "0-1000", "Qwen2_5_VLProcessor": "pixels", "Qwen3VLProcessor": "0-1000"}


def build_prompt(processor, row, cfg):
    """Tokenised prompt for one row: a dict of the processor's tensors (batch dim 1), plus 'images' (the resized
    images), 'video' (load_video's, or None: it comes first) and 'engine_ids' (the prompt's tokens before the
    processor expands each image's or video's placeholder to its patches: what vLLM takes). Raises ValueError with
    the reason when the row must be skipped (unreadable image or video, too many images, prompt too long)."""
    if not isinstance(row.get("problem"), str) or not row["problem"].strip():
        raise ValueError("empty or non-text question")
    values = row_images(row.get("image"))
    if len(values) > cfg.max_images:
        raise ValueError(f"more images than --max_images ({len(values)} > {cfg.max_images})")
    images = [load_image(v, cfg.min_pixels, cfg.max_pixels, patch_size(processor)) for v in values]
    video = None if row.get("video") is None else load_video(row["video"], cfg, patch_size(processor))
    messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "video"}] * (video is not None) +
                 user_content(row["problem"], len(images))}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    triple = "<|vision_start|><|video_pad|><|vision_end|>"
    stamps = video is not None and hasattr(processor, "_calculate_timestamps")  # Qwen3-VL: each frame pair's time
    if stamps:  # the released format is <t seconds><|vision_start|>frame<|vision_end|> per pair in place of the
        text = text.replace(triple, "<|video_pad|>")  # template's triple; transformers >= 5.10 expands the bare
        # token only (the pairs would sit inside the template's own start/end), so it gets the bare token
    from transformers.video_utils import VideoMetadata
    videos = {} if video is None else dict(videos=[video[0]], do_sample_frames=False, video_metadata=[
        VideoMetadata(**video[1])])
    enc = processor(text=[text], images=images or None, return_tensors="pt", **videos)
    n = enc["input_ids"].shape[1]
    if n > cfg.max_prompt_length:  # never truncate: cutting inside the image tokens breaks the model's input
        raise ValueError(f"prompt of {n} tokens is over --max_prompt_length {cfg.max_prompt_length}")
    out = {"text": text, "images": images, "video": video, "engine_ids": processor.tokenizer(text)["input_ids"], **enc}
    if images:  # what the box rewards map the answer's boxes with (rewards.py): the first image's sizes, the frame
        grid, patch = enc["image_grid_thw"][0].tolist(), patch_size(processor)
        out.update(image_size=list(images[0].info.get("original_size", images[0].size)),
                   model_image_size=[grid[2] * patch, grid[1] * patch],
                   box_frame=BOX_FRAMES.get(type(processor).__name__, "0-1000"))
    if stamps:  # what a vLLM that expands the whole triple gets in place of the bare token (engine.vllm_prompt)
        out["video_triple"] = processor.tokenizer(triple, add_special_tokens=False)["input_ids"]
    return out


def skip_reason(message):
    """The reason a row is skipped, from build_prompt's message: what the counts are kept by."""
    return "prompt over --max_prompt_length" if message.startswith("prompt of ") else message.split(" (")[0]


def solution_problem(value, lists_ok, boxes=False):
    """What is wrong with a row's solution for the rewards (None if nothing): each reward compares completions with
    it, so it must be a non-empty string or number, or (lists_ok: every reward that reads it takes them) a
    non-empty list of those; for the box rewards (boxes) one box or more (rewards.solution_boxes)."""
    if boxes:
        from rewards import solution_boxes
        return None if solution_boxes(value) else (
            f"not a box ({str(value)[:60]}): give [x1, y1, x2, y2] in the original image's pixels, or a list of "
            "such boxes, as a list or JSON text")
    if isinstance(value, list) and lists_ok:
        return "an empty list" if not value else next(filter(None, (solution_problem(v, False) for v in value)), None)
    if isinstance(value, list):
        return (f"a list ({str(value)[:60]}), and a reward in --rewards takes one answer per row: give one answer, "
                "or use rewards that take lists (accuracy does)")
    if value is None or (isinstance(value, str) and not value.strip()):
        return "empty: every row needs the answer its completions are scored against (fill it or drop the row)"
    if not isinstance(value, (str, int, float)):  # (a bool too: its text, True or False, is compared)
        return f"a {type(value).__name__} ({str(value)[:60]}): give the answer as text or a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value}: give a finite number or text"
    return None


class DataError(ValueError):
    """The data cannot feed training (too few usable rows, or a bad row under --strict): trainer.rollout stops
    every rank with one message."""


class PromptSampler:
    """Endless shuffled stream of tokenised prompts; rows that cannot be used are skipped and counted (or raise
    with --strict). Each epoch every process draws the same shuffle of all the rows and takes every world-th of it
    from its rank on (torch's DistributedSampler's way): the processes' rows are disjoint within an epoch, and bad
    rows, wherever they sit in the data, fall to every process alike (a fixed rows[rank::world] gave one rank every
    odd row: with every second image unreadable it had none to train on)."""

    def __init__(self, rows, processor, cfg, rank=0, world=1, seed=0):
        if not rows:
            raise ValueError("the dataset is empty: point --dataset at data with rows")
        self.rows, self.processor, self.cfg, self.rank, self.world, self.seed = rows, processor, cfg, rank, world, seed
        self.origin = getattr(rows, "indices", range(len(rows)))  # where each row sits in the data, for messages
        self.rng, self.order, self.skipped, self.tried = random.Random(seed), [], Counter(), 0

    def next(self, n):
        out, tries = [], 0
        while len(out) < n:
            if not self.order:  # a new epoch: the same permutation on every rank (one seed), this rank's share,
                order = list(range(len(self.rows)))  # padded with its first rows to a multiple of the ranks (as
                self.rng.shuffle(order)  # DistributedSampler pads): every rank's share is as long, so the ranks
                total = -(-len(order) // self.world) * self.world  # start their epochs together unless they skip
                order = (order * -(-total // len(order)))[:total]  # rows
                self.order = order[self.rank::self.world]
            index = self.order.pop()
            row = self.rows[index]
            self.tried += 1
            try:
                out.append((row, build_prompt(self.processor, row, self.cfg)))
            except ValueError as e:
                image, message = row.get("image"), str(e)
                e = ValueError(f"{e} (image {image!r})" if isinstance(image, str) else
                               f"{e} (row {self.origin[index]} of the data)")
                if self.cfg.strict:
                    raise DataError(f"{e} (question: {str(row.get('problem'))[:80]!r}); drop --strict to skip "
                                    "such rows") from e
                self.skipped[skip_reason(message)] += 1
                if sum(self.skipped.values()) in (1, 10, 100, 1000):
                    warnings.warn(f"skipped rows so far: {dict(self.skipped)}; last: {e}")
                tries += 1
                if tries > 100 * n and not out:
                    raise DataError(f"too few usable rows in the data: none in {tries} tries, "
                                    f"{sum(self.skipped.values())} of {self.tried} rows tried were skipped "
                                    f"({counted(self.skipped)}); last: {e}. Check the images and "
                                    "--max_prompt_length") from e
        return out

    def state_dict(self):  # the data position, for a resumable checkpoint
        return {"rng": self.rng.getstate(), "order": list(self.order), "skipped": dict(self.skipped),
                "tried": self.tried, "dealt": self.world}

    def load_state_dict(self, state):
        self.skipped, self.tried = Counter(state["skipped"]), state.get("tried", 0)
        if "dealt" not in state and self.world > 1:  # an older version's: each rank shuffled a fixed shard of its
            warnings.warn("the checkpoint's data position is an older version's (a fixed shard per rank): this "
                          "run goes on from a new shuffle of all the rows")  # own; its positions mean other rows
            self.rng, self.order = random.Random(self.seed), []  # the same on every rank
            return
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])


def counted(reasons):
    """'unreadable image: 380, prompt over --max_prompt_length: 21' from {reason: count}, most first."""
    return ", ".join(f"{k}: {v}" for k, v in Counter(reasons).most_common())


VISUALS = (("pixel_values", "image_grid_thw", "image_index"), ("pixel_values_videos", "video_grid_thw", "video_index"))


def collate(prompts, completions, pad_id, share_images=False):
    """One training batch from prompts (dicts from build_prompt) and completion token lists, aligned so that
    every completion starts at the same column: prompts padded on the left to P, completions on the right to C.
    Images (and videos) stay with their own prompt, however many a row has: pixel rows are concatenated in sample
    order. share_images: rows of the same prompt (object) share one copy of its pixels; `image_index`
    (`video_index`) says which copy each image of each row reads (the loss's forward runs the vision tower once
    per distinct image: policy.shared_image_features)."""
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
    for pixels, grid, index in VISUALS:
        having = [p for p in prompts if p.get(pixels) is not None]
        if not having:
            continue
        batch[grid] = torch.cat([p[grid] for p in having])  # a (t, h, w) row per image of every row, in order
        if pixels == "pixel_values_videos" and "second_per_grid_ts" in having[0]:  # Qwen2.5-VL: each video's
            batch["second_per_grid_ts"] = torch.cat([torch.as_tensor(p["second_per_grid_ts"]) for p in having])
        distinct = list({id(p): p for p in having}.values()) if share_images else having
        batch[pixels] = torch.cat([p[pixels] for p in distinct])
        if share_images:  # each image of each row: which of the distinct images it is
            first = dict(zip(map(id, distinct), itertools.accumulate((len(p[grid]) for p in distinct), initial=0)))
            batch[index] = torch.tensor([first[id(p)] + j for p in having for j in range(len(p[grid]))])
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
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
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
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL[1:], chat_template=CHAT_TEMPLATE)


def build_tiny_model(path, kind="qwen2_vl", seed=0, processor_from=None):
    """Builds (once) and saves a tiny random Qwen2-VL, Qwen2.5-VL or Qwen3-VL (kind: a key of TINY_VISION) with
    its processor at `path`: the local BPE
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
            if built is not None:  # the recipe file is written last: it marks a complete build
                os.remove(os.path.join(path, "tiny_model.json"))
            _build_tiny_model(path, kind, seed, processor_from)
            with open(os.path.join(path, "tiny_model.json"), "w") as f:
                json.dump(recipe, f)
    return path


TINY_VISION = {  # the tiny vision towers: what differs between the families (head dims 64 everywhere)
    "qwen2_vl": dict(depth=2, embed_dim=128, num_heads=2, mlp_ratio=2, hidden_size=128, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[1]),
    # DeepStack: features of both blocks are added into the first two language layers; an 8x8 learned position grid
    "qwen3_vl": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=128,
                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                     deepstack_visual_indexes=[0, 1]),
}


def _build_tiny_model(path, kind, seed, processor_from):
    from transformers import CONFIG_MAPPING, AutoModelForImageTextToText, AutoProcessor
    if kind not in TINY_VISION:
        raise ValueError(f"unknown tiny model kind {kind!r}: use one of {', '.join(TINY_VISION)}")
    processor = AutoProcessor.from_pretrained(processor_from) if processor_from else tiny_processor(kind)
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    text = dict(vocab_size=64 * math.ceil(len(tok) / 64), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                tie_word_embeddings=True, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
                bos_token_id=tid("<|endoftext|>"))
    if kind == "qwen3_vl":  # as Qwen3-VL's config.json writes it: interleaved multimodal RoPE
        text.update(head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [8, 12, 12], "mrope_interleaved": True})
    else:
        text.update(rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    ids = dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
               vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
               tie_word_embeddings=True)
    config = CONFIG_MAPPING[kind](text_config=text, vision_config=TINY_VISION[kind], **ids)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    processor.save_pretrained(path)
    model.save_pretrained(path)


def write_jsonl(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=float) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# What a run shows while it goes: curves.png and report.html in output_dir (trainer.train rewrites them).

def plot_curves(history, path):
    """Six panels per step, as a PNG: rewards (the weighted total and each reward), accuracy and eval accuracy, KL,
    completion length, clip fraction, and the step time split. A curve equal to one drawn before it in its panel
    (one reward: the total is that reward) is dashed, so that neither hides the other; steps are whole numbers;
    the step-time panel is scaled to the steps after the first (which loads and compiles) when that one is over
    twice the rest."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    panels = [("reward", ["reward_mean"] + sorted(k for k in history[0] if k.startswith("reward/"))),
              ("accuracy", ["accuracy", "eval_accuracy"]), ("KL to the reference", ["kl"]),
              ("completion length (tokens)", ["completion_len_mean", "completion_len_max"]),
              ("clipped fraction of tokens", ["clip_frac"]),
              ("step time (s)", ["generate_s", "reward_s", "train_s", "sync_s"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (title, keys) in zip(axes.flat, panels):
        drawn = {}
        for key in keys:
            points = [(m["step"], m[key]) for m in history if key in m and m[key] == m[key]]
            if not points:
                continue
            same = next((k for k, p in drawn.items() if p == points), None)
            ax.plot(*zip(*points), label=key + (f" (= {same})" if same else ""), linestyle="--" if same else "-",
                    linewidth=2.5 if key == "reward_mean" else 1.5,
                    marker="o" if key == "eval_accuracy" or len(points) < 3 else None)
            drawn[key] = points
        if title.startswith("step time") and len(history) > 2:
            later = max(sum(m.get(k, 0) for k in keys) for m in history[1:])
            first = max(history[0].get(k, 0) for k in keys)
            if later > 0 and first > 2 * later:
                ax.set_ylim(0, 1.15 * later)
                title += f" (step {history[0]['step']}: {first:.0f} s, off the scale)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_thumbnail(image, out_dir, name):
    """A small PNG of a prompt's (first) image in out_dir/prompt_images/ (the report and completions.jsonl point at
    it), or None."""
    image = next(iter(row_images(image)), None)
    if image is None:
        return None
    try:
        thumb = load_image(image, 28 * 28, 160 * 160)
    except ValueError:
        return None
    os.makedirs(os.path.join(out_dir, "prompt_images"), exist_ok=True)
    thumb.save(os.path.join(out_dir, "prompt_images", f"{name}.png"))
    return f"prompt_images/{name}.png"


def run_identity(out_dir):
    """[(what, value)] of the run in out_dir: its model, data, seed and rewards (config.json: every flag, also
    returned), when it first started and the git commit of its code then (run.json); '?' for what is missing."""
    def read(name):
        try:
            with open(os.path.join(out_dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    cfg, run = read("config.json"), read("run.json")
    return [(k, cfg.get(k, "?")) for k in ("model", "dataset", "seed", "rewards")] + \
        [(k, run.get(k, "?")) for k in ("started", "commit")], cfg


def write_report(out_dir, history, total_steps, last_steps=10):
    """out_dir/report.html, rewritten as the run goes (the page reloads itself every 30 s until the last step) and
    readable offline: what ran (model, data, seed, every flag, start, commit), the curves (curves.png), the
    latest metrics, for the last `last_steps` logged steps each prompt's image, question and solution with its
    completions, their parsed answers, rewards, weighted total and advantages (from completions.jsonl), and the
    latest evaluation's completions (eval_completions.jsonl)."""
    from html import escape
    if not history:
        return
    plot_curves(history, os.path.join(out_dir, "curves.png"))

    def read(name):
        path = os.path.join(out_dir, name)
        return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    samples, evals = read("completions.jsonl"), read("eval_completions.jsonl")
    steps = sorted({s["step"] for s in samples}, reverse=True)[:last_steps]
    last = history[-1]
    fields = [k for k in ("reward_mean", "accuracy", "eval_accuracy", "kl", "completion_len_mean", "clip_frac",
                          "step_s", "sampler_logp_diff") if k in last]
    identity, cfg = run_identity(out_dir)
    cell = lambda v: f"<td>{v:.3f}</td>" if isinstance(v, float) else f"<td>{'' if v is None else escape(str(v))}</td>"
    html = ["<!doctype html><html><head><meta charset='utf-8'><title>grpo-vl report</title>"
            + ("<meta http-equiv='refresh' content='30'>" if last["step"] < total_steps else "") + "<style>"
            "body{font:14px sans-serif;margin:1.5em;max-width:1400px}td,th{border:1px solid #ccc;padding:3px 6px;"
            "vertical-align:top;text-align:left}table{border-collapse:collapse;margin:.4em 0 1.2em}"
            ".c{white-space:pre-wrap;font-family:monospace;max-width:700px}img.t{float:left;margin:0 1em 1em 0}"
            ".p{overflow:hidden;border-top:1px solid #ddd;padding-top:.6em}</style></head><body>",
            f"<h1>grpo-vl: {escape(out_dir)}</h1><p>step {last['step']} of {total_steps}</p><table class='run'><tr>"
            + "".join(f"<th>{k}</th>" for k, _ in identity) + "</tr><tr>" + "".join(cell(v) for _, v in identity)
            + "</tr></table><details><summary>every flag</summary><table>"
            + "".join(f"<tr><td>--{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in cfg.items())
            + "</table></details>"
            "<table><tr>" + "".join(f"<th>{k}</th>" for k in fields) + "</tr><tr>"
            + "".join(f"<td class='m'>{last[k]:.4g}</td>" for k in fields) + "</tr></table>",
            f"<img src='curves.png?{last['step']}' alt='curves' width='100%'>"]
    if evals:
        step = evals[-1]["step"]
        html.append(f"<h2>Eval samples (step {step})</h2><table><tr><th>question</th><th>solution</th>"
                    "<th>completion</th><th>answer</th><th>correct</th></tr>"
                    + "".join(f"<tr>{cell(e['problem'])}{cell(e['solution'])}<td class='c'>{escape(e['completion'])}"
                              f"</td>{cell(e['answer'])}{cell(e['correct'])}</tr>" for e in evals if e["step"] == step)
                    + "</table>")
    html.append("<h2>Samples</h2>")
    for step in steps:
        html.append(f"<h3>step {step}</h3>")
        groups = {}
        for s in samples:
            if s["step"] == step:
                # json text as the key: a solution may be a list of accepted answers (unhashable)
                groups.setdefault(json.dumps([s.get("problem"), s.get("solution"), s.get("image")]), []).append(s)
        for key, group in groups.items():
            problem, solution, image = json.loads(key)
            columns = [k for k in group[0] if k not in ("step", "problem", "solution", "image", "completion",
                                                        "advantage")]  # answer, each reward, total
            html.append("<div class='p'>" + (f"<img class='t' src='{escape(image)}' alt='prompt image'>" if image else "")
                        + f"<p><b>question</b> {escape(str(problem))}</p><p><b>solution</b> {escape(str(solution))}"
                        "</p><table><tr><th>completion</th>" + "".join(f"<th>{escape(k)}</th>" for k in columns)
                        + "<th>advantage</th></tr>")
            for s in group:
                html.append(f"<tr><td class='c'>{escape(s['completion'])}</td>"
                            + "".join(cell(s.get(k)) for k in columns) + f"<td>{s['advantage']:+.3f}</td></tr>")
            html.append("</table></div>")
    html.append("</body></html>")
    with open(os.path.join(out_dir, "report.html.tmp"), "w") as f:
        f.write("\n".join(html))
    os.replace(os.path.join(out_dir, "report.html.tmp"), os.path.join(out_dir, "report.html"))  # never half-written


def user_error(message):
    """Stops the run for a fixable input: rank 0 prints the message; another rank waits 10 s first (the launcher
    ends the job when a rank exits: had it left first, it could kill rank 0 before rank 0 printed) and is then ended
    by the launcher's TERM (the default action again, not the stop-after-this-step handler), or, where rank 0
    did not stop (an error of this rank alone), prints the message with its rank."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        raise SystemExit(message)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's TERM ends this rank now (a handler may be set)
    time.sleep(10)
    raise SystemExit(f"rank {rank}: {message}")
