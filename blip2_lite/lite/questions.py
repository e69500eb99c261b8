"""VQAv2-style questions about a scene, each with ten annotators' answers.

The answers mimic VQAv2's ten annotators: at most two of the ten deviate, by spelling ("two" for
"2", "Red"), by a synonym the metric does not merge ("violet", "box", "yeah"), or by dissent (a
plausible wrong answer). The true answer keeps >= 8 votes and so scores 1.0 under VQA accuracy.
"""

from __future__ import annotations

import numpy as np

from .captions import REL_TEXT, where_text, with_article
from .scenes import (
    COLOR_NAMES,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    choose,
    related,
)

SYNONYMS = {"purple": "violet", "square": "box", "cross": "plus", "circle": "round", "yes": "yeah", "no": "nope"}


def _variant(answer: str, rng: np.random.Generator) -> str:
    """One annotator's deviation from the true answer: a spelling, a synonym, or dissent."""
    kind = choose(rng, ["spelling", "synonym", "dissent"])
    if kind == "spelling":
        return NUMBER_WORDS[int(answer)] if answer.isdigit() else answer.capitalize()
    if kind == "synonym" and answer in SYNONYMS:
        return SYNONYMS[answer]
    # dissent (also for a synonym-less answer): a plausible wrong answer
    if answer.isdigit():
        return str(int(answer) + 1 if answer == "0" or rng.random() < 0.5 else int(answer) - 1)
    for vocabulary in (COLOR_NAMES, SHAPES, ("yes", "no")):
        if answer in vocabulary:
            return choose(rng, [v for v in vocabulary if v != answer])
    raise AssertionError(f"no vocabulary for answer {answer!r}")


def annotate(answer: str, rng: np.random.Generator) -> list[str]:
    """Ten human-like answers: 0, 1 or 2 of them deviate (60/30/10%); the rest are ``answer``."""
    answers = [answer] * 10
    for slot in rng.choice(10, size=rng.choice(3, p=[0.6, 0.3, 0.1]), replace=False):
        answers[slot] = _variant(answer, rng)
    return answers


def make_questions(objects: list[dict], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Six (question, type, true answer): colour, two counts, a yes and a no, a relation."""
    def pick() -> dict:
        return objects[rng.integers(len(objects))]

    qa = []

    obj = pick()  # colour: by shape when the shape is unique in the scene, else by grid cell
    unique_shape = sum(o["shape"] == obj["shape"] for o in objects) == 1
    where = f"the {obj['shape']}" if unique_shape and rng.random() < 0.5 else f"the shape {where_text(obj['row'], obj['col'])}"
    qa.append((f"what color is {where}?", "color", obj["color"]))

    qa.append(("how many shapes are there?", "count", str(len(objects))))
    if rng.random() < 0.5:  # a filtered count: mostly a present colour/shape, sometimes any (answer 0)
        color = pick()["color"] if rng.random() < 0.7 else choose(rng, COLOR_NAMES)
        qa.append((f"how many {color} shapes are there?", "count", str(sum(o["color"] == color for o in objects))))
    else:
        shape = pick()["shape"] if rng.random() < 0.7 else choose(rng, SHAPES)
        qa.append((f"how many {PLURALS[shape]} are there?", "count", str(sum(o["shape"] == shape for o in objects))))

    # Existence, balanced: one yes and one no per scene. Half of the no's are near misses (a
    # present shape in another colour, or a present colour on another shape): they need binding.
    obj = pick()
    qa.append((f"is there {with_article(obj['color'] + ' ' + obj['shape'])}?", "exists", "yes"))
    present = {(o["color"], o["shape"]) for o in objects}
    absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = near if near and rng.random() < 0.5 else absent
    color, shape = pool[rng.integers(len(pool))]
    qa.append((f"is there {with_article(color + ' ' + shape)}?", "exists", "no"))

    # Relation, asked only when well defined: the reference is the only one of its colour and
    # shape, and exactly one object lies in that direction. Otherwise (e.g. one object): a shape.
    candidates = []
    for ref in objects:
        if sum((o["color"], o["shape"]) == (ref["color"], ref["shape"]) for o in objects) > 1:
            continue
        for rel in RELATIONS:
            hits = [o for o in objects if o is not ref and related(o, rel, ref)]
            if len(hits) == 1:
                candidates.append((ref, rel, hits[0]))
    if candidates:
        ref, rel, obj = candidates[rng.integers(len(candidates))]
        qa.append((f"what shape is {REL_TEXT[rel]} the {ref['color']} {ref['shape']}?", "relation", obj["shape"]))
    else:
        obj = pick()
        qa.append((f"what shape is {where_text(obj['row'], obj['col'])}?", "shape", obj["shape"]))
    return [qa[i] for i in rng.permutation(len(qa))]

