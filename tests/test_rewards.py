"""Table-driven tests of the reward functions in rewards.py: accuracy_reward, format_reward, extract_answer,
answers_match and compute_rewards.

Contract under test (rewards.py): a reward takes any model output and returns one float per completion, never
raising; compute_rewards names the reward function that misbehaves.

Cases tagged with a `regression(...)` label guard bugs that these tests found and that were fixed (the reason
says what went wrong).
"""
import math
import multiprocessing
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `import rewards`
import math_verify  # noqa: E402,F401  (imported here so forked children do not pay for the import)

from rewards import (RewardError, accuracy_reward, answers_match, compute_rewards, extract_answer,  # noqa: E402
                   format_reward, number_reward)

MB = 1 << 20
BUDGET_S = 3.0  # "returns quickly": correct code takes ~10 ms on the 1 MB inputs below


def bounded(fn, *args, budget=BUDGET_S):
    """fn(*args) in a forked child; fails the test if it takes more than `budget` seconds (a pathological regex
    cannot be interrupted reliably in-process, and math-verify owns SIGALRM). Re-raises the child's error."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target():
        try:
            send.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001  report anything to the parent
            send.send(("raised", f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=target, daemon=True)
    p.start()
    try:
        if not recv.poll(budget):
            pytest.fail(f"{getattr(fn, '__name__', fn)} took more than {budget}s on a {len(str(args[0]))}-char input")
        status, value = recv.recv()
    finally:
        if p.is_alive():
            p.kill()
        p.join()
    if status != "ok":
        pytest.fail(f"{getattr(fn, '__name__', fn)} raised on model output: {value}")
    return value


def assert_floats(values, n):
    assert isinstance(values, list), f"expected a list, got {type(values).__name__}"
    assert len(values) == n, f"{len(values)} values for {n} completions"
    for v in values:
        assert type(v) is float, f"{v!r} is a {type(v).__name__}, not a float"


def bug(reason):
    """A regression label: the case once failed for `reason` (select them with -m regression)."""
    return pytest.mark.regression(reason=reason)


NUMERIC_TOLERANCE_BUG = bug("answers_match compares numbers with math.isclose(rel_tol=1e-6), so distinct large "
                            "integers match: '123456790' is accepted for '123456789'")
NUMERIC_SOLUTION_SHORTCUT_BUG = bug(
    "answers_match returns False as soon as the solution is a plain number and the answer is not, so a correct "
    "LaTeX answer never reaches math-verify (which accepts it: verify(parse('0.5'), parse('\\\\frac{1}{2}')) is "
    "True)")
RAW_LATEX_BUG = bug("math_verify.parse finds nothing in LaTeX written without $...$ delimiters ('x^{2}'), so "
                    "answers_match falls back to exact text and rejects equal expressions")
NESTED_TAG_BUG = bug("ANSWER_RE is lazy from the FIRST '<answer>', so for '<answer><answer>3</answer>' "
                     "extract_answer returns '<answer>3' instead of the last tag's content '3'")
CONTENT_PARTS_BUG = bug("as_text reads dict['content'] recursively but a content part {'type': 'text', 'text': ...} "
                        "has no 'content' key, so a chat message with list-of-parts content becomes ''")
QUADRATIC_ANSWER_BUG = bug("ANSWER_RE.findall is quadratic on many unclosed '<answer>' tags (each one scans to the end "
                           "of the text): 1 MB takes minutes")
QUADRATIC_FORMAT_BUG = bug("FORMAT_RE backtracks over every '</think>' x every '</answer>': repeated "
                           "think/answer blocks followed by anything take minutes at 1 MB")


# ---------------------------------------------------------------------------------------------------------------
# answers_match(answer, solution)

@pytest.mark.parametrize("answer, solution, expected", [
    # integers and floats
    ("3", "3", True),
    ("3.0", "3", True),
    ("3", "3.0", True),
    (" 3 ", "3", True),
    ("3.", "3", True),
    ("$3$", "3", True),
    ("+3", "3", True),
    ("-3", "3", False),
    ("-0", "0", True),
    ("4", "3", False),
    ("3.5", "3", False),
    (".5", "0.5", True),
    ("1e3", "1000", True),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    ("1,000.5", "1000.5", True),
    ("1,00", "100", False),   # not thousands grouping
    ("10,00", "1000", False),
    ("three", "3", False),
    ("3", "<answer>3</answer>", True),  # solutions may carry the tags too
    pytest.param("123456790", "123456789", False, marks=NUMERIC_TOLERANCE_BUG, id="large-int-off-by-one"),
    pytest.param("1000001", "1000000", False, marks=NUMERIC_TOLERANCE_BUG, id="million-off-by-one"),
    # multiple choice
    ("B", "B", True),
    ("(B)", "B", True),
    ("B. because", "B", True),
    ("B) it is", "B", True),
    ("b", "B", True),
    ("B", "(B)", True),
    ("B", "b", True),
    ("C", "B", False),
    ("(C)", "(B)", False),
    ("Because", "B", False),
    ("BC", "B", False),
    ("The answer is B", "B", False),
    # LaTeX through math-verify
    ("\\frac{1}{2}", "\\frac{1}{2}", True),
    ("$\\frac{1}{2}$", "$\\frac{2}{4}$", True),
    ("0.5", "\\frac{1}{2}", True),
    ("0.5", "$\\frac{1}{2}$", True),
    ("2", "$\\sqrt{4}$", True),
    ("3", "\\boxed{3}", True),
    ("$x^{2}$", "$x^2$", True),
    ("$x \\cdot x$", "$x^2$", True),
    ("$x^3$", "$x^2$", False),
    ("$\\frac{1}{3}$", "$\\frac{1}{2}$", False),
    pytest.param("\\frac{1}{2}", "0.5", True, marks=NUMERIC_SOLUTION_SHORTCUT_BUG, id="frac-vs-decimal"),
    pytest.param("$\\sqrt{4}$", "2", True, marks=NUMERIC_SOLUTION_SHORTCUT_BUG, id="sqrt4-vs-2"),
    pytest.param("\\boxed{3}", "3", True, marks=NUMERIC_SOLUTION_SHORTCUT_BUG, id="boxed-vs-int"),
    pytest.param("$\\frac{1}{2}$", "$0.5$", True, marks=NUMERIC_SOLUTION_SHORTCUT_BUG, id="frac-vs-$decimal$"),
    pytest.param("x^{2}", "x^2", True, marks=RAW_LATEX_BUG, id="raw-x^{2}-vs-x^2"),
    pytest.param("x^{2}", "$x^2$", True, marks=RAW_LATEX_BUG, id="raw-x^{2}-vs-$x^2$"),
    # free text
    ("Paris", "paris.", True),
    ("  new   york ", "New York", True),
    ("Paris", "Lyon", False),
    # unicode. Decision: Unicode decimal digits are digits (Python's float() reads them), so a full-width or
    # Arabic-Indic 3 is the number 3; other scripts compare as text.
    ("３", "3", True),
    ("3", "３", True),
    ("１,０００", "1000", True),
    ("٣", "3", True),
    ("😀", "😀", True),
    ("😀", "😃", False),
    ("باريس", "باريس", True),
    ("باريس", "Paris", False),
    # empty / missing
    ("", "3", False),
    ("   ", "3", False),
    ("3", "", False),
    (None, "3", False),
    ("3", None, False),
    (None, None, False),
    ("3" * 1001, "3" * 1001, False),  # an answer over 1000 chars is not an answer
])
def test_answers_match(answer, solution, expected):
    assert answers_match(answer, solution) is expected


# ---------------------------------------------------------------------------------------------------------------
# extract_answer(text)

@pytest.mark.parametrize("text, expected", [
    ("<answer>3</answer>", "3"),
    ("<answer> 3 </answer>", "3"),
    ("<answer>\n 3\n</answer>", "3"),
    ("<think>2? no</think><answer>3</answer>", "3"),
    ("<answer>1</answer> wait <answer>2</answer> no: <answer>3</answer>", "3"),  # the last tag wins
    ("<answer>3</answer><answer>4", "3"),  # an unclosed tag after a complete one is ignored
    ("<answer>multi\nline</answer>", "multi\nline"),
    ("<answer></answer>", ""),
    ("3", None),
    ("<answer>3", None),
    ("3</answer>", None),
    ("<ANSWER>3</ANSWER>", None),
    ("", None),
    (None, None),
    (3, None),
    ({"role": "assistant", "content": "<answer>3</answer>"}, "3"),
    ([{"role": "assistant", "content": "<answer>1</answer>"}, {"role": "assistant", "content": "<answer>2</answer>"}],
     "2"),
    pytest.param("<answer><answer>3</answer>", "3", marks=NESTED_TAG_BUG, id="nested-open-tags"),
    pytest.param({"role": "assistant", "content": [{"type": "text", "text": "<answer>3</answer>"}]}, "3",
                 marks=CONTENT_PARTS_BUG, id="content-parts"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------------------------------
# accuracy_reward(completions, solution)

@pytest.mark.parametrize("completion, solution, expected", [
    ("<think>1+2</think><answer>3</answer>", "3", 1.0),
    ("<answer>3.0</answer>", "3", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer> 3 </answer>", "3", 1.0),
    ("<answer>4</answer>", "3", 0.0),
    ("<answer>(B)</answer>", "B", 1.0),
    ("<answer>b</answer>", "B", 1.0),
    ("<answer>B. because it is blue</answer>", "B", 1.0),
    ("<answer>0.5</answer>", "$\\frac{1}{2}$", 1.0),
    ("<answer>3</answer> ... <answer>4</answer>", "4", 1.0),  # last tag wins
    ("<answer>3</answer> ... <answer>4</answer>", "3", 0.0),
    ("3", "3", 0.0),                      # no tags: no answer
    ("the answer is 3", "3", 0.0),
    ("<answer>3", "3", 0.0),              # unclosed
    ("", "3", 0.0),
    (None, "3", 0.0),
    (3, "3", 0.0),                        # an int has no tags
    ("<answer>3</answer>", 3, 1.0),       # an int solution column
    ("<answer>0.5</answer>", 0.5, 1.0),
    ("<answer>3</answer>", None, 0.0),
    ("<answer>３</answer>", "3", 1.0),     # full-width digit (see test_answers_match)
    ("<think>🤔 مرحبا</think><answer>3</answer>", "3", 1.0),
    ({"role": "assistant", "content": "<answer>3</answer>"}, "3", 1.0),
    ([{"role": "assistant", "content": "<think>x</think>"}, {"role": "assistant", "content": "<answer>3</answer>"}],
     "3", 1.0),
    pytest.param("<answer><answer>3</answer>", "3", 1.0, marks=NESTED_TAG_BUG, id="nested-open-tags"),
    pytest.param("<answer>\\frac{1}{2}</answer>", "0.5", 1.0, marks=NUMERIC_SOLUTION_SHORTCUT_BUG,
                 id="latex-answer-numeric-solution"),
    pytest.param({"role": "assistant", "content": [{"type": "text", "text": "<answer>3</answer>"}]}, "3", 1.0,
                 marks=CONTENT_PARTS_BUG, id="content-parts"),
])
def test_accuracy_reward_table(completion, solution, expected):
    values = accuracy_reward([completion], [solution])
    assert_floats(values, 1)
    assert values == [expected]


def test_accuracy_reward_batch_keeps_order_and_length():
    completions = ["<answer>1</answer>", "<answer>2</answer>", "nothing", "<answer>4</answer>"]
    solutions = ["1", "3", "3", "4"]
    values = accuracy_reward(completions, solutions, problem=["q"] * 4, other_column=[0] * 4)
    assert_floats(values, 4)
    assert values == [1.0, 0.0, 0.0, 1.0]
    assert accuracy_reward([], []) == []


def test_accuracy_reward_takes_a_list_of_accepted_answers():
    """A row's solution may list its accepted answers (the data check lets lists through to rewards that say
    they take them): any one matches; an empty list matches nothing."""
    completions = ["<answer>two</answer>", "<answer>2</answer>", "<answer>3</answer>", "<answer>2</answer>"]
    assert accuracy_reward(completions, [["2", "two"], ["2", "two"], ["2", "two"], []]) == [1.0, 1.0, 0.0, 0.0]
    assert accuracy_reward.takes_answer_lists


# ---------------------------------------------------------------------------------------------------------------
# format_reward(completions)

@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>3</answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("  <think>a</think>  <answer>3</answer>  ", 1.0),
    ("\n<think>\na\n</think>\n<answer>\n3\n</answer>\n", 1.0),
    ("\r\n<think>a</think>\r\n\r\n<answer>3</answer>\r\n", 1.0),
    ("\t<think>a</think>\t<answer>3</answer>\t", 1.0),
    ("<think>multi\nline\n\nreasoning</think><answer>3</answer>", 1.0),
    ("\u00a0<think>a</think>\u3000<answer>3</answer>", 1.0),  # unicode whitespace is whitespace
    ("<think>🤔 مرحبا</think><answer>３</answer>", 1.0),
    ("<think>a</think>\n\nSo <answer>3</answer>", 0.0),
    ("prefix <think>a</think><answer>3</answer>", 0.0),
    ("<think>a</think><answer>3</answer> suffix", 0.0),
    ("<answer>3</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<answer>3</answer><think>a</think>", 0.0),
    ("<think>a<answer>3</answer>", 0.0),
    ("<think>a</think><answer>3", 0.0),
    ("<think>a</think>3</answer>", 0.0),
    ("<THINK>a</THINK><ANSWER>3</ANSWER>", 0.0),
    ("< think>a</think><answer>3</answer>", 0.0),
    ("", 0.0),
    ("   \n", 0.0),
    (None, 0.0),
    (3, 0.0),
    ({"role": "assistant", "content": "<think>a</think><answer>3</answer>"}, 1.0),
    ({"role": "assistant", "content": "3"}, 0.0),
    ([{"role": "assistant", "content": "<think>a</think>"}, {"role": "assistant", "content": "<answer>3</answer>"}],
     1.0),
])
def test_format_reward_table(completion, expected):
    values = format_reward([completion])
    assert_floats(values, 1)
    assert values == [expected]


# ---------------------------------------------------------------------------------------------------------------
# Any model output: one float per completion, never an exception.

WEIRD = [None, 0, 3, -1, 3.5, float("nan"), float("inf"), True, b"<answer>3</answer>", "", " ", "\x00", "<", ">",
         "<answer>", "</answer>", "<answer></answer>", "<think><answer></think></answer>",
         "<answer>" + "{" * 500 + "</answer>", "<answer>\\frac{</answer>", "<answer>$$$</answer>",
         "<answer>\\sqrt{\\sqrt{\\sqrt{</answer>", "<answer>" + "9" * 999 + "</answer>", "<answer>1e99999</answer>",
         "<answer>nan</answer>", "<answer>-inf</answer>", "<answer>(</answer>", "<answer>\\</answer>",
         "<answer>" + "^" * 300 + "</answer>", "<answer>x^{x^{x^{x^{x}}}}</answer>", "\ud800", "🤖" * 50,
         "\u202eRTL override <answer>3</answer>", {}, {"content": None}, {"text": "no content key"},
         {"role": "assistant", "content": 3}, [], [None, 3, "x"], ("<answer>3</answer>",), object()]


@pytest.mark.parametrize("solution", ["3", "B", "$\\frac{1}{2}$", "x^2", "Paris", "", None, 3])
def test_rewards_never_raise_on_any_output(solution):
    accuracy = accuracy_reward(WEIRD, [solution] * len(WEIRD))
    assert_floats(accuracy, len(WEIRD))
    assert set(accuracy) <= {0.0, 1.0}
    fmt = format_reward(WEIRD)
    assert_floats(fmt, len(WEIRD))
    assert set(fmt) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Huge inputs must come back quickly (each call runs in a child killed after BUDGET_S).

def _repeat_to(unit, size=MB):
    return unit * (size // len(unit))


HUGE = {
    "1MB-plain": ("x" * MB, 0.0, 0.0),
    "1MB-newlines": ("\n" * MB, 0.0, 0.0),
    "1MB-emoji": ("😀" * (MB // 4), 0.0, 0.0),
    "1MB-inside-answer": ("<answer>" + "9" * MB + "</answer>", 0.0, 0.0),
    "1MB-think-then-answer": ("<think>" + "a" * MB + "</think><answer>3</answer>", 1.0, 1.0),
    "1MB-answer-then-junk": ("<answer>3</answer>" + "x" * MB, 1.0, 0.0),
    "10k-answer-tags": ("<answer>1</answer>" * 10000 + "<answer>3</answer>", 1.0, 0.0),
    "10k-think-blocks": ("<think>a</think>" * 10000 + "<answer>3</answer>", 1.0, None),  # format: debatable
    "1MB-open-think-tags": (_repeat_to("<think>"), 0.0, 0.0),
    "1MB-close-answer-tags": (_repeat_to("</answer>"), 0.0, 0.0),
    "64k-deeply-nested": ("<answer>" * 65536 + "3" + "</answer>" * 65536, None, 0.0),
    "1MB-unclosed-answer-tags": (_repeat_to("<answer>"), 0.0, 0.0),
    "1MB-blocks-then-trailing-text": (_repeat_to("<think>a</think><answer>3</answer>") + " trailing", 1.0, 0.0),
    "1MB-think-answer-pairs-unclosed": ("<think>" + _repeat_to("</think><answer>"), 0.0, 0.0),
}
SLOW = {("accuracy_reward", "1MB-unclosed-answer-tags"): QUADRATIC_ANSWER_BUG,
        ("accuracy_reward", "1MB-think-answer-pairs-unclosed"): QUADRATIC_ANSWER_BUG,
        ("format_reward", "1MB-blocks-then-trailing-text"): QUADRATIC_FORMAT_BUG,
        ("format_reward", "1MB-think-answer-pairs-unclosed"): QUADRATIC_FORMAT_BUG}


def _accuracy(text):
    return accuracy_reward([text, text], ["3", "3"])


def _format(text):
    return format_reward([text, text])


@pytest.mark.parametrize("fn_name, case", [
    pytest.param(fn, case, id=f"{fn}-{case}", marks=[SLOW[(fn, case)]] if (fn, case) in SLOW else [])
    for fn in ("accuracy_reward", "format_reward") for case in HUGE])
def test_huge_inputs_return_quickly(fn_name, case):
    text, expected_accuracy, expected_format = HUGE[case]
    fn, expected = (_accuracy, expected_accuracy) if fn_name == "accuracy_reward" else (_format, expected_format)
    values = bounded(fn, text)
    assert_floats(values, 2)
    if expected is not None:
        assert values == [expected, expected]


def test_extract_answer_on_1mb_answer_is_bounded_and_last_tag_wins():
    text = "<answer>" + "x" * MB + "</answer>" + "<answer>3</answer>" * 1000
    assert bounded(extract_answer, text) == "3"


# ---------------------------------------------------------------------------------------------------------------
# compute_rewards(reward_funcs, completions, columns)

COMPLETIONS = ["<think>a</think><answer>3</answer>", "<answer>4</answer>", "junk"]


def named(*fns):
    """{name: fn} as main.py passes them (--rewards names); here each function's own name."""
    return {getattr(f, "__name__", repr(f)): f for f in fns}
