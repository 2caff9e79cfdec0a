"""End to end: real tiny models, real processors, real DeepSpeed (ZeRO-3 over gloo on CPU), real processes."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ASSETS, ROOT, run

PY = sys.executable
FAST = ["--model", "tiny", "--rollout", "hf", "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "8",
        "--eval_steps", "0", "--save_steps", "0"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def state_dict(path):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_learns_a_toy_task_one_step_off(tmp_path):
    """A tiny random model learns to write upper-case letters: mean reward from < 0.2 to > 0.8 in 40 steps, one
    step off (--overlap: each batch sampled by vLLM before the previous update, importance-weighted); with
    transformers' generate: test_zero3_learns_the_toy_task_as_one_process_does. Flipping the sign of the loss
    (or of the advantages) makes the reward fall instead, and this test fail. (vLLM in step, without the overlap:
    its weights after every update are test_sampler_and_trainer_score_the_same_distribution's and
    test_zero3_two_processes_train_save_and_load's; its 40-step run here took 2.5 minutes of CI.)"""
    pytest.importorskip("vllm")
    out = str(tmp_path / "toy")
    run([PY, "tests/run_with_reward.py", "--model", "tiny", "--rollout", "vllm", "--overlap", "true", "--output_dir", out,
         "--rewards", "uppercase",
         "--steps", "40", "--prompts_per_step", "4", "--num_generations", "8", "--micro_batch_size", "16",
         "--max_completion_length", "8", "--learning_rate", "3e-3", "--beta", "0", "--save_steps", "0",
         "--eval_steps", "0"])
    rewards = [m["reward_mean"] for m in metrics(out)]
    assert len(rewards) == 40
    assert rewards[0] < 0.2, rewards
    assert sum(rewards[-5:]) / 5 > 0.8, rewards


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_zero3_two_processes_train_save_and_load(tmp_path, rollout):
    """2 CPU processes under DeepSpeed ZeRO-3 (gloo), reference model sharded too (beta > 0), mu = 2. With vLLM:
    rank 0's engine samples for both ranks and gets the gathered shards after every step, vision tower included;
    its log-probs must match the trainer's on every step (the parity check, inside the real loop)."""
    if rollout == "vllm":
        pytest.importorskip("vllm")
    out = str(tmp_path / "z3")
    p = run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
             "--mixed_precision", "no", "tests/run_with_reward.py", *FAST, "--rollout", rollout, "--output_dir", out,
             "--rewards", "uppercase,format", "--steps", "3", "--learning_rate", "1e-2", "--beta", "0.04",
             "--mu", "2", "--micro_batch_size", "4", "--save_steps", "2",
             *(["--trainable", "all"] if rollout == "vllm" else [])])
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    assert all(m["completion_len_max"] <= 8 for m in ms)
    assert ms[-1]["clip_frac"] >= 0 and ms[-1]["kl"] >= 0
    base, final = state_dict(os.path.join(out, "base_model")), state_dict(os.path.join(out, "final"))
    assert base.keys() == final.keys()
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert changed, "training changed no weight"
    if rollout == "hf":
        assert not any(".visual." in f".{k}" for k in changed), "the vision tower is frozen by default"
    else:
        assert any(".visual." in f".{k}" for k in changed), "--trainable all trains the vision tower"
        assert all(m["sampler_logp_diff"] < 0.02 for m in ms), [m["sampler_logp_diff"] for m in ms]
    assert os.path.exists(os.path.join(out, "checkpoint-2", "model.safetensors"))
    assert "done: 3 steps" in p.stdout


