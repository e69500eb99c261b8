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
        return {
            "image_features": data.features[images].float(),
            "input_ids": data.input_ids[images, captions],
            "attention_mask": data.attention_mask[images, captions],
        }

    return sample


def stage1_losses(model, batch: dict, rng: torch.Generator) -> dict[str, torch.Tensor]:
    out = model(batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"], generator=rng)
    return {"loss": out.loss, "itc": out.loss_itc, "itm": out.loss_itm, "itg": out.loss_itg}
