"""The training loop shared by both stages and both worlds: AdamW, warm-up + cosine schedule, bf16
autocast on any device, gradient accumulation, periodic validation, one process or many (torchrun,
DistributedDataParallel), and checkpoints that make an interrupted run resumable *exactly*
(``checkpoint.py``): a run that is killed and resumed ends with bit-identical weights to one that
never stopped (tests/test_train.py, tests/test_distributed.py).

The loop knows nothing of BLIP-2's data: a stage gives it batches and a loss function. Batches come
either from a sampler called with a generator the loop owns (the lite world draws them in memory)
or from a stream that can start at any step (``BatchStream``: files read by DataLoader workers).
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .allocator import keep_freed_memory
from .checkpoint import CHECKPOINT, RunState, last_good_step, load_checkpoint, save_checkpoint
from .devices import autocast, to_device
from .distributed import barrier, distributed_world, is_main, mean_across_ranks

__all__ = ["CHECKPOINT", "BatchStream", "History", "NonFiniteLossError", "TrainConfig", "lr_lambda", "make_optimizer",
           "plot_history", "train"]


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
    # micro-batches of batch_size per optimizer step (per process). ITC's negatives are those of a
    # micro-batch (times the processes), so accumulation is not the same as a larger batch for ITC.
    grad_accumulation: int = 1

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0 or self.checkpoint_every < 1 or self.eval_every < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, checkpoint_every >= 1 and eval_every >= 0, got "
                             f"{self.lr}, {self.weight_decay}, {self.checkpoint_every} and {self.eval_every}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError(f"steps, batch_size and grad_accumulation must be >= 1, got {self.steps}, "
                             f"{self.batch_size} and {self.grad_accumulation}")
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
    # fused: one kernel for every parameter; on a 2-core CPU the stage-1 Q-Former's step took 15 ms
    # instead of 85 (README), on CUDA it is the fastest of PyTorch's implementations too
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)


@runtime_checkable
class BatchStream(Protocol):
    """Batches that can start anywhere: ``iterate(k)`` yields micro-batch k, k+1, ... of this process
    (k counts micro-batches, ``step * grad_accumulation``). Resuming at step s asks for s * accumulation."""

    def iterate(self, start: int) -> Iterator[dict]: ...


def _micro_batches(batches, rng: torch.Generator, start: int) -> Iterator[dict]:
    if isinstance(batches, BatchStream):
        return iter(batches.iterate(start))
    if not callable(batches):
        raise TypeError(f"batches must be a sampler taking a torch.Generator or a BatchStream, got {type(batches).__name__}")
    return (batches(rng) for _ in itertools.count())  # the sampler's generator is restored on resume


def _losses(model, batch, compute_losses, run: RunState, config: TrainConfig, step: int, path: Path) -> dict:
    """The micro-batch's losses under autocast, checked to be a dict with a scalar ``"loss"``."""
    try:
        with autocast(run.device, config.bf16):
            losses = compute_losses(model, batch, run.loss_rng)
    except FloatingPointError as err:  # e.g. NaN inputs, refused by the model
        raise _non_finite(str(err), step, path) from err
    if not isinstance(losses, dict) or not isinstance(losses.get("loss"), torch.Tensor) or losses["loss"].numel() != 1:
        raise TypeError(f"compute_losses must return a dict whose 'loss' is a scalar tensor, got {type(losses).__name__}"
                        + (f" with keys {sorted(losses)}" if isinstance(losses, dict) else ""))
    return losses


def _non_finite(what: str, step: int, path: Path) -> NonFiniteLossError:
    last = last_good_step(path) if is_main() else None
    return NonFiniteLossError(
        f"{what} at step {step + 1}: stopping. The last good checkpoint "
        + (f"(step {last}) is intact in {path}" if last is not None else "was never written")
        + "; lower the learning rate or check the inputs before resuming."
    )


