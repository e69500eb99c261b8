"""``python -m blip2_lite train stage1|stage2``: one training run at full scale, on one process or many.

    torchrun --nproc_per_node 8 -m blip2_lite train stage1 --config stage1_vitg \\
        --annotations coco_karpathy_train.json --images coco/ --run-dir runs/stage1 --device cuda

Every process builds the model, reads its share of the data (``data.DistributedBatches``) and
trains under DistributedDataParallel (``train.train``); rank 0 writes the checkpoints into the run
folder, with a copy of the config. Running the same command again resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..distributed import barrier, close_distributed, init_distributed, is_main, main_first
from ..families import family_of
from ..lite.stage1_recipe import stage1_losses
from ..lite.stage2_recipe import stage2_losses
from ..train import History, train
from .config import load_config, resolve_config
from .data import (DistributedBatches, ImageTextDataset, caption_samples, distinct_images, stage1_collate,
                   stage2_collate, train_transform, vqa_samples)
from .feature_cache import FeatureCache, build_feature_cache
from .models import image_encoder, stage1_model, stage1_weights, stage2_model

RUN_CONFIG = "config.toml"


def _claim_run_dir(run_dir: Path, config_file: Path) -> None:
    """Rank 0 keeps the config beside the checkpoints; a run folder of another config is refused."""
    text, kept = config_file.read_text(), run_dir / RUN_CONFIG
    if kept.is_file() and kept.read_text() != text:
        raise ValueError(f"{run_dir} holds a run of another config ({kept}): pass another --run-dir, or delete it")
    barrier()  # every rank has read it before rank 0 writes it
    if is_main():
        with atomic_path(kept) as tmp:
            tmp.write_text(text)


def build(stage: int, config):
    """(model, tokenizer, pixel mean, pixel std) for ``stage``, on the host."""
    m = config.model
    encoder, mean, std = image_encoder(m)
    if stage == 1:
        model, tokenizer = stage1_model(m, encoder)
        return model, tokenizer, mean, std
    if m.stage1_run:
        stage1_config = load_config(Path(m.stage1_run) / RUN_CONFIG)
        stage1, _ = stage1_model(stage1_config.model, encoder)
        stage1.load_state_dict(stage1_weights(m.stage1_run))
    else:
        stage1, _ = stage1_model(m, encoder)
    model = stage2_model(m, stage1)
    return model, model.tokenizer, mean, std


def train_run(stage: int, config: str | Path, run_dir: str | Path, annotations: str | Path | None = None,
              images: str | Path | None = None, questions: str | Path | None = None, device: str = "cpu",
              stop_after: int | None = None, progress: bool = True) -> History:
    """Train stage ``stage`` as the config file says, on COCO-format ``annotations`` (+ ``images``) or,
    for a stage-2 VQA config, VQAv2 ``questions`` + ``annotations``. Returns the run's history."""
    config_file = resolve_config(config)
    config = load_config(config_file)
    if config.stage != stage:
        raise ValueError(f"{config_file} configures stage {config.stage}, not stage {stage}")
    vqa = stage == 2 and config.model.task == "vqa"
    if annotations is None or images is None or vqa != (questions is not None):
        need = "--questions, --annotations (answers) and --images (VQAv2)" if vqa else \
            "--annotations and --images (a COCO-format caption file and its image folder)"
        raise ValueError(f"stage {stage} with {config_file.name} trains on {need}")
    device = init_distributed(device)
    try:
        run_dir = Path(run_dir)
        _claim_run_dir(run_dir, config_file)
        torch.manual_seed(config.train.seed)  # the new parts' initialisation (DDP then copies rank 0's)
        with main_first():  # rank 0 fills the caches (hub downloads, tokenizers) the others then read
            model, tokenizer, mean, std = build(stage, config)
        encoder_decoder = stage == 2 and family_of(model.language_model).encoder_decoder
        if vqa:
            samples = vqa_samples(questions, annotations, images, family_of(model.language_model).vqa_prompt,
                                  config.data.vqa_split)
        else:
            samples = caption_samples(annotations, images)
        features = None
        if config.data.feature_cache:
            m = config.model
            identity = dict(image_encoder=m.image_encoder, weights=m.image_encoder_weights, image_size=m.image_size,
                            feature_layer=m.feature_layer, dtype=m.frozen_dtype)
            features = FeatureCache(build_feature_cache(config.data.feature_cache, distinct_images(samples),
                                                        model.image_encoder, identity, device=device))
        dataset = ImageTextDataset(samples, train_transform(config.model.image_size, mean, std, config.data.min_scale),
                                   seed=config.train.seed, prefix_lm=encoder_decoder and not vqa, features=features)
        collate = stage1_collate(tokenizer, config.model.max_text_length) if stage == 1 else \
            stage2_collate(tokenizer, encoder_decoder)
        batches = DistributedBatches(dataset, config.train.batch_size, collate, config.data.num_workers,
                                     pin_memory=device.type == "cuda")
        return train(model, batches, stage1_losses if stage == 1 else stage2_losses, config.train, run_dir,
                     progress=progress, stop_after=stop_after, device=device)
    finally:
        close_distributed()
