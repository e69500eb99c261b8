"""The shapes world: a synthetic image-caption-VQA dataset, generated offline and deterministically.

BLIP-2 learns from millions of web photos; this course needs data that a 2-core CPU can learn from
in minutes and that needs no download. A scene is a 224x224 image with 1-3 shapes on a 3x3 grid
over a textured background. Each object has a shape (5), a colour (6), a size (2) and a grid cell
(9). Per scene there are five captions and six VQAv2-style questions with ten answers each.

Design choices that matter for what the models can learn and how they are scored:

* Every caption names every object by colour *and* shape, and adds one more kind of fact (sizes,
  grid cells, or relations between objects). Telling scenes apart therefore needs attribute
  binding (which colour goes with which shape), yet a caption rarely fits a second image, so the
  ambiguity cap on exact retrieval recall stays high (see ``caption_ambiguity``). A lone object is
  always given with its size and grid cell, since otherwise many scenes would share its caption.
* Each caption is stored with the facts it asserts (``caption_facts``, JSON); ``caption_holds``
  checks them against any scene, so evaluation can report a *semantic* recall (the retrieved
  image satisfies the caption) next to the exact one.
* VQA answers mimic VQAv2's ten annotators: at most two of the ten deviate, by spelling ("two"
  for "2", "Red"), by a synonym the metric does not merge ("violet", "box", "yeah"), or by
  dissent (a plausible wrong answer). The true answer keeps >= 8 votes and so scores 1.0 under
  ``vqa_accuracy``.
* Scene ``i`` of split ``s`` comes from its own random stream, seeded by ``(seed, s, i)``: splits
  never share a scene's seed, and growing a split keeps its existing scenes.

Relations are strict grid relations: "A to the left of B" means A's column is left of B's column,
whatever the rows; "above" compares rows likewise.
"""

from __future__ import annotations

import hashlib
import itertools
import io
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
from collections import Counter, defaultdict

import datasets
import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .paths import cache_root

DATASET_VERSION = 1  # bump on any change to the generator: feature caches are keyed by it
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 3000, "val": 300, "test": 500}