COLUMNS = {"solution": ["3", "3", "3"], "problem": ["q1", "q2", "q3"]}


def test_compute_rewards_real_rewards():
    out = compute_rewards(named(accuracy_reward, format_reward), COMPLETIONS, COLUMNS)
    assert list(out) == ["accuracy_reward", "format_reward"]
    assert out["accuracy_reward"] == [1.0, 0.0, 0.0]
    assert out["format_reward"] == [1.0, 0.0, 0.0]
    for values in out.values():
        assert_floats(values, len(COMPLETIONS))


def constant_reward(completions, **columns):
    return [1] * len(completions)  # ints are fine: converted to float


def bool_reward(completions, **columns):
    return (c.startswith("<think>") for c in completions)  # any iterable of numbers


def none_reward(completions, **columns):
    return [None, 0.5, None]


def test_compute_rewards_converts_values_and_none_to_nan():
    out = compute_rewards(named(constant_reward, bool_reward, none_reward), COMPLETIONS, COLUMNS)
    assert out["constant_reward"] == [1.0, 1.0, 1.0]
    assert out["bool_reward"] == [1.0, 0.0, 0.0]
    nr = out["none_reward"]
    assert math.isnan(nr[0]) and nr[1] == 0.5 and math.isnan(nr[2])
    for values in out.values():
        assert_floats(values, len(COMPLETIONS))


