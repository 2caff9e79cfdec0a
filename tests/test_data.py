"""Tests of the data side of utils.py: the built-in counting task, load_image, load_rows (local json / jsonl /
parquet files), PromptSampler (skipping and counting bad rows), build_prompt + collate (each prompt keeps its own
image, completions aligned at one column) and cut_at_eos.

Everything is real: a tiny Qwen2-VL processor built offline by utils.build_tiny_model, real files under tmp_path,
the real `datasets` loader.
"""
import contextlib
import io
import json
import os
import re
import signal
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import utils, main` from the repo root

import main  # noqa: E402
import utils  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 3136, 200704  # main.Config defaults
FACTOR = 28  # patch 14 x merge 2: image sides are multiples of this


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures and helpers

@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    return utils.build_tiny_model(str(tmp_path_factory.mktemp("tiny")), "qwen2_vl")


@pytest.fixture(scope="session")
def processor(tiny_model_path):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(tiny_model_path)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """datasets writes its Arrow cache here instead of ~/.cache (tests stay hermetic)."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


def cfg(**kw):
    kw.setdefault("max_prompt_length", 4096)
    return main.Config(model="tiny", **kw)


def noise_image(w, h, seed):
    """A distinct image per seed (a row's own pixels can be recognised after processing)."""
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@contextlib.contextmanager
def deadline(seconds):
    """Fails the test instead of hanging if the body loops forever (Python code is interruptible by SIGALRM)."""
    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds}s: endless loop?")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def image_pad_id(processor):
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def n_image_tokens(processor, grid_thw):
    return int(torch.as_tensor(grid_thw).prod()) // processor.image_processor.merge_size ** 2


def expected_vision(processor, image_value):
    """What the row's own image should become: loaded by load_image, then the image processor on its own."""
    img = utils.load_image(image_value, MIN_PIXELS, MAX_PIXELS)
    return img, processor.image_processor(images=[img], return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------
# make_counting_dataset

QUESTION_RE = re.compile(r"^How many (red|green|blue) (circle|square|triangle)s are there\?$")
BACKGROUND = (245, 245, 240)


def recount(img, color, shape):
    """Counts the objects of `color` and `shape` from the pixels: objects sit at the centres of a 4x4 grid of cells
    (radius max(4, size // 14)); the colour is the centre pixel's, the shape is told by two probes near the box
    corners: top-left filled -> square, else bottom-left filled -> triangle, else circle."""
    size = img.size[0]
    r = max(4, size // 14)
    d = round(0.8 * r)
    px = img.load()
    names = {v: k for k, v in utils.COLORS.items()}
    count = objects = 0
    for cx in range(4):
        for cy in range(4):
            x, y = round((cx + 0.5) * size / 4), round((cy + 0.5) * size / 4)
            centre = px[x, y]
            if centre == BACKGROUND:
                continue
            assert centre in names, f"unexpected colour {centre} at cell {(cx, cy)}"
            objects += 1
            if px[x - d, y - d] != BACKGROUND:
                found = "square"
            elif px[x - d, y + d] != BACKGROUND:
                found = "triangle"
            else:
                found = "circle"
            count += (names[centre], found) == (color, shape)
    return count, objects


def test_counting_dataset_is_deterministic_for_a_seed():
    a, b = utils.make_counting_dataset(24, seed=7), utils.make_counting_dataset(24, seed=7)
    assert [(r["problem"], r["solution"]) for r in a] == [(r["problem"], r["solution"]) for r in b]
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))


def test_counting_dataset_seeds_differ():
    a, b = utils.make_counting_dataset(24, seed=0), utils.make_counting_dataset(24, seed=1)
    assert [(r["problem"], r["solution"]) for r in a] != [(r["problem"], r["solution"]) for r in b]
    assert sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, b)) >= 20


@pytest.mark.parametrize("image_size", [112, 224])
@pytest.mark.parametrize("seed", [0, 5])
def test_counting_rows_are_well_formed_and_the_solution_is_the_count_in_the_image(seed, image_size):
    rows = utils.make_counting_dataset(40, seed=seed, image_size=image_size)
    assert len(rows) == 40
    for r in rows:
        m = QUESTION_RE.match(r["problem"])
        assert m, f"question names no colour and shape: {r['problem']!r}"
        assert isinstance(r["solution"], str) and r["solution"].isdigit() and int(r["solution"]) >= 1
        assert isinstance(r["image"], Image.Image) and r["image"].mode == "RGB"
        assert r["image"].size == (image_size, image_size)
        count, objects = recount(r["image"], m.group(1), m.group(2))
        assert count == int(r["solution"]), f"{r['problem']} answered {r['solution']}, the image holds {count}"
        assert count <= objects <= 4 + 3


# regression: distractors of the target colour and shape once pushed counts past max_count
def test_counting_solutions_stay_within_max_count():
    for max_count in (1, 4):
        rows = utils.make_counting_dataset(512, seed=0, max_count=max_count)
        counts = sorted({int(r["solution"]) for r in rows})
        assert counts[0] >= 1 and counts[-1] <= max_count, f"max_count={max_count}: counts {counts}"


# regression: max_count > 13 once asked random.sample for more cells than the grid has
def test_counting_dataset_accepts_a_large_max_count():
    rows = utils.make_counting_dataset(64, seed=0, max_count=16)
    assert all(1 <= int(r["solution"]) for r in rows)


def test_load_rows_counting_splits():
    train = utils.load_rows("counting", "train", "problem", "solution", "image", seed=0)
    test = utils.load_rows("counting", "test", "problem", "solution", "image", seed=0)
    assert len(train) == 512 and len(test) == 64
    assert [r["problem"] for r in test] != [r["problem"] for r in train[:64]]  # not the same rows


# ---------------------------------------------------------------------------------------------------------------
# load_image

def check_within_bounds(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    w, h = img.size
    assert w % FACTOR == 0 and h % FACTOR == 0, img.size
    assert min_pixels <= w * h <= max_pixels, (img.size, min_pixels, max_pixels)


@pytest.mark.parametrize("carrier", ["path", "bytes", "bytearray", "dict-bytes", "dict-path", "dict-both", "pil",
                                     "pil-rgba", "pil-palette", "jpeg-bytes"])
def test_load_image_accepts_every_carrier(tmp_path, carrier):
    img = noise_image(300, 200, seed=1)
    path = tmp_path / "img.png"
    img.save(path)
    value = {"path": str(path), "bytes": encode(img), "bytearray": bytearray(encode(img)),
             "dict-bytes": {"bytes": encode(img), "path": None}, "dict-path": {"bytes": None, "path": str(path)},
             "dict-both": {"bytes": encode(img), "path": "/no/such/file.png"}, "pil": img,
             "pil-rgba": img.convert("RGBA"), "pil-palette": img.convert("P"),
             "jpeg-bytes": encode(img, "JPEG")}[carrier]
    out = utils.load_image(value, MIN_PIXELS, MAX_PIXELS)
    check_within_bounds(out)
    assert out.size == (308, 196)  # 300x200 rounded to multiples of 28
    if carrier in ("path", "bytes", "bytearray", "dict-bytes", "dict-path", "dict-both", "pil", "pil-rgba"):
        reference = utils.load_image(img, MIN_PIXELS, MAX_PIXELS)
        assert out.tobytes() == reference.tobytes(), "same pixels whatever carries them"


@pytest.mark.parametrize("size, min_pixels, max_pixels", [
    ((2000, 1500), MIN_PIXELS, MAX_PIXELS),       # shrunk
    ((1000, 1000), MIN_PIXELS, 50176),            # shrunk to a small budget
    ((10, 10), MIN_PIXELS, MAX_PIXELS),           # grown
    ((1, 1), MIN_PIXELS, MAX_PIXELS),
    ((30, 600), MIN_PIXELS, MAX_PIXELS),          # thin
    ((112, 112), 112 * 112 * 4, MAX_PIXELS),      # grown to a larger minimum
])
def test_load_image_resizes_within_min_max_pixels(size, min_pixels, max_pixels):
    out = utils.load_image(Image.new("RGB", size, (10, 20, 30)), min_pixels, max_pixels)
    check_within_bounds(out, min_pixels, max_pixels)
    w, h = out.size
    assert abs(w / h - size[0] / size[1]) / (size[0] / size[1]) < 0.35, "aspect ratio roughly kept"


@pytest.mark.parametrize("value, message", [
    (b"definitely not an image", "unreadable image"),
    (b"", None),
    (encode(Image.new("RGB", (64, 64)))[:60], "unreadable image"),       # truncated PNG
    ({"bytes": b"\x00\x01garbage", "path": None}, "unreadable image"),
    ("/no/such/dir/image.png", "/no/such/dir/image.png"),                 # the path is named
    ({"bytes": None, "path": "/no/such/dir/image.png"}, "/no/such/dir/image.png"),
    (5, "expected a path, URL, bytes or PIL image, got int"),
    (None, "expected a path, URL, bytes or PIL image"),
    ([b"x"], "expected a path, URL, bytes or PIL image, got list"),
    ({"bytes": None, "path": None}, "expected a path, URL, bytes or PIL image"),
    (3.5, "got float"),
])
def test_load_image_errors_are_value_errors_with_a_clear_message(value, message):
    with pytest.raises(ValueError) as info:
        utils.load_image(value, MIN_PIXELS, MAX_PIXELS)
    if message:
        assert message in str(info.value)


def test_load_image_corrupt_file_and_directory(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ValueError, match="unreadable image"):
        utils.load_image(str(bad), MIN_PIXELS, MAX_PIXELS)
    with pytest.raises(ValueError, match="unreadable image"):
        utils.load_image(str(tmp_path), MIN_PIXELS, MAX_PIXELS)


# ---------------------------------------------------------------------------------------------------------------
# load_rows with local files

def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_load_rows_jsonl_with_image_paths_and_extra_columns(hf_cache):
    img_path = hf_cache / "a.png"
    noise_image(60, 40, seed=2).save(img_path)
    path = hf_cache / "data.jsonl"
    write_jsonl(path, [{"problem": "How many?", "solution": "3", "image": str(img_path), "source": "x"},
                       {"problem": "What colour?", "solution": "red", "image": None, "source": "y"}])
    rows = utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert [(r["problem"], r["solution"], r["image"], r["source"]) for r in rows] == \
        [("How many?", "3", str(img_path), "x"), ("What colour?", "red", None, "y")]
    check_within_bounds(utils.load_image(rows[0]["image"], MIN_PIXELS, MAX_PIXELS))


def test_load_rows_json_array_with_custom_columns(hf_cache):
    path = hf_cache / "data.json"
    path.write_text(json.dumps([{"q": "1+1?", "a": "2", "pic": None, "level": 1},
                                {"q": "2+2?", "a": "4", "pic": None, "level": 2}]))
    rows = utils.load_rows(str(path), "train", "q", "a", "pic")
    assert [(r["problem"], r["solution"], r["image"], r["level"]) for r in rows] == \
        [("1+1?", "2", None, 1), ("2+2?", "4", None, 2)]
    for r in rows:  # the user's own names stay too: a reward may ask for `a`
        assert (r["q"], r["a"]) == (r["problem"], r["solution"])


def test_load_rows_parquet_written_by_datasets_with_an_image_feature(hf_cache):
    import datasets
    images = [noise_image(50, 60, seed=3), noise_image(90, 40, seed=4)]
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "img": datasets.Image(), "id": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"question": ["q0", "q1"], "answer": ["A", "B"],
                                     "img": [{"bytes": encode(i), "path": None} for i in images], "id": [10, 11]},
                                    features=features)
    path = hf_cache / "data.parquet"
    ds.to_parquet(str(path))
    rows = utils.load_rows(str(path), "train", "question", "answer", "img")
    assert [(r["problem"], r["solution"], r["id"]) for r in rows] == [("q0", "A", 10), ("q1", "B", 11)]
    for r, img in zip(rows, images):
        loaded = utils.load_image(r["image"], MIN_PIXELS, MAX_PIXELS)
        assert loaded.tobytes() == utils.load_image(img, MIN_PIXELS, MAX_PIXELS).tobytes()


def test_load_rows_parquet_written_by_pandas_with_raw_bytes(hf_cache):
    import pandas as pd
    img = noise_image(40, 40, seed=5)
    path = hf_cache / "data.parquet"
    pd.DataFrame({"problem": ["q"], "solution": ["7"], "image": [encode(img)]}).to_parquet(path)
    rows = utils.load_rows(str(path), "test", "problem", "solution", "image")  # any split name labels a file
    assert len(rows) == 1 and rows[0]["solution"] == "7"
    assert utils.load_image(rows[0]["image"], MIN_PIXELS, MAX_PIXELS).tobytes() == \
        utils.load_image(img, MIN_PIXELS, MAX_PIXELS).tobytes()


def test_load_rows_upper_case_extension(hf_cache):
    path = hf_cache / "DATA.JSONL"
    write_jsonl(path, [{"problem": "p", "solution": "s"}])
    with pytest.warns(UserWarning, match="image"):
        rows = utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert list(rows) == [{"problem": "p", "solution": "s", "image": None}]


@pytest.mark.parametrize("column, value", [("picture", "x.png"), ("img", "http://x.org/a.jpg?s=2"),
                                           ("photo_path", "a/b.jpeg"), ("figure", "cat.JPG"),
                                           ("scan", "data:image/png;base64,iVBO")])
def test_an_image_like_column_not_named_stops_and_none_means_text_only(hf_cache, column, value):
    """Before: the images of a column not named 'image' were dropped with a warning, and a vision run trained
    text-only. Now: one message naming the column to give; --image_column none trains text-only on purpose."""
    path = hf_cache / "data.jsonl"
    write_jsonl(path, [{"problem": "p", "solution": "s", column: value}])
    with pytest.raises(ValueError, match=f"'{column}' looks like images: name it with --image_column {column}, or "
                                         "give --image_column none"):
        utils.load_rows(str(path), "train", "problem", "solution", "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = utils.load_rows(str(path), "train", "problem", "solution", "none")
    assert rows[0]["image"] is None and rows[0][column] == value


def test_a_text_only_dataset_warns_once_and_gives_text_only_rows(hf_cache):
    """Columns named like images whose values are not (a caption, a count), and a question naming a file, do not
    stop a text dataset."""
    path = hf_cache / "data.jsonl"
    write_jsonl(path, [{"problem": "What is in cat.png?", "solution": "a.jpg", "image_caption": "a cat",
                        "num_images": 3}])
    with pytest.warns(UserWarning, match=r"--image_column none"):
        rows = utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert rows[0]["image"] is None


@pytest.mark.parametrize("question_column, solution_column, missing, flag", [
    ("problem", "solution", "problem", "--question_column"),
    ("question", "solution", "solution", "--solution_column"),
    ("question", "answer_text", "answer_text", "--solution_column"),
])
def test_load_rows_missing_column_names_the_column_and_the_flag(hf_cache, question_column, solution_column,
                                                                 missing, flag):
    path = hf_cache / "data.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError) as info:
        utils.load_rows(str(path), "train", question_column, solution_column, "image")
    assert f"'{missing}'" in str(info.value) and flag in str(info.value)
    assert "question" in str(info.value) and "answer" in str(info.value), "lists the columns there are"


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""),
    ("empty.json", b""),
    ("empty.parquet", b""),
    ("blank_lines.jsonl", b"\n\n"),
    ("empty_array.json", b"[]"),
])
def test_load_rows_empty_file_is_an_error(hf_cache, name, content):
    path = hf_cache / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert str(path) in str(info.value)
    if not content:
        assert "empty" in str(info.value)


def test_load_rows_zero_row_parquet_is_an_error(hf_cache):
    import pandas as pd
    path = hf_cache / "zero.parquet"
    pd.DataFrame({"problem": pd.Series([], dtype=str), "solution": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        utils.load_rows(str(path), "train", "problem", "solution", "image")


@pytest.mark.parametrize("name", ["data.csv", "data.txt", "data.tsv", "data.json.gz"])
def test_load_rows_unsupported_extension_names_it(hf_cache, name):
    path = hf_cache / name
    path.write_text("problem,solution\nq,1\n")
    ext = name.rsplit(".", 1)[1]
    with pytest.raises(ValueError, match=re.escape(f"'.{ext}'")):
        utils.load_rows(str(path), "train", "problem", "solution", "image")


def test_load_rows_corrupt_file_is_a_value_error(hf_cache):
    path = hf_cache / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        utils.load_rows(str(path), "train", "problem", "solution", "image")


# ---------------------------------------------------------------------------------------------------------------
# PromptSampler

TEXT_ROW = {"problem": "What is two plus two?", "solution": "4", "image": None}


def good_image_row(i):
    return {"problem": f"How many dots in picture {i}?", "solution": str(i), "image": encode(noise_image(56, 56, i))}


def bad_image_row(i):
    return {"problem": f"Broken picture {i}?", "solution": "0", "image": b"not an image " + bytes([i])}


def test_sampler_empty_dataset_raises(processor):
    with pytest.raises(ValueError, match="empty"):
        utils.PromptSampler([], processor, cfg())


def test_sampler_skips_and_counts_unreadable_images(processor):
    rows = [good_image_row(1), bad_image_row(1), good_image_row(2), bad_image_row(2), bad_image_row(3)]
    sampler = utils.PromptSampler(rows, processor, cfg())
    with pytest.warns(UserWarning, match="skipped rows"):
        out = sampler.next(4)  # 2 usable rows per pass: at least one full pass, so every bad row was met
    assert len(out) == 4
    assert all(r["problem"].startswith("How many dots") for r, _ in out)
    assert set(sampler.skipped) == {"unreadable image"}
    assert 3 <= sampler.skipped["unreadable image"] <= 6


def test_sampler_strict_raises_on_an_unreadable_image(processor):
    sampler = utils.PromptSampler([bad_image_row(1)], processor, cfg(strict=True))
    with pytest.raises(ValueError) as info:
        sampler.next(1)
    assert "unreadable image" in str(info.value) and "--strict" in str(info.value)
    assert "Broken picture 1?" in str(info.value), "names the question of the bad row"


def test_sampler_skips_and_counts_prompts_over_max_prompt_length(processor):
    limit = utils.build_prompt(processor, TEXT_ROW, cfg())["input_ids"].shape[1] + 5
    long_row = {"problem": "count " * 200, "solution": "1", "image": None}
    assert utils.build_prompt(processor, long_row, cfg())["input_ids"].shape[1] > limit
    sampler = utils.PromptSampler([TEXT_ROW, long_row], processor, cfg(max_prompt_length=limit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sampler.next(3)
    assert [r["solution"] for r, _ in out] == ["4", "4", "4"]
    assert all(p["input_ids"].shape[1] <= limit for _, p in out)
    assert sum(sampler.skipped.values()) >= 2 and len(sampler.skipped) == 1
    (reason,) = sampler.skipped
    assert "prompt" in reason

    strict = utils.PromptSampler([long_row], processor, cfg(max_prompt_length=limit, strict=True))
    with pytest.raises(ValueError, match="--max_prompt_length"):
        strict.next(1)


def test_sampler_counts_each_reason_separately(processor):
    limit = utils.build_prompt(processor, good_image_row(1), cfg())["input_ids"].shape[1] + 5
    rows = [good_image_row(1), bad_image_row(1), {"problem": "count " * 200, "solution": "1", "image": None}]
    sampler = utils.PromptSampler(rows, processor, cfg(max_prompt_length=limit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler.next(3)
    assert len(sampler.skipped) == 2 and sampler.skipped["unreadable image"] >= 2
    assert all(v >= 2 for v in sampler.skipped.values())


@pytest.mark.parametrize("bad_rows", [
    [bad_image_row(1)],
    [bad_image_row(i) for i in range(5)],
    [{"problem": "count " * 200, "solution": "1", "image": None}],
    [{"problem": "", "solution": "1", "image": None}, {"problem": None, "solution": "1", "image": None}],
])
def test_sampler_where_every_row_is_bad_raises_instead_of_looping(processor, bad_rows):
    sampler = utils.PromptSampler(bad_rows, processor, cfg(max_prompt_length=150))
    with deadline(30), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(utils.DataError, match="too few usable rows in the data: none in 201 tries") as info:
            sampler.next(2)
    assert sum(sampler.skipped.values()) > 0
    assert str(info.value).count("\n") == 0 and utils.counted(sampler.skipped) in str(info.value)


def test_sampler_gives_each_rank_a_disjoint_share_of_every_epoch(processor):
    """Each epoch is one shuffle of all the rows (the same on every rank), dealt out rank by rank: within an epoch
    no row goes to two ranks and every row goes to one; the next epoch deals other rows to each rank (before: a
    fixed rows[rank::world] per rank, so a rank's rows never changed)."""
    rows = [dict(TEXT_ROW, solution=str(i)) for i in range(6)]
    samplers = [utils.PromptSampler(rows, processor, cfg(), rank=rank, world=3, seed=0) for rank in range(3)]
    epochs = [[[r["solution"] for r, _ in s.next(2)] for s in samplers] for _ in range(4)]
    for shares in epochs:
        assert sorted(x for share in shares for x in share) == [str(i) for i in range(6)], epochs
    assert len({frozenset(shares[0]) for shares in epochs}) > 1, f"rank 0 drew the same rows every epoch: {epochs}"


@pytest.mark.parametrize("n, world", [(5, 2), (7, 3), (1, 3), (2, 4)])
def test_an_epoch_is_padded_to_a_multiple_of_the_ranks_so_they_stay_in_step(processor, n, world):
    """n rows not a multiple of the ranks (or fewer rows than ranks): each epoch is padded with its first rows, as
    torch's DistributedSampler pads, so every rank's share is as long and the ranks start each epoch together:
    at every step the ranks' rows come from the same shuffle, and each epoch uses every row."""
    rows = [dict(TEXT_ROW, solution=str(i)) for i in range(n)]
    samplers = [utils.PromptSampler(rows, processor, cfg(), rank=rank, world=world, seed=1) for rank in range(world)]
    per_epoch = -(-n // world)
    for _ in range(3):
        shares = [[r["solution"] for r, _ in s.next(per_epoch)] for s in samplers]
        assert {x for share in shares for x in share} == {str(i) for i in range(n)}, shares
        assert all(not s.order for s in samplers)  # every rank ended the epoch at the same step


def test_one_process_draws_rows_in_the_same_order_as_before(processor):
    """One process: the stream is the one the earlier sampler drew (a seeded shuffle of all rows, taken from its
    end), so one-process runs and their tests' expectations do not change."""
    import random
    rows = [dict(TEXT_ROW, solution=str(i)) for i in range(7)]
    sampler = utils.PromptSampler(rows, processor, cfg(), seed=3)
    rng, expected = random.Random(3), []
    for _ in range(3):
        order = list(range(7))
        rng.shuffle(order)
        expected += order[::-1]
    assert [int(r["solution"]) for r, _ in sampler.next(21)] == expected


def test_an_older_versions_data_position_restarts_the_shuffle_on_several_ranks(processor):
    """A checkpoint of the older sampler (each rank a fixed shard, its own seed) holds positions in that shard: on
    2 ranks they would name other rows, so the run goes on from a new shared shuffle, saying so; one process's is
    taken as it is (the same stream)."""
    rows = [dict(TEXT_ROW, solution=str(i)) for i in range(6)]
    old = {"rng": random_state(5), "order": [2, 0], "skipped": {"unreadable image": 1}}
    two = [utils.PromptSampler(rows, processor, cfg(), rank=rank, world=2, seed=0) for rank in (0, 1)]
    for s in two:
        with pytest.warns(UserWarning, match="older version"):
            s.load_state_dict(dict(old))
    shares = [{r["solution"] for r, _ in s.next(3)} for s in two]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 6, shares
    assert two[0].skipped == {"unreadable image": 1}
    one = utils.PromptSampler(rows, processor, cfg(), seed=0)
    one.load_state_dict(dict(old))
    assert [r["solution"] for r, _ in one.next(2)] == ["0", "2"]


def random_state(seed):
    import random
    return random.Random(seed).getstate()


def test_bad_rows_at_every_second_place_fall_to_every_rank_alike(processor):
    """Every second row unreadable, 2 ranks: each rank draws usable rows (before: rank 1 got rows 1, 3, 5, ... and
    stopped with 'no usable row in 401 tries' while the data was half fine)."""
    rows = [good_image_row(i) if i % 2 == 0 else bad_image_row(i) for i in range(20)]
    for rank in (0, 1):
        sampler = utils.PromptSampler(rows, processor, cfg(), rank=rank, world=2, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sampler.next(12)
        assert len(out) == 12 and all(r["problem"].startswith("How many dots") for r, _ in out)


MIXED_ROWS = [
    {"problem": "What is two plus two?", "solution": "4", "image": None},
    {"problem": "How many red pixels in A?", "solution": "1", "image": encode(noise_image(112, 112, 11))},
    {"problem": "Name a colour.", "solution": "red", "image": None},
    {"problem": "How many blue pixels in B?", "solution": "2", "image": encode(noise_image(224, 168, 12))},
    {"problem": "How many green pixels in C?", "solution": "3", "image": encode(noise_image(56, 84, 13))},
    {"problem": "What is three plus four?", "solution": "7", "image": None},
    {"problem": "How many dots in D?", "solution": "5", "image": encode(noise_image(84, 84, 14))},
]


def check_prompt_belongs_to_row(processor, row, prompt):
    assert prompt["text"].count(row["problem"]) == 1
    pads = int((prompt["input_ids"][0] == image_pad_id(processor)).sum())
    if row["image"] is None:
        assert prompt["images"] == [] and prompt.get("pixel_values") is None and pads == 0
        return
    img, vision = expected_vision(processor, row["image"])
    assert len(prompt["images"]) == 1 and prompt["images"][0].tobytes() == img.tobytes()
    assert torch.equal(prompt["image_grid_thw"], vision["image_grid_thw"])
    assert torch.equal(prompt["pixel_values"], vision["pixel_values"])
    assert pads == n_image_tokens(processor, prompt["image_grid_thw"][0])


def test_sampler_keeps_each_prompt_with_its_own_row_and_image(processor):
    bad = [bad_image_row(1), bad_image_row(2)]
    sampler = utils.PromptSampler(MIXED_ROWS + bad, processor, cfg(), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sampler.next(2 * len(MIXED_ROWS))
    assert sum(sampler.skipped.values()) >= 2
    assert {r["problem"] for r, _ in out} == {r["problem"] for r in MIXED_ROWS}
    for row, prompt in out:
        check_prompt_belongs_to_row(processor, row, prompt)


# ---------------------------------------------------------------------------------------------------------------
# build_prompt + collate: a mixed batch keeps each prompt with its own image

def check_batch_images(processor, prompts, batch):
    """Walks the batch rows in order, as the model does, and checks that the k-th image's grid and pixel rows in
    the batch are the ones of the k-th row that has image tokens, and that this row has as many image tokens."""
    pad = image_pad_id(processor)
    grids = batch.get("image_grid_thw", torch.zeros((0, 3), dtype=torch.long))
    pixels = batch.get("pixel_values")
    k, offset = 0, 0
    for i, p in enumerate(prompts):
        n_pad = int((batch["input_ids"][i] == pad).sum())
        if p.get("pixel_values") is None:
            assert n_pad == 0, f"text-only row {i} has {n_pad} image tokens"
            continue
        assert k < len(grids), f"row {i} has an image but the batch has only {len(grids)} grids"
        grid = grids[k]
        assert torch.equal(grid, p["image_grid_thw"][0]), f"row {i} got image {k}'s grid"
        assert n_pad == n_image_tokens(processor, grid) == n_image_tokens(processor, p["image_grid_thw"][0])
        rows = int(grid.prod())
        assert torch.equal(pixels[offset:offset + rows], p["pixel_values"]), f"row {i} got someone else's pixels"
        k, offset = k + 1, offset + rows
    assert k == len(grids) and (pixels is None or offset == pixels.shape[0]), "extra images in the batch"


@pytest.fixture(scope="module")
def mixed_prompts(processor):
    return [utils.build_prompt(processor, row, cfg()) for row in MIXED_ROWS]


def test_build_prompt_gives_each_row_its_own_image(processor, mixed_prompts):
    for row, prompt in zip(MIXED_ROWS, mixed_prompts):
        check_prompt_belongs_to_row(processor, row, prompt)
    token_counts = [n_image_tokens(processor, p["image_grid_thw"][0]) for p in mixed_prompts if "pixel_values" in p]
    assert len(set(token_counts)) == len(token_counts), "images of distinct sizes: a swap cannot go unnoticed"


@pytest.mark.parametrize("order", [
    [0, 1, 2, 3, 4, 5, 6],   # text, image, text, image, image, text, image
    [1, 0, 3, 2, 5, 4, 6],
    [6, 4, 3, 1],            # images only
    [1],
    [0, 2, 5],               # text only
    [2, 4, 0, 6],
])
def test_collate_mixed_batch_keeps_each_prompt_with_its_own_image(processor, mixed_prompts, order):
    prompts = [mixed_prompts[i] for i in order]
    completions = [[300 + j] * (1 + j % 3) for j in range(len(prompts))]  # ordinary text tokens
    batch = utils.collate(prompts, completions, processor.tokenizer.pad_token_id)
    with_image = [p for p in prompts if p.get("pixel_values") is not None]
    if with_image:
        assert torch.equal(batch["pixel_values"], torch.cat([p["pixel_values"] for p in with_image]))
        assert torch.equal(batch["image_grid_thw"], torch.cat([p["image_grid_thw"] for p in with_image]))
    else:
        assert "pixel_values" not in batch and "image_grid_thw" not in batch
    check_batch_images(processor, prompts, batch)
    # mm_token_type_ids mark exactly the image tokens, each row's at its own (shifted) positions
    assert "mm_token_type_ids" in batch
    assert torch.equal(batch["mm_token_type_ids"] != 0, batch["input_ids"] == image_pad_id(processor))


def test_collated_mixed_batch_runs_through_the_tiny_model(tiny_model_path, processor, mixed_prompts):
    """The model pairs image tokens with pixel rows in order; a mismatch raises in the forward."""
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    text_tokens = processor.tokenizer.encode(" 3 dots")  # never a vision token: those would count as images
    assert image_pad_id(processor) not in text_tokens
    batch = utils.collate(mixed_prompts, [text_tokens] * len(mixed_prompts), processor.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape and torch.isfinite(hidden).all()


# ---------------------------------------------------------------------------------------------------------------
# collate alignment

def test_collate_alignment(processor):
    pad = processor.tokenizer.pad_token_id
    rows = [dict(TEXT_ROW, problem=q) for q in ("Hi?", "What is two plus two, exactly?", "Count the words in this "
                                                "rather longer question, please.")]
    prompts = [utils.build_prompt(processor, r, cfg()) for r in rows]
    lengths = [p["input_ids"].shape[1] for p in prompts]
    assert len(set(lengths)) == 3, "prompts of different lengths"
    completions = [[11, 12, 13], [], [21, 22, 23, 24, 25]]
    batch = utils.collate(prompts, completions, pad)
    P, C = max(lengths), max(len(c) for c in completions)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, P + C)
    assert batch["completion_mask"].shape == (3, C) and batch["completion_mask"].dtype == torch.float32
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    for i, (p, c, n) in enumerate(zip(prompts, completions, lengths)):
        ids, attn = batch["input_ids"][i], batch["attention_mask"][i]
        # left padding: the prompt ends at column P for every row
        assert (ids[:P - n] == pad).all() and (attn[:P - n] == 0).all()
        assert torch.equal(ids[P - n:P], p["input_ids"][0]) and (attn[P - n:P] == 1).all()
        # the completion starts at column P, then right padding
        assert ids[P:P + len(c)].tolist() == c and (attn[P:P + len(c)] == 1).all()
        assert (ids[P + len(c):] == pad).all() and (attn[P + len(c):] == 0).all()
        # completion_mask marks exactly the completion tokens
        assert batch["completion_mask"][i].tolist() == [1.0] * len(c) + [0.0] * (C - len(c))
        assert torch.equal(batch["completion_mask"][i].bool(), attn[P:].bool())
    # the last C columns are the completions, as completion_logprobs reads them
    assert batch["input_ids"][2, -C:].tolist() == completions[2]
    if "mm_token_type_ids" in batch:
        assert batch["mm_token_type_ids"].shape == (3, P + C) and not batch["mm_token_type_ids"].any()
    assert "pixel_values" not in batch


def test_collate_with_empty_completions_is_a_generation_batch(processor, mixed_prompts):
    pad = processor.tokenizer.pad_token_id
    batch = utils.collate(mixed_prompts[:3], [[], [], []], pad)
    P = max(p["input_ids"].shape[1] for p in mixed_prompts[:3])
    assert batch["input_ids"].shape == (3, P) and batch["completion_mask"].shape == (3, 0)
    for i, p in enumerate(mixed_prompts[:3]):
        assert torch.equal(batch["input_ids"][i, -p["input_ids"].shape[1]:], p["input_ids"][0])
    check_batch_images(processor, mixed_prompts[:3], batch)


# ---------------------------------------------------------------------------------------------------------------
# cut_at_eos

EOS, EOS2, PAD = 100, 101, 0


@pytest.mark.parametrize("tokens, eos_ids, pad_id, expected", [
    ([1, 2, EOS, 3, 4], {EOS}, PAD, ([1, 2, EOS], True)),           # stops after the first EOS, inclusive
    ([1, EOS, 2, EOS], {EOS}, PAD, ([1, EOS], True)),
    ([EOS], {EOS}, PAD, ([EOS], True)),
    ([EOS, EOS], {EOS}, PAD, ([EOS], True)),
    ([1, EOS2, EOS], {EOS, EOS2}, PAD, ([1, EOS2], True)),          # any of several EOS ids
    ([1, 2, EOS, PAD, PAD], {EOS}, PAD, ([1, 2, EOS], True)),
    ([1, 2, 3], {EOS}, PAD, ([1, 2, 3], False)),                    # ran out of length
    ([1, 2, PAD, PAD], {EOS}, PAD, ([1, 2], False)),                # trailing pad stripped without EOS
    ([1, PAD, 2], {EOS}, PAD, ([1, PAD, 2], False)),                # only trailing pad
    ([PAD, PAD], {EOS}, PAD, ([], False)),
    ([1, 2, PAD], {EOS}, None, ([1, 2, PAD], False)),               # no pad id: nothing stripped
    ([1, PAD, PAD], {EOS, PAD}, PAD, ([1, PAD], True)),             # pad that is also an EOS id ends the row
    ([], {EOS}, PAD, ([], False)),
    ([], {EOS}, None, ([], False)),
    ((1, EOS, 2), [EOS], PAD, ([1, EOS], True)),                   # tuple in, list of eos ids
    (range(1, 4), {EOS}, PAD, ([1, 2, 3], False)),
])
def test_cut_at_eos(tokens, eos_ids, pad_id, expected):
    out = utils.cut_at_eos(tokens, eos_ids, pad_id)
    assert out == expected
    assert isinstance(out[0], list)


def test_cut_at_eos_does_not_modify_its_input():
    tokens = [1, 2, PAD, PAD]
    utils.cut_at_eos(tokens, {EOS}, PAD)
    assert tokens == [1, 2, PAD, PAD]


# ---------------------------------------------------------------------------------------------------------------
# several images a row

def image_runs(processor, ids):
    """[(start, length)] of each run of image tokens in a prompt's ids."""
    pad, runs = image_pad_id(processor), []
    for i, t in enumerate(ids):
        if t == pad and (i == 0 or ids[i - 1] != pad):
            runs.append([i, 0])
        if t == pad:
            runs[-1][1] += 1
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("question,texts", [
    ("Left <image> and right <image>: how many in all?", ["Left ", " and right ", ": how many in all?"]),
    ("<image><image>How many in all?", ["How many in all?"]),
    ("How many in all?", ["How many in all?"]),  # no markers: the images come first
])
def test_several_images_each_in_its_place_with_its_own_pixels(processor, question, texts):
    """A row with a list of images (of different sizes): each image's tokens sit where its <image> marker was
    (else all first, in order), as many as its own grid says, and its pixels are the image processor's of that
    image alone, in the row's order."""
    values = [encode(noise_image(112, 56, 21)), encode(noise_image(56, 84, 22))]
    prompt = utils.build_prompt(processor, {"problem": question, "image": values}, cfg(max_images=2))
    ids = prompt["input_ids"][0].tolist()
    runs = image_runs(processor, ids)
    alone = [expected_vision(processor, v)[1] for v in values]
    assert [n for _, n in runs] == [n_image_tokens(processor, a["image_grid_thw"][0]) for a in alone]
    assert len(set(n for _, n in runs)) == 2, "distinct sizes: a swap cannot go unnoticed"
    assert torch.equal(prompt["image_grid_thw"], torch.cat([a["image_grid_thw"] for a in alone]))
    assert torch.equal(prompt["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    decoded = [processor.tokenizer.decode(ids[a + n:b]) for (a, n), (b, _) in zip(runs, runs[1:] + [(len(ids), 0)])]
    where = [processor.tokenizer.decode(ids[:runs[0][0]])] + decoded
    if len(texts) == 3:  # the text before, between and after the images
        assert where[0].endswith("Left <|vision_start|>") and where[1].startswith("<|vision_end|> and right")
        assert where[2].startswith("<|vision_end|>: how many in all?")
    else:
        assert where[1] == "<|vision_end|><|vision_start|>" and where[2].startswith("<|vision_end|>How many in all?")
    assert "<image>" not in prompt["text"]
    assert processor.tokenizer.decode(prompt["engine_ids"]).count("<|image_pad|>") == 2  # one per image for vLLM


@pytest.mark.parametrize("row,reason", [
    ({"problem": "A <image> B <image>", "image": ["a.png"]}, "<image> markers and images differ in number"),
    ({"problem": "A <image>", "image": None}, "<image> markers and images differ in number"),
    ({"problem": "three?", "image": ["a.png", "a.png", "a.png"]}, "more images than --max_images"),
    ({"problem": "a gap?", "image": ["a.png", None]}, "unreadable image"),
    ({"problem": "a broken one?", "image": ["a.png", b"not an image"]}, "unreadable image"),
])
def test_a_bad_row_of_several_images_is_skipped_with_its_reason(processor, tmp_path, row, reason):
    noise_image(56, 56, 1).save(tmp_path / "a.png")
    row = dict(row, image=[str(tmp_path / v) if isinstance(v, str) else v for v in row["image"]]
               if row["image"] else None)
    with pytest.raises(ValueError) as e:
        utils.build_prompt(processor, row, cfg(max_images=2))
    assert utils.skip_reason(str(e.value)) == reason, str(e.value)


def test_an_empty_image_list_is_a_text_only_row(processor):
    prompt = utils.build_prompt(processor, {"problem": "Two plus two?", "image": []}, cfg())
    assert prompt["images"] == [] and "pixel_values" not in prompt


def test_collate_keeps_each_row_with_its_own_images_whatever_their_count(processor):
    """Rows of 2, 0, 3 and 1 images in one micro-batch, each prompt twice (G = 2): the plain batch holds every
    row's images in row order; the shared one each prompt's once, and image_index sends each image of each row
    to its own copy."""
    sizes = [(112, 56), (56, 84), (84, 84), (56, 56), (112, 112), (168, 56)]
    imgs = [encode(noise_image(w, h, 30 + i)) for i, (w, h) in enumerate(sizes)]
    rows = [{"problem": "two?", "image": imgs[:2]}, {"problem": "none?", "image": None},
            {"problem": "three?", "image": imgs[2:5]}, {"problem": "one?", "image": imgs[5:]}]
    prompts = [utils.build_prompt(processor, r, cfg(max_images=3)) for r in rows]
    flat = [p for p in prompts for _ in range(2)]
    completions = [[300 + j] for j in range(len(flat))]
    pad = processor.tokenizer.pad_token_id
    plain, shared = utils.collate(flat, completions, pad), utils.collate(flat, completions, pad, share_images=True)
    having = [p for p in flat if p.get("pixel_values") is not None]
    assert torch.equal(plain["pixel_values"], torch.cat([p["pixel_values"] for p in having]))
    assert torch.equal(plain["image_grid_thw"], torch.cat([p["image_grid_thw"] for p in having]))
    assert torch.equal(shared["image_grid_thw"], plain["image_grid_thw"])
    assert torch.equal(shared["pixel_values"], torch.cat([p["pixel_values"] for p in prompts if p["images"]]))
    assert shared["image_index"].tolist() == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 5]
    for i in range(len(flat)):  # each row's image tokens, in order, as many as its own images'
        want = [n_image_tokens(processor, g) for g in flat[i].get("image_grid_thw", [])]
        assert [n for _, n in image_runs(processor, plain["input_ids"][i].tolist())] == want


# ---------------------------------------------------------------------------------------------------------------
# videos

def write_video(path, n=10, fps=5, size=(64, 48)):
    """An mpeg4 file (PyAV) of n frames at fps whose frame i is grey level 25 * i."""
    import av
    import numpy as np
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 25 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


@pytest.mark.parametrize("n,max_frames,kept", [(6, 4, [0, 2, 3, 5]), (3, 16, [0, 1]), (1, 16, [0, 0]),
                                               (8, 8, list(range(8))), (9, 5, [0, 2, 4, 6])])
def test_a_list_of_frames_is_thinned_evenly_to_an_even_count(n, max_frames, kept):
    """Frames taken as sampled at --video_fps; at most --video_max_frames, evenly spaced; of an odd count the
    last dropped (the towers take frames in pairs: the cap holds and the frames' times stay true), a single frame
    doubled; each frame resized as an image."""
    frames = [noise_image(60, 90, 40 + i) for i in range(n)]
    array, metadata = utils.load_video(frames, cfg(video_max_frames=max_frames, video_fps=3.0))
    assert metadata == {"fps": 3.0, "frames_indices": kept, "total_num_frames": n}
    want = [utils.load_image(frames[i], MIN_PIXELS, MAX_PIXELS) for i in kept]
    assert array.shape == (len(kept), want[0].height, want[0].width, 3) and array.dtype.name == "uint8"
    assert all((array[k] == np.asarray(w)).all() for k, w in enumerate(want))


def test_a_video_file_is_sampled_at_video_fps(tmp_path):
    """10 frames at 5 fps (2 s) read at --video_fps 2: 4 frames, evenly spread (0, 3, 6, 9), each the frame it
    says it is (grey 25 x index, within the codec's loss), sized as an image, the file's own fps kept for the
    frames' times. --video_max_frames caps the count."""
    path = write_video(tmp_path / "v.mp4")
    array, metadata = utils.load_video(path, cfg(video_fps=2.0, video_max_pixels=56 * 56))
    assert metadata["frames_indices"] == [0, 3, 6, 9] and metadata["fps"] == 5.0 and metadata["total_num_frames"] == 10
    assert array.shape[0] == 4 and array.shape[1] % 28 == 0 and array.shape[1] * array.shape[2] <= 56 * 56
    assert [round(float(f.mean()) / 25) for f in array] == [0, 3, 6, 9]
    array, metadata = utils.load_video("file://" + path, cfg(video_fps=5.0, video_max_frames=2))
    assert metadata["frames_indices"] == [0, 9]


@pytest.mark.parametrize("value,message", [
    ([None, None], r"unreadable video \(frame 0: unreadable image"),
    (["ok", None], r"unreadable video \(frame 1: unreadable image"),
    (["ok", "wide"], r"unreadable video \(frames of different sizes"),
    ([], r"unreadable video \(an empty list of frames\)"),
    ("missing.mp4", r"unreadable video \(.*missing.mp4"),
    ("not_a_video.mp4", r"unreadable video"),
    (5, r"unreadable video \(TypeError: expected a video file's path or URL, or a list of frames, got int\)"),
])
def test_a_bad_video_is_named_and_skipped(tmp_path, processor, value, message):
    files = {"ok": noise_image(56, 56, 1), "wide": noise_image(112, 56, 2)}
    for name, img in files.items():
        img.save(tmp_path / f"{name}.png")
    (tmp_path / "not_a_video.mp4").write_text("hello")
    value = [str(tmp_path / f"{v}.png") if v in files else v for v in value] if isinstance(value, list) else \
        str(tmp_path / value) if isinstance(value, str) else value
    with pytest.raises(ValueError, match=message):
        utils.load_video(value, cfg())
    with pytest.raises(ValueError) as e:  # as a row: skipped and counted under its reason
        utils.build_prompt(processor, {"problem": "what moves?", "image": None, "video": value}, cfg())
    assert utils.skip_reason(str(e.value)) == "unreadable video"


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_video_row_comes_first_with_its_frames_times(tmp_path, kind):
    """The video's tokens come before the question (and any image), as many as its grid says; the processor gets
    the frames as sampled (no sampling of its own) with their times: Qwen2.5-VL's seconds per frame pair from
    --video_fps, Qwen3-VL's timestamps in the text from the frames' indices over the fps."""
    path = utils.build_tiny_model(str(tmp_path / kind), kind)
    c = main.Config(model=path, video_fps=1.0, max_prompt_length=4096)
    proc = main.load_processor(path, c)
    frames = [noise_image(56, 84, 50 + i) for i in range(4)]
    prompt = utils.build_prompt(proc, {"problem": "What moves?", "image": noise_image(56, 56, 3), "video": frames}, c)
    ids = prompt["input_ids"][0].tolist()
    video, image = (proc.tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>"))
    grid = prompt["video_grid_thw"][0]
    assert ids.count(video) == int(grid.prod()) // 4 and grid[0] == 2
    assert max(i for i, t in enumerate(ids) if t == video) < ids.index(image)
    text = proc.tokenizer.decode(ids)
    assert text.index("<|video_pad|>") < text.index("What moves?")
    if kind == "qwen2_5_vl":
        assert prompt["second_per_grid_ts"] == [2.0] or torch.equal(torch.as_tensor(prompt["second_per_grid_ts"]),
                                                                     torch.tensor([2.0]))
    if kind == "qwen3_vl":  # frames 0-1 and 2-3 at 1 fps: their pairs' mid times, in the released format (the
        # frame pairs in place of the template's <|vision_start|><|video_pad|><|vision_end|>, not inside it)
        assert "user\n<0.5 seconds><|vision_start|><|video_pad|>" in text and "<2.5 seconds><|vision_start|>" in text
        assert "<|vision_start|><0.5 seconds>" not in text and "<|vision_end|><|vision_end|>" not in text


def test_load_rows_reads_lists_of_images_and_a_video_column(tmp_path):
    """Lists of relative image paths and a video's frames are taken from the data file's folder; a data file
    without a 'video' column has no videos, and a --video_column it lacks is named."""
    for name in ("a", "b"):
        noise_image(56, 56, 7).save(tmp_path / f"{name}.png")
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"problem": "two?", "solution": "2", "image": ["a.png", "b.png"], "video": ["a.png", "b.png"]}])
    rows = utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert rows[0]["image"] == rows[0]["video"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    write_jsonl(path, [{"problem": "two?", "solution": "2", "image": "a.png"}])
    assert "video" not in utils.load_rows(str(path), "train", "problem", "solution", "image")[0]
    with pytest.raises(ValueError, match="no column 'clip'.*--video_column"):
        utils.load_rows(str(path), "train", "problem", "solution", "image", video_column="clip")
    write_jsonl(path, [{"problem": "what moves?", "solution": "2", "video": ["a.png", "b.png"]}])  # videos only:
    with pytest.warns(UserWarning, match="no image column"):  # not taken for an image column
        rows = utils.load_rows(str(path), "train", "problem", "solution", "image")
    assert rows[0]["image"] is None and rows[0]["video"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
