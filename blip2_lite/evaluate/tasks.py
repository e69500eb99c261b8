"""Zero-shot task runners: captioning and VQA over any evaluation set, in the benchmarks' results formats.

A runner takes a ``stage2.Blip2`` and a ``datasets.Dataset`` with the shapes world's columns (the
shapes world's splits, or COCO, Flickr30k, NoCaps and VQAv2 through ``blip2_lite.eval_sets``), decodes
with the paper's settings and returns the records that the benchmarks' servers and scripts read:

* captions, COCO's results format: ``[{"image_id": ..., "caption": ...}]``;
* answers, VQAv2's results format: ``[{"question_id": ..., "answer": ...}]``.

``write_results`` saves either as JSON; ``score_captions`` / ``score_answers`` score them against
the set's references with the COCO caption metrics and VQA accuracy.

Decoding follows LAVIS's BLIP-2 configs (``caption_coco_*.yaml``, ``*_vqav2_zeroshot*.yaml``):
captions with the prompt "a photo of", beam 5, at most 30 and at least 8 new tokens; answers with
the family's prompt (section 4.2 of the paper), beam 5, at most 10 and at least 1 new token, length
penalty -1 for FlanT5 (short answers) and 0 for OPT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_json
from ..prompts import PROMPTS
from .coco_caption import SCORERS, coco_caption_scores
from .vqa import vqa_scores

CAPTION_DECODING = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)


def vqa_decoding(family) -> dict:
    """LAVIS's zero-shot VQA decoding for an LLM family (``families.LLMFamily``)."""
    return dict(num_beams=5, max_new_tokens=10, min_new_tokens=1,
                length_penalty=-1.0 if family.encoder_decoder else 0.0)


def _check_dataset(dataset, column: str, features) -> None:
    missing = {column, "image_id"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset has no {sorted(missing)} column(s); it has {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    if features is None and "image" not in dataset.column_names:
        raise ValueError("the dataset has no 'image' column: pass its cached image features as `features`")
    if features is not None and len(features) != len(dataset):
        raise ValueError(f"{len(features)} feature rows for {len(dataset)} images: pass one row per dataset row")


def generate_for_rows(model, dataset, rows: list[int], prompts: list[str], features, batch_size: int, progress: bool,
                      desc: str, decoding: dict) -> list[str]:
    """``model.generate`` for (image row, prompt) pairs, a batch at a time, from cached features or
    from ``dataset``'s images (decoded per batch); a batch's prompts about one image share its soft prompt."""
    order = list(range(len(rows)))
    if getattr(model, "prompt_in_decoder", False):  # prompts of one length share a generate call
        lengths = [len(ids) for ids in model.tokenizer(prompts, add_special_tokens=False).input_ids]
        order.sort(key=lengths.__getitem__)
    out = [""] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc=desc, mininterval=2.0):
        batch = order[start:start + batch_size]
        images, image_index = torch.as_tensor([rows[i] for i in batch]).unique(return_inverse=True)
        if features is not None:
            given = dict(image_features=features[images].float())
        else:
            given = dict(images=dataset.select(images.tolist())["image"])
        texts = model.generate(prompts=[prompts[i] for i in batch], image_index=image_index, **given, **decoding)
        for i, text in zip(batch, texts):
            out[i] = text
    return out


def caption_task(model, dataset, features: torch.Tensor | None = None, prompt: str = PROMPTS["caption"],
                 batch_size: int = 64, progress: bool = True, **decoding) -> list[dict]:
    """Zero-shot captions of every image, as ``[{"image_id", "caption"}]``.

    ``features``: the frozen encoder's cached output, one row per dataset row (else the images are
    encoded). ``prompt``: the paper's by default; a model trained without one (the lite world's)
    takes ``""``. ``decoding`` overrides ``CAPTION_DECODING``.
    """
    _check_dataset(dataset, "image_id", features)
    rows = list(range(len(dataset)))
    captions = generate_for_rows(model, dataset, rows, [prompt] * len(rows), features, batch_size, progress, "captions",
                         CAPTION_DECODING | decoding)
    return [{"image_id": image_id, "caption": caption} for image_id, caption in zip(dataset["image_id"], captions)]


def question_ids(dataset) -> list:
    """Every question's id in dataset order: the set's own (VQAv2) or, where it has none (the shapes
    world), its position among all the set's questions."""
    if "question_ids" in dataset.column_names:
        return [q for per_image in dataset["question_ids"] for q in per_image]
    return list(range(sum(len(per_image) for per_image in dataset["questions"])))


def vqa_task(model, dataset, features: torch.Tensor | None = None, prompt: str | None = None, batch_size: int = 64,
             progress: bool = True, **decoding) -> list[dict]:
    """Zero-shot answers to every question, as ``[{"question_id", "answer"}]``.

    ``prompt``: a template with one ``{}`` for the question; the model family's (the paper's) by
    default. ``decoding`` overrides ``vqa_decoding(model.family)``.
    """
    _check_dataset(dataset, "questions", features)
    template = model.family.vqa_prompt if prompt is None else prompt
    if template.count("{}") != 1:
        raise ValueError(f"the VQA prompt needs exactly one '{{}}' for the question, got {template!r}")
    per_image = dataset["questions"]
    rows = [i for i, questions in enumerate(per_image) for _ in questions]
    prompts = [template.format(q) for questions in per_image for q in questions]
    if not prompts:
        raise ValueError("the dataset has no questions")
    answers = generate_for_rows(model, dataset, rows, prompts, features, batch_size, progress, "answers",
                        vqa_decoding(model.family) | decoding)
    return [{"question_id": q, "answer": a} for q, a in zip(question_ids(dataset), answers)]


def write_results(path: str | Path, results: list[dict]) -> Path:
    """Save runner records as the JSON list the benchmarks expect (atomically)."""
    path = Path(path)
    write_json(path, results)
    return path


def score_captions(results: list[dict], dataset, metrics=SCORERS) -> dict[str, float]:
    """COCO caption metrics of ``caption_task`` records against the set's references, one call for the
    whole set (CIDEr-D's document frequencies come from it)."""
    references = dict(zip(dataset["image_id"], dataset["captions"]))
    missing = [r["image_id"] for r in results if not references.get(r["image_id"])]
    if missing:
        raise ValueError(f"{len(missing)} captioned images have no references in the dataset, e.g. {missing[:3]}")
    return coco_caption_scores([r["caption"] for r in results], [references[r["image_id"]] for r in results], metrics)


def score_answers(results: list[dict], dataset, protocol: str = "symmetric") -> dict[str, float]:
    """VQA accuracy of ``vqa_task`` records against the set's ten answers, overall and per type."""
    ids = question_ids(dataset)
    answers = dict(zip(ids, (a for per_image in dataset["answers"] for a in per_image)))
    kinds = dict(zip(ids, (t for per_image in dataset["question_types"] for t in per_image)))
    missing = [r["question_id"] for r in results if r["question_id"] not in answers]
    if missing:
        raise ValueError(f"{len(missing)} answered questions are not in the dataset, e.g. {missing[:3]}")
    return vqa_scores([r["answer"] for r in results], [answers[r["question_id"]] for r in results],
                      [kinds[r["question_id"]] for r in results], protocol)
