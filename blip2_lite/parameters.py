"""Counting parameters: the numbers the paper's tables quote (188M Q-Former, 107M trainable, ...)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def count_parameters(module: nn.Module, include: Callable[[str], bool] | None = None,
                     trainable_only: bool = False) -> int:
    """Parameters of ``module`` (tied ones once), optionally only those whose name passes ``include``
    or that require gradients. Works on the meta device, so full-size models cost nothing to count."""
    return sum(p.numel() for name, p in module.named_parameters()
               if (include is None or include(name)) and (p.requires_grad or not trainable_only))


def millions(module: nn.Module, **kwargs) -> float:
    """``count_parameters`` in millions."""
    return count_parameters(module, **kwargs) / 1e6
