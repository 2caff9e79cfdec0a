"""Stop a run any way and lose nothing: kill -9 and resume, Ctrl-C, no orphan processes or staging files, the
output_dir rules. Real processes: accelerate + DeepSpeed ZeRO-3 over gloo, vLLM's CPU backend or transformers."""
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ON_GPU, ROOT, run

PY = sys.executable
LAUNCH = [PY, "-m", "accelerate.commands.launch", "--config_file", "ds_accel.yaml", "--num_processes", "2",
          "--mixed_precision", "no", "tests/run_with_reward.py"]
# 6 steps that change the weights and the metrics (upper-case reward, AdamW at a high rate, KL to a reference),
# an eval after every step (it draws from the rollouts' RNG): every stop lands in an eval step
RUN = ["--model", "tiny", "--rewards", "uppercase", "--steps", "6", "--save_steps", "2", "--eval_steps", "1",
       "--eval_size", "2",
       "--prompts_per_step", "2", "--num_generations", "4", "--micro_batch_size", "3", "--max_completion_length", "8",
       "--learning_rate", "3e-3", "--beta", "0.04", "--trainable", "all", "--log_completions_steps", "1"]
TIMING = {"step_s", "generate_s", "reward_s", "train_s", "sync_s", "tokens_per_s", "mfu", "peak_mem_gb",
          "reserved_mem_gb"}


def env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            **({} if ON_GPU else {"DS_ACCELERATOR": "cpu"})}


def start(args, log):
    """The launcher in a session of its own (as a terminal job would be), its output in `log`."""
    return subprocess.Popen(args, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, timeout, proc=None, what=""):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tree(proc):
    p = psutil.Process(proc.pid)
    return [p, *p.children(recursive=True)]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_run(a, b):
    """Final weights to fp32 round-off and every per-step metric but the timings."""
    wa, wb = load_file(os.path.join(a, "final", "model.safetensors")), load_file(os.path.join(b, "final", "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [m["step"] for m in ma] == list(range(1, len(ma) + 1))
    for x, y in zip(ma, mb):
        keys = set(x) - TIMING
        assert keys == set(y) - TIMING
        diff = {k: (x[k], y[k]) for k in keys if x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k])}  # NaN == NaN
        assert not diff, f"step {x['step']}: {diff}"


UNINTERRUPTED = {}
# hf: transformers' generate; vllm_overlap: the engine (its weight copy after a resume, its sampling seeds), one step
# ahead: a checkpoint holds the next step's batch, generated before the step's update. Plain vllm is the second's
# engine path without the pending batch, and the first's loop: not run again (3 minutes of CI each test)
ROLLOUTS = {"hf": ["--rollout", "hf"], "vllm_overlap": ["--rollout", "vllm", "--overlap", "true"]}


def uninterrupted(tmp_path_factory, rollout):
    """One uninterrupted run per rollout backend (shared by the tests below)."""
    if rollout not in UNINTERRUPTED:
        out = str(tmp_path_factory.mktemp(f"whole_{rollout}") / "run")
        run([*LAUNCH, *RUN, *ROLLOUTS[rollout], "--output_dir", out, "--save_total_limit", "2"])
        UNINTERRUPTED[rollout] = out
    return UNINTERRUPTED[rollout]


# each rollout's tests share its uninterrupted run: they run on one pytest-xdist worker
SHARING = [pytest.param(r, marks=pytest.mark.xdist_group(f"uninterrupted_{r}")) for r in ROLLOUTS]


