"""Rewards: plain functions fn(completions, **columns) -> list[float], listed in main.py's REWARDS. Text answers
(accuracy, format, number), boxes (iou, boxes, box_f1) and length (overlong); compute_rewards calls them."""
import math
import re
import warnings


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
    """1.0 when the last <answer>...</answer> equals the solution (numbers, letters, LaTeX), or one of them when a
    row's solution is a list of accepted answers, else 0.0."""
    return [float(any(answers_match(extract_answer(c), a) for a in (s if isinstance(s, list) else [s])))
            for c, s in zip(completions, solution)]


accuracy_reward.takes_answer_lists = True  # the data check lets list-valued solutions through to it


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


class RewardError(ValueError):
    """A reward function raised or returned something unusable (trainer.train stops the run with its message)."""


def compute_rewards(reward_funcs, completions, columns):
    """Calls each reward of {name: fn}; returns {name: list[float]}, keyed by the --rewards name (two names may
    share a function). None or a non-finite value becomes NaN, which the weighted sum counts as 0 (the sample's
    other rewards still count); each such reward is named in a warning, once. A reward that raises or returns the
    wrong type or length raises RewardError: one line naming it, what it was given and what it returned."""
    def shown(x):
        text = " ".join(repr(x).split())
        return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
    given = f"given {len(completions)} completions and the columns {sorted(columns)}"
    fix = f"a reward returns a list of {len(completions)} floats, one per completion (None: not scored)"
    out = {}
    for name, fn in reward_funcs.items():
        try:
            values = fn(completions, **columns)
        except Exception as e:
            message = " ".join(str(e).split())[:200]
            raise RewardError(f"reward '{name}' raised {type(e).__name__}{': ' + message if message else ''}, "
                              f"{given}: fix it in main.py ({fix})") from e
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
            raise RewardError(f"reward '{name}' returned {shown(values)}, {given}: {fix}")
        values = list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward '{name}' returned {len(values)} values, {given}: {fix}")
        floats = []
        for i, v in enumerate(values):
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                floats.append(float("nan") if v is None else float(v))
            except (TypeError, ValueError):
                raise RewardError(f"reward '{name}' returned a list whose item {i} is {shown(v)}, {given}: "
                                  f"{fix}") from None
        values = floats
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
# Boxes (grounding). A box is [x1, y1, x2, y2]. A row's solution holds one box or a list of them in the original
# image's pixels (JSON text or a list). The model writes boxes in its family's frame (utils.BOX_FRAMES):
# Qwen2-VL and Qwen3-VL 0-1000 relative to the image, Qwen2.5-VL pixels of the image it was given (resized); the
# trainer passes each row's image_size (original), model_image_size (resized) and box_frame, and the rewards map
# the answer's boxes into the original pixels before comparing.

BOX_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
PAIR_RE = re.compile(rf"\(\s*({BOX_NUMBER})\s*,\s*({BOX_NUMBER})\s*\)\s*(?:,\s*)?\(\s*({BOX_NUMBER})\s*,\s*({BOX_NUMBER})\s*\)")
QUAD_RE = re.compile(rf"[\[(]\s*({BOX_NUMBER})\s*,\s*({BOX_NUMBER})\s*,\s*({BOX_NUMBER})\s*,\s*({BOX_NUMBER})\s*[\])]")
NUMBER_IN_TEXT_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")
MAX_BOXES = 100  # an answer with more is read as its first 100: keeps the matching bounded


def as_box(value):
    """[x1, y1, x2, y2] floats, corners put in order (a box written right to left is the same box), or None."""
    if isinstance(value, dict):
        value = next((value[k] for k in BOX_KEYS if k in value), None)
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError, OverflowError):  # (an integer of 400 digits does not fit a float)
        return None
    if not all(map(math.isfinite, (x1, y1, x2, y2))) or isinstance(value[0], bool):
        return None
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def boxes_in(value):
    """The boxes of parsed JSON: a box, a {'bbox_2d': box, ...} object, or a list of those (nested lists too)."""
    box = as_box(value)
    if box is not None:
        return [box]
    if isinstance(value, dict):
        return []
    if isinstance(value, (list, tuple)):
        return [b for v in value[:MAX_BOXES] for b in boxes_in(v)][:MAX_BOXES]
    return []


def parse_boxes(text, loose=True):
    """The boxes an answer gives, in the order written, in the model's frame: of the last <answer>...</answer> if
    there is one (an empty one: none), else of the whole text. Reads JSON (a box, {"bbox_2d": [...]}, a list of
    them, in ```json fences or not), (x1,y1),(x2,y2) pairs (Qwen2-VL's <|box_start|>...<|box_end|> without the
    markers, which decoding drops), [x1, y1, x2, y2] anywhere, and (loose) else the last four numbers. Nothing
    readable: []."""
    answer = extract_answer(text)
    text = (answer if answer is not None else as_text(text))[-20_000:]  # linear parsers; a box is near the end
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    if body[:1] in "[{":
        try:
            import json
            boxes = boxes_in(json.loads(body))
            if boxes:  # JSON without a box it knows ({"cat": [...]}) is read by the patterns below, not by the
                return boxes  # last four numbers: [1, 2, 3, 4, 5] is no box
            loose = False
        except (ValueError, RecursionError):  # not JSON, or nested past the decoder's depth: the regexes read it
            pass
    # (the two patterns never overlap: inside a pair each bracket holds two numbers, a quad's four)
    found = [(m.start(), m.groups()) for regex in (PAIR_RE, QUAD_RE) for m in regex.finditer(text)]
    boxes = [b for _, g in sorted(found)[:MAX_BOXES] if (b := as_box(g)) is not None]
    if not boxes and loose:  # 'x1=10 y1=20 x2=30 y2=40', '10 20 30 40': the last four numbers (a small model's)
        numbers = NUMBER_IN_TEXT_RE.findall(text[-200:])
        boxes = [b] if len(numbers) >= 4 and (b := as_box(numbers[-4:])) is not None else []
    return boxes


