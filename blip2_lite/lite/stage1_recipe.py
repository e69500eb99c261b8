"""Stage 1 in the lite world: batches, losses, the MiniLM-initialised model and ``run_stage1``,
the one function the notebook and the command line call (train, then test retrieval)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import write_json
from ..convert.bert import qformer_from_bert
from ..evaluate.retrieval import retrieval
from ..stage1 import Blip2Stage1
from ..train import train
from .paths import cache_root
from .presets import STAGE1_PRESETS, Stage1Preset, config_digest
from .shapes_world import relevance_matrix
from .world import CaptionedImages, LiteWorld, load_lite_world


def stage1_sampler(data: CaptionedImages, batch_size: int):
    """Batches of distinct images, each with one of its captions drawn at random."""
    n, c, _ = data.input_ids.shape
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training images")

    def sample(rng: torch.Generator) -> dict:
        images = torch.randperm(n, generator=rng)[:batch_size]
        captions = torch.randint(c, (batch_size,), generator=rng)
        mask = data.attention_mask[images, captions]
        length = int(mask.sum(dim=1).max())  # drop columns that are padding in every row: less compute
        return {
            "image_features": data.features[images].float(),
            "input_ids": data.input_ids[images, captions, :length],
            "attention_mask": mask[:, :length],
        }

    return sample


def stage1_losses(model, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    """The stage-1 losses of a batch of cached ``image_features`` or ``images`` (full-scale runs also
    give ``image_ids``)."""
    out = model(batch["input_ids"], batch["attention_mask"], images=batch.get("images"),
                image_features=batch.get("image_features"), image_ids=batch.get("image_ids"), generator=rng)
    return {"loss": out.loss, "itc": out.loss_itc, "itm": out.loss_itm, "itg": out.loss_itg}


def world_vocabulary(split: CaptionedImages) -> torch.Tensor:
    """The token ids that ITG must predict in a split's captions (everything after [CLS])."""
    return split.input_ids[..., 1:][split.attention_mask[..., 1:].bool()].unique()


def build_stage1_model(world: LiteWorld, preset: Stage1Preset, seed: int = 0):
    """Blip2Stage1 over the lite encoder's features, its Q-Former initialised from MiniLM and built
    as ``preset`` says (queries, dropout, ITG vocabulary, ITM pairs, ITG)."""
    torch.manual_seed(seed)
    width = world.splits["train"].features.shape[-1]
    qformer, tokenizer = qformer_from_bert(num_query_tokens=preset.num_query_tokens, encoder_width=width,
                                           dropout=preset.dropout)
    itg_vocab = world_vocabulary(world.splits["train"]) if preset.world_itg_vocab else None
    return Blip2Stage1(qformer.config, dec_token_id=tokenizer.bos_token_id, qformer=qformer, itg_vocab=itg_vocab,
                       itm_pairs=preset.itm_pairs, itg=preset.itg)


# Bump when a stage-1 run's result changes for the same preset (2: the image keys/values computed
# once per step, the vision LayerNorm folded in: the same function, other bf16 rounding)
STAGE1_RUN_VERSION = 2


def stage1_identity(preset: str, world: LiteWorld) -> str:
    """The cache name of a stage-1 run: its preset, the shape of the frozen tokens it trains on (a
    run trained on other tokens, another encoder layout, is never resumed) and ``STAGE1_RUN_VERSION``."""
    tokens = tuple(world.splits["train"].features.shape[1:])
    return f"{preset}-{config_digest((STAGE1_PRESETS[preset], tokens, STAGE1_RUN_VERSION))}"


# Bump when the test evaluation of the same trained run changes (2: ITC embeddings under bf16
# autocast): the cached metrics of a run carry it in their file name, so older ones are not reused.
STAGE1_EVAL_VERSION = 2


def retrieval_on(model, split: CaptionedImages, **kwargs) -> dict[str, float]:
    ids, mask, text_image = split.flat_texts()
    return retrieval(model, split.features, ids, mask, text_image, **kwargs)


def run_stage1(preset: str = "course", root: str | None = None, run_dir: str | None = None,
               world: LiteWorld | None = None, progress: bool = True, device: str | torch.device = "cpu",
               rerank_k: int | None = None):
    """Train stage 1 with a preset (resuming/reusing ``run_dir``) on ``device``, then evaluate retrieval
    on the test split, with and without ITM re-ranking of the top ``rerank_k`` (default: the preset's;
    each k's metrics are cached beside the checkpoint). Returns ``(model, history, test_metrics)``."""
    if preset not in STAGE1_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(STAGE1_PRESETS)}")
    if rerank_k is not None and (isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or rerank_k < 1):
        raise ValueError(f"rerank_k must be a positive number of candidates, got {rerank_k!r}")
    chosen = STAGE1_PRESETS[preset]
    top_k = chosen.rerank_k if rerank_k is None else rerank_k
    root = Path(root or cache_root())
    world = world or load_lite_world(root, progress=progress)
    run_dir = Path(run_dir or root / "runs" / f"stage1-{stage1_identity(preset, world)}")
    model = build_stage1_model(world, chosen, seed=chosen.train.seed)
    val = world.splits["val"]
    history = train(
        model, stage1_sampler(world.splits["train"], chosen.train.batch_size), stage1_losses, chosen.train, run_dir,
        evaluate=lambda m: {k: v for k, v in retrieval_on(m, val).items() if k.endswith("_r1")}, progress=progress,
        device=device,
    )
    depth = "" if top_k == chosen.rerank_k else f"_k{top_k}"
    metrics_path = run_dir / f"test_metrics_v{STAGE1_EVAL_VERSION}{depth}.json"
    if metrics_path.exists():
        test_metrics = json.loads(metrics_path.read_text())
    else:
        model.eval()
        relevant = relevance_matrix(world.dataset["test"])
        test_metrics = retrieval_on(model, world.splits["test"], relevant=relevant, rerank_k=top_k,
                                    progress=progress)
        write_json(metrics_path, test_metrics)  # atomic: a half-written file would be reused as a cache
    return model.eval(), history, test_metrics
