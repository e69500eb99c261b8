"""Checks of inputs shared by both stages, so that a bad token id or index fails with its name, not as
an ``IndexError`` deep inside an embedding lookup or a gather."""

from __future__ import annotations

import torch


def check_token_ids(input_ids, vocab_size: int, whose: str = "the", name: str = "input_ids") -> torch.Tensor:
    """``input_ids`` must be an integer tensor with every id in ``[0, vocab_size)``."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids in [{int(input_ids.min())}, {int(input_ids.max())}], outside {whose} "
                         f"vocabulary [0, {vocab_size}): was the text tokenised with the matching tokenizer?")
    return input_ids


def check_index(index, size: int, name: str, of: str) -> torch.Tensor:
    """``index`` as a 1-D integer tensor of positions in ``[0, size)`` into ``size`` ``of`` (for the error)."""
    index = torch.as_tensor(index)
    integer = not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
    if index.dim() != 1 or not integer or (index.numel() and not bool(((index >= 0) & (index < size)).all())):
        values = f" with values in [{int(index.min())}, {int(index.max())}]" if integer and index.numel() else ""
        raise ValueError(f"{name} must be a 1-D integer tensor of indices in [0, {size}) into the {size} {of}, "
                         f"got {index.dtype} of shape {tuple(index.shape)}{values}")
    return index
