"""The training loop shared by both stages: AdamW, warm-up + cosine schedule, bf16 autocast,
periodic validation, and checkpoints that make an interrupted run resumable *exactly*.

A checkpoint holds the model, optimizer and scheduler states, the step, the history, and every
random-number state the loop consumes (torch's global RNG for dropout, the batch sampler's and the
loss's own generators). A run that is killed and resumed therefore ends with bit-identical
weights to one that never stopped (tests/test_train.py). Checkpoints are written to a temporary
file and renamed over the old one, so a kill during the write leaves the previous one intact.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .paths import cache_root

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # the cosine decays to this
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eval_every: int = 0  # 0: validate only at the end
    checkpoint_every: int = 50
    seed: int = 0
    bf16: bool = True  # autocast on CPU: the backward pass is ~1.8x faster (REFERENCE.md)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps], got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must lie in [0, lr], got {self.min_lr}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)  # name -> value per step
    eval_steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # name -> value per validation

    def log(self, store: dict[str, list[float]], values: dict[str, float]):
        for name, value in values.items():
            store.setdefault(name, []).append(value)


class NonFiniteLossError(FloatingPointError):
    pass


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to ``min_lr`` (as a factor of ``lr``)."""
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; as in BERT/BLIP-2, biases, LayerNorms and the temperature get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or name.endswith("query_tokens") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS at once.

    A training step allocates and frees tensors of tens of MB (ITG logits over BERT's 30k words,
    ITM's 3B pairs); by default glibc maps each afresh and the kernel zeroes its pages every time:
    measured here, 250k page faults and a quarter of the wall time in the kernel per stage-1 step.
    With these thresholds a stage-1 step runs ~1.2x faster; the price is that the process keeps its
    peak memory. Returns False where there is no glibc (macOS, Windows, musl), which changes nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(mallopt(option, ctypes.c_int(value)) == 1
               for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 30), (m_top_pad, 1 << 28)))


def save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half


