"""Full-scale training data: COCO-format and VQAv2 samples, the paper's augmentation made
deterministic per sample, and how a batch is shared out among processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_lite.eval_sets import AnnotationError
from blip2_lite.pretrain import data as pretrain_data
from blip2_lite.pretrain.config import load_config
from blip2_lite.pretrain.data import (DistributedBatches, ImageTextDataset, Sample, caption_samples, stage1_collate,
                                      train_transform, vqa_samples)

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"


def images(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 40 + k, 3), dtype=np.uint8)).save(folder / name)


def test_captions_from_lavis_records_and_from_coco_files(tmp_path):
    records = json.loads((FIXTURES / "coco_karpathy_train.json").read_text())
    images(tmp_path, sorted({r["image"] for r in records}))
    samples = caption_samples(FIXTURES / "coco_karpathy_train.json", tmp_path)
    assert [s.target for s in samples] == [r["caption"] for r in records]
    assert len({s.image_id for s in samples}) == len({r["image"] for r in records})

    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 9, "file_name": "b.png"}],
            "annotations": [{"image_id": 9, "caption": "two"}, {"image_id": 7, "caption": "one"},
                            {"image_id": 9, "caption": "three"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    images(tmp_path, ["a.png", "b.png"])
    samples = caption_samples(tmp_path / "coco.json", tmp_path)
    assert [(Path(s.image).name, s.target) for s in samples] == [("b.png", "two"), ("a.png", "one"), ("b.png", "three")]
    assert samples[0].image_id == samples[2].image_id != samples[1].image_id


def test_bad_caption_files_are_named(tmp_path):
    cases = {
        "notes.json": ({"captions": []}, AnnotationError, "expected a list"),
        "nocaption.json": ([{"image": "a.png"}], AnnotationError, "record 0 has no field 'caption'"),
        "missing.json": ([{"image": "nowhere.png", "caption": "x"}], FileNotFoundError, "1 of the 1 images"),
        "empty.json": ([], AnnotationError, "holds no captions"),
    }
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(error, match=message):
            caption_samples(tmp_path / name, tmp_path)


def test_vqa_samples_take_the_most_frequent_answer(tmp_path):
    questions = json.loads((FIXTURES / "vqav2_val2014_questions.json").read_text())["questions"]
    annotations = json.loads((FIXTURES / "vqav2_val2014_annotations.json").read_text())["annotations"]
    images(tmp_path, sorted({f"COCO_val2014_{q['image_id']:012d}.jpg" for q in questions}))
    samples = vqa_samples(FIXTURES / "vqav2_val2014_questions.json", FIXTURES / "vqav2_val2014_annotations.json",
                          tmp_path, "Question: {} Answer:", split="val2014")
    assert len(samples) == len(questions)
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    for sample, question in zip(samples, questions):
        assert sample.prompt == f"Question: {question['question']} Answer:"
        counts = answers[question["question_id"]]
        assert counts.count(sample.target) == max(counts.count(a) for a in counts)


def tiny_dataset(tmp_path, n=12, prefix_lm=False):
    images(tmp_path, [f"{k}.png" for k in range(n)])
    samples = [Sample(str(tmp_path / f"{k}.png"), "", f"caption number {k} of a picture", k) for k in range(n)]
    return ImageTextDataset(samples, train_transform(32, (0.5,) * 3, (0.25,) * 3), seed=3, prefix_lm=prefix_lm)


def test_augmentation_is_random_per_epoch_but_the_same_on_every_call(tmp_path):
    dataset = tiny_dataset(tmp_path, prefix_lm=True)
    a, again, next_epoch = dataset[(0, 5)], dataset[(0, 5)], dataset[(1, 5)]
    assert a["pixels"].shape == (3, 32, 32)
    assert torch.equal(a["pixels"], again["pixels"]) and a["prompt"] == again["prompt"]
    assert not torch.equal(a["pixels"], next_epoch["pixels"])
    assert a["prompt"] + " " + a["target"] == "caption number 5 of a picture" or a["prompt"] == ""
    state = torch.get_rng_state()
    dataset[(2, 1)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG (dropout) is left alone


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_micro_batches_together_are_one_process_batch(tmp_path, monkeypatch, world):
    dataset = tiny_dataset(tmp_path, n=24)
    collate = lambda items: [item["image_id"] for item in items]  # noqa: E731
    monkeypatch.setattr(pretrain_data, "distributed_world", lambda: (0, 1))
    whole = DistributedBatches(dataset, 2 * world, collate).iterate(0)
    single = [next(whole) for _ in range(7)]  # crosses an epoch (24 // 2w batches each)
    shares = []
    for rank in range(world):
        monkeypatch.setattr(pretrain_data, "distributed_world", lambda rank=rank: (rank, world))
        stream = DistributedBatches(dataset, 2, collate)
        shares.append([next(stream.iterate(0)) for _ in range(1)] + [b for _, b in zip(range(6), stream.iterate(1))])
    for k, batch in enumerate(single):
        assert sorted(batch) == sorted(i for share in shares for i in share[k])
    resumed = DistributedBatches(dataset, 2, collate).iterate(5)  # the last rank, from micro-batch 5
    assert next(resumed) == shares[-1][5]


def test_packaged_configs_are_the_papers_runs():
    stage1, opt, t5 = (load_config(n) for n in ("stage1_vitg", "stage2_opt2.7b", "stage2_flant5xl"))
    for config, steps, batch, min_lr in ((stage1, 250_000, 1680, 1e-5), (opt, 80_000, 1920, 5e-5),
                                         (t5, 80_000, 1520, 5e-5)):
        t = config.train
        assert (t.steps, t.batch_size * 16, t.lr, t.min_lr, t.warmup_steps) == (steps, batch, 1e-4, min_lr, 2000)
        assert (t.betas, t.weight_decay, config.model.image_size, config.data.min_scale) == ((0.9, 0.98), 0.05, 224, 0.5)
    assert stage1.model.num_query_tokens == 32 and stage1.model.losses == ("itc", "itm", "itg")
    assert (opt.model.llm_dtype, t5.model.llm_dtype) == ("float16", "bfloat16")


def test_bad_configs_are_named(tmp_path):
    cases = {
        "stage = 3\n[train]\nsteps = 1\nbatch_size = 1": "'stage' must be 1 or 2",
        "stage = 1\n[train]\nsteps = 1\nbatch_size = 1\nlearning_rate = 1": r"\[train\]: unknown keys \['learning_rate'\]",
        "stage = 1\n[model]\nlosses = ['itm']\n[train]\nsteps = 1\nbatch_size = 1": "must include 'itc'",
        "stage = 2\n[train]\nsteps = 1\nbatch_size = 1": "stage 2 needs \\[model\\] llm",
        "stage = 1\n[train]\nsteps = 1": "batch_size",
        "stage = 1 [": "not valid TOML",
    }
    for k, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{k}.toml").write_text(text)
        with pytest.raises(ValueError, match=message):
            load_config(tmp_path / f"{k}.toml")
    with pytest.raises(FileNotFoundError, match="stage1_vitg"):
        load_config("stage1_vitg_typo")


def test_the_train_command_ends_bad_input_in_one_line(tmp_path, capsys):
    from blip2_lite.__main__ import main

    (tmp_path / "stage2.toml").write_text('stage = 2\n[model]\nllm = "x"\n[train]\nsteps = 1\nbatch_size = 1')
    common = ["--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path), "--run-dir", str(tmp_path / "r")]
    for config, message in (("nope", "no config file 'nope'"), (str(tmp_path / "stage2.toml"), "configures stage 2")):
        with pytest.raises(SystemExit) as stop:
            main(["train", "stage1", "--config", config, *common])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
