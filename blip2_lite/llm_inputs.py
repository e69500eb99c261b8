"""What the frozen LLM reads in stage 2: the (prompt, target) tokens with their labels, FlanT5's
prefix/suffix split of a caption, and the soft prompt placed after a row's left padding.

``stage2.Blip2`` builds on these; they are separate because the training data (``lite.stage2_recipe``,
``pretrain.data``) and the notebooks tokenise with them without a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # positions that carry no language-modelling loss


def split_for_prefix_lm(text: str, num_prefix_words: int) -> tuple[str, str]:
    """(prefix, suffix) of a text at a word boundary: FlanT5's stage-2 pre-training splits each caption
    into an encoder prefix and a decoder target. ``num_prefix_words`` may be 0 (empty prefix)."""
    words = text.split(" ")
    if not 0 <= num_prefix_words < len(words):
        raise ValueError(f"num_prefix_words must lie in [0, {len(words) - 1}] for {text!r}, got {num_prefix_words}")
    return " ".join(words[:num_prefix_words]), " ".join(words[num_prefix_words:])


def insert_after_padding(soft: torch.Tensor, embeds: torch.Tensor, attention_mask: torch.Tensor):
    """``[padding; soft prompt; tokens]`` per row, with the attention mask extended over the soft prompt.

    ``soft`` is ``[B, Q, ...]``, ``embeds`` ``[B, L, ...]`` (embeddings, or ids and labels). Left-padded prompts (generation) keep their padding in front, so every row ends at the same
    position; right-padded ones (training) simply get the soft prompt in front.
    """
    if soft.shape[0] != embeds.shape[0]:
        raise ValueError(f"{soft.shape[0]} images but {embeds.shape[0]} prompts")
    num_soft = soft.shape[1]
    rows, masks = [], []
    for s, e, m in zip(soft, embeds, attention_mask):
        pads = int(m.cumsum(0).eq(0).sum())  # leading zeros of the mask
        rows.append(torch.cat([e[:pads], s.to(e.dtype), e[pads:]]))
        masks.append(torch.cat([m[:pads], m.new_ones(num_soft), m[pads:]]))
    return torch.stack(rows), torch.stack(masks)


@dataclass
class LanguageBatch:
    """Token ids for one stage-2 batch (see ``language_batch``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def language_batch(tokenizer, prompts: list[str], targets: list[str], encoder_decoder: bool) -> LanguageBatch:
    """Tokenise (prompt, target) pairs for the stage-2 loss. The target gets the end-of-sequence token.

    Decoder-only: ``input_ids = prompt + target`` (right-padded), ``labels`` = the target's ids with
    prompt and padding set to -100. Encoder-decoder: ``input_ids`` = the prompt (the encoder's
    input), ``labels`` = the target (the decoder's), padding -100.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
    target_ids = [ids + [eos] for ids in tokenizer(targets, add_special_tokens=False).input_ids]
    if encoder_decoder:
        inputs, labels = prompt_ids, target_ids
        input_labels = None
    else:
        inputs = [p + t for p, t in zip(prompt_ids, target_ids)]
        input_labels = [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompt_ids, target_ids)]
        labels = input_labels

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    input_ids = pad(inputs, tokenizer.pad_token_id)
    attention_mask = pad([[1] * len(r) for r in inputs], 0)
    return LanguageBatch(input_ids, attention_mask, pad(labels, IGNORE_INDEX))