@pytest.mark.slow
def test_smoke_run_of_train_sh_leaves_every_output(tmp_path):
    out = str(tmp_path / "smoke")
    p = run(["bash", "train.sh", "--steps", "2", "--output_dir", out, "--save_steps", "1", "--eval_steps", "2"],
            env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.stdout.splitlines()[0].startswith("train.sh: no GPU found")
    # quiet by default: only the project's own lines (before: DeepSpeed's op build, vLLM's and torch's import
    # warnings, vLLM's load bars), the progress bar's frames aside (it redraws one line with carriage returns)
    text = (p.stdout + p.stderr).replace("\r", "\n")
    console = [line for line in text.split("\n") if line.strip() and not line.startswith("GRPO:")]
    ours = ("train.sh: no GPU found", "grpo-vl: loading tiny", "grpo-vl: tiny | ", "step 2: eval_accuracy",
            "done: 2 steps in ", "final model in ")
    assert [next((o for o in ours if line.startswith(o)), line) for line in console] == list(ours), console
    assert "reward=" in text and "number=" in text  # the bar shows each reward's mean beside the weighted total
    assert " reward " in console[4] and "number " in console[4] and "skipped rows: none" in console[4], console
    for name in ("metrics.jsonl", "completions.jsonl", "curves.png", "config.json", "final/model.safetensors",
                 "checkpoint-1/model.safetensors"):
        assert os.path.exists(os.path.join(out, name)), name
    ms = metrics(out)
    assert len(ms) == 2 and "eval_accuracy" in ms[-1]
    for key in ("reward_mean", "reward_std", "reward/accuracy", "reward/format", "accuracy", "kl",
                "clip_frac", "completion_len_mean", "completion_len_max", "truncated_frac", "tokens_per_s",
                "step_s", "generate_s", "train_s", "sync_s"):
        assert key in ms[0], key
    with open(os.path.join(out, "completions.jsonl")) as f:
        sample = json.loads(f.readline())
    assert {"problem", "solution", "completion", "accuracy", "format", "advantage"} <= set(sample)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    AutoModelForImageTextToText.from_pretrained(os.path.join(out, "final"))
    AutoProcessor.from_pretrained(os.path.join(out, "final"))

    # the same command again into that folder of the user's: it holds a finished run, which is kept (the smoke
    # run starts over only in its own outputs/smoke; before, it deleted the run and trained anew, exit 0)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("metrics.jsonl", "final/model.safetensors")}
    p = run(["bash", "train.sh", "--steps", "2", "--output_dir", out, "--save_steps", "1", "--eval_steps", "2"],
            env={"CUDA_VISIBLE_DEVICES": ""}, check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and text.count("already holds") == 1, text[-3000:]
    assert "--resume auto" in text and "--overwrite true" in text and "Traceback" not in text, text[-3000:]
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in before}


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_both_with_its_one_line(tmp_path):
    """2 ZeRO-3 processes, a reward that raises on rank 1's rows only: rank 0 learns of it before the update (no
    hang in the update's collectives) and prints rank 1's message once; no rank prints a traceback of ours."""
    p = run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
             "--mixed_precision", "no", "tests/run_with_reward.py", *FAST, "--rewards", "rank1_raising", "--steps", "2",
             "--output_dir", str(tmp_path / "run")], check=False, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-3000:]
    assert text.count("reward 'rank1_raising' raised ValueError: cannot score this row") == 1, text[-3000:]
    assert 'main.py", line' not in text and "trainer.py" not in text, text[-3000:]


# ---- bad input: a clear message naming the field and the fix --------------------------------------------------

