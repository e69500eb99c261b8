"""The training loop shared by both stages: AdamW, warm-up + cosine schedule, bf16 autocast on any
device, periodic validation, and checkpoints that make an interrupted run resumable *exactly*.

The loop knows nothing of BLIP-2's data: a stage gives it a batch sampler and a loss function.
A checkpoint holds the model, optimizer and scheduler states, the step, the history, and every
random-number state the loop consumes (torch's global RNG for dropout, the batch sampler's and the
loss's own generators). A run that is killed and resumed therefore ends with bit-identical
weights to one that never stopped (tests/test_train.py). Checkpoints are written atomically, so a
kill during the write leaves the previous one intact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .atomic import atomic_path
from .convert.engine import CheckpointError, read_torch_file
from .devices import autocast, to_device

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
    bf16: bool = True  # autocast to bfloat16 (CUDA, and CPUs: there the backward pass ran ~1.8x faster)

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.checkpoint_every < 1 or self.eval_every < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, checkpoint_every >= 1 and eval_every >= 0, got "
                             f"{self.lr}, {self.weight_decay}, {self.checkpoint_every} and {self.eval_every}")
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


@dataclass
class _Run:
    """What a checkpoint must capture besides the model: optimizer, schedule and random streams."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler_rng: torch.Generator  # on the host: batches are assembled there
    loss_rng: torch.Generator  # on the device: e.g. ITM's negative sampling
    device: torch.device

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "sampler": self.sampler_rng.get_state(), "loss": self.loss_rng.get_state()}
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's own generator
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.sampler_rng.set_state(state["sampler"])
        self.loss_rng.set_state(state["loss"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def _save(path: Path, model, run: _Run, step: int, history: History, config: TrainConfig) -> None:
    state = {"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "step": step, "rng": run.rng_state(),
             "history": asdict(history), "config": asdict(config)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path, model, run: _Run, config: TrainConfig) -> tuple[History, int]:
    """The history and step of the checkpoint at ``path`` (loaded into model and run), or a fresh start."""
    if not path.exists():
        return History(), 0
    state = read_torch_file(path, advice="delete it to start this run over, or pass another run_dir")
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint of this training loop: delete it or use another run_dir")
    if state["config"] != asdict(config):
        raise ValueError(
            f"{path} was written with another training config:\n  {state['config']}\nvs\n  {asdict(config)}\n"
            "use another run_dir, or delete it to start over"
        )
    model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.set_rng_state({k: v.cpu() for k, v in state["rng"].items()})  # RNG states are host byte tensors
    return History(**state["history"]), state["step"]


def _losses(model, batch, compute_losses, run: _Run, config: TrainConfig, step: int, path: Path) -> dict:
    """The step's losses under autocast; a non-finite loss stops the run naming the last good checkpoint."""
    try:
        with autocast(run.device, config.bf16):
            losses = compute_losses(model, batch, run.loss_rng)
        if not isinstance(losses, dict) or not isinstance(losses.get("loss"), torch.Tensor) or losses["loss"].numel() != 1:
            raise TypeError(f"compute_losses must return a dict whose 'loss' is a scalar tensor, got {type(losses).__name__}"
                            + (f" with keys {sorted(losses)}" if isinstance(losses, dict) else ""))
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"loss is {losses['loss'].item()}")
    except FloatingPointError as err:
        last = torch.load(path, map_location="cpu", weights_only=True)["step"] if path.exists() else None
        raise NonFiniteLossError(
            f"{err} at step {step + 1}: stopping. The last good checkpoint "
            + (f"(step {last}) is intact in {path}" if last is not None else "was never written")
            + "; lower the learning rate or check the inputs before resuming."
        ) from err
    return losses


def _check_arguments(config, device, run_dir) -> tuple[torch.device, Path]:
    """The loop's own arguments, checked before anything is trained: (device, created run_dir)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"run_dir {run_dir} is a file: pass a folder for the checkpoints")
    run_dir.mkdir(parents=True, exist_ok=True)
    return device, run_dir


def _validate(model, evaluate, history: History, step: int) -> None:
    model.eval()
    with torch.no_grad():
        metrics = evaluate(model)
    model.train()
    history.eval_steps.append(step)
    history.log(history.metrics, metrics)


def train(
    model: torch.nn.Module,
    sample_batch: Callable[[torch.Generator], dict],
    compute_losses: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]],
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> History:
    """Train ``model`` for ``config.steps`` steps on ``device``, resuming from ``run_dir`` if it holds a checkpoint.

    Args:
        sample_batch: draws one batch on the host using the given generator (the loop owns its
            state); the loop moves its tensors to ``device``.
        compute_losses: returns a dict of losses whose ``"loss"`` entry is optimised; it may use the
            given generator, which lives on ``device`` (e.g. ITM's negative sampling).
        evaluate: validation metrics, called every ``config.eval_every`` steps and at the end.
        stop_after: stop (with a checkpoint) after this many steps in total, as if interrupted.
        device: where the model trains ("cpu", "cuda", "cuda:1", ...), with bf16 autocast for that device.
    Returns the full history, including steps done before a resume.
    """
    device, run_dir = _check_arguments(config, device, run_dir)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    run = _Run(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)),
               torch.Generator().manual_seed(config.seed + 1),
               torch.Generator(device=device).manual_seed(config.seed + 2), device)
    path = run_dir / CHECKPOINT
    history, start = _resume(path, model, run, config)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    model.train()
    # At most one refresh every 2 s: in a notebook each refresh is several widget messages, and a
    # flood of them (one per step) overflowed the kernel's output queue under nbval (400 steps).
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, desc="train",
               mininterval=2.0)
    for step in bar:
        batch = to_device(sample_batch(run.sampler_rng), device)
        losses = _losses(model, batch, compute_losses, run, config, step, path)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        history.steps.append(step + 1)
        history.lr.append(run.scheduler.get_last_lr()[0])
        history.log(history.losses, {name: value.item() for name, value in losses.items()})
        run.scheduler.step()
        bar.set_postfix(loss=f"{history.losses['loss'][-1]:.3f}", refresh=False)  # shown at the next refresh
        done = step + 1
        if evaluate is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            _validate(model, evaluate, history, done)
        if done % config.checkpoint_every == 0 or done == end:
            _save(path, model, run, done, history, config)
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