def solution_boxes(solution):
    """A row's reference boxes (original pixels): a box, a list of boxes, {'bbox_2d': ...}, or JSON text of those."""
    if isinstance(solution, str):
        try:
            import json
            solution = json.loads(solution)
        except (ValueError, RecursionError):
            return parse_boxes(solution, loose=False)  # a solution in prose with four numbers is not a box
    return boxes_in(solution)


def to_original(box, frame, image_size, model_image_size):
    """A box in the model's frame -> the original image's pixels, clipped to the image (None: no image size, the
    box as written)."""
    if not image_size:
        return box
    w, h = image_size
    if frame == "pixels":  # Qwen2.5-VL: pixels of the resized image it saw
        mw, mh = model_image_size or image_size
        sx, sy = w / mw, h / mh
    else:  # 0-1000 relative
        sx, sy = w / 1000, h / 1000
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    clip = lambda v, top: min(max(v, 0.0), float(top))
    return [clip(x1, w), clip(y1, h), clip(x2, w), clip(y2, h)]


def box_iou(a, b):
    """Intersection over union of two boxes; 0 when both have no area."""
    iw, ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_boxes(pred, gold):
    """The optimal one-to-one matching of predicted and reference boxes (scipy's linear_sum_assignment): the most
    pairs at IoU >= 0.5 first, then the largest IoU sum. Returns the matched pairs' IoUs."""
    if not pred or not gold:
        return []
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    iou = np.array([[box_iou(p, g) for g in gold] for p in pred])
    rows, cols = linear_sum_assignment(-((iou >= 0.5) * (len(gold) + 1.0) + iou))
    return [float(iou[r, c]) for r, c in zip(rows, cols)]


def row_boxes(completions, solution, image_size, model_image_size, box_frame):
    """(predicted boxes in original pixels, reference boxes) per completion; None for a row without an image
    (its boxes have no frame: the rewards score it None, which compute_rewards counts 0 and names). Without the
    sizes at all (a reward called by hand) the boxes are compared as written."""
    n = len(completions)
    sized = image_size is not None
    image_size, model_image_size = image_size or [None] * n, model_image_size or [None] * n
    box_frame = box_frame or ["0-1000"] * n
    return [None if sized and not size else
            ([to_original(b, f, size, msize) for b in parse_boxes(c)], solution_boxes(s))
            for c, s, size, msize, f in zip(completions, solution, image_size, model_image_size, box_frame)]


def iou_reward(completions, solution, image_size=None, model_image_size=None, box_frame=None, **columns):
    """IoU of the answer's first box with the solution's first box, in the original image's pixels; 0 when the
    answer has no box."""
    return [None if row is None else box_iou(row[0][0], row[1][0]) if row[0] and row[1] else 0.0
            for row in row_boxes(completions, solution, image_size, model_image_size, box_frame)]


def boxes_reward(completions, solution, image_size=None, model_image_size=None, box_frame=None, **columns):
    """Several boxes: the optimally matched pairs' IoU summed over max(answer's boxes, solution's boxes), so a
    missing box and an extra one each cost as much as a box that misses entirely. 1.0 only for every box, once."""
    out = []
    for row in row_boxes(completions, solution, image_size, model_image_size, box_frame):
        pred, gold = row or ([], [])
        out.append(None if row is None else sum(matched_boxes(pred, gold)) / max(len(pred), len(gold))
                   if pred and gold else 0.0)
    return out


def box_f1_reward(completions, solution, image_size=None, model_image_size=None, box_frame=None, **columns):
    """F1 at IoU 0.5: boxes matched one to one (matched_boxes) with IoU >= 0.5 count as found."""
    out = []
    for row in row_boxes(completions, solution, image_size, model_image_size, box_frame):
        pred, gold = row or ([], [])
        hits = sum(v >= 0.5 for v in matched_boxes(pred, gold))
        out.append(None if row is None else 2 * hits / (len(pred) + len(gold)) if pred and gold else 0.0)
    return out


for _reward in (iou_reward, boxes_reward, box_f1_reward):
    _reward.reads_boxes = True  # the data check reads their solutions as boxes (solution_boxes)


def overlong_reward(completions, completion_length=None, max_completion_length=None, overlong_buffer=None,
                    **columns):
    """DAPO's soft overlong penalty (Yu et al. 2025): 0 up to max_completion_length - overlong_buffer tokens, then
    falling linearly to -1 at max_completion_length (a completion cut there). The trainer passes the three columns;
    overlong_buffer 0: a fifth of max_completion_length."""
    out = []
    for i, _ in enumerate(completions):
        n, top = completion_length[i], max_completion_length[i]
        buffer = overlong_buffer[i] or max(1, top // 5)
        out.append(max(-1.0, min(0.0, (top - buffer - n) / buffer)))
    return out
