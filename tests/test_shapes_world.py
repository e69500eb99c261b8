import json
import math
import os

import matplotlib
import pytest

from blip2_lite.evaluate.vqa import majority_answer, vqa_accuracy
from blip2_lite.lite import shapes_world
from blip2_lite.lite.captions import caption_holds
from blip2_lite.lite.scenes import IMAGE_SIZE, QUESTION_TYPES
from blip2_lite.lite.shapes_world import (
    caption_ambiguity,
    chance_levels,
    fingerprint,
    load_shapes_world,
    make_scene,
    relevance_matrix,
    show_examples,
)

SMALL = {"train": 20, "val": 5, "test": 5}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_shapes_world(tmp_path_factory.mktemp("a"), SMALL, progress=False)


def test_regeneration_is_identical_and_seed_matters(world, tmp_path):
    again = load_shapes_world(tmp_path / "b", SMALL, progress=False)
    assert fingerprint(again) == fingerprint(world)
    assert fingerprint(load_shapes_world(tmp_path / "c", SMALL, seed=1, progress=False)) != fingerprint(world)


def test_splits_and_ids(world):
    assert {name: len(split) for name, split in world.items()} == SMALL
    ids = [i for split in world.values() for i in split["image_id"]]
    assert len(set(ids)) == len(ids)
    # independent streams: no scene repeats across splits
    scenes = [json.dumps(o) for split in world.values() for o in split["objects"]]
    assert len(set(scenes)) == len(scenes)
    assert world["train"][0]["image"].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_every_caption_holds_for_its_own_image(world):
    for split in world.values():
        for captions, facts, objects in zip(split["captions"], split["caption_facts"], split["objects"]):
            assert len(captions) == len(facts) == 5
            assert all(caption_holds(f, objects) for f in facts), captions


def test_caption_holds_checks_binding_and_relations():
    objects = [dict(shape="circle", color="red", size="large", row=0, col=0),
               dict(shape="square", color="blue", size="small", row=0, col=2)]
    facts = {"n": 2, "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
             "relations": [[0, "left_of", 1]]}
    assert caption_holds(facts, objects) and caption_holds(json.dumps(facts), objects)
    swapped = [dict(objects[0], color="blue"), dict(objects[1], color="red")]  # same colours, other binding
    assert not caption_holds(facts, swapped)
    assert not caption_holds({**facts, "relations": [[0, "right_of", 1]]}, objects)
    assert not caption_holds({**facts, "n": 3}, objects)


def test_objects_inside_the_image_and_apart(world):
    for split in world.values():
        for objects in split["objects"]:
            assert 1 <= len(objects) <= 3
            assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
            for o in objects:
                x0, y0, x1, y1 = o["bbox"]
                assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
                cell = IMAGE_SIZE / 3  # inside its own grid cell, hence disjoint from the others
                assert o["col"] * cell <= x0 and x1 <= (o["col"] + 1) * cell + 1
                assert o["row"] * cell <= y0 and y1 <= (o["row"] + 1) * cell + 1


def test_questions(world):
    for example in world["train"]:
        assert len(example["questions"]) == len(example["question_types"]) == len(example["answers"]) == 6
        assert set(example["question_types"]) <= set(QUESTION_TYPES)
        assert all(len(a) == 10 for a in example["answers"])
        truth = {q: majority_answer(a) for q, a in zip(example["questions"], example["answers"])}
        assert truth["how many shapes are there?"] == str(len(example["objects"]))
        exists = [majority_answer(a) for t, a in zip(example["question_types"], example["answers"]) if t == "exists"]
        assert sorted(exists) == ["no", "yes"]  # balanced per scene
        for answers in example["answers"]:  # at most two annotators deviate: the truth scores 1
            assert vqa_accuracy(majority_answer(answers), answers) == 1.0


def test_vqa_accuracy_by_hand():
    def answers(k):
        return ["2"] * k + ["3"] * (10 - k)

    assert vqa_accuracy("2", answers(10)) == 1.0
    assert vqa_accuracy("2", answers(4)) == 1.0
    assert vqa_accuracy("2", answers(3)) == pytest.approx(0.9)  # (7 * 1 + 3 * 2/3) / 10
    assert vqa_accuracy("2", answers(2)) == pytest.approx(0.6)
    assert vqa_accuracy("2", answers(1)) == pytest.approx(0.3)
    assert vqa_accuracy("2", answers(0)) == 0.0
    assert vqa_accuracy("Two.", answers(10)) == 1.0  # normalised: case, punctuation, number words
    assert vqa_accuracy("the circle", ["a circle"] * 10) == 1.0


def test_cache_is_loaded_not_regenerated(tmp_path, monkeypatch):
    first = load_shapes_world(tmp_path, SMALL, progress=False)
    monkeypatch.setattr(shapes_world, "make_scene", lambda *a, **k: pytest.fail("regenerated"))
    assert fingerprint(load_shapes_world(tmp_path, SMALL, progress=False)) == fingerprint(first)
    assert os.listdir(tmp_path) == [f"shapes-v{shapes_world.DATASET_VERSION}-s0-20-5-5"]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return make_scene(*args, **kwargs)

    monkeypatch.setattr(shapes_world, "make_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_shapes_world(tmp_path, SMALL, progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert len(load_shapes_world(tmp_path, SMALL, progress=False)["train"]) == SMALL["train"]


def test_bad_arguments(tmp_path):
    for sizes in ({"train": 0}, {"val": -1}, {"train": 2.5}, {"dev": 3}):
        with pytest.raises(ValueError):
            load_shapes_world(tmp_path, sizes, progress=False)
    for seed in (-1, 1.5):
        with pytest.raises(ValueError, match="seed"):
            load_shapes_world(tmp_path, seed=seed, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        make_scene("dev", 0)
    assert os.listdir(tmp_path) == []


def test_chance_levels(world):
    chance = chance_levels(world)
    assert chance["t2i_r1"] == pytest.approx(100 / 5) and chance["i2t_r1"] == pytest.approx(100 / 5)
    assert chance["t2i_r5"] == 100  # K >= N
    assert chance["i2t_r5"] == pytest.approx(100 * (1 - math.comb(20, 5) / math.comb(25, 5)))  # 5 of 25 captions
    assert 0 < chance["vqa_overall"] < 100
    with pytest.raises(ValueError):
        chance_levels({"train": world["train"]})


def test_caption_ambiguity(world):
    from datasets import concatenate_datasets

    assert 0 <= caption_ambiguity(relevance_matrix(world["test"])) <= 1
    twice = concatenate_datasets([world["val"], world["val"]])
    assert caption_ambiguity(relevance_matrix(twice)) == 1.0  # every scene twice
    with pytest.raises(ValueError, match="relevance matrix"):
        caption_ambiguity(relevance_matrix(twice).float())
    with pytest.raises(TypeError, match="relevance_matrix"):
        caption_ambiguity(twice)


def test_relevance_matrix_is_every_pair_checked(world):
    split = world["train"]
    facts = [f for per_image in split["caption_facts"] for f in per_image]
    brute = [[caption_holds(f, objects) for f in facts] for objects in split["objects"]]
    relevant = relevance_matrix(split)
    assert relevant.tolist() == brute
    assert all(relevant[j // 5, j] for j in range(len(facts)))  # every caption fits its own scene
    fitting = [sum(column) for column in zip(*brute)]
    assert caption_ambiguity(relevant) == sum(n > 1 for n in fitting) / len(fitting)


def test_show_examples(world):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = show_examples(world["train"], n=4)
    assert sum(ax.has_data() for ax in fig.axes) == 4
    plt.close(fig)
