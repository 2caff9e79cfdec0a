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
    (["--max_images", "0"], "--max_images must be >= 1"),
    (["--lora_rank", "8", "--zero_stage", "3"], "--lora_rank with --zero_stage 3: LoRA runs under ZeRO-2"),
    (["--lora_rank", "8", "--trainable", "all"], "--trainable all with --lora_rank: LoRA trains its adapters only"),
    (["--lora_rank", "-1"], "--lora_rank -1 --lora_alpha 0.0: give a rank >= 1"),
    (["--lora_rank", "4", "--lora_targets", "(q_proj"], "--lora_targets '(q_proj': not a regex"),
    (["--vllm_lora", "adapter"], "--vllm_lora adapter: vLLM applies LoRA adapters, which needs --lora_rank"),
    (["--lora_rank", "4", "--vllm_lora", "adapter", "--lora_targets", "all"],
     "--vllm_lora adapter with --lora_targets all --lora_rank 4: vLLM's own LoRA takes language layers"),
    (["--offload", "params", "--zero_stage", "2"], "--offload params keeps the weights in host memory between uses, "
                                                    "which only ZeRO-3 does: give --zero_stage 3 or auto"),
    (["--dynamic_sampling", "true", "--overlap", "true"], "--dynamic_sampling draws more rollouts within a step"),
    (["--dataset", "grounding"], "--dataset grounding answers with boxes"),
    (["--overlong_buffer", "600"], "--overlong_buffer 600: tokens before --max_completion_length 512"),
    (["--video_fps", "0"], "--video_fps 0.0: frames a second must be > 0"),
    (["--min_pixels", "300000"], "--min_pixels 300000 --max_pixels 200704: need 0 < min_pixels <= max_pixels"),
    # Qwen3-VL's 16-pixel patches: a token is 32x32 (Qwen2-VL's 28x28 fits); before, every image failed to resize
    (["--model", "tiny-qwen3", "--min_pixels", "100", "--max_pixels", "900"],
     "--max_pixels 900 is under one visual token of tiny-qwen3 (1024 pixels, 32x32): raise it"),
    (["--scale_rewards", "ture"], "'ture' is not a boolean: use true or false"),
    (["--beta", "-1"], "--beta -1.0: the KL weight must be >= 0"),
    (["--learning_rate=-1e-5"], "--learning_rate -1e-05: must be >= 0"),
    (["--learning_rate", "-1e-5"], "argument --learning_rate: expected one argument"),  # argparse: an option
    (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
    (["--vllm_gpu_memory_utilization", "1.5"], "--vllm_gpu_memory_utilization 1.5: a share in [0, 1)"),
    (["--dataset", "mydata.jsonl"], "--dataset mydata.jsonl: no such file or folder"),
    (["--eval_dataset", "data/test.parquet"], "--eval_dataset data/test.parquet: no such file or folder"),
    (["--model", "./my-model"], "--model ./my-model: no such file or folder"),
    # owner/name with owner/ a folder here: not looked up online (half a minute of retries before)
    (["--model", "tests/my-model"], "--model tests/my-model: no such folder"),
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


@pytest.mark.parametrize("targets, what", [
    (r".*visual.*\.qkv", "vision layers (model.visual.blocks.0.attn.qkv"),
    (r".*(language_model.*\.q_proj|lm_head)", "layers outside the language model's decoder layers (lm_head")])
def test_vllms_own_lora_outside_the_decoder_layers_is_refused_once_the_model_names_them(tmp_path, targets, what):
    """A --lora_targets regex is only known to reach the vision tower, the LM head or the embeddings (which vLLM's
    own LoRA does not adapt) once the model is built: refused there, one message, before any engine starts."""
    p = run([PY, "main.py", "--model", "tiny", "--output_dir", str(tmp_path / "out"), "--steps", "1", "--lora_rank",
             "4", "--vllm_lora", "adapter", "--lora_targets", targets], check=False, timeout=300)
    text = p.stdout + p.stderr
    message = f"--vllm_lora adapter: --lora_targets '{targets}' adapts {what}"
    assert p.returncode != 0 and text.count(message) == 1 and "Traceback" not in text, text[-3000:]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    p = run([PY, "main.py", "--check_only", "true", "--model", "tiny", "--output_dir", str(tmp_path / "out")],
            check=False)
    assert p.returncode != 0 and "is a file: name a folder" in p.stderr and "Traceback" not in p.stderr


def test_the_free_space_warning_counts_what_a_checkpoint_holds(tmp_path):
    """A full fine-tuning checkpoint holds about 8x the bf16 weights (the model, float32 master weights and Adam
    state, ZeRO-2's module state), a LoRA one about 1x (the merged model, the adapters' small state). Weights of a
    third of the disk's free space (a sparse file: its size counts, no space is taken) warn for the first and not
    for the second."""
    import shutil
    import warnings

    from checkpoint import check_output_dir
    model = tmp_path / "model"
    model.mkdir()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(shutil.disk_usage(tmp_path).free // 3)
    for lora, warns in ((False, True), (True, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_output_dir(str(tmp_path / "out"), str(model), lora=lora)
        assert any("GB free" in str(w.message) for w in caught) == warns, (lora, [str(w.message) for w in caught])

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


def test_file_rows_are_read_when_sampled_and_each_rank_reads_only_its_share(tmp_path, tiny_qwen2_vl):
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
    assert len(sampler.next(5)) == 5 and sampler.tried == 5  # half an epoch of 10 rows: 5 rows read, no more
    train, held, _ = main.load_data(main.Config(dataset=str(tmp_path / "d.parquet"), eval_size=2))
    assert len(train) == 8 and len(held) == 2 and not isinstance(held, list)
    assert {r["solution"] for r in train}.isdisjoint(r["solution"] for r in held)
    shares = [[r["solution"] for r, _ in utils.PromptSampler(train, AutoProcessor.from_pretrained(tiny_qwen2_vl),
                                                            main.Config(), rank, 2).next(4)] for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(r["solution"] for r in train), shares  # held-out rows never


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One short run for the report tests (they share it: pytest-xdist group 'report'): every step's completions
    logged, an eval at step 2."""
    out = tmp_path_factory.mktemp("report") / "r"
    run([PY, "main.py", "--model", "tiny", "--rollout", "hf", "--steps", "2", "--prompts_per_step", "2",
         "--num_generations", "2", "--max_completion_length", "6", "--eval_steps", "2", "--eval_size", "2",
         "--save_steps", "0", "--log_completions_steps", "1", "--output_dir", str(out)])
    with open(out / "completions.jsonl") as f:
        return out, [json.loads(line) for line in f]


def check_report_text(text, samples):
    """What the page says, as a reader sees it: the run's identity, every logged completion with its parsed answer,
    rewards, weighted total and advantage, the eval's completions."""
    assert "tiny" in text and "counting" in text and "commit" in text and "every flag" in text, text[:2000]
    for s in samples:
        assert s["problem"] in text and f"{s['advantage']:+.3f}" in text and f"{s['accuracy']:.3f}" in text
        assert f"{s['total']:.3f}" in text
    assert "total" in text and "answer" in text and "Eval samples (step 2)" in text
    assert "step 1" in text and "step 2" in text and "reward_mean" in text


@pytest.mark.xdist_group("report")
def test_report_html_shows_the_run_the_curves_and_each_logged_prompt_with_its_image_and_completions(report):
    """report.html, rewritten as the run goes: what ran, the curves and, per logged step, the prompt's image (saved,
    also referenced from completions.jsonl), question, solution, completions, parsed answers, rewards, weighted
    total and advantages; the eval's completions (the page parsed; the next test renders it). A finished run's
    page no longer reloads itself."""
    from html.parser import HTMLParser
    out, samples = report

    class Page(HTMLParser):
        images, text = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"].split("?")[0])

        def handle_data(self, data):
            self.text.append(data)
    page = Page()
    html = (out / "report.html").read_text()
    page.feed(html)
    assert page.images[0] == "curves.png" and len(page.images) == 1 + 2 * 2  # 2 prompts at each of 2 steps
    for src in page.images:
        assert Image.open(out / src).size[0] > 0
    assert {s["image"] for s in samples} == set(page.images[1:])
    check_report_text(" ".join(page.text), samples)
    assert "http-equiv='refresh'" not in html


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_report_html_in_a_real_headless_browser(report, headless_chromium, tmp_path):
    """The same page opened by Chromium: every image decodes (curves and prompt thumbnails), the page says what a
    reader needs (check_report_text), and a screenshot of it renders (the README's is made by
    tests/screenshot_report.py, the same way)."""
    from playwright.sync_api import sync_playwright
    out, samples = report
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=headless_chromium, timeout=120_000,
                                    args=["--no-sandbox", "--no-zygote", "--single-process", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"file://{out}/report.html")
        page.wait_for_load_state("load")
        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert len(images) == 5 and all(done and width > 0 for _, done, width in images), images
    assert images[0][2] >= 1000  # the six-panel curves
    check_report_text(text, samples)
    assert Image.open(tmp_path / "report.png").size[1] > 900  # the whole page, below the fold too


def test_curves_dash_a_curve_equal_to_another_and_count_steps_in_whole_numbers(tmp_path):
    """One reward: the weighted total is that reward, and its line lay exactly under the other (invisible); the
    step axis showed 1.5, 2.5; the step-time panel was scaled by step 1's load and compile (16 s against 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    history = [{"step": i, "reward_mean": 0.1 * i, "reward/number": 0.1 * i, "generate_s": 16.0 if i == 1 else 1.0,
                "train_s": 1.0} for i in (1, 2, 3)]
    figures = []
    original = plt.Figure.savefig
    try:
        plt.Figure.savefig = lambda fig, *a, **k: figures.append(fig) or original(fig, *a, **k)
        utils.plot_curves(history, str(tmp_path / "c.png"))
    finally:
        plt.Figure.savefig = original
    reward, *_, times = figures[0].axes
    styles = {line.get_label(): line.get_linestyle() for line in reward.lines}
    assert styles == {"reward_mean": "-", "reward/number (= reward_mean)": "--"}, styles
    assert all(float(t).is_integer() for t in reward.get_xticks()), reward.get_xticks()
    assert times.get_ylim()[1] < 16 and "off the scale" in times.get_title()


def bad_data(folder):
    """{case: (rows, flags, what the one message says)}: data that trained badly or crashed after the model loaded."""
    Image.new("RGB", (56, 56), "red").save(folder / "ok.png")
    whole = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[:len(whole) // 2])
    row = lambda i, **kw: {"problem": f"How many squares in picture {i}?", "solution": "1", "image": "ok.png", **kw}
    return {
        "every image missing": ([row(i, image=f"gone{i}.png") for i in range(40)], [],
                                "none of 32 sampled rows is usable (unreadable image: 32); row "),
        "truncated PNGs": ([row(i, image="truncated.png") for i in range(40)], [], "image file is truncated"),
        "empty questions": ([row(i, problem="") for i in range(40)], [],
                            "none of 32 sampled rows is usable (empty or non-text question: 32); row "),
        "prompts over --max_prompt_length": ([row(i, problem="word " * 400) for i in range(40)], [],
                                             "(prompt over --max_prompt_length: 32)"),
        "URL images offline": ([row(i, image="http://images.invalid/a.png") for i in range(40)], [],
                               "none of 32 sampled rows is usable (unreadable image: 32)"),
        "list solutions, a reward that takes one answer": (
            [row(i, solution=["2", "two"]) for i in range(40)], ["--rewards", "number"],
            "no sampled row has a solution the rewards can score (a list: 32); row "),
        "empty solutions": ([row(i, solution="") for i in range(40)], [],
                            "no sampled row has a solution the rewards can score (empty: 32)"),
        "dict solutions": ([row(i, solution={"value": 1}) for i in range(40)], [],
                           "the solution (column 'solution') is a dict"),
        "the images in a column named 'img'": ([{"problem": "q?", "solution": "1", "img": "ok.png"}] * 40, [],
                                               "'img' looks like images: name it with --image_column img"),
        "--strict and one unreadable image": ([row(i, image="gone.png" if i == 5 else "ok.png") for i in range(6)],
                                              ["--strict", "true"], "row 5: unreadable image"),
        "--strict and one empty solution": ([row(i, solution="" if i == 2 else "1") for i in range(6)],
                                            ["--strict", "true"], "row 2: the solution (column 'solution') is empty"),
    }


def test_bad_data_stops_before_the_model_loads_with_one_line_naming_the_row(tmp_path):
    """Each case stops in the checks every run (and --check_only, and so train.sh) makes before loading a model:
    one message naming the column, the row and the fix. Before, each was a traceback after the model build, or
    trained one step and crashed in the report (a list solution), or trained an unlearnable task (an empty
    solution), or trained text-only (an image column of another name)."""
    import main
    for case, (rows, flags, message) in bad_data(tmp_path).items():
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = main.parse_config(["--model", "tiny", "--dataset", str(tmp_path / "d.jsonl"), "--eval_steps", "0",
                                 "--output_dir", str(tmp_path / "out"), *flags])
        with pytest.raises(SystemExit) as stop:
            main.preflight(cfg, is_main=False)
        text = str(stop.value.code)
        assert message in text and "\n" not in text, f"{case}: {text}"
    assert not (tmp_path / "out").exists()


def test_a_few_bad_rows_get_one_warning_that_counts_them(tmp_path):
    """Training skips a row it cannot prompt and scores an unusable solution 0: a few such rows among good ones
    are counted in one warning (which rows stop a run must not depend on the seed's sample), and the run goes on;
    a bool solution (yes/no data) is text to the rewards."""
    import warnings

    import main
    rows = [{"problem": "" if i == 3 else f"q{i}?", "solution": "" if i == 4 else True if i == 5 else "1",
             "image": None} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = main.parse_config(["--model", "tiny", "--dataset", str(tmp_path / "d.jsonl"), "--eval_steps", "0",
                             "--output_dir", str(tmp_path / "out")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main.preflight(cfg, is_main=False)
    said = [str(w.message) for w in caught if "sampled rows" in str(w.message)]
    assert len(said) == 1 and "of 10 sampled rows, 1 would be skipped (empty or non-text question: 1); 1 have a " \
        "solution the rewards score 0 (empty: 1); first: row 3" in said[0], said


def test_check_only_on_bad_data_prints_one_line_in_seconds_and_good_data_with_a_list_solution_passes(tmp_path):
    """The command train.sh runs first, on the first case above: one line, no model built, in seconds (the
    imports and 32 prompts). A list of accepted answers passes with the accuracy reward, which takes lists."""
    import time
    cases = bad_data(tmp_path)
    for rows, expect in ((cases["every image missing"][0], 1),
                         ([{"problem": "How many?", "solution": ["2", "two"], "image": "ok.png"}] * 8, 0)):
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        t0 = time.time()
        p = run([PY, "main.py", "--check_only", "true", "--model", "tiny", "--dataset", str(tmp_path / "d.jsonl"),
                 "--eval_steps", "0", "--rewards", "accuracy,format", "--output_dir", str(tmp_path / "out")],
                check=False, timeout=120)
        seconds, text = time.time() - t0, p.stdout + p.stderr
        assert p.returncode == expect and len(text.strip().splitlines()) == expect, text
        assert seconds < 60 and not (tmp_path / "out").exists(), (seconds, text)
        print(f"--check_only: exit {p.returncode} in {seconds:.1f} s: {text.strip()[:200]}")


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


def test_offload_auto_offloads_the_optimizer_only_where_full_fine_tuning_would_not_fit_the_gpu(tiny_qwen2_vl):
    """--offload auto: the optimizer's state goes to host memory where the bf16 weights, the fp32 gradients, the fp32
    master weights and Adam's moments (2 + 4 + 12 bytes a trained weight; a reference model 2 more a weight) would
    take over 0.6 of each GPU even sharded over every rank; LoRA and CPU runs never offload; where the host cannot hold 16 bytes a trained
    weight the run stops with one message naming the flag and the ways out."""
    import torch
    from transformers import AutoModelForImageTextToText
    from main import Config
    from zero import resolve_offload
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for name, p in model.named_parameters() if ".visual." in f".{name}")
    full, host = Config(model=tiny_qwen2_vl, trainable="all"), 1e15
    fits = 18 * n / 0.6  # the GPU that full fine-tuning just fills to 0.6
    assert resolve_offload(full, model, 1, fits * 1.01, host) == "none"
    assert resolve_offload(full, model, 1, fits * 0.99, host) == "optimizer"
    assert resolve_offload(full, model, 2, fits * 0.99, host) == "none"  # ZeRO-3 halves it
    assert resolve_offload(full, model, 1, 0, host) == "none"  # no GPU
    assert resolve_offload(full, model, 1, fits * 1.01, host, reference=True) == "optimizer"  # its bf16 copy
    assert resolve_offload(full, model, 1, 20 * n / 0.6 * 1.01, host, reference=True) == "none"
    language = Config(model=tiny_qwen2_vl, trainable="language")  # the frozen tower: 2 bytes a weight, not 16
    assert resolve_offload(language, model, 1, (18 * n - 16 * vision) / 0.6 * 1.01, host) == "none"
    assert resolve_offload(language, model, 1, (18 * n - 16 * vision) / 0.6 * 0.99, host) == "optimizer"
    assert resolve_offload(Config(model=tiny_qwen2_vl, lora_rank=8), model, 1, fits * 0.5, host) == "none"
    assert resolve_offload(Config(model=tiny_qwen2_vl, offload="none"), model, 1, fits * 0.5, host) == "none"
    with pytest.raises(SystemExit, match=r"--offload auto: the optimizer's state of .* takes .* \(2 training process"
                                         r".*--lora_rank"):
        resolve_offload(full, model, 2, fits * 0.4, 16 * n * 0.99, on_node=2)
    assert resolve_offload(full, model, 2, fits * 0.4, 16 * n * 1.01, on_node=2) == "optimizer"


def test_the_colocated_engine_sizes_the_weights_from_their_files(tmp_path, tiny_qwen2_vl):
    """vLLM's colocated share counts the weights from the safetensors headers (no model built: under ZeRO-3 that
    went through zero.Init and failed): the model's own parameter count in bf16, tied embeddings once, from
    shards named by the index and not a stray copy beside them; a folder without safetensors stops with one line."""
    import shutil

    from transformers import AutoModelForImageTextToText

    import engine
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    expected = 2 * sum(p.numel() for p in model.parameters())
    assert engine.model_bytes(tiny_qwen2_vl) == expected
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    shutil.copy(os.path.join(tiny_qwen2_vl, "model.safetensors"), sharded / "old-copy.safetensors")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert engine.model_bytes(str(sharded)) == expected
    (tmp_path / "bin").mkdir()
    with pytest.raises(SystemExit, match="no safetensors weights"):
        engine.model_bytes(str(tmp_path / "bin"))
