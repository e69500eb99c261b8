"""Generation from a prompt at the start of an encoder-decoder LLM's decoder.

BLIP-2 puts FlanT5's prompt in its encoder, after the soft prompt. The lite world's T5 is pretrained
to read its question at the start of its decoder instead (``lite.llm_text``): the encoder reads the
context (a caption, or the soft prompt) and the decoder starts from ``[start; question]``. So that
every row's decoder starts exactly as in pretraining, with no padding inside it, rows are generated
in groups whose decoder prompts have one length.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def generate_by_prompt_length(generate: Callable, encoder_inputs: Callable[[list[int]], dict],
                              decoder_prompts: list[list[int]], start_id: int, device: torch.device | str = "cpu",
                              **generate_kwargs) -> list[torch.Tensor]:
    """``generate(**encoder_inputs(rows), decoder_input_ids=[start; prompt], **generate_kwargs)`` for
    each group of ``rows`` whose ``decoder_prompts`` (lists of token ids) have one length. Returns
    each prompt's new ids, the prompt left out: ``num_return_sequences`` rows per prompt."""
    per_prompt = generate_kwargs.get("num_return_sequences", 1)
    lengths = [len(prompt) for prompt in decoder_prompts]
    new_ids: list[torch.Tensor] = [torch.empty(0)] * len(decoder_prompts)
    for length in sorted(set(lengths)):
        rows = [i for i, n in enumerate(lengths) if n == length]
        decoder_input_ids = torch.tensor([[start_id] + decoder_prompts[i] for i in rows], device=device)
        out = generate(**encoder_inputs(rows), decoder_input_ids=decoder_input_ids, **generate_kwargs)
        for j, row in enumerate(rows):
            new_ids[row] = out[j * per_prompt:(j + 1) * per_prompt, 1 + length:]
    return new_ids


def pad_right(pieces: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Id rows of different lengths as one tensor, padded on the right with ``pad_id``."""
    width = max(piece.shape[1] for piece in pieces)
    return torch.cat([nn.functional.pad(piece, (0, width - piece.shape[1]), value=pad_id) for piece in pieces])
