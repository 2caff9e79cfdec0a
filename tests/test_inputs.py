"""Bad input, as a new user gives it: each case stops before any model loads with one message that names the flag
or file and the fix, printed once, no traceback. And inputs that used to be silently wrong: relative paths from
the user's own folder, image paths relative to the data file, file:// and data: URIs, transparent / 16-bit /
palette images, the user's own column names in rewards."""
import base64
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import ROOT, run

sys.path.insert(0, ROOT)
import utils  # noqa: E402

PY = sys.executable
# (flags, what the one message must say)
BAD_FLAGS = [
    (["--steps", "0"], "--steps 0: train at least 1 step"),
    (["--log_completions_steps", "-1"], "--log_completions_steps -1: must be >= 0"),
    (["--eval_steps", "-5"], "--eval_steps -5: must be >= 0"),
    (["--top_p", "0"], "--top_p 0.0: use a value in (0, 1]"),
    (["--min_pixels", "300000"], "--min_pixels 300000 --max_pixels 200704: need 0 < min_pixels <= max_pixels"),
    (["--scale_rewards", "ture"], "'ture' is not a boolean: use true or false"),
    (["--beta", "-1"], "--beta -1.0: the KL weight must be >= 0"),
    (["--learning_rate=-1e-5"], "--learning_rate -1e-05: must be >= 0"),
    (["--learning_rate", "-1e-5"], "argument --learning_rate: expected one argument"),  # argparse: an option
    (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["--vllm_gpu_memory_utilization", "1.5"], "--vllm_gpu_memory_utilization 1.5: a share in [0, 1)"),
    (["--dataset", "mydata.jsonl"], "--dataset mydata.jsonl: no such file or folder"),
    (["--eval_dataset", "data/test.parquet"], "--eval_dataset data/test.parquet: no such file or folder"),
    (["--model", "./my-model"], "--model ./my-model: no such file or folder"),
    (["--resume", "auto", "--overwrite", "true"], "--resume and --overwrite true contradict each other"),
    (["--num_generations", "1"], "--num_generations 1: GRPO compares samples within a group"),
    (["--rewards", "accuracy,nope"], "unknown ['nope']"),
    (["--compile", "true", "--zero_stage", "3"], "--compile true --zero_stage 3: not supported"),
    (["--compile", "yes"], "--compile 'yes': use auto, true or false"),
    *([(["--report_to", "wandb"], "the wandb package is not installed: pip install wandb")]
      if importlib.util.find_spec("wandb") is None else []),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_stops_with_one_message(tmp_path, flags, message):
    p = run([PY, os.path.join(ROOT, "main.py"), "--check_only", "true", "--model", "tiny", "--output_dir",
             str(tmp_path / "out"), *flags], check=False, timeout=120)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert message in text, text[-2000:]
    assert text.count(message) == 1 and "Traceback" not in text, text[-2000:]


def test_compile_under_a_zero3_that_auto_chose_is_refused_once(tmp_path):
    """On CPU --zero_stage auto resolves to 3 only once DeepSpeed is set up: --compile true is refused there too,
    with one message (not a traceback per rank)."""
    p = run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
             "main.py", "--model", "tiny", "--output_dir", str(tmp_path / "out"), "--steps", "1", "--rollout", "hf",
             "--compile", "true"], check=False, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and text.count("--compile true under ZeRO-3") == 1, text[-3000:]
    assert 'main.py", line' not in text, text[-3000:]  # no rank's traceback (the launcher reports the exit)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    p = run([PY, "main.py", "--check_only", "true", "--model", "tiny", "--output_dir", str(tmp_path / "out")],
            check=False)
    assert p.returncode != 0 and "is a file: name a folder" in p.stderr and "Traceback" not in p.stderr


def line_art(path, mode):
    """Black strokes on a transparent ground (RGBA), as drawn by most tools; or the same as a palette image."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], outline=(0, 0, 0, 255), width=4)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = img.getpixel((0, 0))
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_line_art_is_black_on_white(tmp_path, mode):
    """Before: converted straight to RGB, the transparent ground became black: a black image."""
    img = np.asarray(utils.load_image(line_art(str(tmp_path / "a.png"), mode), 3136, 200704))
    assert img.mean() > 200, "the ground is not white"
    assert img.min() < 50, "the strokes are gone"


def test_a_16_bit_png_keeps_its_grey_levels(tmp_path):
    """Before: 16-bit values were clipped at 255: 99% white."""
    ramp = (np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = np.asarray(utils.load_image(str(tmp_path / "g16.png"), 3136, 200704)).astype(float)
    assert 100 < img.mean() < 155, img.mean()  # a ramp from black to white averages mid-grey
    assert img[:, :8].mean() < 40 and img[:, -8:].mean() > 215


def test_file_and_data_uris_are_images(tmp_path):
    path = line_art(str(tmp_path / "a.png"), "RGBA")
    with open(path, "rb") as f:
        uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    for value in ("file://" + path, uri):
        assert np.asarray(utils.load_image(value, 3136, 200704)).mean() > 200
    with pytest.raises(ValueError, match="unreadable image"):
        utils.load_image("data:image/png;base64,not-base64!", 3136, 200704)


def write_data(folder):
    """data.jsonl with image paths relative to its own folder, and the user's own column names."""
    os.makedirs(os.path.join(folder, "imgs"), exist_ok=True)
    rows = []
    for i, r in enumerate(utils.make_counting_dataset(16, seed=1)):
        r["image"].save(os.path.join(folder, "imgs", f"{i}.png"))
        rows.append({"question": r["problem"], "gt": r["solution"], "image": f"imgs/{i}.png", "source": "mine"})
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return os.path.join(folder, "data.jsonl")


