"""Zero-shot task runners: records in the benchmarks' results formats, batching that changes nothing,
images or cached features alike, the evaluation sets' own ids, and scoring that finds every record."""

import json
from dataclasses import replace

import pytest
import torch

from blip2_lite.eval_sets import load_vqav2
from blip2_lite.evaluate.tasks import (
    caption_task,
    question_ids,
    score_captions,
    score_answers,
    vqa_decoding,
    vqa_task,
    write_results,
)
from blip2_lite.families import FAMILIES
from blip2_lite.lite import presets
from blip2_lite.lite.stage2_recipe import build_stage2_model
from blip2_lite.lite.world import load_lite_world
from test_eval_sets import FIXTURES, draw

SIZES = {"train": 24, "val": 8, "test": 8}
QUICK = dict(num_beams=2, max_new_tokens=4, min_new_tokens=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_lite_world(tmp_path_factory.mktemp("cache"), sizes=SIZES, progress=False)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, world, tmp_path_factory):
    quick = {f: replace(presets.LLM_TRAIN[f], steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
             for f in FAMILIES}
    with pytest.MonkeyPatch.context() as patch:
        for family, config in quick.items():
            patch.setitem(presets.LLM_TRAIN, family, config)
        model = build_stage2_model(world, request.param, root=tmp_path_factory.mktemp("llm"), progress=False)
    return model.eval()


def test_captions_are_coco_results_and_batching_changes_nothing(world, model, tmp_path):
    test, features = world.dataset["test"], world.splits["test"].features
    results = caption_task(model, test, features, prompt="", batch_size=3, progress=False, **QUICK)
    assert [r["image_id"] for r in results] == test["image_id"]
    alone = [model.generate(image_features=features[i:i + 1].float(), prompts="", **QUICK)[0] for i in range(len(test))]
    assert [r["caption"] for r in results] == alone
    path = write_results(tmp_path / "captions.json", results)
    assert json.loads(path.read_text()) == results


def test_answers_follow_the_family_prompt_and_decoding(world, model):
    test, features = world.dataset["test"], world.splits["test"].features
    results = vqa_task(model, test, features, batch_size=5, progress=False, **QUICK)
    questions = [q for per_image in test["questions"] for q in per_image]
    assert [r["question_id"] for r in results] == list(range(len(questions)))  # the shapes world has no ids
    image_of = [i for i, per_image in enumerate(test["questions"]) for _ in per_image]
    alone = [model.generate(image_features=features[i:i + 1].float(), prompts=model.family.vqa_prompt.format(q),
                            **vqa_decoding(model.family) | QUICK)[0] for i, q in zip(image_of, questions)]
    assert [r["answer"] for r in results] == alone  # in batches (the lite T5's in order of prompt length) or alone
    scores = score_answers(results, test)
    assert 0 <= scores["vqa_overall"] <= 100 and {"vqa_color", "vqa_shape"} <= set(scores)
    perfect = [{"question_id": r["question_id"], "answer": ten[0]}
               for r, ten in zip(results, (a for per_image in test["answers"] for a in per_image))]
    assert score_answers(perfect, test)["vqa_overall"] > 90  # the first annotator agrees with most others


def test_runners_read_images_and_the_sets_own_ids(world, model, tmp_path):
    images = draw(tmp_path, ["COCO_val2014_000000262148.jpg", "COCO_val2014_000000393225.jpg"])
    vqav2 = load_vqav2(FIXTURES / "vqav2_val2014_questions.json", FIXTURES / "vqav2_val2014_annotations.json", images)
    model.image_encoder = world.encoder  # encode the images instead of reading cached features
    try:
        results = vqa_task(model, vqav2, progress=False, **QUICK)
    finally:
        model.image_encoder = None
    assert [r["question_id"] for r in results] == [262148000, 262148001, 393225000] == question_ids(vqav2)
    assert all(isinstance(r["answer"], str) for r in results)


def test_bad_input_is_named(world, model):
    test, features = world.dataset["test"], world.splits["test"].features
    with pytest.raises(ValueError, match="one row per dataset row"):
        caption_task(model, test, features[:3], progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        vqa_task(model, test, features, prompt="Question: Answer:", progress=False)
    with pytest.raises(ValueError, match="no \\['questions'\\] column"):
        vqa_task(model, test.remove_columns("questions"), features, progress=False)
    with pytest.raises(ValueError, match="not in the dataset"):
        score_answers([{"question_id": 10**6, "answer": "red"}], test)


def test_lavis_decoding_per_family():
    assert vqa_decoding(FAMILIES["t5"])["length_penalty"] == -1.0
    assert vqa_decoding(FAMILIES["opt"])["length_penalty"] == 0.0
    assert vqa_decoding(FAMILIES["opt"])["num_beams"] == 5 and vqa_decoding(FAMILIES["opt"])["max_new_tokens"] == 10


def test_missing_references_are_named(world):
    with pytest.raises(ValueError, match="no references"):
        score_captions([{"image_id": -1, "caption": "a red circle"}], world.dataset["test"])

