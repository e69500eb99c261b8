"""Every preset of the lite world, as data in one place: stage 1, stage 2 and the lite LLMs.

A preset names a budget: ``course`` fits the course's time on a 2-core CPU, ``long`` is for better
numbers when there is time, ``smoke`` checks the pipeline in seconds. The README reports what each
reaches and how long it takes. Runs are cached under a hash of their preset (``config_digest``;
stage 1 adds the frozen tokens' shape), so editing a preset trains afresh instead of reusing a stale
run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from ..train import TrainConfig


def config_digest(preset) -> str:
    """A short hash of a preset (or any repr-able key), naming the cache of what it produces."""
    return hashlib.sha256(repr(preset).encode()).hexdigest()[:8]


def with_seed(presets: dict, name: str, seed: int, **changes) -> str:
    """The name of ``presets[name]`` with ``train.seed = seed`` and ``changes``: the preset itself if
    nothing changes, else a copy registered as ``<name>-seed<s>`` (so each seed has its own run cache)."""
    preset = presets[name]
    if preset.train.seed == seed and not changes:
        return name
    derived = f"{name}-seed{seed}"
    presets[derived] = replace(preset, train=replace(preset.train, seed=seed), **changes)
    return derived


# ---------------------------------------------------------------------------------------------------
# Stage 1: the Q-Former on frozen EfficientNet-Lite0 features (ITC + ITM + ITG)


@dataclass(frozen=True)
class Stage1Preset:
    """A stage-1 run. The last three fields trade the paper's recipe for speed on a CPU; their
    defaults keep the paper's (see ``Blip2Stage1`` and the README for what each saves)."""

    train: TrainConfig
    num_query_tokens: int = 16  # the paper uses 32; scenes of at most 3 objects need fewer
    rerank_k: int = 10  # ITM re-ranks each query's top k ITC candidates at test time
    dropout: float | None = None  # Q-Former dropout; None keeps BERT's 0.1, as the paper does
    world_itg_vocab: bool = False  # ITG predicts among the world's caption words only
    itm_pairs: int | None = None  # ITM scores this many of the batch's pairs (None: all)
    itg: bool = True  # train with ITG; False is the paper's ablation of it (Table 6)


STAGE1_PRESETS = {
    # The course: two minutes of training on 2 cores (200 steps: the course's time goes to the OPT
    # that must learn to copy, README). 8 queries suffice for scenes of at most 3 objects and cost a
    # third less than 16. Three deviations from the paper's recipe make a step 2.9x cheaper
    # (2.07 -> 0.72 s at batch 32 on 2 cores, README): no dropout (the run sees each scene about
    # twice: nothing to regularise yet, and dropout's random masks cost 14% of a step), ITG over the
    # world's caption words instead of BERT's 30,523, and ITM on 8 of the 32 pairs per batch
    # (negatives still drawn from all 32).
    # Validation (ITC retrieval over the 300 val images, 5 s on 2 cores) and checkpoints every 100 steps.
    "course": Stage1Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                       eval_every=100, checkpoint_every=100), num_query_tokens=8, rerank_k=5,
                           dropout=0.0, world_itg_vocab=True, itm_pairs=8),
    # The course's steps with the paper's recipe (BERT's dropout, the whole vocabulary, ITM on every
    # pair): the reference for what the course's deviations change, at 2.9x the time.
    "paper": Stage1Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                      eval_every=100, checkpoint_every=100), num_query_tokens=8, rerank_k=5),
    "long": Stage1Preset(TrainConfig(steps=2000, batch_size=48, lr=3e-4, min_lr=3e-5, warmup_steps=100,
                                     eval_every=250, checkpoint_every=100), num_query_tokens=16, rerank_k=16,
                         dropout=0.0, world_itg_vocab=True, itm_pairs=16),
    "smoke": Stage1Preset(TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=2,
                                      checkpoint_every=2), num_query_tokens=4, rerank_k=2,
                          dropout=0.0, world_itg_vocab=True, itm_pairs=4),
}


# The paper's Table 6 ablation in miniature (``python -m blip2_lite reproduce``): each run without ITG.
for _run in ("course", "long", "smoke"):
    STAGE1_PRESETS[f"{_run}-no-itg"] = replace(STAGE1_PRESETS[_run], itg=False)


# ---------------------------------------------------------------------------------------------------
# Stage 2: soft visual prompts for the lite world's frozen OPT and T5


@dataclass(frozen=True)
class Stage2Preset:
    train: TrainConfig
    stage1: str = "course"  # the stage-1 preset whose Q-Former stage 2 starts from
    skip_stage1: bool = False  # start instead from an untrained (MiniLM-initialised) Q-Former built like it
    val_vqa_images: int = 0  # validation also scores zero-shot VQA on this many val images' questions
    llm_seed: int = 0  # the frozen LLM's pretraining seed: each seed is its own cached LLM


STAGE2_PRESETS = {
    # Validation every 50 steps includes zero-shot VQA on 100 val images: Figure 5's curve.
    "course": Stage2Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                       eval_every=50, checkpoint_every=100), val_vqa_images=100),
    "long": Stage2Preset(TrainConfig(steps=2000, batch_size=48, lr=3e-4, min_lr=3e-5, warmup_steps=100,
                                     eval_every=250, checkpoint_every=100), stage1="long", val_vqa_images=300),
    "smoke": Stage2Preset(TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=2,
                                      checkpoint_every=2), stage1="smoke", val_vqa_images=4),
}

# The paper's Figure 5 ablation: each run's training from a Q-Former that skipped stage 1.
for _run in ("course", "long", "smoke"):
    STAGE2_PRESETS[f"{_run}-no-stage1"] = replace(STAGE2_PRESETS[_run], skip_stage1=True)


# ---------------------------------------------------------------------------------------------------
# The lite LLMs, pretrained on the training split's text only (``lite.llm``)

# FlanT5's layout for T5 (gated-GELU feed-forward, untied LM head). The T5 has 2 + 2 layers: 3 + 3
# cost 40% more per step and read the context no better within the time budget.
LLM_SIZES = {
    "opt": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024),
    "t5": dict(d_model=256, d_kv=64, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2),
}
# By the end of these budgets the held-out perplexity has nearly flattened (README, stage 2). OPT
# learns to copy from the captions before a caption late and suddenly: at 2e-3 only three of five
# runs had learned it after 1200 steps, at 1e-3 all three tried (README, stage 2). T5, which reads
# its question from the decoder, answered 56.1% of the test questions from a caption after 180
# steps and 60.9% after 270; after stage 2, from the image, 54.0% and 60.5% (README, stage 2).
LLM_TRAIN = {
    "opt": TrainConfig(steps=1200, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=20, eval_every=400,
                       checkpoint_every=1200),
    "t5": TrainConfig(steps=270, batch_size=64, lr=2e-3, min_lr=2e-4, warmup_steps=15, eval_every=90,
                      checkpoint_every=270),
}
LLM_VOCAB_SIZE = 512  # byte-level BPE over the world's text
LLM_DROPOUT = 0.0  # pretraining sees each text about once: nothing to regularise, and dropout slows learning
OPT_SEQ_LEN = 128  # OPT's learned positions: the soft prompt plus the text must fit
# transformers' plain attention (softmax of a product) rather than PyTorch's fused kernel ("sdpa",
# transformers' default): on 2 CPU cores in bf16 a pretraining step took 0.18 s instead of 0.23 (OPT)
# and 0.21 instead of 0.24 (T5), with the same logits to 1e-5 (README; tests/test_lite_llm.py)
LLM_ATTENTION = "eager"
