"""The synthetic visual-QA generator: deterministic, answers re-derived from the pixels alone, a few
layouts checked by hand, and questions the tiny tokenizer reads without unknown words."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from grace.demo import synthetic
from grace.demo.synthetic import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    VOCAB,
    PlacedShape,
    cell_name,
    render,
    write_task,
)
from grace.demo.tiny import DEFAULT_WORDS, build_processor

WHITE = (255, 255, 255)


def _files(paths: dict) -> dict:
    out = {}
    for split in ("train", "eval"):
        with open(paths[split], "rb") as f:
            out[split] = f.read()
        for rec in json.loads(out[split]):
            with open(os.path.join(paths["image_folder"], rec["image"]), "rb") as f:
                out[rec["image"]] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(write_task(str(tmp_path / "a"), 12, 8, seed=3))
    b = _files(write_task(str(tmp_path / "b"), 12, 8, seed=3))
    c = _files(write_task(str(tmp_path / "c"), 12, 8, seed=4))
    assert a == b
    assert a.keys() == c.keys()
    assert a["train"] != c["train"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) > 10


def test_eval_split_does_not_depend_on_n_train(tmp_path):
    a = _files(write_task(str(tmp_path / "a"), 4, 6))
    b = _files(write_task(str(tmp_path / "b"), 9, 6))
    assert a["eval"] == b["eval"]
    assert all(a[k] == b[k] for k in a if k.startswith("images/eval-"))


def test_validation_split_is_its_own_draw(tmp_path):
    # Train and eval do not move when a validation split is added; the split is deterministic and its own.
    plain = _files(write_task(str(tmp_path / "a"), 6, 8))
    paths = write_task(str(tmp_path / "b"), 6, 8, n_val=8)
    assert _files(paths) == plain
    val = open(paths["val"], "rb").read()
    assert val == open(write_task(str(tmp_path / "c"), 6, 8, n_val=8)["val"], "rb").read()
    assert [r["question_type"] for r in json.loads(val)] == [r["question_type"] for r in json.loads(plain["eval"])]
    assert json.loads(val) != json.loads(plain["eval"])


def test_validation_split_holds_no_eval_question(tmp_path, monkeypatch):
    # A task of four layouts per question type: one eval question per type takes one of them, and a validation
    # split drawn without looking at eval would repeat it in about a quarter of its questions.
    real = synthetic.make_sample

    def few_layouts(rng, question_type, image_size=synthetic.IMAGE_SIZE):
        return real(np.random.default_rng([7, int(rng.integers(4))]), question_type, image_size)

    monkeypatch.setattr(synthetic, "make_sample", few_layouts)
    paths = write_task(str(tmp_path), 0, 4, n_val=40)
    val, test = (json.load(open(paths[split])) for split in ("val", "eval"))

    def identity(rec):   # the question and the image it is asked about
        return rec["conversations"][0]["value"], (tmp_path / rec["image"]).read_bytes()

    assert len(val) == 40 and not {identity(r) for r in val} & {identity(r) for r in test}
    assert len({identity(r) for r in val}) == 12   # the other three layouts of each type, all drawn


def test_cached_directory_is_reused_and_regenerated_on_change(tmp_path):
    out = str(tmp_path / "task")
    paths = write_task(out, 8, 4)
    stamps = {p: os.stat(p).st_mtime_ns for p in (paths["train"], paths["eval"], paths["meta"])}
    assert write_task(out, 8, 4) == paths
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps

    os.remove(os.path.join(out, "images", "train-00003.png"))   # an incomplete directory is rebuilt
    write_task(out, 8, 4)
    assert os.path.exists(os.path.join(out, "images", "train-00003.png"))

    write_task(out, 3, 2)   # new parameters: rewritten, and the images of the larger run are gone
    assert len(json.load(open(paths["train"]))) == 3
    assert sorted(os.listdir(paths["images"])) == ["eval-00000.png", "eval-00001.png", "train-00000.png",
                                                   "train-00001.png", "train-00002.png"]
    assert json.load(open(paths["meta"]))["n_train"] == 3


# --- re-deriving every answer from the pixels, with no help from the generator's own code ---------------

def _components(img: np.ndarray) -> list[dict]:
    """4-connected components of non-white pixels: color name, pixel count, bounding box, centroid."""
    h, w, _ = img.shape
    palette = {v: k for k, v in COLORS.items()}
    seen = np.zeros((h, w), dtype=bool)
    comps = []
    for y0 in range(h):
        for x0 in range(w):
            if seen[y0, x0] or tuple(img[y0, x0]) == WHITE:
                continue
            color = tuple(int(v) for v in img[y0, x0])
            assert color in palette, f"pixel {color} is neither white nor a palette color"
            stack, pixels = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                pixels.append((y, x))
                for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and tuple(img[ny, nx]) != WHITE:
                        assert tuple(img[ny, nx]) == color, "two colors touch: shapes overlap"
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            ys, xs = np.array(pixels).T
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            comps.append({"color": palette[color], "n": len(pixels), "fill": len(pixels) / box,
                          "cy": ys.mean(), "cx": xs.mean()})
    return comps


def _shape_of(comp: dict) -> str:
    # Share of its bounding box a shape covers: square 1, disc about pi/4, triangle about 1/2.
    return "square" if comp["fill"] > 0.95 else "circle" if comp["fill"] > 0.7 else "triangle"


def _answer_from_pixels(img: np.ndarray, rec: dict) -> str:
    comps = _components(img)
    qtype = rec["question_type"]
    words = rec["conversations"][0]["value"].split()
    if qtype == "count":   # "<image>\nhow many <color> objects are there ?": up to three of other colors too
        n = sum(c["color"] == words[3] for c in comps)
        assert 1 <= n <= 6 and len(comps) - n <= 3
        return ("one", "two", "three", "four", "five", "six")[n - 1]
    if qtype == "color":   # "<image>\nwhat is the color of the <shape> ?": one shape of each kind
        assert len(comps) == 3 and sorted(_shape_of(c) for c in comps) == ["circle", "square", "triangle"]
        (target,) = [c for c in comps if _shape_of(c) == words[7]]
        return target["color"]
    if qtype == "shape":   # "<image>\nwhat is the shape of the <color> object ?": three colors
        assert len(comps) == 3 and len({c["color"] for c in comps}) == 3
        (target,) = [c for c in comps if c["color"] == words[7]]
        return _shape_of(target)
    assert qtype == "position" and len(comps) == 3 and len({c["color"] for c in comps}) == 3
    (target,) = [c for c in comps if c["color"] == words[4]]   # "<image>\nwhere is the <color> object ?"
    third = img.shape[0] // 3
    row, col = int(target["cy"] // third), int(target["cx"] // third)
    return f"{('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[col]}"


@pytest.mark.parametrize("image_size", [42, 24, 50])
def test_answers_follow_from_the_pixels(tmp_path, image_size):
    paths = write_task(str(tmp_path), 60, 20, seed=1, image_size=image_size)
    records = json.load(open(paths["train"])) + json.load(open(paths["eval"]))
    for rec in records:
        img = np.asarray(Image.open(os.path.join(paths["image_folder"], rec["image"])))
        assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
        assert _answer_from_pixels(img, rec) == rec["answer"], rec["id"]
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": rec["answer"]}
    types = [r["question_type"] for r in records]
    assert {t: types.count(t) for t in QUESTION_TYPES} == {t: 20 for t in QUESTION_TYPES}


def test_answers_are_spread_over_their_choices(tmp_path):
    """No answer word dominates its question type, so guessing the commonest answer stays near chance."""
    records = json.load(open(write_task(str(tmp_path), 800, 0, seed=2)["train"]))
    for qtype, n_choices in (("color", 4), ("shape", 3), ("count", 6), ("position", 9)):
        answers = [r["answer"] for r in records if r["question_type"] == qtype]
        counts = {a: answers.count(a) for a in set(answers)}
        assert len(counts) == n_choices, (qtype, counts)
        assert max(counts.values()) / len(answers) < 1.6 / n_choices, (qtype, counts)


# --- hand-checked layouts ----------------------------------------------------------------------------------

def test_hand_checked_red_square_top_left():
    img = render([PlacedShape("square", "red", cell=0, size=7, dy=1, dx=2)], 42)
    red = np.all(img == COLORS["red"], axis=-1)
    assert red.sum() == 49 and red[1:8, 2:9].all()
    assert not red[0].any() and not red[:, 1].any() and not red[8].any()
    assert (img[~red] == 255).all()


def test_hand_checked_triangle_and_circle():
    img = render([PlacedShape("triangle", "blue", cell=4, size=7, dy=1, dx=1),
                  PlacedShape("circle", "yellow", cell=1, size=12, dy=1, dx=1)], 42)
    blue = np.all(img == COLORS["blue"], axis=-1)
    # The center cell starts at (14, 14): apex one pixel at the center column, base seven pixels wide.
    assert blue[15].nonzero()[0].tolist() == [18]
    assert blue[21].nonzero()[0].tolist() == list(range(15, 22))
    assert blue.sum(axis=1)[15:22].tolist() == [1, 1, 3, 3, 5, 5, 7] and blue.sum() == 25
    yellow = np.all(img == COLORS["yellow"], axis=-1)
    # Top-right cell at (0, 14), box (1..12, 15..26): a disc, so the box corners stay white, its middle is filled.
    assert yellow[1:13, 15:27].sum() == yellow.sum()
    assert not yellow[1, 15] and not yellow[12, 26] and yellow[6, 20] and yellow[6, 15] and yellow[1, 20]


def test_hand_checked_positions():
    # 3 x 3 grid, row-major: 0 1 2 / 3 4 5 / 6 7 8
    assert [cell_name(c) for c in (0, 1, 2, 4, 6, 8)] == ["top left", "top center", "top right", "middle center",
                                                          "bottom left", "bottom right"]
    assert cell_name(3) == "middle left" and cell_name(5) == "middle right" and cell_name(7) == "bottom center"
    with pytest.raises(ValueError, match="no cell 9"):
        cell_name(9)


def test_every_cell_is_one_of_thirteen_patterns(tmp_path):
    """Shapes fill their cell less a 1 px border: a cell is empty or one (kind, color) pattern, nothing else, so
    the image content is exact and the task's difficulty is in the language model."""
    paths = write_task(str(tmp_path), 80, 0, seed=5)
    patches = set()
    for rec in json.load(open(paths["train"])):
        img = np.asarray(Image.open(os.path.join(paths["image_folder"], rec["image"])))
        patches |= {img[r:r + 14, c:c + 14].tobytes() for r in (0, 14, 28) for c in (0, 14, 28)}
    assert len(patches) == 13