def keyerror_reward(completions, **columns):
    return [float(columns["no_such_column"][0])] * len(completions)


def zerodiv_reward(completions, **columns):
    return [1 / 0 for _ in completions]


@pytest.mark.parametrize("fn, original", [(keyerror_reward, "KeyError"), (zerodiv_reward, "ZeroDivisionError")])
def test_compute_rewards_names_a_raising_reward(fn, original):
    with pytest.raises(RewardError) as info:
        compute_rewards(named(format_reward, fn), COMPLETIONS, COLUMNS)
    assert fn.__name__ in str(info.value)
    assert original in str(info.value)
    assert type(info.value.__cause__).__name__ == original


def test_compute_rewards_names_accuracy_reward_without_solution_column():
    with pytest.raises(RewardError, match="accuracy_reward"):
        compute_rewards(named(accuracy_reward), COMPLETIONS, {"problem": COLUMNS["problem"]})


def short_reward(completions, **columns):
    return [1.0] * (len(completions) - 1)


def long_reward(completions, **columns):
    return [1.0] * (len(completions) + 1)


def empty_reward(completions, **columns):
    return []


@pytest.mark.parametrize("fn", [short_reward, long_reward, empty_reward])
def test_compute_rewards_wrong_length_is_a_value_error_naming_the_function(fn):
    with pytest.raises(RewardError, match=fn.__name__) as info:
        compute_rewards(named(fn), COMPLETIONS, COLUMNS)
    assert str(len(COMPLETIONS)) in str(info.value)


