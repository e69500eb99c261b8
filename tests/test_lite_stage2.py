"""Stage 2 in the lite world end to end on a tiny world: samplers, the training loop's resume
guarantee with a frozen LLM, the pipeline and its caching, and the test-split report."""

import json
from dataclasses import replace

import pytest
import torch

from blip2_lite.families import FAMILIES
from blip2_lite.lite import presets
from blip2_lite.lite.llm import llm_cache_dir, load_lite_llm
from blip2_lite.lite.presets import STAGE1_PRESETS, STAGE2_PRESETS
from blip2_lite.lite.stage1_recipe import build_stage1_model
from blip2_lite.lite.stage2_recipe import (
    build_stage2_model,
    run_stage2,
    stage2_losses,
    stage2_sampler,
)
from blip2_lite.lite.world import load_lite_world
from blip2_lite.llm_inputs import IGNORE_INDEX
from blip2_lite.train import CHECKPOINT, TrainConfig, train

SIZES = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_lite_world(tmp_path_factory.mktemp("cache"), sizes=SIZES, progress=False)


@pytest.fixture(autouse=True)
def quick_llms(monkeypatch):
    """A few pretraining steps: these tests check wiring, the notebook checks learning."""
    for family in sorted(FAMILIES):
        quick = replace(presets.LLM_TRAIN[family], steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
        monkeypatch.setitem(presets.LLM_TRAIN, family, quick)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sampler_labels_the_caption_and_nothing_else(world, tmp_path, family):
    model = build_stage2_model(world, family, root=tmp_path, progress=False)
    captions = world.dataset["train"]["captions"]
    sample = stage2_sampler(world.splits["train"].features, captions, model.tokenizer, model.encoder_decoder, 6)
    batch = sample(torch.Generator().manual_seed(0))
    assert batch["image_features"].shape[0] == 6 and batch["labels"].shape[0] == 6
    all_captions = {c for per_image in captions for c in per_image}
    eos = model.tokenizer.eos_token_id
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        target = labels[labels != IGNORE_INDEX]
        assert target[-1] == eos
        assert model.tokenizer.decode(target[:-1]) in all_captions  # no prompt: the whole caption is the target
        if family == "t5":  # and the encoder reads the soft prompt alone
            assert not (ids != model.tokenizer.pad_token_id).any()
    assert model.prompt_in_decoder == (family == "t5")  # the lite T5 reads its questions in its decoder


def test_stage2_model_does_not_depend_on_the_global_rng(world, tmp_path):
    stage1 = build_stage1_model(world, STAGE1_PRESETS["smoke"])  # given, as run_stage2 does: no reseeding there
    first = build_stage2_model(world, "t5", stage1, root=tmp_path, progress=False)
    torch.rand(1000)  # as if another family's stage 2 had run before in this process
    second = build_stage2_model(world, "t5", stage1, root=tmp_path, progress=False)
    assert torch.equal(first.language_projection.weight, second.language_projection.weight)
    other_seed = build_stage2_model(world, "t5", stage1, root=tmp_path, progress=False, seed=1)
    assert not torch.equal(first.language_projection.weight, other_seed.language_projection.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_interrupted_stage2_resumes_exactly(world, tmp_path, family):
    config = TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2)

    def run(name, stop_after=None):
        model = build_stage2_model(world, family, root=tmp_path, progress=False)
        sample = stage2_sampler(world.splits["train"].features, world.dataset["train"]["captions"], model.tokenizer,
                                model.encoder_decoder, config.batch_size)
        history = train(model, sample, stage2_losses, config, tmp_path / name, progress=False, stop_after=stop_after)
        return model, history

    straight, straight_history = run("straight")
    run("resumed", stop_after=3)
    resumed, resumed_history = run("resumed")
    assert resumed_history.losses == straight_history.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    frozen = build_stage2_model(world, family, root=tmp_path, progress=False).language_model.state_dict()
    assert all(torch.equal(v, straight.language_model.state_dict()[k]) for k, v in frozen.items())  # LLM untouched


def test_run_stage2_trains_reports_and_reuses_its_run(world, tmp_path):
    model, history, metrics = run_stage2("opt", "smoke", root=tmp_path, run_dir=tmp_path / "run", world=world,
                                         progress=False)
    assert history.steps == [1, 2, 3, 4] and history.eval_steps == [2, 4]
    assert {"unigram_f1", "exact", "vqa_overall", "vqa_color", "vqa_count"} <= metrics.keys()
    assert all(0 <= v <= 100 for k, v in metrics.items() if k not in ("examples", "caption_image_gap"))
    assert -100 <= metrics["caption_image_gap"] <= 100
    assert len(metrics["examples"]) == SIZES["test"] and (tmp_path / "run" / CHECKPOINT).exists()
    assert json.loads((tmp_path / "run" / "test_metrics.json").read_text()) == metrics
    again, _, metrics_again = run_stage2("opt", "smoke", root=tmp_path, run_dir=tmp_path / "run", world=world,
                                         progress=False)
    assert metrics_again == metrics
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_presets_llm_seed_picks_its_own_pretrained_llm(world, tmp_path, monkeypatch):
    """Each pretraining seed is its own cached LLM, and stage 2 trains on the one its preset names."""
    monkeypatch.setitem(STAGE2_PRESETS, "smoke-llm1", replace(STAGE2_PRESETS["smoke"], llm_seed=1))
    model, _, _ = run_stage2("opt", "smoke-llm1", root=tmp_path, world=world, progress=False)
    seed1, _ = load_lite_llm("opt", world.dataset, root=tmp_path, progress=False, seed=1)
    seed0, _ = load_lite_llm("opt", world.dataset, root=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "llm").iterdir()) == sorted(
        llm_cache_dir("opt", world.dataset, tmp_path, seed).name for seed in (0, 1))
    weights = lambda m: list(m.state_dict().values())  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(weights(model.language_model), weights(seed1)))
    assert not all(torch.equal(a, b) for a, b in zip(weights(seed0), weights(seed1)))


def test_stage2_presets_and_families_are_checked(world):
    assert STAGE2_PRESETS["course-no-stage1"].skip_stage1  # the Figure 5 ablation
    with pytest.raises(ValueError, match="unknown preset"):
        run_stage2("opt", "huge", world=world)
    with pytest.raises(ValueError, match="unknown LLM family"):
        run_stage2("gpt", "smoke", world=world)