@contextlib.contextmanager
def tmpfs(path, size, read_only=False):
    """A small filesystem of its own at `path` (root: mount; skipped where mounting is not allowed)."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_an_output_folder_that_cannot_be_written_stops_before_the_model_loads(tmp_path):
    """A read-only folder and a path under a file: one line from --check_only, in seconds, nothing loaded."""
    (tmp_path / "a_file").write_text("x")
    with tmpfs(tmp_path / "ro", "1m", read_only=True):
        for out, message in ((tmp_path / "ro" / "run", "cannot write in"), (tmp_path / "a_file" / "run", "is a file")):
            start = time.time()
            p = run([PY, "main.py", "--check_only", "true", "--model", "tiny", "--output_dir", str(out)], check=False)
            assert p.returncode != 0 and p.stderr.count(message) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
            assert time.time() - start < 60


@pytest.mark.slow
@pytest.mark.parametrize("full_at", ["checkpoint-1", "the final model"])
def test_a_full_disk_while_saving_stops_with_one_line_and_leaves_no_half_written_folder(tmp_path, full_at):
    """A 10 MB (or 7 MB) disk: the tiny model (4.5 MB) fits, checkpoint-1 with its optimizer state (or final/
    beside it) does not. One line names what was written and how to go on; the half-written folder is removed
    (it would hold the space) and no final/ exists (before: a traceback and a broken final/)."""
    with tmpfs(tmp_path / "disk", "10m" if full_at == "checkpoint-1" else "7m"):
        out = tmp_path / "disk" / "run"
        p = run([PY, "tests/run_with_reward.py", *FAST, "--rewards", "uppercase", "--steps", "2", "--save_steps",
                 "1" if full_at == "checkpoint-1" else "0", "--output_dir", str(out)], check=False)
        text = p.stdout + p.stderr
        assert p.returncode != 0 and text.count(f"No space left on device writing {full_at}") == 1, text[-3000:]
        assert "--resume auto" in text and "Traceback" not in text, text[-3000:]
        assert not [e for e in os.listdir(out) if e.endswith(".tmp") or e == "final"], os.listdir(out)


def test_an_early_error_leaves_no_watchdog_output(tmp_path):
    """`python main.py` stopping at a missing dataset: its message and nothing after it (the watchdog started
    before the checks and, finding its process gone, printed a psutil.NoSuchProcess traceback, 3 runs of 3)."""
    for _ in range(3):
        p = run([PY, "main.py", "--model", "tiny", "--dataset", str(tmp_path / "nope.jsonl"), "--output_dir",
                 str(tmp_path / "out")], check=False)  # the pipes close once every writer, the watchdog too, is gone
        assert p.returncode != 0 and "no such file or folder" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and "NoSuchProcess" not in p.stderr, p.stderr[-2000:]
    # the race itself, made certain: a watchdog that starts after its process has gone leaves quietly
    import guard
    gone = subprocess.Popen([PY, "-c", "pass"])
    gone.wait()
    p = subprocess.run([PY, "-c", guard.GUARD_SOURCE, str(gone.pid), "0"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]


def fails_with(args, *needles):
    p = run([PY, "tests/run_with_reward.py", *args], check=False, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0, text[-3000:]
    for n in needles:
        assert n in text, f"{n!r} not in output:\n{text[-3000:]}"


def test_g_below_two_is_refused(tmp_path):
    fails_with([*FAST, "--num_generations", "1", "--output_dir", str(tmp_path)], "--num_generations 1", "2 or more")


def test_unknown_reward_and_bad_values_are_refused(tmp_path):
    fails_with([*FAST, "--rewards", "accuracy,nope", "--loss_type", "ppo", "--output_dir", str(tmp_path)],
               "--rewards", "nope", "REWARDS in main.py", "--loss_type 'ppo'")


@pytest.mark.slow
def test_a_raising_reward_is_named(tmp_path):
    """One line naming the reward, the error and what it was given; no traceback (before: two chained ones)."""
    p = run([PY, "tests/run_with_reward.py", *FAST, "--rewards", "format,raising", "--steps", "1", "--output_dir",
             str(tmp_path)], check=False, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "'raising'" in line]
    assert len(lines) == 1 and "reward 'raising' raised KeyError: 'no_such_column', given 8 completions" in lines[0], \
        text[-3000:]


@pytest.mark.slow
def test_missing_column_and_empty_dataset(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    fails_with([*FAST, "--dataset", str(data), "--output_dir", str(tmp_path / "a")],
               "column 'problem' is missing", "--question_column")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    fails_with([*FAST, "--dataset", str(empty), "--output_dir", str(tmp_path / "b")], "empty")


@pytest.mark.slow
def test_prompts_over_the_limit_and_unreadable_images_are_skipped_or_strict(tmp_path):
    from PIL import Image
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"problem": "How many red squares?", "solution": "1", "image": str(tmp_path / "ok.png")},
            {"problem": "And here?", "solution": "2", "image": str(tmp_path / "broken.png")},
            {"problem": "long " * 400, "solution": "3", "image": None}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [*FAST, "--dataset", str(data), "--max_prompt_length", "300", "--steps", "2", "--rewards", "format"]
    out = str(tmp_path / "ok")
    run([PY, "tests/run_with_reward.py", *args, "--output_dir", out])
    assert metrics(out)[-1]["skipped_rows"] >= 2  # the broken image and the long prompt, counted
    fails_with([*args, "--strict", "true", "--output_dir", str(tmp_path / "strict")], "--strict")



@pytest.mark.slow
def test_every_second_image_unreadable_on_two_ranks_trains_and_all_unreadable_stops_once(tmp_path):
    """2 ZeRO-3 processes, every second row's image unreadable: both ranks train (before: rank 1 held every odd
    row, died with 'no usable row in 401 tries', rank 0 followed on a closed connection, 69+ lines). Every image
    unreadable: one line that counts the reasons, from one process, no traceback of ours (the launcher's own is
    train.sh's to hide). Before rank 0 was given time to print, rank 1's exit made the launcher kill it first."""
    from PIL import Image
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    launch = [PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
              "--mixed_precision", "no", "tests/run_with_reward.py", *FAST, "--rewards", "format", "--steps", "2"]
    for name, images in (("half", ["ok.png", "broken.png"] * 8), ("none", ["broken.png"] * 16)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"problem": f"How many squares in picture {i}?", "solution": "1", "image": str(tmp_path / im)})
            + "\n" for i, im in enumerate(images)))
        p = run([*launch, "--dataset", str(tmp_path / f"{name}.jsonl"), "--output_dir", str(tmp_path / name)],
                check=False, timeout=300)
        text = p.stdout + p.stderr
        if name == "half":
            assert p.returncode == 0, text[-3000:]
            assert [m["step"] for m in metrics(str(tmp_path / name))] == [1, 2]
        else:
            # (stopped by the data check before the model loads, on every rank, printed by rank 0)
            assert p.returncode != 0 and text.count("none of 16 sampled rows is usable") == 1, text[-3000:]
            assert "unreadable image: " in text, text[-3000:]
            assert 'main.py", line' not in text and 'utils.py", line' not in text, text[-3000:]

# ---- models with their real processors ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,assets", [("qwen2_vl", "Qwen2-VL-2B-Instruct"), ("qwen2_5_vl", "Qwen2.5-VL-3B-Instruct"),
                                         ("qwen3_vl", "Qwen2.5-VL-3B-Instruct")])
def test_collate_forward_generate_with_the_real_processor(tmp_path, kind, assets):
    """Tiny layers, the real tokenizer (151k tokens) and image processor from ../shared/assets (Qwen3-VL: its
    processor classes around that tokenizer, as tests/make_random_model.py builds its real shapes)."""
    src = os.path.join(ASSETS, assets)
    if not os.path.isdir(src):
        pytest.skip(f"{src} not found (the real processors live in ../shared/assets)")
    from transformers import AutoModelForImageTextToText
    import policy
    import trainer
    from main import Config, load_processor
    from make_random_model import qwen3_vl
    from utils import build_prompt, build_tiny_model, collate, make_counting_dataset, vision_token_ids
    if kind == "qwen3_vl":
        qwen3_vl("qwen3-vl-2b", src)[1].save_pretrained(str(tmp_path / "processor"))
        src = str(tmp_path / "processor")
    path = build_tiny_model(str(tmp_path / kind), kind, processor_from=src)
    model = AutoModelForImageTextToText.from_pretrained(path)
    cfg = Config(model=path, max_pixels=112 * 112)
    processor = load_processor(path, cfg)
    assert type(processor).__name__ == {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                        "qwen3_vl": "Qwen3VLProcessor"}[kind]
    rows = make_counting_dataset(3, seed=2)
    rows[2]["image"] = None
    prompts = [build_prompt(processor, r, cfg) for r in rows]
    assert "<|image_pad|>" in prompts[0]["text"] and "<|image_pad|>" not in prompts[2]["text"]
    side = 16 if kind == "qwen3_vl" else 14  # patches of the image resized to multiples of 2 x side pixels
    h, w = prompts[0]["images"][0].height, prompts[0]["images"][0].width
    assert h % (2 * side) == w % (2 * side) == 0 and prompts[0]["image_grid_thw"].tolist() == [[1, h // side, w // side]]
    suppressed = vision_token_ids(model.config, processor.tokenizer)
    assert model.config.image_token_id in suppressed
    samples, logps = trainer.hf_generate(model, prompts, 2, processor.tokenizer.pad_token_id, 6,
                                         suppressed_ids=suppressed)
    assert [len(s) for s in samples] == [2, 2, 2]
    assert [[len(lp) for lp in g] for g in logps] == [[len(s) for s in g] for g in samples]  # one per token
    assert all(-1e9 < x <= 0 for g in logps for lp in g for x in lp)
    completions = [s for group in samples for s in group]
    assert not any(t in suppressed for c in completions for t in c)
    batch = collate([p for p in prompts for _ in range(2)], completions, processor.tokenizer.pad_token_id)
    logp = policy.completion_logprobs(model, batch, 1.0, suppressed)
    assert logp.shape == batch["completion_mask"].shape
    assert torch.isfinite(logp[batch["completion_mask"] > 0]).all() and (logp <= 0).all()


# ---- debugging ----------------------------------------------------------------------------------------------

def test_debug_flag_waits_for_a_debugger_on_port_5678(tmp_path):
    proc = subprocess.Popen([PY, "main.py", *FAST, "--debug", "true", "--output_dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, seen = time.time() + 120, ""
        while "debugpy listening" not in seen and time.time() < deadline:
            seen += proc.stdout.readline()
            assert proc.poll() is None, seen
        assert "debugpy listening on port 5678" in seen
        with socket.create_connection(("127.0.0.1", 5678), timeout=10):
            pass  # a debug adapter accepts the connection
        time.sleep(1)
        assert proc.poll() is None, "still waiting for the IDE, not training"
        assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))
    finally:
        proc.kill()
        proc.wait()


def test_non_finite_numbers_are_refused(tmp_path):
    fails_with([*FAST, "--beta", "nan", "--max_grad_norm", "inf", "--output_dir", str(tmp_path)],
               "--beta nan: give a finite number", "--max_grad_norm inf: give a finite number")


def test_every_config_field_is_a_flag():
    from main import Config, parse_config
    cfg = parse_config(["--debug", "--scale_rewards", "false", "--beta", "0", "--steps", "7", "--model", "tiny"])
    assert cfg.debug is True and cfg.scale_rewards is False and cfg.beta == 0.0 and cfg.steps == 7
    assert parse_config([]) == Config()


# ---- the update, the sampler and the data it is computed from --------------------------------------------------

def toy_run(out, processes, micro_batch_size, prompts_per_step):
    args = ["tests/run_with_reward.py", "--model", "tiny", "--rollout", "hf", "--output_dir", out, "--rewards",
            "uppercase", "--steps", "30", "--prompts_per_step", str(prompts_per_step), "--num_generations", "8",
            "--micro_batch_size", str(micro_batch_size), "--max_completion_length", "8", "--learning_rate", "3e-3",
            "--beta", "0", "--save_steps", "0", "--eval_steps", "0"]
    if processes == 1:
        return run([PY, *args])
    return run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes",
                str(processes), "--mixed_precision", "no", *args])


@pytest.mark.slow
def test_zero3_learns_the_toy_task_as_one_process_does(tmp_path):
    """The same 32 samples a step (2 ZeRO-3 processes x 2 prompts x 8, or 1 process x 4 x 8), 8 micro-batches of 4
    a step on each process, transformers' generate: each learns the toy task (reward < 0.2 at first, > 0.8 at
    the end), and the reward curves agree within noise. When ZeRO-3 kept only the last micro-batch's gradient,
    the 2-process run learned from an eighth of its batch."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    toy_run(one, 1, 4, 4)
    toy_run(two, 2, 2, 2)
    r1, r2 = [m["reward_mean"] for m in metrics(one)], [m["reward_mean"] for m in metrics(two)]
    assert len(r1) == len(r2) == 30
    mean = lambda xs: sum(xs) / len(xs)
    assert r1[0] < 0.2 and r2[0] < 0.2, (r1[0], r2[0])
    assert mean(r1[-5:]) > 0.8 and mean(r2[-5:]) > 0.8, (r1, r2)
    assert abs(mean(r1) - mean(r2)) < 0.1, f"area under the reward curve: one process {mean(r1):.3f}, ZeRO-3 {mean(r2):.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["hf", "vllm"])