def train(
    model: torch.nn.Module,
    sample_batch: Callable[[torch.Generator], dict],
    compute_losses: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]],
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> History:
    """Train ``model`` for ``config.steps`` steps, resuming from ``run_dir`` if it holds a checkpoint.

    Args:
        sample_batch: draws one batch using the given generator (the loop owns its state).
        compute_losses: returns a dict of losses whose ``"loss"`` entry is optimised; it may use the
            given generator (e.g. ITM's negative sampling).
        evaluate: validation metrics, called every ``config.eval_every`` steps and at the end.
        stop_after: stop (with a checkpoint) after this many steps in total, as if interrupted.
    Returns the full history, including steps done before a resume.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    torch.manual_seed(config.seed)
    sampler_rng = torch.Generator().manual_seed(config.seed + 1)
    loss_rng = torch.Generator().manual_seed(config.seed + 2)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    history, start = History(), 0

    path = run_dir / CHECKPOINT
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{path} was written with another training config:\n  {state['config']}\nvs\n  {asdict(config)}\n"
                "use another run_dir, or delete it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        sampler_rng.set_state(state["rng"]["sampler"])
        loss_rng.set_state(state["rng"]["loss"])
        history, start = History(**state["history"]), state["step"]

    def checkpoint(step: int):
        save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "rng": {"torch": torch.get_rng_state(), "sampler": sampler_rng.get_state(), "loss": loss_rng.get_state()},
                "history": asdict(history),
                "config": asdict(config),
            },
            path,
        )

    def validate(step: int):
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        model.train()
        history.eval_steps.append(step)
        history.log(history.metrics, metrics)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    model.train()
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        batch = sample_batch(sampler_rng)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                losses = compute_losses(model, batch, loss_rng)
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"loss is {losses['loss'].item()}")
        except FloatingPointError as err:
            last = torch.load(path, map_location="cpu", weights_only=True)["step"] if path.exists() else None
            raise NonFiniteLossError(
                f"{err} at step {step + 1}: stopping. The last good checkpoint "
                + (f"(step {last}) is intact in {path}" if last is not None else "was never written")
                + "; lower the learning rate or check the inputs before resuming."
            ) from err
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.steps.append(step + 1)
        history.lr.append(scheduler.get_last_lr()[0])
        history.log(history.losses, {name: value.item() for name, value in losses.items()})
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done == config.steps or (config.eval_every and done % config.eval_every == 0):
            validate(done)
        if done % config.checkpoint_every == 0 or done == end:
            checkpoint(done)
    bar.close()
    return history


def plot_history(history: History, title: str = ""):
    """Loss curves (smoothed) and validation metrics side by side. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 3.6))
    window = max(1, len(history.steps) // 50)
    kernel = torch.ones(window) / window
    for name, values in history.losses.items():
        smooth = torch.nn.functional.conv1d(torch.tensor(values)[None, None], kernel[None, None]).flatten()
        ax_loss.plot(history.steps[window - 1 :], smooth.tolist(), label=name)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{title} training losses (moving average of {window})")
    ax_loss.legend()
    for name, values in history.metrics.items():
        ax_metric.plot(history.eval_steps, values, marker="o", label=name)
    ax_metric.set(xlabel="step", title="validation")
    if history.metrics:
        ax_metric.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------


@dataclass
class CaptionedImages:
    """One split, ready for training: cached frozen features and tokenised captions.

    ``features [N, P, D]`` (half precision is fine), ``input_ids`` / ``attention_mask``
    ``[N, C, T]`` with C captions per image.
    """

    features: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self):
        n, c, t = self.input_ids.shape
        if len(self.features) != n or self.attention_mask.shape != (n, c, t):
            raise ValueError(
                f"features {tuple(self.features.shape)}, input_ids {tuple(self.input_ids.shape)} and "
                f"attention_mask {tuple(self.attention_mask.shape)} disagree on the number of images/captions"
            )

    def flat_texts(self):
        """All captions as ``[N*C, T]`` ids and mask, and the image index of each."""
        n, c, t = self.input_ids.shape
        return self.input_ids.reshape(n * c, t), self.attention_mask.reshape(n * c, t), torch.arange(n).repeat_interleave(c)


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
    out = model(batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"], generator=rng)
    return {"loss": out.loss, "itc": out.loss_itc, "itm": out.loss_itm, "itg": out.loss_itg}


# ---------------------------------------------------------------------------------------------------
# Stage 1 in the lite world: presets and the whole pipeline (used by the notebook and the CLI)
# ---------------------------------------------------------------------------------------------------

MAX_TEXT_LEN = 32  # the paper's maximum caption length


@dataclass(frozen=True)
class Stage1Preset:
    train: TrainConfig
    num_query_tokens: int = 16  # the prototype in REFERENCE.md: 16 queries ~20% faster than 32, as good
    rerank_k: int = 10  # ITM re-ranks each query's top k ITC candidates at test time


STAGE1_PRESETS = {
    # The course: ~4 minutes of training on 2 cores (1.3 s/step), so that every notebook together
    # fits CI's budget. 8 queries suffice for scenes of at most 3 objects and cost a third less.
    "course": Stage1Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                       eval_every=50, checkpoint_every=50), num_query_tokens=8, rerank_k=5),
    # For better numbers when you have the time (about an hour on 2 cores).
    "long": Stage1Preset(TrainConfig(steps=2000, batch_size=48, lr=3e-4, min_lr=3e-5, warmup_steps=100,
                                     eval_every=250, checkpoint_every=100), num_query_tokens=16, rerank_k=16),
    # A smoke test of the pipeline (seconds).
    "smoke": Stage1Preset(TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=2,
                                      checkpoint_every=2), num_query_tokens=4, rerank_k=2),
}


def config_digest(preset) -> str:
    """A short hash of a preset, so that a changed preset trains into a fresh run directory."""
    import hashlib

    return hashlib.sha256(repr(preset).encode()).hexdigest()[:8]


