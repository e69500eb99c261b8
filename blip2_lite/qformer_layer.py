"""One Q-Former layer: BERT's attention and feed-forward blocks, and the layer that runs them over
``[queries; text]`` (self-attention over both, cross-attention to the image for the queries only,
separate feed-forward weights for query and text positions). Each block is built from the
Q-Former's ``QFormerConfig`` (``config``), which ``qformer.py`` defines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class AttentionBlock(nn.Module):
    """BERT attention: multi-head attention, output projection, dropout, residual, LayerNorm.

    ``kv_width`` differs from the hidden size for cross-attention (keys/values from image features).
    """

    def __init__(self, config, kv_width: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.num_heads)

    def keys_values(self, source: torch.Tensor, norm: nn.LayerNorm | None = None) -> KeyValue:
        """Keys and values of ``source``; with ``norm``, of ``norm``'s affine map of ``source``, folded
        into the projections: (x * w + b) W^T + c = x (W * w)^T + (c + W b)."""
        if norm is None:
            return self.split_heads(self.key(source)), self.split_heads(self.value(source))
        folded = (F.linear(source, p.weight * norm.weight, p.bias + p.weight @ norm.bias) for p in (self.key, self.value))
        return tuple(self.split_heads(x) for x in folded)

    def forward(
        self,
        hidden: torch.Tensor,
        keys_values: KeyValue,
        mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mask``: boolean ``[B, L, L_keys]``, True where attention is allowed."""
        q = self.split_heads(self.query(hidden))
        k, v = keys_values
        dropout_p = self.attention_dropout if self.training else 0.0
        # On CPUs PyTorch's fused attention kernel ran 3-6x slower (forward + backward, bf16) than the
        # explicit product-softmax-product at the Q-Former's lengths (tens of tokens): use it there.
        explicit = output_attentions or q.device.type == "cpu"
        context, weights = attention(q, k, v, mask, dropout_p, explicit)
        context = rearrange(context, "b h n d -> b n (h d)")
        return self.norm(self.dropout(self.out(context)) + hidden), weights


def attention(q, k, v, mask: torch.Tensor | None = None, dropout_p: float = 0.0, explicit: bool = False):
    """Scaled dot-product attention over ``[B, H, L, d]`` heads; ``mask`` ``[B, L, L_keys]`` is True
    where allowed. ``explicit`` computes the product-softmax-product by hand and also returns the
    weights ``[B, H, L, L_keys]``; otherwise PyTorch's fused kernel, and no weights."""
    sdpa_mask = None if mask is None else mask[:, None]
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p), None
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if sdpa_mask is not None:
        scores = scores.masked_fill(~sdpa_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return F.dropout(weights, dropout_p) @ v, weights


class FeedForward(nn.Module):
    """BERT feed-forward: Linear, GELU, Linear, dropout, residual, LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = AttentionBlock(config, kv_width=config.hidden_size)
        self.cross_attn = (
            AttentionBlock(config, kv_width=config.encoder_width) if config.has_cross_attention(layer_idx) else None
        )
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config) if config.text_input else None

    def forward(
        self,
        hidden: torch.Tensor,
        num_queries: int,
        self_mask: torch.Tensor | None,
        image_kv: KeyValue | None = None,
        image_index: torch.Tensor | None = None,
        past: KeyValue | None = None,
        output_attentions: bool = False,
    ):
        """``image_kv``: this layer's keys/values of the N images (``QFormer.image_keys_values``), and
        ``image_index`` the image of each row when rows share images; ``past``: cached query keys/values.
        Returns the new hidden states, the queries' keys/values, and the attention weights."""
        k, v = self.self_attn.keys_values(hidden)
        # The queries' keys/values of this pass; cached so that a later text pass can attend to them.
        query_kv = (k[:, :, :num_queries], v[:, :, :num_queries])
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        hidden, self_weights = self.self_attn(hidden, (k, v), self_mask, output_attentions)

        queries, text = hidden[:, :num_queries], hidden[:, num_queries:]
        cross_weights = None
        if num_queries > 0:
            if self.cross_attn is not None:
                image_k, image_v = image_kv
                if image_index is not None:
                    # keys/values were computed once per distinct image; pick each row's image
                    image_k, image_v = image_k[image_index], image_v[image_index]
                queries, cross_weights = self.cross_attn(queries, (image_k, image_v), None, output_attentions)
            queries = self.query_ffn(queries)
        if text.shape[1] > 0:
            text = self.text_ffn(text)
        return torch.cat([queries, text], dim=1), query_kv, self_weights, cross_weights