def text_values_reward(completions, **columns):
    return ["good"] * len(completions)


def object_values_reward(completions, **columns):
    return [object()] * len(completions)


def list_values_reward(completions, **columns):
    return [[1.0]] * len(completions)


def scalar_reward(completions, **columns):
    return 1.0


def none_instead_of_list_reward(completions, **columns):
    return None


@pytest.mark.parametrize("fn", [text_values_reward, object_values_reward, list_values_reward, scalar_reward,
                                none_instead_of_list_reward])
def test_compute_rewards_non_numeric_is_one_line_naming_the_function_and_what_it_returned(fn):
    with pytest.raises(RewardError, match=fn.__name__) as info:
        compute_rewards(named(fn), COMPLETIONS, COLUMNS)
    message = str(info.value)
    assert "\n" not in message and f"given {len(COMPLETIONS)} completions" in message, message
    returned = fn(COMPLETIONS)
    shown = type(returned[0] if isinstance(returned, list) else returned).__name__
    assert f"returned {'a list whose item 0 is ' if isinstance(returned, list) else ''}{shown}" in message, message


def dict_reward(completions, **columns):
    return {"score": [1.0] * len(completions)}


def test_compute_rewards_shows_a_returned_dict_by_its_value():
    with pytest.raises(RewardError, match=r"returned dict \{'score': \[1.0") as info:
        compute_rewards(named(dict_reward), COMPLETIONS, COLUMNS)
    assert "could not convert" not in str(info.value)