def tokenize_captions(tokenizer, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, T]`` ids and mask, padded to the longest caption (at most ``MAX_TEXT_LEN`` tokens)."""
    n, c = len(captions), len(captions[0])
    flat = [caption for per_image in captions for caption in per_image]
    tokens = tokenizer(flat, padding="longest", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    return tokens.input_ids.reshape(n, c, -1), tokens.attention_mask.reshape(n, c, -1)


@dataclass
class LiteWorld:
    """The shapes world with cached frozen features and tokenised captions for every split."""

    dataset: object  # datasets.DatasetDict
    splits: dict[str, CaptionedImages]
    tokenizer: object
    encoder: torch.nn.Module


def load_lite_world(root: str | None = None, sizes: dict | None = None, progress: bool = True) -> LiteWorld:
    """Generate (or load) the shapes world, cache its frozen EfficientNet-Lite0 features and tokenise
    its captions with the Q-Former's BERT tokenizer. Everything is cached under ``root``."""
    from .checkpoints import bert_tokenizer
    from .data import DATASET_VERSION, load_shapes_world
    from .vision import FrozenImageEncoder, cached_features

    root = Path(root or cache_root())
    dataset = load_shapes_world(root, sizes=sizes, progress=progress)
    encoder = FrozenImageEncoder()
    tokenizer = bert_tokenizer()
    splits = {}
    for name, split in dataset.items():
        features = cached_features(encoder, split, name, DATASET_VERSION, cache_dir=root / "features")
        splits[name] = CaptionedImages(features, *tokenize_captions(tokenizer, split["captions"]))
    return LiteWorld(dataset, splits, tokenizer, encoder)


def build_stage1_model(world: LiteWorld, num_query_tokens: int, seed: int = 0):
    """Blip2Stage1 over the lite encoder's features, its Q-Former initialised from MiniLM."""
    from .checkpoints import qformer_from_bert
    from .stage1 import Blip2Stage1

    torch.manual_seed(seed)
    width = world.splits["train"].features.shape[-1]
    qformer, tokenizer = qformer_from_bert(num_query_tokens=num_query_tokens, encoder_width=width)
    return Blip2Stage1(qformer.config, dec_token_id=tokenizer.bos_token_id, qformer=qformer)


def retrieval_on(model, split: CaptionedImages, **kwargs) -> dict[str, float]:
    from .evaluate import retrieval

    ids, mask, text_image = split.flat_texts()
    return retrieval(model, split.features, ids, mask, text_image, **kwargs)


def run_stage1(preset: str = "course", root: str | None = None, run_dir: str | None = None,
               world: LiteWorld | None = None, progress: bool = True):
    """Train stage 1 with a preset (resuming/reusing ``run_dir``), then evaluate retrieval on the
    test split, with and without ITM re-ranking. Returns ``(model, history, test_metrics)``."""
    import json

    from .data import relevance_matrix

    if preset not in STAGE1_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(STAGE1_PRESETS)}")
    chosen = STAGE1_PRESETS[preset]
    root = Path(root or cache_root())
    run_dir = Path(run_dir or root / "runs" / f"stage1-{preset}-{config_digest(chosen)}")
    world = world or load_lite_world(root, progress=progress)
    model = build_stage1_model(world, chosen.num_query_tokens, seed=chosen.train.seed)
    val = world.splits["val"]
    history = train(
        model, stage1_sampler(world.splits["train"], chosen.train.batch_size), stage1_losses, chosen.train, run_dir,
        evaluate=lambda m: {k: v for k, v in retrieval_on(m, val).items() if k.endswith("_r1")}, progress=progress,
    )
    metrics_path = run_dir / "test_metrics.json"
    if metrics_path.exists():
        test_metrics = json.loads(metrics_path.read_text())
    else:
        model.eval()
        relevant = relevance_matrix(world.dataset["test"])
        test_metrics = retrieval_on(model, world.splits["test"], relevant=relevant, rerank_k=chosen.rerank_k,
                                    progress=progress)
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(test_metrics, indent=1))
        os.replace(tmp, metrics_path)  # a half-written file would otherwise be reused as a cache
    return model.eval(), history, test_metrics


# ---------------------------------------------------------------------------------------------------
# Stage 2: soft visual prompts for a frozen LLM (the lite world's OPT and T5, see ``llm``)
# ---------------------------------------------------------------------------------------------------


