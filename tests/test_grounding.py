"""Grounding: the box parser, the box rewards (iou, boxes, box_f1) and overlong, with adversarial tables; each
family's box frame checked end to end (a box placed on an image, the image resized by the family's processor, the
answer that family writes for that box, scored through trainer.score); the built-in grounding data."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rewards import (box_f1_reward, box_iou, boxes_reward, iou_reward, matched_boxes, overlong_reward,  # noqa: E402
                     parse_boxes, solution_boxes)

B = [10.0, 20.0, 30.0, 40.0]


@pytest.mark.parametrize("text, expected", [
    ('[10, 20, 30, 40]', [B]),
    ('<answer>[10, 20, 30, 40]</answer>', [B]),
    ('<think>[0,0,1,1]</think><answer>[10, 20, 30, 40]</answer>', [B]),  # the answer's, not the thinking's
    ('{"bbox_2d": [10, 20, 30, 40], "label": "cat"}', [B]),  # Qwen2.5-VL / Qwen3-VL JSON
    ('[{"bbox_2d": [10, 20, 30, 40], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "b"}]', [B, [1, 2, 3, 4]]),
    ('```json\n[{"bbox_2d": [10, 20, 30, 40]}]\n```', [B]),  # in fences, as the released models write it
    ('<answer>```json\n{"bbox": [10.0, 20.0, 30.0, 40.0]}\n```</answer>', [B]),
    ('[[10, 20, 30, 40], [1, 2, 3, 4]]', [B, [1, 2, 3, 4]]),
    ('<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>', [B]),  # Qwen2-VL
    ('the cat (10, 20), (30, 40) and the dog (1,2),(3,4)', [B, [1, 2, 3, 4]]),  # decoded: markers dropped
    ('It is at [10, 20, 30, 40].', [B]),
    ('{"bbox_2d": [10, 20, 30, 40], broken json', [B]),  # JSON that does not parse: the box inside still reads
    ('[30, 40, 10, 20]', [B]),  # corners swapped: the same box
    ('[30, 20, 10, 40]', [B]),
    ('x1=10 y1=20 x2=30 y2=40', [B]),  # four numbers: what a small model writes first
    ('<answer>10 20 30 40</answer>', [B]),
    ('[-5, 20, 30, 40]', [[-5, 20, 30, 40]]),  # outside the image: clipped when mapped (to_original)
    ('[10, 20, 30]', []), ('[10, 20, 30, 40, 50]', []), ('three numbers 1 2 3', []), ('', []), ('no box', []),
    ('[nan, 20, 30, 40]', []), ('{"bbox_2d": [1e999, 2, 3, 4]}', []), ('{"bbox_2d": [true, 2, 3, 4]}', []),
    ('{"bbox_2d": ["a", 2, 3, 4]}', []), ('{"bbox_2d": null}', []), ('{}', []), ('[]', []), ('null', []),
    ('<answer></answer>', []), ('<answer>[1, 2</answer>', []),
    ('[10, 20, 30, 40] <answer></answer>', []),  # an empty answer gives no box (not the one before it)
    ('{"red square": [10, 20, 30, 40]}', [B]), ('{"objects": [{"bbox_2d": [10, 20, 30, 40]}]}', [B]),  # other keys
    ('[1' + '0' * 400 + ', 0, 10, 10]', []), ('{"bbox_2d": [1' + '0' * 400 + ', 0, 1, 1]}', []),  # no float holds it
    (None, []), ({"content": "[10, 20, 30, 40]"}, [B]),  # a chat message
])
def test_parse_boxes(text, expected):
    assert parse_boxes(text) == expected


@pytest.mark.parametrize("solution, expected", [
    ([10, 20, 30, 40], [B]), ("[10, 20, 30, 40]", [B]), ([[10, 20, 30, 40], [1, 2, 3, 4]], [B, [1, 2, 3, 4]]),
    ('{"bbox_2d": [30, 40, 10, 20]}', [B]), ("", []), (None, []), ([], []), ("[1, 2]", []), (7, []),
    ("left of 10 20 30 40", []),  # prose is no reference box (the last-four-numbers reading is for answers)
])
def test_solution_boxes(solution, expected):
    assert solution_boxes(solution) == expected


def test_a_row_without_an_image_has_no_box_frame_and_scores_none():
    """A text-only row in a grounding run: its boxes have no frame to be read in; None (compute_rewards counts it
    0 and names the reward once), not a number from a wrong frame."""
    for fn in (iou_reward, boxes_reward, box_f1_reward):
        assert fn(["[0, 0, 50, 50]"] * 2, ["[0, 0, 50, 50]"] * 2, image_size=[None, [100, 100]],
                  model_image_size=[None, [100, 100]], box_frame=["pixels"] * 2) == [None, 1.0]


def test_box_iou_by_hand():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # no area: never a division by zero
    assert box_iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)  # inside


IMG = dict(image_size=[[100, 100]], model_image_size=[[100, 100]], box_frame=["pixels"])


@pytest.mark.parametrize("completion, solution, iou", [
    ("[0, 0, 50, 50]", "[0, 0, 50, 50]", 1.0),
    ("[50, 50, 0, 0]", "[0, 0, 50, 50]", 1.0),  # swapped corners
    ("[0, 0, 50, 50]", [50, 50, 0, 0], 1.0),  # a solution's too
    ("[25, 0, 75, 50]", "[0, 0, 50, 50]", 1 / 3),
    ("[-50, -50, 50, 50]", "[0, 0, 50, 50]", 1.0),  # outside the image: clipped to it first
    ("[0, 0, 500, 500]", "[0, 0, 100, 100]", 1.0),
    ("[200, 200, 300, 300]", "[0, 0, 50, 50]", 0.0),  # wholly outside: no area left
    ("no box", "[0, 0, 50, 50]", 0.0), ("", "[0, 0, 50, 50]", 0.0),
    ("[0, 0, 50, 50] then [60, 60, 70, 70]", "[0, 0, 50, 50]", 1.0),  # iou: the first box
    ("[0, 0, 50, 50]", "not a box", 0.0), ("[0, 0, 50, 50]", None, 0.0),
])
def test_iou_reward_table(completion, solution, iou):
    assert iou_reward([completion], [solution], **IMG) == [pytest.approx(iou)]


GOLD = [[0, 0, 10, 10], [20, 0, 30, 10]]


@pytest.mark.parametrize("completion, boxes, f1", [
    ("[[0, 0, 10, 10], [20, 0, 30, 10]]", 1.0, 1.0),
    ("[[20, 0, 30, 10], [0, 0, 10, 10]]", 1.0, 1.0),  # any order
    ("[[0, 0, 10, 10]]", 0.5, 2 / 3),  # one missing: IoU sum over the larger count; F1 = 2 x 1 / (1 + 2)
    ("[[0, 0, 10, 10], [20, 0, 30, 10], [50, 50, 60, 60]]", 2 / 3, 0.8),  # one extra
    ("[[0, 0, 10, 10], [0, 0, 10, 10]]", 0.5, 0.5),  # the same box twice counts once
    ("[[0, 0, 10, 10], [25, 0, 35, 10]]", (1 + 1 / 3) / 2, 0.5),  # the second at IoU 1/3: not found at 0.5
    ("nothing", 0.0, 0.0),
])
def test_boxes_and_f1_rewards_table(completion, boxes, f1):
    assert boxes_reward([completion], [GOLD], **IMG) == [pytest.approx(boxes)]
    assert box_f1_reward([completion], [GOLD], **IMG) == [pytest.approx(f1)]


def test_matching_is_optimal_where_greedy_is_not():
    """Greedy (each answer box takes its best reference box in turn) pairs A with X (0.724) and leaves B with Y
    (0.316): one hit at 0.5. The optimal matching pairs A with Y (0.613) and B with X (0.786): two."""
    X, Y = [0, 0, 10, 10], [4, 0, 14, 10]
    A = [1.6, 0, 11.6, 10]  # IoU with X 84/116 = 0.724, with Y 76/124 = 0.613
    Bx = [-1.2, 0, 8.8, 10]  # with X 88/112 = 0.786, with Y 48/152 = 0.316
    pairs = matched_boxes([A, Bx], [X, Y])
    assert sorted(round(v, 3) for v in pairs) == [0.613, 0.786]  # both found at 0.5: A-Y, B-X
    assert box_f1_reward([json.dumps([A, Bx])], [[X, Y]], **IMG) == [1.0]


WEIRD = ["", None, 3, [], {}, {"content": None}, "(" * 5000, "[" * 20000, "{" * 20000, "[1," * 5000,
         "(1,2),(3," * 3000, "9" * 100000, "<answer>" * 1000, "[1e308, 1e308, -1e308, -1e308]",
         "(1,1)" + " " * 19990, "(1,1)" + "\n" * 19990 + "(2,2)", "[1" + "0" * 400 + ", 0, 10, 10]",
         '{"bbox_2d": [1, 2, 3, 4]' * 1000, "\ud800[1,2,3,4]", "🤖" * 100, "-" * 10000 + "1 2 3 4"]


@pytest.mark.parametrize("fn", [iou_reward, boxes_reward, box_f1_reward])
def test_box_rewards_never_raise_and_stay_in_0_1(fn):
    import time
    t = time.time()
    for frame, size in (("pixels", [100, 80]), ("0-1000", [100, 80]), ("0-1000", None)):
        n = len(WEIRD)
        values = fn(WEIRD, [GOLD] * n, image_size=[size] * n, model_image_size=[[112, 84]] * n,
                    box_frame=[frame] * n)
        assert len(values) == n and all(v is None if size is None else type(v) is float and 0.0 <= v <= 1.0
                                        for v in values), values
    # linear parsers take ~0.05 s for all of it; a quadratic one took 4.5 s here (a pair then 20k spaces)
    assert time.time() - t < 2, "the parsers must stay linear in the text's length"


@pytest.mark.parametrize("length, expected", [(0, 0.0), (80, 0.0), (85, -0.25), (90, -0.5), (100, -1.0)])
def test_overlong_reward_is_dapo_soft_penalty(length, expected):
    """max 100 tokens, buffer 20: 0 up to 80, then linear to -1 at 100 (DAPO's R_length)."""
    assert overlong_reward(["x"], [length], [100], [20]) == [pytest.approx(expected)]
    assert overlong_reward(["x"], [length], [100], [0]) == [pytest.approx(expected)]  # 0: a fifth


# ---------------------------------------------------------------------------------------------------------------
# Each family's frame, end to end: the box the model would write for the reference box scores 1.0.

def family_answer(kind, box, prompt):
    """What each family writes for `box` (original pixels), from the prompt's sizes: Qwen2-VL (x,y) pairs
    0-1000, Qwen2.5-VL JSON in the resized image's pixels, Qwen3-VL JSON 0-1000."""
    w, h = prompt["image_size"]
    mw, mh = prompt["model_image_size"]
    if kind == "qwen2_5_vl":
        x1, y1, x2, y2 = box[0] * mw / w, box[1] * mh / h, box[2] * mw / w, box[3] * mh / h
        return json.dumps([{"bbox_2d": [x1, y1, x2, y2], "label": "red square"}])
    x1, y1, x2, y2 = box[0] * 1000 / w, box[1] * 1000 / h, box[2] * 1000 / w, box[3] * 1000 / h
    if kind == "qwen2_vl":
        return f"<|object_ref_start|>red square<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
    return f'```json\n[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "red square"}}]\n```'


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_each_family_s_answer_for_the_box_scores_1_through_the_processor_s_resize(kind):
    """A 150 x 100 image with a red square at [30, 20, 90, 60]; the family's processor resizes it (Qwen2 and 2.5:
    to 140 x 112, Qwen3: to 352 x 224); the answer in that family's frame scores IoU 1 through trainer.score, a box
    10 pixels to the right (1/3 of the width less overlap) (60 - 10) / (60 + 10), and read in another family's frame
    it scores less than 0.9 (so the frame matters)."""
    from PIL import Image, ImageDraw

    import trainer
    from main import Config
    from utils import build_prompt, tiny_processor
    img = Image.new("RGB", (150, 100), "white")
    box = [30, 20, 90, 60]
    ImageDraw.Draw(img).rectangle(box, fill="red")
    cfg = Config(num_generations=3, max_completion_length=16)
    processor = tiny_processor(kind)
    row = {"image": img, "problem": "Where is the red square?", "solution": json.dumps(box)}
    prompt = build_prompt(processor, row, cfg)
    assert prompt["image_size"] == [150, 100]
    # the size the model saw, independently of how build_prompt computes it: the pixels the processor encoded
    patch = 16 if kind == "qwen3_vl" else 14
    t, gh, gw = prompt["image_grid_thw"][0].tolist()
    assert prompt["pixel_values"].shape[0] == t * gh * gw
    assert prompt["model_image_size"] == ([352, 224] if kind == "qwen3_vl" else [140, 112]) == [gw * patch, gh * patch]
    shifted = [box[0] + 10, box[1], box[2] + 10, box[3]]
    texts = [family_answer(kind, box, prompt), family_answer(kind, shifted, prompt),
             family_answer("qwen2_vl" if kind == "qwen2_5_vl" else "qwen2_5_vl", box, prompt)]
    per, _, _ = trainer.score([row], texts, {"iou": iou_reward, "boxes": boxes_reward}, [1.0, 1.0], cfg, None,
                              [prompt], [10, 10, 10])
    for name in ("iou", "boxes"):
        assert per[name][0] == pytest.approx(1.0, abs=1e-9), (kind, name, per[name])
        assert per[name][1] == pytest.approx(50 / 70, abs=1e-9), (kind, name, per[name])
        assert per[name][2] < 0.9, (kind, name, per[name])


def test_an_image_from_a_url_keeps_its_own_size_as_the_frame_of_its_boxes(tmp_path):
    """An image served over HTTP (a local server here): its original size is the one served, not that of a copy
    resized on the way in (qwen-vl-utils' fetch resized before the size was read: a perfect answer scored 0.1)."""
    import functools
    import http.server
    import threading
    from PIL import Image
    from utils import load_image
    Image.new("RGB", (40, 30), "red").save(tmp_path / "small.png")
    Image.new("RGB", (640, 480), "red").save(tmp_path / "coco.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name, size in (("small.png", (40, 30)), ("coco.png", (640, 480))):
            image = load_image(f"http://127.0.0.1:{server.server_port}/{name}", 3136, 200704)
            assert image.info["original_size"] == size and image.size != size
    finally:
        server.shutdown()


def test_the_built_in_grounding_data_s_boxes_are_where_the_shapes_are():
    """Each row's solution box holds its shape's colour at the centre, and the box lies inside the image."""
    from utils import COLORS, make_grounding_dataset
    rows = make_grounding_dataset(20, seed=3)
    assert len({r["problem"] for r in rows}) > 5
    for r in rows:
        (box,) = solution_boxes(r["solution"])
        w, h = r["image"].size
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        colour = r["problem"].split()[3]
        centre = r["image"].getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2 + 3))
        assert centre == COLORS[colour], (r["problem"], centre)


def test_grounding_without_a_box_reward_and_a_solution_that_is_no_box_are_one_message_each(tmp_path, tiny_qwen2_vl):
    import main
    with pytest.raises(SystemExit, match=r"--dataset grounding .* --rewards iou,format"):
        main.check_config(main.Config(dataset="grounding"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"problem": "where?", "solution": s}) + "\n" for s in ["left", "up", "x"]))
    cfg = main.Config(model=tiny_qwen2_vl, dataset=str(data), rewards="iou", image_column="none", eval_steps=0)
    rows = main.load_rows(str(data), "train", "problem", "solution", "none")
    with pytest.raises(SystemExit, match=r"column 'solution'\) is not a box .*\[x1, y1, x2, y2\]"):
        main.check_data(cfg, rows, [])
    data.write_text(json.dumps({"problem": "where?", "solution": [[1, 2, 3, 4], [5, 6, 7, 8]]}) + "\n")
    main.check_data(cfg, main.load_rows(str(data), "train", "problem", "solution", "none"), [])  # boxes: no error