def test_compute_rewards_names_lambdas_and_callables():
    with pytest.raises(RewardError, match="<lambda>"):
        compute_rewards(named(lambda completions, **kw: []), COMPLETIONS, COLUMNS)

    class LengthReward:
        def __call__(self, completions, **columns):
            raise KeyError("oops")

        def __repr__(self):
            return "LengthReward()"

    with pytest.raises(RewardError, match=r"LengthReward\(\)"):
        compute_rewards(named(LengthReward()), COMPLETIONS, COLUMNS)


def test_compute_rewards_with_no_completions():
    assert compute_rewards(named(accuracy_reward, format_reward), [], {"solution": []}) == \
        {"accuracy_reward": [], "format_reward": []}


# ---------------------------------------------------------------------------------------------------------------
# How rewards combine (trainer.score): keyed by the --rewards name, NaN-aware, warned once

def inf_reward(completions, **columns):
    return [float("inf"), 1.0, float("-inf")]


def test_two_names_for_one_function_are_two_rewards():
    out = compute_rewards({"fmt": format_reward, "fmt_again": format_reward}, COMPLETIONS, COLUMNS)
    assert list(out) == ["fmt", "fmt_again"] and out["fmt"] == out["fmt_again"] == [1.0, 0.0, 0.0]


def test_non_finite_rewards_become_nan_and_are_named_once(recwarn):
    import rewards
    rewards.WARNED_REWARDS.discard("odd")
    out = compute_rewards({"odd": inf_reward}, COMPLETIONS, COLUMNS)
    assert math.isnan(out["odd"][0]) and out["odd"][1] == 1.0 and math.isnan(out["odd"][2])
    compute_rewards({"odd": inf_reward}, COMPLETIONS, COLUMNS)
    said = [str(w.message) for w in recwarn if "'odd'" in str(w.message)]
    assert len(said) == 1 and "2 of 3" in said[0], said