def stage2_sampler(features: torch.Tensor, captions: list[list[str]], tokenizer, encoder_decoder: bool, batch_size: int):
    """Batches of distinct images, each with one caption drawn at random as the LLM's target.

    Decoder-only LLMs get no text prompt (the caption follows the soft prompt). Encoder-decoder LLMs
    get prefix language modelling: the caption is split at a random word, the prefix joins the soft
    prompt in the encoder and the rest is the decoder's target (``bridge.split_for_prefix_lm``).
    """
    from .bridge import language_batch, split_for_prefix_lm

    n, per_image = len(captions), len(captions[0])
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training images")

    def sample(rng: torch.Generator) -> dict:
        images = torch.randperm(n, generator=rng)[:batch_size]
        picks = torch.randint(per_image, (batch_size,), generator=rng)
        texts = [captions[i][c] for i, c in zip(images.tolist(), picks.tolist())]
        if encoder_decoder:
            cuts = [int(torch.randint(len(t.split(" ")), (1,), generator=rng)) for t in texts]
            prompts, targets = zip(*(split_for_prefix_lm(t, k) for t, k in zip(texts, cuts)))
        else:
            prompts, targets = [""] * batch_size, texts
        tokens = language_batch(tokenizer, list(prompts), list(targets), encoder_decoder)
        return {"image_features": features[images].float(), "input_ids": tokens.input_ids,
                "attention_mask": tokens.attention_mask, "labels": tokens.labels}

    return sample


def stage2_losses(model, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                image_features=batch["image_features"])
    return {"loss": out.loss}


STAGE2_RUN_VERSION = 2  # bump when a stage-2 run's result changes for the same preset: cached runs are keyed by it


@dataclass(frozen=True)
class Stage2Preset:
    train: TrainConfig
    stage1: str | None = "course"  # the stage-1 preset whose Q-Former stage 2 starts from; None: MiniLM only


STAGE2_PRESETS = {
    # The course: about 0.35 s per step on 2 cores, so a little over a minute per LLM family.
    "course": Stage2Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                       eval_every=100, checkpoint_every=100)),
    # The paper's Figure 5 ablation: the same training from a Q-Former that skipped stage 1.
    "course-no-stage1": Stage2Preset(TrainConfig(steps=200, batch_size=32, lr=3e-4, min_lr=3e-5, warmup_steps=20,
                                                 eval_every=100, checkpoint_every=100), stage1=None),
    "long": Stage2Preset(TrainConfig(steps=2000, batch_size=48, lr=3e-4, min_lr=3e-5, warmup_steps=100,
                                     eval_every=250, checkpoint_every=100), stage1="long"),
    "smoke": Stage2Preset(TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, eval_every=2,
                                      checkpoint_every=2), stage1="smoke"),
}


def build_stage2_model(world: LiteWorld, family: str, stage1_model=None, num_query_tokens: int = 8,
                       root: str | None = None, progress: bool = True, seed: int = 0):
    """``bridge.Blip2`` over the lite world's frozen LLM of ``family``, starting from ``stage1_model``'s
    Q-Former, or from a Q-Former that skipped stage 1 (MiniLM-initialised) when it is None. The new
    projection is drawn from ``seed``: without it, it would depend on whatever consumed the global
    RNG before (in the notebook, the other family's stage 2)."""
    from .bridge import Blip2
    from .llm import load_lite_llm

    language_model, tokenizer = load_lite_llm(family, world.dataset, root=root, progress=progress)
    if stage1_model is None:
        stage1_model = build_stage1_model(world, num_query_tokens, seed=seed)
    torch.manual_seed(seed)
    return Blip2.from_stage1(stage1_model, language_model, tokenizer)


def stage2_val_loss(model, features: torch.Tensor, captions: list[list[str]], num_images: int = 128) -> float:
    """Mean language-modelling loss on the first caption of the first ``num_images`` images (the
    whole caption as target, for either family): a cheap, fixed validation signal."""
    from .bridge import language_batch

    texts = [per_image[0] for per_image in captions[:num_images]]
    tokens = language_batch(model.tokenizer, [""] * len(texts), texts, model.encoder_decoder)
    out = model(tokens.input_ids, tokens.attention_mask, labels=tokens.labels,
                image_features=features[: len(texts)].float())
    return out.loss.item()