def test_sampler_and_trainer_score_the_same_distribution(tmp_path, rollout):
    """vLLM's (or generate()'s) log-prob of every sampled token equals the trainer's (fp32 on CPU: ~1e-6 nats),
    with top_p 0.7, temperature 0.8, and a model whose generation_config asks for repetition_penalty 1.5, top_k 5
    (Qwen2.5-VL ships repetition_penalty 1.05): the sampler may not draw from anything the loss does not score."""
    if rollout == "vllm":
        pytest.importorskip("vllm")
    from utils import build_tiny_model
    path = build_tiny_model(str(tmp_path / "model"), "qwen2_vl")
    config_file = os.path.join(path, "generation_config.json")
    with open(config_file) as f:
        generation = json.load(f)
    generation.update(repetition_penalty=1.5, top_k=5, top_p=0.3, temperature=0.2, do_sample=True)
    with open(config_file, "w") as f:
        json.dump(generation, f)
    out = str(tmp_path / "run")
    run([PY, "tests/run_with_reward.py", *FAST, "--model", path, "--rollout", rollout, "--output_dir", out,
         "--rewards", "uppercase", "--steps", "2", "--top_p", "0.7", "--temperature", "0.8",
         "--max_completion_length", "16"])
    diffs = [m["sampler_logp_diff"] for m in metrics(out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, diffs


@pytest.mark.slow
def test_eval_rows_are_never_trained_on(tmp_path):
    """A user file without a test split: eval_size rows are held out of training, and the metrics say so (before,
    eval_accuracy was measured on rows[-eval_size:], which were trained on too)."""
    import run_with_reward  # noqa: F401  (registers the 'uppercase' reward for parse_config)
    from main import load_data, parse_config
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} plus one?", "solution": str(i + 1)}) + "\n"
                            for i in range(20)))
    out = str(tmp_path / "run")
    args = [*FAST, "--dataset", str(data), "--output_dir", out, "--rewards", "uppercase", "--steps", "8",
            "--prompts_per_step", "2", "--eval_steps", "4", "--eval_size", "4", "--log_completions_steps", "1"]
    run([PY, "tests/run_with_reward.py", *args])
    with open(os.path.join(out, "completions.jsonl")) as f:
        trained = {json.loads(line)["problem"] for line in f}
    _, held_out, source = load_data(parse_config(args))
    held_out = {r["problem"] for r in held_out}
    assert len(held_out) == 4 and len(trained) == 16 and not trained & held_out, (trained, held_out)
    evals = [m for m in metrics(out) if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [4, 8]
    assert all(m["eval_source"] == source and "4 rows held out" in source for m in evals), evals


@pytest.mark.slow
def test_an_error_on_rank_0_in_the_weight_copy_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone talks to vLLM; when its part of the copy fails, the other rank raises the same message
    rather than waiting in the next bucket's gather (or dying of a closed connection that names nothing)."""
    pytest.importorskip("vllm")
    p = run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
             "--mixed_precision", "no", "tests/fail_weight_copy.py", *FAST, "--rollout", "vllm", "--output_dir",
             str(tmp_path / "fail"), "--rewards", "uppercase", "--steps", "3", "--trainable", "all"],
            check=False, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "[rank1]: RuntimeError: rank 0 stopped the run: OSError: injected failure" in text, text[-3000:]