def test_a_missing_reward_counts_as_zero_and_keeps_the_sample_s_other_rewards():
    """Sample 0: none_reward gives None, format 1 -> total 1 (it was NaN -> 0 for the whole sample before).
    Sample 2 of the inf reward: -inf -> 0, not a NaN that zeroes the whole group's advantages."""
    import torch
    from main import Config
    from trainer import score
    cfg = Config(num_generations=3, scale_rewards=False)
    rows = [{"problem": "q", "solution": "3"}]
    per, total, adv = score(rows, COMPLETIONS, {"format": format_reward, "none": none_reward}, [1.0, 2.0], cfg)
    assert total.tolist() == [1.0, 1.0, 0.0]  # 1 + 2 x None, 0 + 2 x 0.5, 0 + 2 x None
    torch.testing.assert_close(adv, torch.tensor([1 / 3, 1 / 3, -2 / 3]))
    per, total, adv = score(rows, COMPLETIONS, {"format": format_reward, "inf": inf_reward}, [1.0, 1.0], cfg)
    assert total.tolist() == [1.0, 1.0, 0.0] and adv.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# number_reward: partial credit for the last number of the completion (the CPU smoke run's learnable reward).

@pytest.mark.parametrize("completion, solution, expected", [
    ("<answer>3</answer>", "3", 1.0),
    ("I see 4 shapes", "3", 0.5),           # 1 / (1 + |4 - 3|)
    ("2 or maybe 13", "3", 1 / 11),         # the last number counts
    ("no number at all", "3", 0.0),
    ("", "3", 0.0),
    ("٣ shapes", "3", 1.0),                 # a Unicode digit is a digit
    ("3", "three", 0.0),                    # the solution is not a number
    ("3", None, 0.0),
    ("3", 3, 1.0),                          # a numeric solution column
    (None, "3", 0.0),
    (3, "3", 1.0),                          # not a string: as text
    ("9" * MB, "3", 0.0),                   # a 1 MB number, far from 3 (read in pieces: bounded time)
    ("x" * MB + " 3", "3", 1.0),
    ("-3", "3", 1.0),                       # the sign is not read: credit for the count
])
def test_number_reward_table(completion, solution, expected):
    values = bounded(number_reward, [completion], [solution])
    assert_floats(values, 1)
    assert values[0] == pytest.approx(expected, abs=1e-3)


def test_number_reward_never_raises_on_any_output():
    for solution in ["3", "B", "", None, 3, 2.5, "1e400"]:
        assert_floats(number_reward(WEIRD, [solution] * len(WEIRD)), len(WEIRD))
