"""Runs main.py with extra rewards registered the way a user adds one (an entry in main.REWARDS).
Used by the tests: python tests/run_with_reward.py [main.py flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main  # noqa: E402


def uppercase_reward(completions, **columns):
    """Share of the completion's letters that are upper case: a tiny random model starts near 0 and can learn it."""
    out = []
    for c in completions:
        letters = [ch for ch in c if ch.isalpha()]
        out.append(sum(ch.isupper() for ch in letters) / len(letters) if letters else 0.0)
    return out


def colour_letters_reward(completions, solution, **columns):
    """Share of the completion's letters from the row's half of the alphabet: a-m for a red image, n-z for a blue
    one (tests/test_train.py's colour data). A random model starts near 0.5 on both; a policy blind to the image
    writes the same letters for both colours, so its shares on red and on blue rows add up to about 1."""
    out = []
    for c, colour in zip(completions, solution):
        letters = [ch.lower() for ch in c if ch.isascii() and ch.isalpha()]
        first_half = sum(ch <= "m" for ch in letters)
        out.append((first_half if colour == "red" else len(letters) - first_half) / len(letters) if letters else 0.0)
    return out


def raising_reward(completions, **columns):
    raise KeyError("no_such_column")


def rank1_raising_reward(completions, **columns):  # a reward that fails on one rank's data only
    if os.environ.get("RANK") == "1":
        raise ValueError("cannot score this row")
    return [0.0] * len(completions)


main.REWARDS.update(uppercase=uppercase_reward, colour_letters=colour_letters_reward, raising=raising_reward, rank1_raising=rank1_raising_reward)

if os.environ.get("NAN_LOSS_AT_CALL"):  # a fault to test the non-finite gradient guard: the Nth loss is NaN
    import trainer
    calls, loss_fn = [0], trainer.grpo_loss

    def nan_loss(*args, **kwargs):
        calls[0] += 1
        loss, stats = loss_fn(*args, **kwargs)
        return (loss * float("nan") if calls[0] == int(os.environ["NAN_LOSS_AT_CALL"]) else loss), stats
    trainer.grpo_loss = nan_loss
if __name__ == "__main__":
    main.cli()
