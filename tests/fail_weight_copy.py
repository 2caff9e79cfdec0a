"""Runs main.py with the weight copy failing on rank 0 after step 1's update, as a vLLM error or a full /dev/shm
there would: every rank must stop with the message instead of waiting in its next collective.
    python tests/fail_weight_copy.py [main.py flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_with_reward  # noqa: E402,F401  (registers the test rewards)
import main  # noqa: E402
import trainer  # noqa: E402
import engine  # noqa: E402

staging_file, update_policy, updated = engine.weight_staging_file, trainer.update_policy, []


def failing_staging_file(llm, nbytes):  # rank 0 only, once per bucket of the copy
    if updated:
        raise OSError("injected failure: no space left for the weight staging file")
    return staging_file(llm, nbytes)


def update_then_fail(*args, **kwargs):
    out = update_policy(*args, **kwargs)
    updated.append(True)
    return out


engine.weight_staging_file, trainer.update_policy = failing_staging_file, update_then_fail
if __name__ == "__main__":
    main.cli()
