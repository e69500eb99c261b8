"""The paper's evaluation sets from their published annotation files, as the shapes world's records.

Each loader returns a ``datasets.Dataset`` with the shapes world's columns, so the same evaluation
code serves both: ``image`` (decoded lazily from its file), ``image_id``, ``captions`` (the
references), ``questions``, ``question_ids``, ``question_types`` and ``answers`` (ten per question).
A caption set has no questions and a VQA set no captions.

Formats (as distributed; BLIP-2 evaluates on them, LAVIS ships the Karpathy files):
- COCO and Flickr30k, Karpathy splits (LAVIS's ``coco_karpathy_test.json``, ``flickr30k_test.json``):
  a list of ``{"image": relative path, "caption": [references]}`` (test/val) or one record per
  caption ``{"image", "caption": str, "image_id"}`` (train).
- NoCaps (``nocaps_val_4500_captions.json``): COCO style ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``.
- VQAv2: ``v2_OpenEnded_mscoco_{split}_questions.json`` (``{"questions": [{"question_id",
  "image_id", "question"}]}``) and ``v2_mscoco_{split}_annotations.json`` (``{"annotations":
  [{"question_id", "image_id", "answer_type", "answers": [{"answer"}, ...]}]}``); images are
  ``{image_dir}/COCO_{split}_{image_id:012d}.jpg``.

A bad or partial file raises ``AnnotationError`` naming the file, the record and the field.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import datasets

FEATURES = datasets.Features({
    "image": datasets.Image(),
    "image_id": datasets.Value("string"),
    "captions": datasets.List(datasets.Value("string")),
    "questions": datasets.List(datasets.Value("string")),
    "question_ids": datasets.List(datasets.Value("int64")),
    "question_types": datasets.List(datasets.Value("string")),
    "answers": datasets.List(datasets.List(datasets.Value("string"))),
})


class AnnotationError(ValueError):
    """An annotation file that is not in its benchmark's format."""


def read_annotations(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path} is not valid JSON: {e}") from e


def annotation_field(record, key: str, kind, path: Path, where: str):
    """``record[key]``, checked to be of ``kind``; else an error naming file, record and field."""
    if not isinstance(record, dict) or key not in record:
        raise AnnotationError(f"{path}: {where} has no field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise AnnotationError(f"{path}: {where} field {key!r} must be a non-empty {kind}, got {value!r:.80}")
    return value


def _dataset(rows: list[dict], image_dir: Path, check_images: bool, source: Path) -> datasets.Dataset:
    if not rows:
        raise AnnotationError(f"{source} holds no records")
    if check_images and (missing := [r["image"] for r in rows if not (image_dir / r["image"]).is_file()]):
        raise FileNotFoundError(f"{len(missing)} images of {source} are not under {image_dir}, e.g. {missing[:3]}")
    empty = dict(captions=[], questions=[], question_ids=[], question_types=[], answers=[])
    columns = {name: [({**empty, **row} | {"image": str(image_dir / row["image"])})[name] for row in rows]
               for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def load_karpathy_captions(annotation_file: str | Path, image_dir: str | Path,
                           check_images: bool = True) -> datasets.Dataset:
    """COCO or Flickr30k in the Karpathy split files: one row per image with all its references."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    records = read_annotations(path)
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of records, got {type(records).__name__}")
    by_image: dict[str, list[str]] = defaultdict(list)
    for i, record in enumerate(records):
        image = annotation_field(record, "image", str, path, f"record {i}")
        captions = annotation_field(record, "caption", (str, list), path, f"record {i}")
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise AnnotationError(f"{path}: record {i} field 'caption' must hold non-empty strings")
        by_image[image] += captions
    rows = [{"image": image, "image_id": Path(image).stem, "captions": refs} for image, refs in by_image.items()]
    return _dataset(rows, image_dir, check_images, path)


def load_nocaps(annotation_file: str | Path, image_dir: str | Path, check_images: bool = True) -> datasets.Dataset:
    """NoCaps (COCO-style ``images`` + ``annotations``): one row per image with all its references."""
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = read_annotations(path)
    images = annotation_field(data, "images", list, path, "the file")
    annotations = annotation_field(data, "annotations", list, path, "the file")
    files = {}
    for i, image in enumerate(images):
        files[annotation_field(image, "id", int, path, f"images[{i}]")] = annotation_field(image, "file_name", str, path, f"images[{i}]")
    refs: dict[int, list[str]] = defaultdict(list)
    for i, annotation in enumerate(annotations):
        image_id = annotation_field(annotation, "image_id", int, path, f"annotations[{i}]")
        if image_id not in files:
            raise AnnotationError(f"{path}: annotations[{i}] field 'image_id' {image_id} is not in 'images'")
        refs[image_id].append(annotation_field(annotation, "caption", str, path, f"annotations[{i}]"))
    rows = [{"image": files[i], "image_id": str(i), "captions": refs[i]} for i in files if refs[i]]
    return _dataset(rows, image_dir, check_images, path)


def load_vqav2(questions_file: str | Path, annotations_file: str | Path, image_dir: str | Path,
               split: str = "val2014", check_images: bool = True) -> datasets.Dataset:
    """VQAv2 questions joined with their annotations: one row per image with its questions, their
    answer types and ten answers each."""
    qpath, apath, image_dir = Path(questions_file), Path(annotations_file), Path(image_dir)
    questions = annotation_field(read_annotations(qpath), "questions", list, qpath, "the file")
    annotations = annotation_field(read_annotations(apath), "annotations", list, apath, "the file")
    by_question = {}
    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        answers = annotation_field(annotation, "answers", list, apath, where)
        texts = [annotation_field(a, "answer", str, apath, f"{where}.answers[{j}]") for j, a in enumerate(answers)]
        by_question[annotation_field(annotation, "question_id", int, apath, where)] = (
            annotation_field(annotation, "answer_type", str, apath, where), texts)
    rows: dict[int, dict] = {}
    for i, question in enumerate(questions):
        where = f"questions[{i}]"
        question_id = annotation_field(question, "question_id", int, qpath, where)
        image_id = annotation_field(question, "image_id", int, qpath, where)
        if question_id not in by_question:
            raise AnnotationError(f"{apath}: no annotation for question_id {question_id} ({qpath}, {where})")
        answer_type, answers = by_question[question_id]
        row = rows.setdefault(image_id, {"image": f"COCO_{split}_{image_id:012d}.jpg", "image_id": str(image_id),
                                         "questions": [], "question_ids": [], "question_types": [], "answers": []})
        row["questions"].append(annotation_field(question, "question", str, qpath, where))
        row["question_ids"].append(question_id)
        row["question_types"].append(answer_type)
        row["answers"].append(answers)
    return _dataset(list(rows.values()), image_dir, check_images, qpath)