def _step_losses(totals: dict[str, torch.Tensor], step: int, path: Path) -> dict[str, float]:
    """The step's losses averaged over micro-batches and ranks (one collective). A non-finite loss on
    any rank stops every rank, before the update, naming the last good checkpoint."""
    names = list(totals)
    values = dict(zip(names, mean_across_ranks(torch.stack([totals[name] for name in names])).tolist()))
    if not math.isfinite(values["loss"]):
        raise _non_finite(f"loss is {values['loss']}", step, path)
    return values


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
    """Rank 0 validates while the other ranks wait."""
    if is_main():
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model)
        model.train()
        history.eval_steps.append(step)
        history.log(history.metrics, metrics)
    barrier()


def train(
    model: torch.nn.Module,
    batches: Callable[[torch.Generator], dict] | BatchStream,
    compute_losses: Callable[[torch.nn.Module, dict, torch.Generator], dict[str, torch.Tensor]],
    config: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
) -> History:
    """Train ``model`` for ``config.steps`` steps on ``device``, resuming from ``run_dir`` if it holds a checkpoint.

    Under torchrun (a process group is initialised, ``distributed.init_distributed``) every rank
    calls it: the model is wrapped in DistributedDataParallel, each rank trains on its own batches,
    rank 0 validates, shows progress and writes the checkpoints.

    Args:
        batches: a sampler drawing one batch on the host from the given generator (the loop owns its
            state), or a ``BatchStream``; the loop moves the tensors to ``device``.
        compute_losses: returns a dict of losses whose ``"loss"`` entry is optimised; it may use the
            given generator, which lives on ``device`` (e.g. ITM's negative sampling).
        evaluate: validation metrics, called every ``config.eval_every`` steps and at the end.
        stop_after: stop (with a checkpoint) after this many steps in total, as if interrupted.
        device: where the model trains ("cpu", "cuda", "cuda:1", ...), with bf16 autocast for that device.
    Returns the full history, including steps done before a resume (on ranks other than 0, without
    the validation metrics).
    """
    device, run_dir = _check_arguments(config, device, run_dir)
    if device.type == "cpu":
        keep_freed_memory()
    model.to(device)
    rank, world = distributed_world()
    seed = config.seed + 7919 * rank  # each rank its own dropout masks and samples; rank 0 as in one process
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, config)
    run = RunState(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)),
                   torch.Generator().manual_seed(seed + 1), torch.Generator(device=device).manual_seed(seed + 2), device)
    path = run_dir / CHECKPOINT
    saved, start = load_checkpoint(path, model, run, config)
    history = History(**saved) if saved else History()
    # find_unused_parameters: an ablation (ITG off) leaves heads without gradient
    wrapped = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    model.train()
    micro = _micro_batches(batches, run.sampler_rng, start * config.grad_accumulation)
    # At most one refresh every 2 s: in a notebook each refresh is several widget messages, and a
    # flood of them (one per step) overflowed the kernel's output queue under nbval (400 steps).
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress or not is_main(),
               desc="train", mininterval=2.0)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        totals = {}
        for k in range(config.grad_accumulation):
            last = k == config.grad_accumulation - 1
            with (wrapped.no_sync() if world > 1 and not last else nullcontext()):  # gradients meet once per step
                losses = _losses(wrapped, to_device(next(micro), device), compute_losses, run, config, step, path)
                (losses["loss"] / config.grad_accumulation).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / config.grad_accumulation
        values = _step_losses(totals, step, path)
        optimizer.step()
        history.steps.append(step + 1)
        history.lr.append(run.scheduler.get_last_lr()[0])
        history.log(history.losses, values)
        run.scheduler.step()
        bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)  # shown at the next refresh
        done = step + 1
        if evaluate is not None and (done == config.steps or (config.eval_every and done % config.eval_every == 0)):
            _validate(model, evaluate, history, done)
        if done % config.checkpoint_every == 0 or done == end:
            save_checkpoint(path, model, run, done, history, config)
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
