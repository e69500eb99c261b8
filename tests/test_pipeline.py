"""The stage-1 pipeline end to end on a tiny world (smoke preset), and its caching."""

import dataclasses
import json

import pytest
import torch

from blip2_lite.__main__ import main
from blip2_lite.lite.stage1_recipe import STAGE1_EVAL_VERSION, run_stage1, stage1_identity
from blip2_lite.lite.world import CaptionedImages, load_lite_world
from blip2_lite.train import CHECKPOINT

SIZES = {"train": 24, "val": 8, "test": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return load_lite_world(tmp_path_factory.mktemp("cache"), sizes=SIZES, progress=False)


def test_lite_world_has_cached_features_and_tokens(world):
    train = world.splits["train"]
    assert train.features.shape == (24, 49, 1456) and train.input_ids.shape[:2] == (24, 5)
    assert world.tokenizer.convert_ids_to_tokens(int(train.input_ids[0, 0, 0])) == "[CLS]"


def test_run_stage1_trains_evaluates_and_reuses_its_run(world, tmp_path):
    model, history, metrics = run_stage1("smoke", root=tmp_path, run_dir=tmp_path / "run", world=world, progress=False)
    assert history.steps == [1, 2, 3, 4] and history.eval_steps == [2, 4]
    assert {"i2t_r1", "t2i_r5", "i2t_semantic_r1", "itm_i2t_r1", "itm_t2i_semantic_r1"} <= metrics.keys()
    assert all(0 <= v <= 100 for v in metrics.values())
    assert (tmp_path / "run" / CHECKPOINT).exists()
    assert json.loads((tmp_path / "run" / f"test_metrics_v{STAGE1_EVAL_VERSION}.json").read_text()) == metrics
    again, _, metrics_again = run_stage1("smoke", root=tmp_path, run_dir=tmp_path / "run", world=world, progress=False)
    assert metrics_again == metrics
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Another re-ranking depth reuses the trained run and caches its metrics beside the preset's.
    assert "itm_t2i_r5" not in metrics  # the smoke preset re-ranks 2 of the 8 test images: R@5 is undefined
    _, history_k, metrics_k = run_stage1("smoke", root=tmp_path, run_dir=tmp_path / "run", world=world,
                                         progress=False, rerank_k=5)
    assert history_k.steps == history.steps and {k: metrics_k[k] for k in ("i2t_r1", "t2i_r1")} == {
        k: metrics[k] for k in ("i2t_r1", "t2i_r1")}  # the same model: ITC unchanged
    assert "itm_t2i_r5" in metrics_k
    assert json.loads((tmp_path / "run" / f"test_metrics_v{STAGE1_EVAL_VERSION}_k5.json").read_text()) == metrics_k


def test_a_run_on_other_tokens_is_never_resumed(world):
    train = world.splits["train"]
    final_map_only = CaptionedImages(train.features[..., -1280:], train.input_ids, train.attention_mask)
    other = dataclasses.replace(world, splits={**world.splits, "train": final_map_only})
    assert stage1_identity("smoke", other) != stage1_identity("smoke", world) == stage1_identity("smoke", world)


def test_unknown_preset_is_refused(world):
    with pytest.raises(ValueError, match="unknown preset"):
        run_stage1("huge", world=world)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rerank_k must be a positive number"):
            run_stage1("smoke", world=world, rerank_k=bad)
    with pytest.raises(SystemExit):
        main(["stage1", "--preset", "huge"])


def test_the_no_itg_ablation_trains_without_itg(world, tmp_path):
    from blip2_lite.lite.presets import STAGE1_PRESETS
    from blip2_lite.lite.stage1_recipe import build_stage1_model, stage1_losses, stage1_sampler
    from blip2_lite.train import train

    preset = STAGE1_PRESETS["smoke-no-itg"]
    model = build_stage1_model(world, preset)
    head = model.lm_head.dense.weight.detach().clone()
    history = train(model, stage1_sampler(world.splits["train"], 8), stage1_losses, preset.train, tmp_path,
                    progress=False)
    assert set(history.losses["itg"]) == {0.0} and min(history.losses["itc"]) > 0
    assert torch.equal(model.lm_head.dense.weight, head)  # ITG's head gets no gradient (and no weight decay)
