"""A small synthetic visual question-answering task, drawn with numpy and written in the LLaVA
conversation format, so the demo and the tests exercise the real data path with no download.

The task is built so that what an image holds is never in doubt and the difficulty lies in the
language model: binding an attribute to a named object, counting past a few, locating a named object.

* Images are ``image_size`` x ``image_size`` RGB (default 42 px) on a white background, divided into a
  3 x 3 grid of cells (with the tiny LLaVA's 14 px patches, one cell is one of 9 image tokens). A cell
  holds at most one flat-colored shape: a circle, square or triangle (apex up) in red, green, blue or
  yellow, filling the cell less a 1 px white border on each side (so shapes never touch, and each cell
  is one of 13 fixed pixel patterns, which the frozen random vision tower maps to distinct features). Pixels
  are exactly white or exactly one palette color: no anti-aliasing, PNG is lossless.
* One question per image, the four types in turn (sample i has type ``QUESTION_TYPES[i % 4]``):

  ==========  =======================================  ==================================  ======================
  type        question                                 image                               answers
  ==========  =======================================  ==================================  ======================
  color       what is the color of the <shape> ?       three shapes, one of each kind,     red, green, blue,
                                                       colors drawn independently          yellow
  shape       what is the shape of the <color> object  three shapes of three colors        circle, square,
              ?                                                                            triangle
  count       how many <color> objects are there ?     1 to 6 shapes of that color among   one, two, three,
                                                       0 to 3 of other colors, kinds       four, five, six
                                                       drawn independently
  position    where is the <color> object ?            three shapes of three colors        top left, top center,
                                                                                           ... bottom right (9)
  ==========  =======================================  ==================================  ======================

  color and shape need an attribute of a named object (the other objects are distractors); count needs
  every cell and tells five from six; position needs the row and the column of a named object.
* Every word of every question and answer is in ``grace.demo.tiny.DEFAULT_WORDS`` (``VOCAB`` lists them),
  lower case and separated by spaces, so the tiny word-level tokenizer never sees an unknown word.

Splits are drawn from independent random streams of one seed, so the eval split does not depend on
n_train. An eval image can repeat a training layout by chance: the eval split is held out in the sense
of separately drawn samples. The validation split (``n_val``, for choosing settings without looking at the eval
split) has a stream of its own and leaves out every draw that repeats an eval question (the same shapes in the
same cells and the same question), so no question is in both.

Files written by :func:`write_task`::

    out_dir/images/{train,eval,val}-NNNNN.png
    out_dir/train.json, out_dir/eval.json, out_dir/val.json
                                            lists of {"id", "image", "question_type", "answer", "conversations"}
    out_dir/meta.json                       the generation parameters; written last, so a complete
                                            directory with the same parameters is reused as is
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
from PIL import Image

from grace.demo.tiny import PATCH
from grace.io import write_json

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
QUESTION_TYPES = ("color", "shape", "count", "position")
QUESTIONS = {
    "color": "what is the color of the {shape} ?",
    "shape": "what is the shape of the {color} object ?",
    "count": "how many {color} objects are there ?",
    "position": "where is the {color} object ?",
}
GRID = 3                     # cells per side; cells are numbered row-major, 0 top left .. 8 bottom right
IMAGE_SIZE = GRID * PATCH    # one cell per vision patch: 9 image tokens for the tiny LLaVA
MIN_IMAGE_SIZE = 24          # 8 px cells: a 6 px shape inside its 1 px border still has a recognisable form
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")   # "where is": row and column
_FORMAT = 5   # bump when the drawing or the question set changes, so cached directories are regenerated


def _vocab() -> tuple[str, ...]:
    words = [w for q in QUESTIONS.values() for w in q.split() if not w.startswith("{")]
    words += list(COLORS) + list(SHAPES) + list(COUNT_WORDS) + list(ROWS) + list(COLUMNS)
    return tuple(dict.fromkeys(words))


VOCAB = _vocab()


@dataclasses.dataclass(frozen=True)
class PlacedShape:
    """One shape: its kind, color, grid cell (0..8, row-major in the 3 x 3 grid), side of its bounding box
    in pixels and the offset of that box from the cell's top-left corner."""
    shape: str
    color: str
    cell: int
    size: int
    dy: int
    dx: int


