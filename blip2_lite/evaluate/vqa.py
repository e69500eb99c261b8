"""VQA accuracy as VQAv2 scores it: an answer is right to the degree that annotators gave it.

Normalisation and scoring follow the VQAv2 evaluation script (Antol et al., 2015; ``vqaEval.py``):
lower case, punctuation removed, number words to digits, articles dropped; then the mean over the
ten leave-one-annotator-out subsets of min(1, matches / 3).
"""

from __future__ import annotations

import re
from collections import Counter

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
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



def vqa_scores(predictions: list[str], answers: list[list[str]], question_types: list[str]) -> dict[str, float]:
    """VQA accuracy (%) overall (``vqa_overall``) and per question type (``vqa_<type>``), the keys of
    ``lite.shapes_world.chance_levels``."""
    if not len(predictions) == len(answers) == len(question_types):
        raise ValueError("predictions, answers and question_types differ in length")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    out = {"vqa_overall": 100 * sum(scores) / len(scores)}
    for kind in sorted(set(question_types)):
        picked = [s for s, t in zip(scores, question_types) if t == kind]
        out[f"vqa_{kind}"] = 100 * sum(picked) / len(picked)
    return out