@pytest.mark.parametrize("launch", ["one_process", "one_process_no_clipping", "zero2", "zero2_bf16"])
def test_a_non_finite_gradient_stops_the_run_before_anything_is_saved(tmp_path, launch):
    """Step 2's loss is NaN (a fault injected by run_with_reward.py), so is its gradient. The run stops at that
    step with one message (with DeepSpeed ZeRO-2: from the norm it clips with; in bf16, as on GPUs, DeepSpeed's own
    per-tensor check is off) and keeps what it saved before: step 1's checkpoint, no later one, no final model."""
    out = str(tmp_path / "nan")
    args = ["tests/run_with_reward.py", *FAST, "--rewards", "uppercase", "--output_dir", out, "--steps", "3",
            "--save_steps", "1", "--zero_stage", "2"] + (["--max_grad_norm", "0"] if "no_clipping" in launch else [])
    if launch.startswith("zero2"):
        args = ["-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "1",
                "--mixed_precision", "bf16" if launch == "zero2_bf16" else "no", *args]
    p = run([PY, *args], check=False, env={"NAN_LOSS_AT_CALL": "2"})
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert text.count("step 2: the gradient is not finite") == 1, text[-3000:]
    assert 'main.py", line' not in text and "trainer.py" not in text, text[-3000:]  # the launcher reports the exit
    assert [m["step"] for m in metrics(out)] == [1] and math.isfinite(metrics(out)[0]["grad_norm"])
    assert sorted(e for e in os.listdir(out) if e.startswith(("checkpoint", "final"))) == ["checkpoint-1"]


