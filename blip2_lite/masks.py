"""The three self-attention masks of BLIP-2 stage 1 (paper, Figure 2).

Every Q-Former pass runs self-attention over the concatenation ``[queries; text]``.
What changes between the three objectives is only *who may look at whom*:

* ITC, unimodal: queries see queries, text sees text. Image and text stay apart, so that the
  contrastive loss compares two independent embeddings.
* ITM, bidirectional: everything sees everything, so query outputs fuse image and text.
* ITG, multimodal causal: queries see queries (never text: they must carry the image information
  on their own), text token ``t`` sees all queries and text tokens ``<= t``.

A mask here is a boolean tensor ``[batch, L, L]`` with ``L = num_queries + text_len`` where
``mask[b, i, j]`` is True when position ``i`` may attend to position ``j``. Padded text positions
are never attended to. A row left with no key at all (a left-padded position that may only
look backwards) attends to itself, so that softmax never sees an all-masked row.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("itc", "itm", "itg")


def _check_text_mask(text_attention_mask: torch.Tensor) -> torch.Tensor:
    if text_attention_mask.dim() != 2:
        raise ValueError(
            f"text_attention_mask must be [batch, text_len], got shape {tuple(text_attention_mask.shape)}"
        )
    valid = text_attention_mask.bool()
    if valid.shape[1] > 0 and not bool(valid.any(dim=1).all()):
        raise ValueError("every text needs at least one non-padded token (a row of text_attention_mask is all 0)")
    return valid


def attention_mask(kind: str, num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """The boolean self-attention mask ``[B, Q+T, Q+T]`` of one stage-1 objective.

    Args:
        kind: "itc" (unimodal), "itm" (bidirectional) or "itg" (multimodal causal).
        num_queries: number of learned query tokens Q (may be 0: text alone).
        text_attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    if num_queries < 0:
        raise ValueError(f"num_queries must be >= 0, got {num_queries}")
    text_valid = _check_text_mask(text_attention_mask)
    batch, text_len = text_valid.shape
    q, length = num_queries, num_queries + text_len
    device = text_valid.device

    # Which keys exist at all: every query, and the non-padded text tokens.
    key_valid = torch.cat([torch.ones(batch, q, dtype=torch.bool, device=device), text_valid], dim=1)
    is_query = torch.arange(length, device=device) < q
    rows_q, cols_q = is_query[:, None], is_query[None, :]

    if kind == "itm":
        allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    elif kind == "itc":
        allowed = rows_q == cols_q  # block diagonal: same modality only
    else:  # itg
        causal_text = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
        allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
        allowed[:q, :q] = True
        allowed[q:, :q] = True
        allowed[q:, q:] = causal_text
    mask = allowed[None] & key_valid[:, None, :]
    empty_rows = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty_rows & torch.eye(length, dtype=torch.bool, device=device))


def itc_mask(num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Unimodal mask: queries and text never see each other."""
    return attention_mask("itc", num_queries, text_attention_mask)


def itm_mask(num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Bidirectional mask: all positions see all non-padded positions."""
    return attention_mask("itm", num_queries, text_attention_mask)


def itg_mask(num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Multimodal causal mask: queries see queries; text sees queries and earlier text."""
    return attention_mask("itg", num_queries, text_attention_mask)


def draw_mask(mask: torch.Tensor, num_queries: int, title: str = "", ax=None, tokens: list[str] | None = None):
    """Draw one ``[L, L]`` mask as in the paper's Figure 2: dark = may attend, light = masked.

    Rows are the attending positions (Q then T), columns the attended ones. A line separates
    queries from text. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if mask.dim() == 3:
        mask = mask[0]
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"draw_mask expects a square [L, L] mask (or [B, L, L]), got {tuple(mask.shape)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    length = mask.shape[0]
    ax.imshow(mask.detach().cpu().float().numpy(), cmap="Blues", vmin=-0.15, vmax=1.0, interpolation="nearest")
    for pos in (num_queries - 0.5,):
        ax.axhline(pos, color="black", lw=1)
        ax.axvline(pos, color="black", lw=1)
    labels = tokens if tokens is not None else [f"q{i}" for i in range(num_queries)] + [
        f"t{i}" for i in range(length - num_queries)
    ]
    if length <= 24:
        ax.set_xticks(range(length), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(length), labels, fontsize=7)
    else:
        ax.set_xticks([num_queries / 2, num_queries + (length - num_queries) / 2], ["queries", "text"])
        ax.set_yticks([num_queries / 2, num_queries + (length - num_queries) / 2], ["queries", "text"])
    ax.set_title(title)
    return ax