def generate_in_batches(model, features: torch.Tensor, prompts: list[str] | None = None, batch_size: int = 250,
                        progress: bool = False, **generate_kwargs) -> list[str]:
    """``model.generate`` over many images (one prompt per image, or none), a batch at a time."""
    texts = []
    for start in tqdm(range(0, len(features), batch_size), disable=not progress, desc="generate"):
        chunk = slice(start, start + batch_size)
        texts += model.generate(image_features=features[chunk].float(),
                                prompts=None if prompts is None else prompts[chunk], **generate_kwargs)
    return texts


def stage2_test_metrics(model, world: LiteWorld, progress: bool = True) -> dict:
    """Captions (greedy) scored against the test references, and zero-shot VQA with the paper's prompt."""
    from .bridge import PROMPTS
    from .evaluate import caption_image_gap, caption_scores, vqa_scores

    split, features = world.dataset["test"], world.splits["test"].features
    family = "t5" if model.encoder_decoder else "opt"
    captions = generate_in_batches(model, features, max_new_tokens=40, progress=progress)
    per_image = len(split["questions"][0])
    image_of_question = torch.arange(len(split)).repeat_interleave(per_image)
    prompts = [PROMPTS[f"vqa_{family}"].format(q) for qs in split["questions"] for q in qs]
    answers = generate_in_batches(model, features[image_of_question], prompts, max_new_tokens=5, progress=progress)
    flat = lambda column: [x for per in split[column] for x in per]  # noqa: E731
    return {
        **caption_scores(captions, split["captions"]),
        "caption_image_gap": caption_image_gap(captions, split["captions"]),
        **vqa_scores(answers, flat("answers"), flat("question_types")),
        "examples": [{"caption": c, "references": r} for c, r in zip(captions[:8], split["captions"][:8])],
    }


def run_stage2(family: str = "opt", preset: str = "course", root: str | None = None, run_dir: str | None = None,
               world: LiteWorld | None = None, stage1_model=None, progress: bool = True):
    """Train stage 2 for one LLM family with a preset (resuming/reusing ``run_dir``), then report
    captions and zero-shot VQA on the test split. The Q-Former comes from the preset's stage-1 run
    (trained first if needed), or skips stage 1. Returns ``(model, history, test_metrics)``."""
    import json

    from .llm import LLM_FAMILIES, llm_cache_dir

    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}; choose one of {LLM_FAMILIES}")
    if preset not in STAGE2_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(STAGE2_PRESETS)}")
    chosen = STAGE2_PRESETS[preset]
    root = Path(root or cache_root())
    world = world or load_lite_world(root, progress=progress)
    if stage1_model is None and chosen.stage1 is not None:
        stage1_model, _, _ = run_stage1(chosen.stage1, root, world=world, progress=progress)
    stage1_identity = "none" if chosen.stage1 is None else f"{chosen.stage1}-{config_digest(STAGE1_PRESETS[chosen.stage1])}"
    llm_identity = llm_cache_dir(family, world.dataset, root).name
    identity = (STAGE2_RUN_VERSION, chosen, stage1_identity, llm_identity)
    run_dir = Path(run_dir or root / "runs" / f"stage2-{family}-{preset}-{config_digest(identity)}")
    model = build_stage2_model(world, family, stage1_model, root=root, progress=progress, seed=chosen.train.seed)

    train_split, val = world.dataset["train"], world.dataset["val"]
    sampler = stage2_sampler(world.splits["train"].features, train_split["captions"], model.tokenizer,
                             model.encoder_decoder, chosen.train.batch_size)
    history = train(model, sampler, stage2_losses, chosen.train, run_dir, progress=progress,
                    evaluate=lambda m: {"val_loss": stage2_val_loss(m, world.splits["val"].features, val["captions"])})
    metrics_path = run_dir / "test_metrics.json"
    if metrics_path.exists():
        test_metrics = json.loads(metrics_path.read_text())
    else:
        model.eval()
        test_metrics = stage2_test_metrics(model, world, progress=progress)
        tmp = metrics_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(test_metrics, indent=1))
        os.replace(tmp, metrics_path)
    return model.eval(), history, test_metrics
