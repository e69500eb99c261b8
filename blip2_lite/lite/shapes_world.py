"""The shapes world: a synthetic image-caption-VQA dataset, generated offline and deterministically.

Per scene (``scenes``): a 224 px image, five captions with the facts they assert (``captions``) and
six VQAv2-style questions with ten answers each (``questions``). Splits are Hugging Face ``datasets``
cached under ``cache_root()``. Scene ``i`` of split ``s`` comes from its own random stream, seeded
by ``(seed, s, i)``: splits never share a scene's seed, and growing a split keeps its existing scenes.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import textwrap
from collections import Counter, defaultdict

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..evaluate.vqa import majority_answer, vqa_accuracy
from .captions import caption_holds, make_captions
from .paths import cache_root
from .questions import annotate, make_questions
from .scenes import render, sample_objects

DATASET_VERSION = 1  # bump on any change to the generator: feature caches are keyed by it
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 3000, "val": 300, "test": 500}


def make_scene(split: str, index: int, seed: int = 0) -> dict:
    """Scene ``index`` of ``split``: image (PIL), objects, captions with facts, questions, answers."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])  # an independent stream per scene
    objects, polygons = sample_objects(rng)
    image = render(objects, polygons, rng)
    captions, facts = make_captions(objects, rng)
    questions = make_questions(objects, rng)
    return dict(
        image=image, objects=objects, captions=captions, caption_facts=facts,
        questions=[q for q, _, _ in questions], question_types=[t for _, t, _ in questions],
        answers=[annotate(a, rng) for _, _, a in questions],
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
        silence = not progress and datasets.is_progress_bar_enabled()  # datasets' own "Saving" bars
        if silence:
            datasets.disable_progress_bars()
        try:
            with atomic_path(path, directory=True) as tmp:
                generate_shapes_world(sizes, seed, progress).save_to_disk(str(tmp))
        finally:
            if silence:
                datasets.enable_progress_bars()
    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError) as e:  # the folder is only ever renamed into place complete
        raise OSError(f"the cached shapes world {path} cannot be read ({e}): delete it to regenerate it") from e


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
        out[f"t2i_r{k}"] = 100 * min(k, n) / n
        out[f"i2t_r{k}"] = 100 * (1 - math.comb(5 * n - 5, k) / math.comb(5 * n, k))
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


def relevance_matrix(split: datasets.Dataset) -> torch.Tensor:
    """``[N_images, N_images * 5]`` bool: caption j (in split order) describes image i. For
    semantic recall, which counts a retrieved image that fits the caption although it is not the
    caption's own."""
    objects = list(split["objects"])  # a list: indexing datasets' column decodes a row each time
    facts = [json.loads(f) for per_image in split["caption_facts"] for f in per_image]
    by_count = defaultdict(list)  # only scenes with the caption's object count can match
    for i, objs in enumerate(objects):
        by_count[len(objs)].append(i)
    hits = [(i, j) for j, f in enumerate(facts) for i in by_count[f["n"]] if caption_holds(f, objects[i])]
    relevant = torch.zeros(len(objects), len(facts), dtype=torch.bool)
    relevant[[i for i, _ in hits], [j for _, j in hits]] = True
    return relevant


def caption_ambiguity(relevant: torch.Tensor) -> float:
    """Fraction of a split's captions that hold for more than one of its images.

    ``relevant`` is the split's ``relevance_matrix`` ([image, caption]). Such captions cap exact
    text->image R@1: even a model that reads every caption perfectly can only guess among the k
    images a caption fits (expected 1/k); semantic recall (``caption_holds`` on the retrieved
    image) does not have that ceiling.
    """
    if not isinstance(relevant, torch.Tensor):  # e.g. a split, which this function took before
        raise TypeError(f"expected relevance_matrix(split), a boolean tensor, got {type(relevant).__name__}")
    if relevant.dim() != 2 or relevant.dtype != torch.bool:
        shape = tuple(relevant.shape)
        raise ValueError(f"expected a boolean [image, caption] relevance matrix, got {relevant.dtype} {shape}")
    fitting = relevant.sum(dim=0)  # images per caption
    return int((fitting > 1).sum()) / len(fitting)


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