def test_render_refuses_a_shape_that_leaves_its_cell():
    with pytest.raises(ValueError, match="does not fit"):
        render([PlacedShape("square", "red", cell=0, size=13, dy=1, dx=1)], 42)
    with pytest.raises(ValueError, match="no cell 9"):
        render([PlacedShape("square", "red", cell=9, size=7, dy=1, dx=1)], 42)


# --- vocabulary and inputs ---------------------------------------------------------------------------------

def test_questions_and_answers_use_only_the_tiny_vocabulary(tmp_path):
    assert set(VOCAB) <= set(DEFAULT_WORDS)
    tok = build_processor().tokenizer
    paths = write_task(str(tmp_path), 8, 0)
    for rec in json.load(open(paths["train"])):
        for turn in rec["conversations"]:
            ids = tok(turn["value"], add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, turn["value"]


@pytest.mark.parametrize("kwargs, match", [
    ({"n_train": -1, "n_eval": 2}, "n_train, n_eval and n_val"),
    ({"n_train": 2, "n_eval": 2, "n_val": -1}, "n_train, n_eval and n_val"),
    ({"n_train": 2, "n_eval": 2.5}, "n_eval must be an integer"),
    ({"n_train": 2, "n_eval": 2, "seed": "x"}, "seed must be an integer"),
    ({"n_train": 2, "n_eval": 2, "seed": -1}, "seed must be >= 0"),
    ({"n_train": 2, "n_eval": 2, "image_size": 23}, "image_size must be at least 24"),
])
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_task(str(tmp_path), **kwargs)


def test_the_random_vision_tower_tells_the_thirteen_patterns_apart(tmp_path):
    """The demo's premise: the frozen, random vision tower gives each cell pattern its own feature vector, so the
    image content reaches the language model intact (nothing about it has to be learned by the vision side)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grace.demo.tiny import build_tiny_vlm

    path = build_tiny_vlm(str(tmp_path / "m"), size="demo-student", vocab_words=VOCAB, seed=1, image_size=42,
                          init="fan_in")
    model, processor = AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    images = [render([], 42)] + [render([PlacedShape(s, c, cell=4, size=12, dy=1, dx=1)], 42)
                                 for s in SHAPES for c in COLORS]
    pixels = processor.image_processor([Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():   # the features LLaVA takes ("default": the penultimate layer, CLS dropped)
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    center = states[:, 4]   # the center cell's token
    dist = torch.cdist(center, center) + torch.eye(len(images)) * 1e9
    assert dist.min() > 0.05 * center.norm(dim=-1).mean()