def test_rows_keep_the_users_columns_and_image_paths_resolve_from_the_data_file(tmp_path, monkeypatch):
    data = write_data(str(tmp_path / "mine"))
    monkeypatch.chdir(tmp_path)  # not the data's folder
    rows = utils.load_rows(data, "train", "question", "gt", "image")
    assert rows[0]["gt"] == rows[0]["solution"] and rows[0]["source"] == "mine"
    assert os.path.isabs(rows[0]["image"]) and os.path.exists(rows[0]["image"])
    utils.load_image(rows[0]["image"], 3136, 200704)

    import trainer

    class Cfg:
        num_generations, scale_rewards = 2, True

    def exact(completions, gt, **columns):  # a reward asking for the user's own column name
        return [float(c == g) for c, g in zip(completions, gt)]
    per, _, _ = trainer.score(rows[:1], [rows[0]["gt"], "no"], {"exact": exact}, [1.0], Cfg)
    assert per["exact"] == [1.0, 0.0]


def test_a_column_named_completions_is_refused(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "2+2?", "solution": "4", "completions": "x"}) + "\n")
    with pytest.raises(ValueError, match="column named 'completions'.*rename that column"):
        utils.load_rows(str(data), "train", "problem", "solution", "image")


@pytest.mark.slow
def test_train_sh_from_the_users_own_folder_with_relative_paths(tmp_path):
    """`bash /path/to/train.sh --dataset data.jsonl --output_dir out` run in the user's folder: the data and
    its images are found there and the outputs land there (before: "Couldn't reach 'data.jsonl' on the Hub")."""
    write_data(str(tmp_path))
    p = run(["bash", os.path.join(ROOT, "train.sh"), "--dataset", "data.jsonl", "--question_column", "question",
             "--solution_column", "gt", "--output_dir", "out", "--steps", "1", "--eval_steps", "0",
             "--save_steps", "0", "--rollout", "hf"], env={"CUDA_VISIBLE_DEVICES": ""}, cwd=str(tmp_path))
    assert os.path.exists(tmp_path / "out" / "final" / "model.safetensors"), p.stdout[-2000:]
    assert os.path.exists(tmp_path / "out" / "metrics.jsonl")
    # and a bad flag from there: one message, before any launch
    p = run(["bash", os.path.join(ROOT, "train.sh"), "--dataset", "nope.jsonl"], env={"CUDA_VISIBLE_DEVICES": ""},
            cwd=str(tmp_path), check=False)
    assert p.returncode != 0 and (p.stdout + p.stderr).count("no such file or folder") == 1
    assert "Traceback" not in p.stdout + p.stderr and "accelerate" not in p.stderr


