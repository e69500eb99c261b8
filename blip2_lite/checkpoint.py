"""What makes an interrupted training run resumable *exactly*: the run's state and its checkpoint file.

A checkpoint holds the model, optimizer and scheduler states, the step, the history, the training
config, and every random-number state the loop consumes on *every* rank: torch's global RNG (dropout),
the batch sampler's and the loss's own generators (e.g. ITM's negative sampling), and the GPU's
generator. Saving is collective (each rank hands its random states to rank 0, which alone writes);
resuming reads the same file on every rank, so multi-node runs need a shared file system for the run
directory. Files are written atomically: a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import atomic_path
from .convert.engine import CheckpointError, read_torch_file
from .distributed import all_gather_objects, distributed_world, is_main

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunState:
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


def save_checkpoint(path: Path, model: torch.nn.Module, run: RunState, step: int, history, config) -> None:
    """Collective: every rank must call it; rank 0 writes ``path``."""
    rng = all_gather_objects(run.rng_state())
    if not is_main():
        return
    state = {"model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "step": step, "rng": rng,
             "history": asdict(history), "config": asdict(config)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, model: torch.nn.Module, run: RunState, config) -> tuple[dict, int]:
    """Load the checkpoint at ``path`` into model and run; its (history dict, step), or (None, 0) without one."""
    if not path.exists():
        return None, 0
    state = read_torch_file(path, advice="delete it to start this run over, or pass another run_dir")
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "history", "config"} <= set(state):
        raise CheckpointError(f"{path} is not a checkpoint of this training loop: delete it or use another run_dir")
    if not _same_config(state["config"], config):
        raise ValueError(
            f"{path} was written with another training config:\n  {state['config']}\nvs\n  {asdict(config)}\n"
            "use another run_dir, or delete it to start over"
        )
    rank, world = distributed_world()
    rng = [state["rng"]] if isinstance(state["rng"], dict) else state["rng"]  # dict: written by one process
    if len(rng) != world:
        raise ValueError(f"{path} was written by a run of {len(rng)} processes; resume it with as many "
                         f"(torchrun --nproc_per_node), not {world}, or start over in another run_dir")
    model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.set_rng_state({k: v.cpu() for k, v in rng[rank].items()})  # RNG states are host byte tensors
    return state["history"], state["step"]


def _same_config(saved: dict, config) -> bool:
    """Whether a saved config is ``config``; fields added to the config since the save take their defaults."""
    try:
        return type(config)(**saved) == config
    except TypeError:  # a field this version does not know
        return False


def last_good_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path``, or None if there is none."""
    return torch.load(path, map_location="cpu", weights_only=True)["step"] if path.exists() else None