@pytest.mark.slow
@pytest.mark.parametrize("rollout", SHARING)
def test_ctrl_c_then_kill_9_each_resumed_ends_as_the_uninterrupted_run(tmp_path, tmp_path_factory, rollout):
    """One run stopped twice, each time continued with the same command plus --resume auto:
    1. Ctrl-C (SIGINT to the launcher) once step 1 is logged: the step in progress finishes, a resumable
       checkpoint, the curves and metrics are written, and the run exits non-zero saying how to continue. That step
       evaluates (--eval_steps 1), and the stop skips its evaluation with the weight copy: the resumed run does it
       first. With vLLM, torchrun signals rank 0's whole process group, the engine included, which must live on to
       finish the step.
    2. kill -9 of the whole process tree at a random moment after checkpoint-4.
    3. The end: the same final weights (1e-6) and the same metrics at every step as a run never stopped. Without
       the optimizer/RNG/sampler state in checkpoints, with vLLM sampling from its own generator, or without the
       skipped evaluation (0.018 apart), the resumed steps differ."""
    if rollout != "hf":
        pytest.importorskip("vllm")
    whole = uninterrupted(tmp_path_factory, rollout)
    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(whole, "checkpoint-*")))
    assert ckpts == ["checkpoint-4", "checkpoint-6"], ckpts  # --save_total_limit 2 kept the last two
    out = str(tmp_path / "run")
    args = [*LAUNCH, *RUN, *ROLLOUTS[rollout], "--output_dir", out]

    with open(tmp_path / "stopped.log", "w") as log:
        proc = start(args, log)
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 600, proc, "the first step")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    text = (tmp_path / "stopped.log").read_text()
    assert code != 0 and "--resume auto" in text, text[-3000:]
    step = max(m["step"] for m in metrics(out))
    assert step < 4, "the signal came too late"
    assert os.path.exists(os.path.join(out, f"checkpoint-{step}", "trainer_state.json"))
    assert os.path.exists(os.path.join(out, "curves.png"))
    assert "eval_accuracy" not in metrics(out)[-1] and "eval_accuracy" in metrics(out)[0]

    with open(tmp_path / "killed.log", "w") as log:
        proc = start([*args, "--resume", "auto"], log)
        wait_for(lambda: os.path.exists(os.path.join(out, "checkpoint-4", "trainer_state.json")), 600, proc,
                 "checkpoint-4")
        time.sleep(random.uniform(0, 0.5))  # two steps and the final save are left: over a second on any machine
        procs = tree(proc)
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=10)
    assert "resumed from" in (tmp_path / "killed.log").read_text()
    assert not (tmp_path / "run" / "final").exists(), "killed too late: the run had finished"
    print(f"stopped after step {step}, killed after step {max(m['step'] for m in metrics(out))}")

    p = run([*args, "--resume", "auto"])
    assert re.search(r"resumed from \S+/checkpoint-\d+: step \d+ of 6 done", p.stdout + p.stderr), p.stdout[-2000:]
    same_run(whole, out)


@pytest.mark.slow
def test_ctrl_c_of_train_sh_prints_the_way_on_and_no_launcher_traceback(tmp_path):
    """Ctrl-C (SIGINT to the launcher train.sh became) in the CPU smoke set-up: the line saying how to continue,
    and none of the launcher's own (before: a 30-line SignalException traceback after it); the exit code says
    SIGINT."""
    out = str(tmp_path / "run")
    env_ = {**env(), "CUDA_VISIBLE_DEVICES": ""}
    with open(tmp_path / "ctrl_c.log", "w") as log:
        proc = subprocess.Popen(["bash", "train.sh", "--output_dir", out, "--steps", "6", "--save_steps", "0",
                                 "--eval_steps", "0", "--max_completion_length", "8"], cwd=ROOT, env=env_,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 600, proc, "the first step")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    text = (tmp_path / "ctrl_c.log").read_text()
    assert code == 128 + signal.SIGINT and text.count("--resume auto") == 1, (code, text[-3000:])
    assert "Traceback" not in text and "SignalException" not in text and "ChildFailedError" not in text, text[-3000:]


@pytest.mark.slow
def test_a_schedulers_term_to_every_process_checkpoints_and_resumes(tmp_path):
    """SIGTERM to every process of the run at once (Slurm's scancel; the ranks get torchrun's too), vLLM one step
    ahead: the engine dies mid-rollout. The ranks notice its death (vLLM's client waited forever), take the
    duplicate signal as one, checkpoint the step as if that rollout had not begun, exit saying how to resume, and
    the resumed run goes to the end. Before: rank 0 hung until torchrun killed it, no checkpoint."""
    pytest.importorskip("vllm")
    out = str(tmp_path / "run")
    # 64-token completions: the rollout running ahead takes seconds, so the signal lands while it runs (with 8 it was
    # sometimes done before the signal, and the step was saved with it, as it should be, but this path went untested)
    args = [*LAUNCH, *RUN, *ROLLOUTS["vllm_overlap"], "--output_dir", out, "--save_steps", "0",
            "--max_completion_length", "64", "--steps", "3", "--eval_steps", "0"]  # (stopping at an eval: above)
    with open(tmp_path / "term.log", "w") as log:
        proc = start(args, log)
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 600, proc, "the first step")
        time.sleep(0.2)
        for p in tree(proc):
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        code = proc.wait(120)
    text = (tmp_path / "term.log").read_text()
    assert code != 0 and "--resume auto" in text, text[-3000:]
    step = max(m["step"] for m in metrics(out))
    assert step < 3 and os.path.exists(os.path.join(out, f"checkpoint-{step}", "trainer_state.json")), text[-3000:]
    assert not os.path.exists(os.path.join(out, f"checkpoint-{step}", "state", "pending_0.pkl"))
    run([*args, "--resume", "auto"])
    assert [m["step"] for m in metrics(out)] == list(range(1, 4))