@pytest.mark.slow
def test_report_to_tensorboard_logs_the_metrics(tmp_path):
    """tensorboard comes with setup.sh: --report_to tensorboard writes every metric there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    run([PY, "main.py", "--model", "tiny", "--rollout", "hf", "--steps", "2", "--prompts_per_step", "2",
         "--num_generations", "2", "--max_completion_length", "4", "--eval_steps", "0", "--save_steps", "0",
         "--report_to", "tensorboard", "--output_dir", str(out)])
    events = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("events.out")]
    assert events
    scalars = set()
    for e in events:
        acc = EventAccumulator(e)
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"reward_mean", "kl", "step_s", "sampler_logp_diff"} <= scalars, scalars


def test_file_rows_are_read_when_sampled_and_each_rank_reads_only_its_own(tmp_path, tiny_qwen2_vl):
    """Before: every rank held every row of the file in memory, images included (tests/bench_data_memory.py: a
    1 GB parquet of images cost 3.8 GB per rank, now 1.0 GB)."""
    import datasets
    from transformers import AutoProcessor

    import main
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    ds = datasets.Dataset.from_dict({"problem": [f"q{i}" for i in range(10)], "solution": [str(i) for i in range(10)],
                                     "image": [{"bytes": buf.getvalue(), "path": None}] * 10},
                                    features=datasets.Features(problem=datasets.Value("string"),
                                                               solution=datasets.Value("string"),
                                                               image=datasets.Image()))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    rows = utils.load_rows(str(tmp_path / "d.parquet"), "train", "problem", "solution", "image")
    assert not isinstance(rows, list) and len(rows) == 10
    sampler = utils.PromptSampler(rows, AutoProcessor.from_pretrained(tiny_qwen2_vl), main.Config(), rank=1, world=2)
    assert list(sampler.rows.indices) == [1, 3, 5, 7, 9]
    assert {int(row["solution"]) % 2 for row, _ in sampler.next(8)} == {1}
    train, held, _ = main.load_data(main.Config(dataset=str(tmp_path / "d.parquet"), eval_size=2))
    assert len(train) == 8 and len(held) == 2 and not isinstance(held, list)
    assert {r["solution"] for r in train}.isdisjoint(r["solution"] for r in held)
    for rank in (0, 1):  # each rank's share of the training rows: held-out rows never among them
        mine = utils.PromptSampler(train, AutoProcessor.from_pretrained(tiny_qwen2_vl), main.Config(), rank, 2).rows
        assert [r["solution"] for r in mine] == [r["solution"] for r in train][rank::2]


def report_run(tmp_path):
    out = tmp_path / "r"
    run([PY, "main.py", "--model", "tiny", "--rollout", "hf", "--steps", "2", "--prompts_per_step", "2",
         "--num_generations", "2", "--max_completion_length", "6", "--eval_steps", "0", "--save_steps", "0",
         "--log_completions_steps", "1", "--output_dir", str(out)])
    with open(out / "completions.jsonl") as f:
        return out, [json.loads(line) for line in f]


@pytest.mark.slow
def test_report_html_shows_the_curves_and_each_logged_prompt_with_its_image_and_completions(tmp_path):
    """report.html, rewritten as the run goes: the curves and, per logged step, the prompt's image (saved, also
    referenced from completions.jsonl), question, solution, completions, rewards and advantages (the page parsed;
    the next test renders it)."""
    from html.parser import HTMLParser
    out, samples = report_run(tmp_path)

    class Page(HTMLParser):
        images, text = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"].split("?")[0])

        def handle_data(self, data):
            self.text.append(data)
    page = Page()
    page.feed((out / "report.html").read_text())
    text = " ".join(page.text)
    assert page.images[0] == "curves.png" and len(page.images) == 1 + 2 * 2  # 2 prompts at each of 2 steps
    for src in page.images:
        assert Image.open(out / src).size[0] > 0
    assert {s["image"] for s in samples} == set(page.images[1:])
    for s in samples:  # every logged completion is on the page, with its numbers
        assert s["problem"] in text and f"{s['advantage']:+.3f}" in text and f"{s['accuracy']:.3f}" in text
    assert "step 1" in text and "step 2" in text and "reward_mean" in text


@pytest.mark.slow
def test_report_html_in_a_real_headless_browser(tmp_path, headless_chromium):
    """The same page opened by Chromium: every image decodes (curves and prompt thumbnails), every logged
    completion's numbers are on the rendered page."""
    from playwright.sync_api import sync_playwright
    out, samples = report_run(tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=headless_chromium, timeout=120_000,
                                    args=["--no-sandbox", "--no-zygote", "--single-process", "--disable-gpu"])
        page = browser.new_page()
        page.goto(f"file://{out}/report.html")
        page.wait_for_load_state("load")
        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        text = page.inner_text("body")
        browser.close()
    assert len(images) == 5 and all(done and width > 0 for _, done, width in images), images
    assert images[0][2] >= 1000  # the six-panel curves
    for s in samples:
        assert f"{s['advantage']:+.3f}" in text and s["problem"] in text


def test_data_errors_name_the_line_the_row_or_the_file(tmp_path, tiny_qwen2_vl):
    """A JSON error names its line (before: buried in a datasets traceback); an unreadable image names its file;
    a non-VL model names what it is (before: a list of 80 config classes)."""
    from transformers import AutoProcessor

    import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "solution": "1"}\n{"problem": "b", "solution": \n{"problem": "c"}\n')
    p = run([PY, "main.py", "--check_only", "true", "--model", "tiny", "--dataset", str(bad), "--output_dir",
             str(tmp_path / "o")], check=False)
    assert p.returncode != 0 and "line 2 is not valid JSON" in p.stderr and "Traceback" not in p.stderr, p.stderr

    pretty = tmp_path / "pretty.json"  # one JSON document over several lines: the line of the error
    pretty.write_text('[\n  {"problem": "a", "solution": "1"},\n  {"problem": "b" "solution": "2"}\n]\n')
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        utils.load_rows(str(pretty), "train", "problem", "solution", "image")

    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"problem": "how many?", "solution": "1", "image": str(tmp_path / "broken.png")}]
    sampler = utils.PromptSampler(rows * 2, AutoProcessor.from_pretrained(tiny_qwen2_vl), main.Config(strict=True))
    with pytest.raises(ValueError, match="unreadable image.*broken.png"):
        sampler.next(1)

    from transformers import GPT2Config
    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    p = run([PY, "main.py", "--check_only", "true", "--model", str(tmp_path / "gpt2"), "--output_dir",
             str(tmp_path / "o")], check=False)
    assert p.returncode != 0 and "is a 'gpt2' model" in p.stderr and p.stderr.count("\n") <= 2, p.stderr
