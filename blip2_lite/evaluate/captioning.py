"""Caption scores of the lite world: word overlap with the references, and whether a caption depends
on its image at all (the image gap). The COCO metrics (BLEU, METEOR, ROUGE-L, CIDEr) are in
``coco_caption``."""

from __future__ import annotations

from collections import Counter


def check_captions(predictions, references) -> None:
    """ValueError naming the argument (and index) that is not one prediction and >= 1 references per image."""
    for name, value in (("predictions", predictions), ("references", references)):
        if isinstance(value, str) or not hasattr(value, "__len__"):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    if len(predictions) != len(references):
        raise ValueError(f"predictions has {len(predictions)} captions but references has {len(references)} "
                         "lists: one list of references per prediction")
    if len(predictions) == 0:
        raise ValueError("predictions is empty: nothing to score")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] must be a string, got {type(prediction).__name__}")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"references[{i}] must be a list of strings, got {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every prediction needs at least one reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] must be a string, got {type(ref).__name__}")


def unigram_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 (bag of words with counts) between two lower-cased texts."""
    pred, ref = Counter(prediction.lower().split()), Counter(reference.lower().split())
    overlap = sum((pred & ref).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """A simple token-level score, no Java needed (``coco_caption`` has BLEU/CIDEr): per image the best
    unigram F1 over its references, and the share of captions that equal one of them exactly (in %)."""
    check_captions(predictions, references)
    f1 = [max(unigram_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    exact = [any(p.strip().lower() == r.lower() for r in refs) for p, refs in zip(predictions, references)]
    return {"unigram_f1": 100 * sum(f1) / len(f1), "exact": 100 * sum(exact) / len(exact)}


def caption_image_gap(predictions: list[str], references: list[list[str]]) -> float:
    """How much the captions depend on their images: unigram F1 against each image's own references
    minus unigram F1 against the next image's references (in points). A captioner that ignores the
    image (the same caption for every image, or one drawn independently of it) scores about 0,
    however fluent; a high unigram F1 alone can come from the language prior."""
    if len(references) < 2:
        raise ValueError("need at least two images to compare a caption with another image's references")
    other = references[1:] + references[:1]
    return caption_scores(predictions, references)["unigram_f1"] - caption_scores(predictions, other)["unigram_f1"]