def test_a_killed_process_leaves_no_adapter_folder(tmp_path):
    """--vllm_lora adapter writes its adapters into a folder: the watchdog removes it when the process is killed
    (kill -9), and a later run removes such a folder of a dead process that its watchdog did not (the whole tree
    killed at once) once it is 10 minutes old, never a live process's or a fresh one."""
    code = ("import os, sys, time; sys.path.insert(0, %r); import guard; guard.start_guard(); "
            "os.makedirs(sys.argv[1]); open(os.path.join(sys.argv[1], 'adapter_config.json'), 'w').write('{}'); "
            "guard.guard(paths=[sys.argv[1]]); print('ready', flush=True); time.sleep(60)" % ROOT)
    folder = str(tmp_path / "grpo_vl_adapter_1_x")
    proc = subprocess.Popen([PY, "-c", code, folder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready" and os.path.isdir(folder)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while os.path.exists(folder) and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(folder), "the watchdog left the adapter folder"

    from guard import remove_stale_staging_files
    dead = proc.pid  # reaped above: no process has this pid now (nor, within this test, will one)
    old, fresh, live = (str(tmp_path / f"grpo_vl_adapter_{pid}_{tag}") for pid, tag in
                        ((dead, "old"), (dead, "fresh"), (os.getpid(), "live")))
    for f in (old, fresh, live):
        os.makedirs(f)
        open(os.path.join(f, "adapter_model.safetensors"), "wb").close()
    for f in (old, live):
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    remove_stale_staging_files(str(tmp_path))
    assert not os.path.exists(old) and os.path.isdir(fresh) and os.path.isdir(live)


def test_a_watchdog_acts_on_what_its_process_registered_before_it_saw_it(tmp_path):
    """Registrations still in the pipe when the watchdog finds its process gone (here: gone before it started) are
    acted on: the registered process is killed and the registered folder removed; a line that is neither is
    ignored (no path taken from it)."""
    from guard import GUARD_SOURCE
    gone = subprocess.Popen([PY, "-c", "pass"])
    gone.wait()
    child = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    folder, victim = tmp_path / "grpo_vl_adapter_x", tmp_path / "victim"
    folder.mkdir()
    victim.mkdir()
    lines = f"pid {child.pid}\npath {folder}\necho {victim}\n"
    p = subprocess.run([PY, "-c", GUARD_SOURCE, str(gone.pid), "0"], input=lines, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]
    assert child.wait(timeout=10) == -9 and not folder.exists() and victim.is_dir()


@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_no_process_and_no_staging_file(tmp_path):
    """`kill -9` of the launcher alone: within 10 s every rank and the vLLM engine's processes are gone and the
    weight staging file and vLLM's shared memory in /dev/shm are removed (before: the ranks trained on, the engine
    outlived them, the file stayed; later, two psm_* segments and a semaphore stayed per kill)."""
    pytest.importorskip("vllm")
    out = str(tmp_path / "run")
    args = [*LAUNCH, *RUN, "--rollout", "vllm", "--output_dir", out, "--steps", "50"]
    with open(tmp_path / "run.log", "w") as log:
        proc = start(args, log)
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 600, proc, "the first step")
        procs = tree(proc)
        pids = {p.pid for p in procs}
        staging = [f for f in glob.glob("/dev/shm/grpo_vl_weights_*") + glob.glob("/tmp/grpo_vl_weights_*")
                   if int(os.path.basename(f).split("_")[3]) in pids]
        assert staging, "no staging file found: the test would prove nothing"
        assert len(procs) >= 4, [p.name() for p in procs]  # launcher, 2 ranks, the engine (and the watchdogs)
        shared = set()  # vLLM's shared memory (its queues' psm_* segments, semaphores), not the staging file
        for p in procs:
            try:
                shared.update(m.path for m in p.memory_maps() if m.path.startswith(("/dev/shm/psm_",
                                                                                     "/dev/shm/sem.mp-")))
            except psutil.Error:
                pass
        assert shared, "the engine maps no shared memory: the test would prove nothing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        gone, alive = psutil.wait_procs(procs[1:], timeout=10)
    assert not alive, f"still running 10 s after kill -9 of the launcher: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
    print(f"all {len(gone)} processes gone {time.time() - t0:.1f} s after the kill")
    left = [f for f in staging + sorted(shared) if os.path.exists(f)]
    assert not left, f"staging files and shared memory left: {left}"


# ---------------------------------------------------------------------------------------------------------------
# The output_dir rules, decided before any model is loaded.

def main_py(*args):
    return run([PY, "main.py", "--model", "tiny", "--rollout", "hf", *args], check=False, timeout=120)


@pytest.mark.xdist_group("uninterrupted_vllm_overlap")
@pytest.mark.slow
def test_a_run_whose_overlap_resolves_otherwise_on_these_gpus_is_not_resumed(tmp_path, tmp_path_factory):
    """--overlap auto runs rollouts one step ahead where vLLM has a GPU of its own and in step elsewhere: a
    checkpoint saved with the step ahead (its next batch saved, importance-weighted) resumed on GPUs where auto says
    off would train that batch unweighted and go on as another algorithm. Here: a checkpoint of a run one step
    ahead, as written with --overlap auto on 2 GPUs, resumed on CPU (auto: off). One message, before any
    training; before the fix it trained on."""
    pytest.importorskip("vllm")
    import shutil
    out = tmp_path / "run"
    shutil.copytree(uninterrupted(tmp_path_factory, "vllm_overlap"), out)
    for later in ("checkpoint-6", "final"):
        shutil.rmtree(out / later)
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["rollout"] == {"overlap": True, "importance_sampling": True}, state["rollout"]
    assert (out / "checkpoint-4" / "state" / "pending_0.pkl").exists()
    state["config"]["overlap"] = "auto"
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    p = run([*LAUNCH, *RUN, "--rollout", "vllm", "--overlap", "auto", "--output_dir", str(out), "--resume", "auto"],
            check=False)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and text.count("resume on the GPU layout it was saved on") == 1, text[-3000:]
    assert 'main.py", line' not in text and [m["step"] for m in metrics(str(out))] == [1, 2, 3, 4, 5, 6], text[-3000:]
    assert not (out / "final").exists()


def test_an_earlier_run_is_never_silently_reused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    p = main_py("--output_dir", str(out))
    assert p.returncode != 0
    assert "--resume auto" in p.stderr and "--overwrite true" in p.stderr, p.stderr[-2000:]
    assert p.stderr.count("already holds") == 1 and "Traceback" not in p.stderr
    assert (out / "metrics.jsonl").exists()  # nothing deleted

    p = main_py("--output_dir", str(out), "--resume", str(out / "checkpoint-2"))  # no trainer_state.json: incomplete
    assert p.returncode != 0 and "not a complete checkpoint" in p.stderr, p.stderr[-2000:]
    p = main_py("--output_dir", str(out), "--resume", "auto", "--overwrite", "true")
    assert p.returncode != 0 and "contradict" in p.stderr


def test_resume_refuses_a_config_that_changes_the_math(tmp_path):
    """A checkpoint's run continued with another learning rate, G or model would be a different run: refused,
    naming each difference; flags that change no math (steps, save_steps, ...) may change."""
    sys.path.insert(0, ROOT)
    import checkpoint
    import main
    out = tmp_path / "run"
    ckpt = out / "checkpoint-4"
    ckpt.mkdir(parents=True)
    saved = main.Config(output_dir=str(out))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "num_processes": 1, "history": [],
                                                         "config": main.dataclasses.asdict(saved)}))
    ok = main.Config(output_dir=str(out), resume="auto", steps=500, save_steps=7, log_completions_steps=3)
    assert main.resolve_output_dir(ok, True) == str(ckpt)
    changed = main.Config(output_dir=str(out), resume="auto", learning_rate=2e-6, num_generations=4, model="tiny")
    with pytest.raises(SystemExit) as e:
        main.resolve_output_dir(changed, True)
    assert "--learning_rate 1e-06 -> 2e-06" in str(e.value) and "--num_generations 8 -> 4" in str(e.value)
    assert "--model Qwen/Qwen2-VL-2B-Instruct -> tiny" in str(e.value) and "--steps" not in str(e.value)
    with pytest.raises(SystemExit, match="--eval_steps 50 -> 3"):  # evaluation draws from the rollouts' RNG
        main.resolve_output_dir(main.Config(output_dir=str(out), resume="auto", eval_steps=3), True)
    # a checkpoint from before --overlap existed ran synchronously: continuing it one step off would change the run
    older = {k: v for k, v in main.dataclasses.asdict(saved).items() if k not in checkpoint.BEFORE_THEIR_FLAGS}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "num_processes": 1, "history": [],
                                                         "config": {**older, "zero_stage": 3}}))
    with pytest.raises(SystemExit) as e:
        main.resolve_output_dir(main.Config(output_dir=str(out), resume="auto"), True)
    assert "--overlap false -> auto" in str(e.value) and "--importance_sampling false -> auto" in str(e.value)
    assert "--zero_stage 3 -> auto" in str(e.value)
    same = main.Config(output_dir=str(out), resume="auto", overlap="false", importance_sampling="false",
                       zero_stage="3")
    assert main.resolve_output_dir(same, True) == str(ckpt)  # 3 (an int then) and "3" are the same stage


