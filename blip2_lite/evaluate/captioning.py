"""Caption scores of the lite world: word overlap with the references, and whether a caption depends
on its image at all (the image gap). The COCO metrics (BLEU, METEOR, ROUGE-L, CIDEr) are in
``coco_caption``."""

from __future__ import annotations

from collections import Counter


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
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one prediction per image and at least one image, got {len(predictions)} predictions "
                         f"for {len(references)} images")
    for i, (p, refs) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise TypeError(f"predictions[{i}] must be a string, got {type(p).__name__}")
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a non-empty list of strings")
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