def colour_data(folder, n=64, seed=0, second=False):
    """n rows alternating a red and a blue 64x64 image (a little noise in the shade), the same question, and the
    colour as the solution: what a completion should say can only be read from the image. second: each row holds
    two images, the first grey (whatever the answer), and the answer is the second's colour."""
    from PIL import Image
    import random
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)

    def square(colour, name, side=64):
        strong, weak = rng.randint(180, 255), (rng.randint(0, 60), rng.randint(0, 60))
        Image.new("RGB", (side, side), (strong, *weak) if colour == "red" else (*weak, strong)).save(
            os.path.join(folder, name))
        return os.path.join(folder, name)
    rows = []
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        image = square(colour, f"{i}.png", 128 if second else 64)
        if second:  # the first: grey, whatever the answer (it tells nothing)
            Image.new("RGB", (64, 64), (128, 128, 128)).save(os.path.join(folder, "grey.png"))
            image = [os.path.join(folder, "grey.png"), image]
        rows.append({"image": image, "problem": "Which colour is the second image?" if second else
                     "Which colour is this?", "solution": colour})
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_shares(out, after):
    """Mean colour_letters reward on red and on blue rows in the steps after `after`."""
    with open(os.path.join(out, "completions.jsonl")) as f:
        last = [s for s in map(json.loads, f) if s["step"] > after]
    return {c: sum(s["colour_letters"] for s in last if s["solution"] == c) /
            max(1, sum(s["solution"] == c for s in last)) for c in ("red", "blue")}