def test_overwrite_deletes_only_the_earlier_runs_outputs(tmp_path):
    sys.path.insert(0, ROOT)
    import main
    out = tmp_path / "run"
    for d in ("checkpoint-2", "checkpoint-4.tmp", "final", "base_model"):
        (out / d).mkdir(parents=True)
    for f in ("metrics.jsonl", "completions.jsonl", "config.json", "curves.png", "notes.txt"):
        (out / f).write_text("x")
    assert main.resolve_output_dir(main.Config(output_dir=str(out), overwrite=True), True) == ""
    assert sorted(os.listdir(out)) == ["base_model", "notes.txt"]  # the user's own file stays
    # --resume auto where a run died before its first checkpoint: starts over, deleting only what it left
    os.remove(out / "notes.txt")
    (out / "metrics.jsonl").write_text("x")
    (out / "checkpoint-2.tmp").mkdir()
    assert main.resolve_output_dir(main.Config(output_dir=str(out), resume="auto"), True) == ""
    assert sorted(os.listdir(out)) == ["base_model"]
    # ... but never a finished model, another version's checkpoints or the user's files: those need --overwrite
    for leftover in ("final", "checkpoint-6", "notes"):
        (out / leftover).mkdir()
        with pytest.raises(SystemExit, match=f"holds {leftover} but no complete checkpoint.*--overwrite true"):
            main.resolve_output_dir(main.Config(output_dir=str(out), resume="auto"), True)
        assert (out / leftover).exists()
        os.rmdir(out / leftover)


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_drops_the_later_ones(tmp_path):
    """Checkpoints after the one resumed from belong to the abandoned run: a later --resume auto must not jump
    back to them."""
    out = str(tmp_path / "run")
    args = [PY, "tests/run_with_reward.py", *RUN, "--rollout", "hf", "--output_dir", out]  # one process
    run([*args, "--steps", "4"])
    assert os.path.exists(os.path.join(out, "checkpoint-4"))
    run([*args, "--steps", "3", "--resume", os.path.join(out, "checkpoint-2")])
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoint-*"))) == \
        ["checkpoint-2", "checkpoint-3"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_a_lora_run_resumed_ends_as_the_uninterrupted_run(tmp_path):
    """--lora_rank on 2 ZeRO-2 processes: a checkpoint's DeepSpeed state holds the adapters, their Adam state and the
    RNGs, not the frozen base (it comes from --model again; peft's random A matrices are overwritten by the
    checkpoint's). Resumed from the uninterrupted run's checkpoint-2 into another folder, steps 3-4 and the final
    merged model are that run's."""
    lora = [*RUN, "--rollout", "hf", "--lora_rank", "4", "--trainable", "language", "--steps", "4", "--eval_steps", "0"]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    run([*LAUNCH, *lora, "--output_dir", whole])
    assert os.path.exists(os.path.join(whole, "checkpoint-2", "adapter", "adapter_model.safetensors"))
    module_state = os.path.getsize(os.path.join(whole, "checkpoint-2", "state", "pytorch_model",
                                                "mp_rank_00_model_states.pt"))
    merged = os.path.getsize(os.path.join(whole, "checkpoint-2", "model.safetensors"))
    assert module_state < 0.1 * merged, (module_state, merged)  # with the base: 1.0x
    p = run([*LAUNCH, *lora, "--output_dir", resumed, "--resume", os.path.join(whole, "checkpoint-2")])
    assert re.search(r"resumed from \S+/checkpoint-2: step 2 of 4 done", p.stdout + p.stderr), p.stdout[-2000:]
    same_run(whole, resumed)

def test_a_reused_base_model_folder_is_rebuilt_for_another_tiny_model_or_seed(tmp_path):
    """Before: the old base_model/ was trained whatever --model tiny-qwen2.5 or --seed said."""
    from transformers import AutoConfig

    from utils import build_tiny_model
    path = str(tmp_path / "base_model")
    build_tiny_model(path, "qwen2_vl", seed=0)
    w0 = load_file(os.path.join(path, "model.safetensors"))
    build_tiny_model(path, "qwen2_vl", seed=1)
    w1 = load_file(os.path.join(path, "model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    build_tiny_model(path, "qwen2_5_vl", seed=1)
    assert AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl"
