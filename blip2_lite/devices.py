"""Device placement and mixed precision, the same for CPU and CUDA: no code path names a device type."""

from __future__ import annotations

import torch


def to_device(batch, device: torch.device):
    """A batch (tensors, possibly in dicts, lists or tuples) moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast for ``device``'s type (CUDA or CPU), the one place the loop and evaluation take it from."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