IMAGE_SIZE = 224
CELL = IMAGE_SIZE / 3
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLORS = {  # saturated and far apart in RGB, so that colour names are never a judgement call
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 85, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (240, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
RADII = {"small": 14, "large": 26}  # pixels from centre to the outline's farthest point (about)
N_OBJECTS, N_OBJECTS_P = (1, 2, 3), (0.15, 0.35, 0.5)  # few lone objects: they are the least distinct
JITTER = 6  # max centre offset in px: with the largest object (~29.3 px) it stays inside its cell
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = ("left_of", "right_of", "above", "below")
QUESTION_TYPES = ("color", "count", "exists", "relation", "shape")


def _unit_outline(shape: str) -> np.ndarray:
    """Vertices ``[k, 2]`` of a shape of radius 1 centred at 0, pointing up (image y grows down)."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # a polygon: every shape rotates alike
        radii = np.ones(48)
    elif shape == "square":
        angles, radii = np.pi / 4 + np.arange(4) * np.pi / 2, np.ones(4)
    elif shape == "triangle":
        angles, radii = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3, np.ones(3)
    elif shape == "star":
        angles, radii = -np.pi / 2 + np.arange(10) * np.pi / 5, np.tile([1.0, 0.45], 5)
    else:  # cross: a plus sign with arms 0.6 wide
        a, w = 1.0, 0.3
        return np.array([(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a),
                         (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w), (-w, -a)])
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


# ----------------------------------------------------------------------------- scenes


def _sample_objects(rng: np.random.Generator) -> tuple[list[dict], list[np.ndarray]]:
    """Objects (attributes, bbox, rgb) in reading order, and the polygon that draws each."""
    n = int(rng.choice(N_OBJECTS, p=N_OBJECTS_P))
    objects, polygons = [], []
    for cell in sorted(rng.choice(9, size=n, replace=False)):  # one object per cell: no overlap
        row, col = divmod(int(cell), 3)
        shape, color = SHAPES[rng.integers(len(SHAPES))], COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        size = ("small", "large")[rng.integers(2)]
        centre = (np.array([col, row]) + 0.5) * CELL + rng.uniform(-JITTER, JITTER, 2)
        angle = 0.0 if shape == "circle" else np.deg2rad(rng.uniform(-12, 12))
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = centre + RADII[size] * rng.uniform(0.92, 1.08) * OUTLINES[shape] @ rot.T
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255)
        bbox = [*np.floor(points.min(0)).astype(int).tolist(), *np.ceil(points.max(0)).astype(int).tolist()]
        objects.append(dict(shape=shape, color=color, size=size, row=row, col=col, bbox=bbox, rgb=rgb.tolist()))
        polygons.append(points)
    return objects, polygons


_GRID = np.linspace(-0.5, 0.5, 28)


def _background(rng: np.random.Generator) -> Image.Image:
    """A dull (low-saturation) dark or light colour, a linear gradient, and smooth blotches.

    Drawn at 28x28 and upsampled: smooth backgrounds are cheap to draw and to PNG-encode, and
    the low saturation keeps the six object colours the only vivid ones in the image.
    """
    base = rng.uniform(35, 85) if rng.random() < 0.5 else rng.uniform(150, 205)
    start = base + rng.uniform(-15, 15, 3)
    end = start + rng.uniform(-30, 30)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * _GRID[None, :] + np.sin(angle) * _GRID[:, None] + 0.5
    blotches = Image.fromarray(rng.normal(0, 6, (6, 6)).astype(np.float32)).resize((28, 28), Image.Resampling.BICUBIC)
    texture = np.asarray(blotches) + rng.normal(0, 3, (28, 28))
    pixels = start + (end - start) * t[..., None] + texture[..., None]
    small = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)


def _render(objects: list[dict], polygons: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    for obj, points in zip(objects, polygons):
        draw.polygon([tuple(p) for p in points.tolist()], fill=tuple(obj["rgb"]))
    return image


# ----------------------------------------------------------------------------- captions


def _where(row: int, col: int) -> str:
    return "in the center" if (row, col) == (1, 1) else f"in the {ROWS[row]} {COLS[col]}"


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _desc(obj: dict, keys: tuple[str, ...]) -> dict:
    return {k: obj[k] for k in keys}


def _mention(desc: dict, article: bool = True, noun: str | None = None) -> str:
    """'a large red circle in the top left' from whichever attributes ``desc`` holds."""
    words = " ".join([desc[k] for k in ("size", "color") if k in desc] + [noun or desc["shape"]])
    text = _article(words) if article else words
    return text + " " + _where(desc["row"], desc["col"]) if "row" in desc else text


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    """A relation that holds from ``a`` to ``b`` (two objects in different cells have one)."""
    options = [rel for rel in RELATIONS if _related(a, rel, b)]
    return options[rng.integers(len(options))]


def _related(a: dict, rel: str, b: dict) -> bool:
    return {"left_of": a["col"] < b["col"], "right_of": a["col"] > b["col"],
            "above": a["row"] < b["row"], "below": a["row"] > b["row"]}[rel]


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


REL_TEXT = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
REL_TO_ANCHOR = {"left_of": "to its left", "right_of": "to its right", "above": "above it", "below": "below it"}
FULL = ("size", "color", "shape")
PLACED = ("color", "shape", "row", "col")


def _caption_attributes(objs, rng):
    """'a large red circle and a small blue square'"""
    descs = [_desc(o, FULL + (("row", "col") if len(objs) == 1 else ())) for o in objs]
    prefix = _pick(rng, ["", "a picture of ", "an image with ", "a drawing of "])
    return prefix + _and([_mention(d) for d in descs]), descs, []


def _caption_counts(objs, rng):
    """'three shapes: two circles (a large red one and a small blue one) and a small yellow star'"""
    by_shape = defaultdict(list)
    for o in objs:
        by_shape[o["shape"]].append(o)
    descs, parts = [], []
    for shape, group in by_shape.items():
        group_descs = [_desc(o, FULL + (("row", "col") if len(objs) == 1 else ())) for o in group]
        descs += group_descs
        if len(group) == 1:
            parts.append(_mention(group_descs[0]))
        elif len({(d["size"], d["color"]) for d in group_descs}) == 1:
            parts.append(f"{NUMBER_WORDS[len(group)]} {_mention(group_descs[0], False, PLURALS[shape])}")
        else:
            ones = _and([_mention(d, noun="one") for d in group_descs])
            parts.append(f"{NUMBER_WORDS[len(group)]} {PLURALS[shape]} ({ones})")
    head = f"{NUMBER_WORDS[len(objs)]} shape{'s' if len(objs) > 1 else ''}: "
    return head + _and(parts), descs, []


def _caption_relation(objs, rng):
    """'a large red circle to the left of a small blue square, and a green star in the top right'"""
    if len(objs) == 1:
        d = _desc(objs[0], FULL)
        return f"{_mention(d)}, alone {_where(objs[0]['row'], objs[0]['col'])}", [_desc(objs[0], FULL + ("row", "col"))], []
    a, b, *rest = objs
    rel = _relation(a, b, rng)
    descs = [_desc(a, FULL), _desc(b, FULL)] + [_desc(o, PLACED) for o in rest]
    text = f"{_mention(descs[0])} {REL_TEXT[rel]} {_mention(descs[1])}"
    if rest:
        text += ", and " + _and([_mention(d) for d in descs[2:]])
    return text, descs, [[0, rel, 1]]


def _caption_positions(objs, rng):
    """'a green star in the top left and a red circle in the bottom center'"""
    if len(objs) == 1:
        d = _desc(objs[0], FULL + ("row", "col"))
        return f"{_where(d['row'], d['col'])} there is {_mention(_desc(objs[0], FULL))}", [d], []
    descs = [_desc(o, PLACED) for o in objs]
    prefix = _pick(rng, ["", "a scene with ", "shapes on a grid: "])
    return prefix + _and([_mention(d) for d in descs]), descs, []


def _caption_anchor(objs, rng):
    """'a large red circle with a small blue square below it and a small yellow star to its right'"""
    if len(objs) == 1:
        d = _desc(objs[0], FULL + ("row", "col"))
        return "a single " + _mention(d, article=False), [d], []
    anchor, *others = objs
    descs = [_desc(o, FULL) for o in objs]
    rels = [_relation(o, anchor, rng) for o in others]
    parts = [f"{_mention(d)} {REL_TO_ANCHOR[rel]}" for d, rel in zip(descs[1:], rels)]
    return f"{_mention(descs[0])} with {_and(parts)}", descs, [[i + 1, rel, 0] for i, rel in enumerate(rels)]


CAPTION_TEMPLATES = {"attributes": _caption_attributes, "counts": _caption_counts, "relation": _caption_relation,
                     "positions": _caption_positions, "anchor": _caption_anchor}


def _make_captions(objects: list[dict], rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Five captions, one per template, and the JSON of the facts each asserts.

    Facts: ``n`` objects in the scene, partial ``objects`` descriptions that must match distinct
    scene objects, and ``relations`` ``[i, rel, j]`` between the matched objects ``i`` and ``j``.
    """
    captions, facts = [], []
    for name, template in CAPTION_TEMPLATES.items():
        objs = [objects[i] for i in rng.permutation(len(objects))]  # vary the order of mention
        text, descs, relations = template(objs, rng)
        captions.append(text)
        facts.append(json.dumps({"template": name, "n": len(objects), "objects": descs, "relations": relations}))
    return captions, facts


def caption_holds(facts: dict | str, objects: list[dict]) -> bool:
    """Whether a scene with ``objects`` satisfies a caption's facts (a dict or its stored JSON).

    True when the scene has exactly ``n`` objects and the described objects can be matched to
    distinct scene objects so that every attribute and every relation holds.
    """
    if isinstance(facts, str):
        facts = json.loads(facts)
    if len(objects) != facts["n"]:
        return False
    for chosen in itertools.permutations(objects, len(facts["objects"])):
        if all(all(obj[k] == v for k, v in d.items()) for d, obj in zip(facts["objects"], chosen)) and all(
            _related(chosen[i], rel, chosen[j]) for i, rel, j in facts["relations"]
        ):
            return True
    return False


def relevance_matrix(split: datasets.Dataset) -> "torch.Tensor":
    """``[N_images, N_images * 5]`` bool: caption j (in split order) describes image i. For
    semantic recall, which counts a retrieved image that fits the caption although it is not the
    caption's own."""
    import torch

    objects = split["objects"]
    facts = [json.loads(f) for per_image in split["caption_facts"] for f in per_image]
    return torch.tensor([[caption_holds(f, objs) for f in facts] for objs in objects])


# ----------------------------------------------------------------------------- VQA

SYNONYMS = {"purple": "violet", "square": "box", "cross": "plus", "circle": "round", "yes": "yeah", "no": "nope"}


def _variant(answer: str, rng: np.random.Generator) -> str:
    """One annotator's deviation from the true answer: a spelling, a synonym, or dissent."""
    kind = _pick(rng, ["spelling", "synonym", "dissent"])
    if kind == "spelling":
        return NUMBER_WORDS[int(answer)] if answer.isdigit() else answer.capitalize()
    if kind == "synonym" and answer in SYNONYMS:
        return SYNONYMS[answer]
    # dissent (also for a synonym-less answer): a plausible wrong answer
    if answer.isdigit():
        return str(int(answer) + 1 if answer == "0" or rng.random() < 0.5 else int(answer) - 1)
    for vocabulary in (COLOR_NAMES, SHAPES, ("yes", "no")):
        if answer in vocabulary:
            return _pick(rng, [v for v in vocabulary if v != answer])
    raise AssertionError(f"no vocabulary for answer {answer!r}")


def _annotate(answer: str, rng: np.random.Generator) -> list[str]:
    """Ten human-like answers: 0, 1 or 2 of them deviate (60/30/10%); the rest are ``answer``."""
    answers = [answer] * 10
    for slot in rng.choice(10, size=rng.choice(3, p=[0.6, 0.3, 0.1]), replace=False):
        answers[slot] = _variant(answer, rng)
    return answers


def _make_questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Six (question, type, true answer): colour, two counts, a yes and a no, a relation."""
    def pick() -> dict:
        return objects[rng.integers(len(objects))]

    qa = []

    obj = pick()  # colour: by shape when the shape is unique in the scene, else by grid cell
    unique_shape = sum(o["shape"] == obj["shape"] for o in objects) == 1
    where = f"the {obj['shape']}" if unique_shape and rng.random() < 0.5 else f"the shape {_where(obj['row'], obj['col'])}"
    qa.append((f"what color is {where}?", "color", obj["color"]))

    qa.append(("how many shapes are there?", "count", str(len(objects))))
    if rng.random() < 0.5:  # a filtered count: mostly a present colour/shape, sometimes any (answer 0)
        color = pick()["color"] if rng.random() < 0.7 else _pick(rng, COLOR_NAMES)
        qa.append((f"how many {color} shapes are there?", "count", str(sum(o["color"] == color for o in objects))))
    else:
        shape = pick()["shape"] if rng.random() < 0.7 else _pick(rng, SHAPES)
        qa.append((f"how many {PLURALS[shape]} are there?", "count", str(sum(o["shape"] == shape for o in objects))))

    # Existence, balanced: one yes and one no per scene. Half of the no's are near misses (a
    # present shape in another colour, or a present colour on another shape): they need binding.
    obj = pick()
    qa.append((f"is there {_article(obj['color'] + ' ' + obj['shape'])}?", "exists", "yes"))
    present = {(o["color"], o["shape"]) for o in objects}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = near if near and rng.random() < 0.5 else absent
    color, shape = pool[rng.integers(len(pool))]
    qa.append((f"is there {_article(color + ' ' + shape)}?", "exists", "no"))

    # Relation, asked only when well defined: the reference is the only one of its colour and
    # shape, and exactly one object lies in that direction. Otherwise (e.g. one object): a shape.
    candidates = []
    for ref in objects:
        if sum((o["color"], o["shape"]) == (ref["color"], ref["shape"]) for o in objects) > 1:
            continue
        for rel in RELATIONS:
            hits = [o for o in objects if o is not ref and _related(o, rel, ref)]
            if len(hits) == 1:
                candidates.append((ref, rel, hits[0]))
    if candidates:
        ref, rel, obj = candidates[rng.integers(len(candidates))]
        qa.append((f"what shape is {REL_TEXT[rel]} the {ref['color']} {ref['shape']}?", "relation", obj["shape"]))
    else:
        obj = pick()
        qa.append((f"what shape is {_where(obj['row'], obj['col'])}?", "shape", obj["shape"]))
    return [qa[i] for i in rng.permutation(len(qa))]


_NUMBERS = {word: str(i) for i, word in enumerate(NUMBER_WORDS)} | {"none": "0"}


def normalize_answer(answer: str) -> str:
    """VQAv2-style: lower case, punctuation stripped, number words to digits, articles removed."""
    words = re.sub(r"[^\w\s]", "", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy: mean over the annotators of min(1, matches among the *other* answers / 3).

    So 3 matching answers of 10 score (7 * 1 + 3 * 2/3) / 10 = 0.9, and 4 or more score 1.
    """
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(hits)


def majority_answer(answers: list[str]) -> str:
    """The most common normalised answer (ties: alphabetical), e.g. a training target."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


# ----------------------------------------------------------------------------- dataset


def make_scene(split: str, index: int, seed: int = 0) -> dict:
    """Scene ``index`` of ``split``: image (PIL), objects, captions with facts, questions, answers."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])  # an independent stream per scene
    objects, polygons = _sample_objects(rng)
    image = _render(objects, polygons, rng)
    captions, facts = _make_captions(objects, rng)
    questions = _make_questions(objects, rng)
    return dict(
        image=image, objects=objects, captions=captions, caption_facts=facts,
        questions=[q for q, _, _ in questions], question_types=[t for _, t, _ in questions],
        answers=[_annotate(a, rng) for _, _, a in questions],
    )


def _png(image: Image.Image) -> bytes:
    # compress_level=1: 3x faster than Pillow's default at a third more bytes; generation is the
    # part of the course that people wait for, disk is cheap.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


FEATURES = datasets.Features({
    "image": datasets.Image(),
    "image_id": datasets.Value("int64"),
    "captions": datasets.List(datasets.Value("string")),
    "caption_facts": datasets.List(datasets.Value("string")),
    "objects": datasets.List({
        "shape": datasets.Value("string"), "color": datasets.Value("string"), "size": datasets.Value("string"),
        "row": datasets.Value("int32"), "col": datasets.Value("int32"),
        "bbox": datasets.List(datasets.Value("int32")), "rgb": datasets.List(datasets.Value("int32")),
    }),
    "questions": datasets.List(datasets.Value("string")),
    "question_types": datasets.List(datasets.Value("string")),
    "answers": datasets.List(datasets.List(datasets.Value("string"))),
})


def _check(sizes: dict | None, seed: int) -> dict:
    """Validated split sizes: ``sizes`` overrides ``DEFAULT_SIZES`` split by split."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    unknown = set(sizes or {}) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in sizes; expected keys from {SPLITS}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"size of split {name!r} must be an integer >= 0, got {n!r}")
    if sizes["train"] == 0:
        raise ValueError("the train split needs at least one scene")
    return sizes


def generate_shapes_world(sizes: dict | None = None, seed: int = 0, progress: bool = True) -> datasets.DatasetDict:
    """The train/val/test splits in memory (no cache). ``sizes`` overrides ``DEFAULT_SIZES``.

    ``image_id`` numbers all scenes consecutively, train first, so it is unique across splits.
    """
    sizes = _check(sizes, seed)
    splits, first_id = {}, 0
    with tqdm(total=sum(sizes.values()), desc="shapes world", unit="img", disable=not progress) as bar:
        for name in SPLITS:
            columns = defaultdict(list)
            for index in range(sizes[name]):
                scene = make_scene(name, index, seed)
                scene["image"] = {"bytes": _png(scene["image"]), "path": None}
                scene["image_id"] = first_id + index
                for key, value in scene.items():
                    columns[key].append(value)
                bar.update()
            splits[name] = datasets.Dataset.from_dict({k: columns[k] for k in FEATURES}, features=FEATURES)
            first_id += sizes[name]
    return datasets.DatasetDict(splits)


def load_shapes_world(root: str | None = None, sizes: dict | None = None, seed: int = 0,
                      progress: bool = True) -> datasets.DatasetDict:
    """The shapes world, generated once into ``root/shapes-v{VERSION}-s{seed}-{train}-{val}-{test}``.

    Generation writes to a temporary folder that is renamed into place only when complete (and
    removed on any error or interrupt), so a half-written dataset is never loaded.
    """
    sizes = _check(sizes, seed)
    root = str(root or cache_root())
    path = os.path.join(root, f"shapes-v{DATASET_VERSION}-s{seed}-" + "-".join(str(sizes[s]) for s in SPLITS))
    if not os.path.isdir(path):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=root)
        silence = not progress and datasets.is_progress_bar_enabled()  # datasets' own "Saving" bars
        if silence:
            datasets.disable_progress_bars()
        try:
            generate_shapes_world(sizes, seed, progress).save_to_disk(tmp)
            os.rename(tmp, path)
        except OSError:
            if not os.path.isdir(path):  # not a concurrent generator finishing first: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
            if silence:
                datasets.enable_progress_bars()
    return datasets.load_from_disk(path)


def fingerprint(dataset_dict: datasets.DatasetDict) -> str:
    """sha256 over every split's decoded pixels and all other columns, in order."""
    digest = hashlib.sha256()
    for name in sorted(dataset_dict):
        digest.update(name.encode())
        for example in dataset_dict[name]:
            digest.update(np.asarray(example.pop("image").convert("RGB")).tobytes())  # pixels, not PNG bytes
            digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- evaluation helpers


def _split(dataset_dict: datasets.DatasetDict, name: str) -> datasets.Dataset:
    if name not in dataset_dict or len(dataset_dict[name]) == 0:
        raise ValueError(f"the dataset has no (or an empty) {name!r} split")
    return dataset_dict[name]


def chance_levels(dataset_dict: datasets.DatasetDict) -> dict[str, float]:
    """Chance level of each test metric, in percent.

    Retrieval with N test images of 5 captions each, ranking at random: text->image R@K = K/N;
    image->text R@K = P(one of the image's 5 captions among the first K of 5N).
    VQA: always answering the most frequent training answer of the question's type, scored with
    ``vqa_accuracy``; per type (``vqa_<type>``) and over all questions (``vqa_overall``).
    """
    train, test = _split(dataset_dict, "train"), _split(dataset_dict, "test")
    n, out = len(test), {}
    for k in (1, 5, 10):
        out[f"t2i_R@{k}"] = 100 * min(k, n) / n
        out[f"i2t_R@{k}"] = 100 * (1 - math.comb(5 * n - 5, k) / math.comb(5 * n, k))
    counts = defaultdict(Counter)
    for types, answers in zip(train["question_types"], train["answers"]):
        for qtype, ten in zip(types, answers):
            counts[qtype][majority_answer(ten)] += 1
    prior = {qtype: min(c, key=lambda a: (-c[a], a)) for qtype, c in counts.items()}
    scores = defaultdict(list)
    for types, answers in zip(test["question_types"], test["answers"]):
        for qtype, ten in zip(types, answers):
            scores[qtype].append(vqa_accuracy(prior.get(qtype, ""), ten))  # a type unseen in train: 0
    for qtype in sorted(scores):
        out[f"vqa_{qtype}"] = 100 * float(np.mean(scores[qtype]))
    out["vqa_overall"] = 100 * float(np.mean([s for v in scores.values() for s in v]))
    return out


def caption_ambiguity(split: datasets.Dataset) -> float:
    """Fraction of the split's captions that hold for more than one of its images.

    Such captions cap exact text->image R@1: even a model that reads every caption perfectly can
    only guess among the k images a caption fits (expected 1/k); semantic recall
    (``caption_holds`` on the retrieved image) does not have that ceiling.
    """
    by_count = defaultdict(list)  # only scenes with the caption's object count can match
    for objects in split["objects"]:
        by_count[len(objects)].append(objects)
    ambiguous = total = 0
    for facts_of_image in split["caption_facts"]:
        for facts in map(json.loads, facts_of_image):
            matches = (caption_holds(facts, objects) for objects in by_count[facts["n"]])
            ambiguous += sum(itertools.islice(filter(None, matches), 2)) > 1  # stop at a second match
            total += 1
    return ambiguous / total


def show_examples(dataset: datasets.Dataset, n: int = 6, seed: int = 0):
    """A matplotlib figure of ``n`` random scenes with their captions and two Q/A pairs."""
    import matplotlib.pyplot as plt  # here: plotting is optional and pyplot is slow to import

    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be between 1 and the dataset size {len(dataset)}, got {n}")
    indices = sorted(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False).tolist())
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 7.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices):
        example = dataset[index]
        ax.imshow(example["image"])
        ax.set_title(f"image_id {example['image_id']}", fontsize=10)
        ax.axis("off")
        lines = [textwrap.fill(f"{i + 1}. {c}", 46, subsequent_indent="    ") for i, c in enumerate(example["captions"])]
        lines += [textwrap.fill(f"Q: {q}  A: {majority_answer(a)}", 46, subsequent_indent="    ")
                  for q, a in zip(example["questions"][:2], example["answers"][:2])]
        ax.text(0, -0.03, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=9, family="monospace")
    fig.tight_layout()
    fig.subplots_adjust(hspace=0.6)  # the caption block under each image needs the room
    return fig
