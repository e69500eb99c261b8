"""Loaders of the paper's evaluation sets, on small fixture files in their published formats."""

import json
from pathlib import Path

import pytest
from PIL import Image

from blip2_lite.eval_sets import AnnotationError, load_karpathy_captions, load_nocaps, load_vqav2
from blip2_lite.evaluate.vqa import vqa_scores

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"


def draw(image_dir: Path, names) -> Path:
    for name in names:
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "gray").save(image_dir / name, format="PNG")  # the name says .jpg: PIL reads content
    return image_dir


def test_karpathy_coco_and_flickr_give_one_row_per_image_with_its_references(tmp_path):
    for name in ("coco_karpathy_test.json", "flickr30k_test.json"):
        records = json.loads((FIXTURES / name).read_text())
        images = draw(tmp_path / name, [r["image"] for r in records])
        split = load_karpathy_captions(FIXTURES / name, images)
        assert len(split) == len(records) and split["captions"] == [r["caption"] for r in records]
        assert split[0]["image"].size == (8, 8) and split["questions"] == [[], []]
    train = load_karpathy_captions(FIXTURES / "coco_karpathy_train.json", tmp_path / "coco_karpathy_test.json")
    assert len(train) == 1 and len(train[0]["captions"]) == 2  # one record per caption, grouped by image


def test_nocaps_groups_annotations_by_image(tmp_path):
    data = json.loads((FIXTURES / "nocaps_val.json").read_text())
    split = load_nocaps(FIXTURES / "nocaps_val.json", draw(tmp_path, [i["file_name"] for i in data["images"]]))
    assert split["image_id"] == ["0", "1"] and [len(c) for c in split["captions"]] == [2, 1]


def test_vqav2_joins_questions_and_annotations_and_scores(tmp_path):
    images = draw(tmp_path, ["COCO_val2014_000000262148.jpg", "COCO_val2014_000000393225.jpg"])
    split = load_vqav2(FIXTURES / "vqav2_val2014_questions.json", FIXTURES / "vqav2_val2014_annotations.json", images)
    assert split["question_ids"] == [[262148000, 262148001], [393225000]]
    assert split["question_types"] == [["other", "other"], ["yes/no"]]
    assert all(len(ten) == 10 for per_image in split["answers"] for ten in per_image)
    flat = [ten for per_image in split["answers"] for ten in per_image]
    types = [t for per_image in split["question_types"] for t in per_image]
    scores = vqa_scores(["down", "watching", "no"], flat, types)
    assert scores["vqa_overall"] == pytest.approx(100.0)  # 7, 9 and 9 of ten annotators agree


def test_bad_files_name_the_file_the_record_and_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": ["ok"]}, {"image": "b.jpg"}]))
    with pytest.raises(AnnotationError, match=r"bad.json: record 1 has no field 'caption'"):
        load_karpathy_captions(bad, tmp_path, check_images=False)
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json is not valid JSON"):
        load_karpathy_captions(bad, tmp_path)
    nocaps = json.loads((FIXTURES / "nocaps_val.json").read_text())
    nocaps["annotations"][1]["image_id"] = 7
    bad.write_text(json.dumps(nocaps))
    with pytest.raises(AnnotationError, match=r"annotations\[1\] field 'image_id' 7"):
        load_nocaps(bad, tmp_path, check_images=False)
    annotations = json.loads((FIXTURES / "vqav2_val2014_annotations.json").read_text())
    del annotations["annotations"][2]["answers"][3]["answer"]
    bad.write_text(json.dumps(annotations))
    with pytest.raises(AnnotationError, match=r"annotations\[2\]\.answers\[3\] has no field 'answer'"):
        load_vqav2(FIXTURES / "vqav2_val2014_questions.json", bad, tmp_path, check_images=False)
    with pytest.raises(FileNotFoundError, match="2 images of .*coco_karpathy_test.json"):
        load_karpathy_captions(FIXTURES / "coco_karpathy_test.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_karpathy_captions(tmp_path / "missing.json", tmp_path)
