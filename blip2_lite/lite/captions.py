"""Captions of a scene, each stored with the facts it asserts, and the check of those facts.

* Every caption names every object by colour *and* shape, and adds one more kind of fact (sizes,
  grid cells, or relations between objects). Telling scenes apart therefore needs attribute
  binding (which colour goes with which shape), yet a caption rarely fits a second image, so the
  ambiguity cap on exact retrieval recall stays high (see ``shapes_world.caption_ambiguity``). A
  lone object is always given with its size and grid cell, since otherwise many scenes would share
  its caption.
* Each caption is stored with the facts it asserts (``caption_facts``, JSON); ``caption_holds``
  checks them against any scene, so evaluation can report a *semantic* recall (the retrieved
  image satisfies the caption) next to the exact one.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np

from .scenes import COLS, NUMBER_WORDS, PLURALS, RELATIONS, ROWS, choose, related


def where_text(row: int, col: int) -> str:
    return "in the center" if (row, col) == (1, 1) else f"in the {ROWS[row]} {COLS[col]}"


def with_article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _desc(obj: dict, keys: tuple[str, ...]) -> dict:
    return {k: obj[k] for k in keys}


def _mention(desc: dict, article: bool = True, noun: str | None = None) -> str:
    """'a large red circle in the top left' from whichever attributes ``desc`` holds."""
    words = " ".join([desc[k] for k in ("size", "color") if k in desc] + [noun or desc["shape"]])
    text = with_article(words) if article else words
    return text + " " + where_text(desc["row"], desc["col"]) if "row" in desc else text


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    """A relation that holds from ``a`` to ``b`` (two objects in different cells have one)."""
    options = [rel for rel in RELATIONS if related(a, rel, b)]
    return options[rng.integers(len(options))]


REL_TEXT = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
REL_TO_ANCHOR = {"left_of": "to its left", "right_of": "to its right", "above": "above it", "below": "below it"}
FULL = ("size", "color", "shape")
PLACED = ("color", "shape", "row", "col")


def _caption_attributes(objs, rng):
    """'a large red circle and a small blue square'"""
    descs = [_desc(o, FULL + (("row", "col") if len(objs) == 1 else ())) for o in objs]
    prefix = choose(rng, ["", "a picture of ", "an image with ", "a drawing of "])
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
        return f"{_mention(d)}, alone {where_text(objs[0]['row'], objs[0]['col'])}", [_desc(objs[0], FULL + ("row", "col"))], []
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
        return f"{where_text(d['row'], d['col'])} there is {_mention(_desc(objs[0], FULL))}", [d], []
    descs = [_desc(o, PLACED) for o in objs]
    prefix = choose(rng, ["", "a scene with ", "shapes on a grid: "])
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


def make_captions(objects: list[dict], rng: np.random.Generator) -> tuple[list[str], list[str]]:
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
            related(chosen[i], rel, chosen[j]) for i, rel, j in facts["relations"]
        ):
            return True
    return False