@pytest.mark.slow
def test_a_tiny_model_learns_what_only_the_second_image_says(tmp_path, given="both images"):
    """Rows of two images, a grey one and a red or blue one, whose answer is the second's colour: the same reward
    and measure as the Qwen3-VL test below, on Qwen3-VL. After 40 steps both shares are > 0.9 in the last 5
    (measured: both 1.0 from about step 25). With given="the first image only" (each row's second image dropped
    from the data) this fails: red 0.47, blue 0.54 (measured)."""
    data = colour_data(str(tmp_path / "colour"), second=True)
    if given == "the first image only":
        with open(data) as f:
            rows = [dict(r, image=r["image"][:1]) for r in map(json.loads, f)]
        with open(data, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    run([PY, "tests/run_with_reward.py", "--model", "tiny-qwen3", "--dataset", data, "--rewards", "colour_letters",
         "--rollout", "hf", "--output_dir", out, "--steps", "40", "--prompts_per_step", "4", "--num_generations", "8",
         "--micro_batch_size", "16", "--max_completion_length", "8", "--learning_rate", "5e-3", "--beta", "0",
         "--save_steps", "0", "--eval_steps", "0", "--trainable", "all", "--log_completions_steps", "1",
         "--max_images", "2"])
    share = colour_shares(out, 35)
    assert share["red"] > 0.9 and share["blue"] > 0.9, share


@pytest.mark.slow
def test_a_tiny_qwen3_vl_learns_what_only_the_image_says(tmp_path, images=True):
    """Qwen3-VL (DeepStack, interleaved multimodal RoPE, 16-pixel patches) through the whole loop: the reward is the
    share of a completion's letters from a-m for a red image and from n-z for a blue one (run_with_reward's
    colour_letters). A random model starts near 0.5 on both; a policy that does not see the image writes the same
    letters for both colours, so its shares on red and blue rows add up to about 1. After 80 steps both are
    > 0.9 in the last 5 (measured: both 1.0 from about step 45). With images=False (--image_column none) this test
    fails: red and blue shares sum to ~1."""
    data = colour_data(str(tmp_path / "colour"))
    out = str(tmp_path / "run")
    run([PY, "tests/run_with_reward.py", "--model", "tiny-qwen3", "--dataset", data, "--rewards", "colour_letters",
         "--rollout", "hf", "--output_dir", out, "--steps", "80", "--prompts_per_step", "4", "--num_generations", "8",
         "--micro_batch_size", "16", "--max_completion_length", "8", "--learning_rate", "5e-3", "--beta", "0",
         "--save_steps", "0", "--eval_steps", "0", "--trainable", "all", "--log_completions_steps", "1",
         *([] if images else ["--image_column", "none"])])
    share = colour_shares(out, 75)
    assert share["red"] > 0.9 and share["blue"] > 0.9, share


def test_dynamic_sampling_draws_again_while_groups_are_all_equal_and_keeps_the_step_whole(tmp_path):
    """The tiny model never answers the counting task right: every group's accuracy is all 0, so each step draws
    --dynamic_sampling_tries more rollouts, finds none to keep and steps on the first draw's groups (zero
    advantages): the same number of completions a step, and the metrics say so."""
    out = str(tmp_path / "ds")
    run([PY, "main.py", *FAST, "--output_dir", out, "--steps", "2", "--rewards", "accuracy",
         "--dynamic_sampling", "true", "--dynamic_sampling_tries", "2"])
    ms = metrics(out)
    assert [m["dynamic_sampling_draws"] for m in ms] == [2, 2]
    assert all(m["zero_std_frac"] == 1.0 and m["completions"] == 8 for m in ms)
    assert all(m["reward_mean"] == 0.0 and m["loss"] == 0.0 for m in ms)


@pytest.mark.slow
def test_a_tiny_model_learns_the_grounding_task_s_answer_format(tmp_path):
    """The grounding task at its smallest (utils.make_grounding_dataset: one shape in a quadrant of a 56 x 56 image;
    Qwen2.5-VL's frame, pixels) scored by iou alone: a random tiny model writes few numbers and its mean IoU over the
    first 5 steps is 0.006; over steps 21-30 it is 0.067 (measured, --loss_type dapo; 0.072 with grpo; 0.074 over
    steps 101-200 of a 200-step run at --learning_rate 2e-3). It has learnt to answer with boxes that overlap the
    shape, not where the shape is: a box over the whole image, blind to it, scores 0.18, the top-left quadrant's
    box 0.27."""
    from utils import make_grounding_dataset
    rows = make_grounding_dataset(64, seed=0, size=(56, 56), radius=12, grid=(2, 2), objects=(1, 1))
    for i, r in enumerate(rows):
        r["image"].save(tmp_path / f"{i}.png")
        r["image"] = f"{i}.png"
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    run([PY, "main.py", "--model", "tiny-qwen2.5", "--dataset", str(tmp_path / "data.jsonl"), "--rewards", "iou",
         "--rollout", "hf", "--output_dir", out, "--steps", "30", "--prompts_per_step", "4", "--num_generations", "8",
         "--micro_batch_size", "16", "--max_completion_length", "12", "--learning_rate", "5e-3", "--beta", "0",
         "--save_steps", "0", "--eval_steps", "0", "--trainable", "all"])
    iou = [m["reward/iou"] for m in metrics(out)]
    assert sum(iou[:5]) / 5 < 0.02 and sum(iou[20:]) / 10 > 0.04, iou


def test_grounding_with_every_loss_option_runs_and_evaluates_iou(tmp_path):
    """--dataset grounding with the box and overlong rewards, every 2025-26 loss option on at once and an eval each
    step: the loop runs them together and logs what each adds (their formulas: test_grpo_math; their wiring into
    the step: test_gradients' GSPO step)."""
    out = str(tmp_path / "g")
    run([PY, "main.py", "--model", "tiny", "--rollout", "hf", "--dataset", "grounding", "--output_dir", out,
         "--steps", "2", "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "8",
         "--rewards", "iou,boxes,box_f1,format,overlong", "--eval_steps", "1", "--eval_size", "4", "--save_steps", "0",
         "--importance_sampling", "true", "--importance_sampling_mode", "sequence_mask",
         "--importance_sampling_level", "sequence", "--kl_estimator", "k3+", "--beta", "0.04",
         "--mask_truncated_completions", "true", "--dynamic_sampling", "true", "--dynamic_sampling_tries", "1",
         "--mu", "2"])
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        for key in ("reward/iou", "reward/boxes", "reward/box_f1", "reward/overlong", "eval_accuracy", "entropy",
                    "mismatch_kl", "is_ratio_mean", "is_masked_frac", "zero_std_frac", "dynamic_sampling_draws"):
            assert key in m and math.isfinite(m[key]), (key, m)
        assert m["reward/overlong"] == -1.0  # every completion of the random model runs to the limit
    with open(os.path.join(out, "eval_completions.jsonl")) as f:
        assert all(0.0 <= json.loads(line)["correct"] <= 1.0 for line in f)


@pytest.mark.slow
def test_nan_weights_reaching_vllm_stop_the_run_at_its_next_rollout(tmp_path):
    """A weight copy that brings vLLM a NaN tensor (the trainer's own stay finite, so its loss and gradient do):
    vLLM's sampled log-probs are not finite, and the run stops at the next rollout with one message instead of
    training on noise (a 7B LoRA run on an H100 went on for 9 steps with NaN sampler log-probs before this). Two
    processes: rank 0's engine samples for both, and rank 1 stops with the same error, printed once, no traceback."""
    pytest.importorskip("vllm")
    out = str(tmp_path / "nan_copy")
    p = run([PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
             "--mixed_precision", "no", "tests/fail_weight_copy.py", *FAST, "--rollout", "vllm", "--output_dir", out,
             "--rewards", "uppercase", "--steps", "3", "--trainable", "all", "--save_steps", "0", "--eval_steps", "0",
             "--zero_stage", "2"], check=False, timeout=300, env={"WEIGHT_COPY_FAULT": "nan"})
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert text.count("vLLM sampled") == 1 and "log-prob that is not finite" in text, text[-3000:]
    assert 'engine.py", line' not in text and "stopped the run" not in text, text[-3000:]  # the launcher's own shows
    assert [m["step"] for m in metrics(out)] == [1], metrics(out)