def _cell_side(image_size: int) -> int:
    return image_size // GRID   # an image size that GRID does not divide leaves its last rows and columns white


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` filling a size x size box (pixel centers tested)."""
    c = (np.arange(size) + 0.5) - size / 2           # pixel-center coordinates relative to the box center
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return x * x + y * y <= (size / 2) ** 2
    if shape == "triangle":
        # apex at the top center, base along the bottom edge: the half-width grows linearly with the row
        return np.abs(x) <= (y + size / 2) / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(shapes: list[PlacedShape], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``shapes`` on a white uint8 [image_size, image_size, 3] image."""
    cell = _cell_side(image_size)
    img = np.full((image_size, image_size, 3), 255, dtype=np.uint8)
    for s in shapes:
        if not 0 <= s.cell < GRID * GRID:
            raise ValueError(f"{s} has no cell {s.cell} in a {GRID} x {GRID} grid")
        if not (1 <= s.dy and s.dy + s.size <= cell - 1 and 1 <= s.dx and s.dx + s.size <= cell - 1):
            raise ValueError(f"{s} does not fit a {cell} px cell with a 1 px border")
        top, left = (s.cell // GRID) * cell + s.dy, (s.cell % GRID) * cell + s.dx
        region = img[top:top + s.size, left:left + s.size]
        region[shape_mask(s.shape, s.size)] = COLORS[s.color]
    return img


def _place(rng: np.random.Generator, image_size: int, cell_index: int, color: str | None = None,
           shape: str | None = None) -> PlacedShape:
    cell = _cell_side(image_size)
    # Every shape fills its cell less a 1 px white border: a cell's pixels are one of 13 fixed patterns (empty or
    # a kind in a color), so what an image holds is never in doubt and the task measures the language model.
    size, dy, dx = cell - 2, 1, 1
    color = color or str(rng.choice(list(COLORS)))
    shape = shape or str(rng.choice(SHAPES))
    return PlacedShape(shape, color, cell_index, size, dy, dx)


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    return sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))


def make_sample(rng: np.random.Generator, question_type: str,
                image_size: int = IMAGE_SIZE) -> tuple[list[PlacedShape], str, str]:
    """Draw one (shapes, question, answer) of ``question_type``; the answer follows from the shapes.

    color: three shapes, one of each kind, colors drawn independently; asks the color of a named kind.
    shape: three shapes of three different colors, kinds drawn independently; asks the kind of a named color.
    count: one to six shapes of one color among zero to three of other colors (any kinds); asks how many of that
    color.
    position: three shapes of three different colors; asks the cell (row and column) of a named color.
    """
    if question_type == "color":
        kinds = [str(k) for k in rng.permutation(SHAPES)]
        shapes = [_place(rng, image_size, c, shape=k) for c, k in zip(_cells(rng, 3), kinds, strict=True)]
        target = shapes[int(rng.integers(3))]
        return shapes, QUESTIONS["color"].format(shape=target.shape), target.color
    if question_type == "shape":
        colors = [str(c) for c in rng.choice(list(COLORS), size=3, replace=False)]
        shapes = [_place(rng, image_size, c, color=k) for c, k in zip(_cells(rng, 3), colors, strict=True)]
        target = shapes[int(rng.integers(3))]
        return shapes, QUESTIONS["shape"].format(color=target.color), target.shape
    if question_type == "count":
        n = int(rng.integers(1, len(COUNT_WORDS) + 1))
        color = str(rng.choice(list(COLORS)))
        m = int(rng.integers(0, min(3, GRID * GRID - n) + 1))
        others = [str(c) for c in rng.choice([c for c in COLORS if c != color], size=m)]
        colors = [str(c) for c in rng.permutation([color] * n + others)]
        shapes = [_place(rng, image_size, c, color=k) for c, k in zip(_cells(rng, len(colors)), colors, strict=True)]
        return shapes, QUESTIONS["count"].format(color=color), COUNT_WORDS[n - 1]
    if question_type == "position":
        colors = [str(c) for c in rng.choice(list(COLORS), size=3, replace=False)]
        shapes = [_place(rng, image_size, c, color=k) for c, k in zip(_cells(rng, 3), colors, strict=True)]
        target = shapes[int(rng.integers(3))]
        return shapes, QUESTIONS["position"].format(color=target.color), cell_name(target.cell)
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def cell_name(cell: int) -> str:
    """The answer to "where is ...": the cell's row and column, "top left" .. "bottom right"."""
    if not 0 <= cell < GRID * GRID:
        raise ValueError(f"no cell {cell} in a {GRID} x {GRID} grid")
    return f"{ROWS[cell // GRID]} {COLUMNS[cell % GRID]}"


def _record(split: str, i: int, question_type: str, question: str, answer: str) -> dict:
    return {"id": f"{split}-{i:05d}", "image": f"images/{split}-{i:05d}.png", "question_type": question_type,
            "answer": answer, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                {"from": "gpt", "value": answer}]}


def _write_split(out_dir: str, split: str, n: int, rng: np.random.Generator, image_size: int,
                 exclude: frozenset = frozenset()) -> tuple[list[dict], set]:
    """The split's records (images written), and the identity of each question: (question, its shapes).
    A draw whose identity is in ``exclude`` is dropped and drawn again (same question type)."""
    records, seen = [], set()
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        while True:
            shapes, question, answer = make_sample(rng, qtype, image_size)
            key = (question, tuple(sorted(dataclasses.astuple(sh) for sh in shapes)))
            if key not in exclude:
                break
        seen.add(key)
        rec = _record(split, i, qtype, question, answer)
        Image.fromarray(render(shapes, image_size)).save(os.path.join(out_dir, rec["image"]))
        records.append(rec)
    return records, seen


def _complete(paths: dict, meta: dict) -> bool:
    try:
        with open(paths["meta"]) as f:
            if json.load(f) != meta:
                return False
        for split in ("train", "eval", "val"):
            with open(paths[split]) as f:
                records = json.load(f)
            if len(records) != meta[f"n_{split}"]:
                return False
            if not all(os.path.exists(os.path.join(paths["image_folder"], r["image"])) for r in records):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def write_task(out_dir: str, n_train: int, n_eval: int, seed: int = 0, image_size: int = IMAGE_SIZE,
               n_val: int = 0) -> dict:
    """Write the task to ``out_dir`` (see the module docstring for the layout) and return its paths:
    {"image_folder": out_dir (what records' "image" paths are relative to), "images", "train", "eval", "val",
    "meta"}.

    Deterministic: the same (n_train, n_eval, seed, image_size, n_val) give byte-identical files; the train and
    eval splits do not depend on n_val, and the val split holds no eval question. When ``out_dir`` already
    holds a complete task with the same parameters nothing is rewritten.
    Raises ValueError for negative counts, a non-integer seed or an image smaller than
    ``MIN_IMAGE_SIZE`` (24 px).
    """
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("seed", seed), ("image_size", image_size),
                    ("n_val", n_val)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if n_train < 0 or n_eval < 0 or n_val < 0:
        raise ValueError(f"n_train, n_eval and n_val must be >= 0, got {n_train}, {n_eval} and {n_val}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} px so every shape fits its cell, "
                         f"got {image_size}")
    paths = {"image_folder": out_dir, "images": os.path.join(out_dir, "images"),
             "train": os.path.join(out_dir, "train.json"), "eval": os.path.join(out_dir, "eval.json"),
             "val": os.path.join(out_dir, "val.json"), "meta": os.path.join(out_dir, "meta.json")}
    meta = {"format": _FORMAT, "n_train": int(n_train), "n_eval": int(n_eval), "n_val": int(n_val),
            "seed": int(seed), "image_size": int(image_size)}
    if _complete(paths, meta):
        return paths
    if os.path.exists(paths["meta"]):
        os.remove(paths["meta"])   # a run interrupted from here on must not look complete
    os.makedirs(paths["images"], exist_ok=True)
    for split in ("train", "eval", "val"):
        for stale in glob.glob(os.path.join(paths["images"], f"{split}-*.png")):
            os.remove(stale)   # images of an earlier, larger run would otherwise linger
    # One independent stream per split: the eval split does not change with n_train, nor train and eval with n_val.
    train_rng, eval_rng, val_rng = (np.random.default_rng([int(seed), k]) for k in (0, 1, 2))
    write_json(_write_split(out_dir, "train", n_train, train_rng, image_size)[0], paths["train"])
    eval_records, eval_questions = _write_split(out_dir, "eval", n_eval, eval_rng, image_size)
    write_json(eval_records, paths["eval"])
    write_json(_write_split(out_dir, "val", n_val, val_rng, image_size, frozenset(eval_questions))[0], paths["val"])
    write_json(meta, paths["meta"])
    return paths
