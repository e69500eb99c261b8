"""The Querying Transformer (Q-Former), BLIP-2's bridge between a frozen image encoder and text.

A BERT whose input is ``[queries; text]``: a fixed number of learned query embeddings followed by
(optionally) word embeddings. Per layer:

    self-attention over [queries; text]           (shared by both; the mask decides who sees whom)
    cross-attention queries -> image features     (every ``cross_attention_freq``-th layer, queries only)
    feed-forward                                   (separate weights for query and text positions)

One module serves all four uses of the paper:

====================================  ==============================================================
image pass (ITC image side, stage 2)  ``qformer(image_embeds=img)``
text alone (ITC text side)            ``qformer(input_ids=ids, text_attention_mask=m, use_queries=False)``
joint, bidirectional (ITM)            ``qformer(ids, m, image_embeds=img, mask="itm")``
joint, multimodal causal (ITG)        ``qformer(ids, m, image_embeds=img, mask="itg")`` or, reusing the
                                      image pass, ``qformer(ids, m, query_past=out.query_past, mask="itg")``
====================================  ==============================================================

Every pass with queries first projects the image to each cross-attention layer's keys/values
(``image_keys_values``); passes over the same images can share them (``image_kv=``), as a stage-1
training step's image and ITM passes do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .inputs import check_index, check_token_ids
from .masks import attention_mask
from .qformer_layer import KeyValue, QFormerLayer


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. Defaults are the paper's: BERT-base with 32 queries over ViT-g features."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408  # width of the frozen image features (ViT-g)
    cross_attention_freq: int = 2  # cross-attention in layers 0, f, 2f, ...
    num_query_tokens: int = 32
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # False builds the queries-only Q-Former of the stage-2 checkpoints (no word/position
    # embeddings, no text feed-forwards): stage 2 never feeds it text.
    text_input: bool = True

    def __post_init__(self):
        sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "encoder_width", "num_query_tokens",
                 "vocab_size", "max_position_embeddings")
        if bad := {name: getattr(self, name) for name in sizes if getattr(self, name) < 1}:
            raise ValueError(f"Q-Former sizes must be >= 1, got {bad}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError(f"cross_attention_freq must be >= 1, got {self.cross_attention_freq}")

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_freq == 0

    @classmethod
    def small(cls, **overrides) -> "QFormerConfig":
        """A Q-Former small enough to print and step through: the course's running example (4 layers
        of width 64, 8 queries over 48-wide image features, a 100-word vocabulary). Any size can be overridden."""
        sizes = dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, encoder_width=48,
                     num_query_tokens=8, vocab_size=100, max_position_embeddings=32)
        return cls(**(sizes | overrides))


@dataclass
class QFormerOutput:
    last_hidden_state: torch.Tensor  # [B, Q+T, H]
    num_queries: int
    query_past: list[KeyValue] | None = None  # per layer, the queries' self-attention keys/values
    self_attentions: list[torch.Tensor] = field(default_factory=list)  # per layer [B, heads, L, L_keys]
    cross_attentions: list[torch.Tensor] = field(default_factory=list)  # per cross layer [B, heads, Q, N]

    @property
    def query_output(self) -> torch.Tensor:
        return self.last_hidden_state[:, : self.num_queries]

    @property
    def text_output(self) -> torch.Tensor:
        return self.last_hidden_state[:, self.num_queries :]


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        if config.text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor | None, batch_size: int, use_queries: bool) -> torch.Tensor:
        """``[queries; word + position embeddings]``, then LayerNorm and dropout. Queries get no position."""
        parts = [self.query_tokens.expand(batch_size, -1, -1)] if use_queries else []
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1)))

    def image_keys_values(self, image_embeds: torch.Tensor, norm: nn.LayerNorm | None = None) -> list[KeyValue | None]:
        """The keys/values of ``image_embeds`` ``[N, P, encoder_width]`` for each layer (None where a
        layer has no cross-attention): passes over the same images can share them (``image_kv``).

        With ``norm`` (the vision LayerNorm), ``image_embeds`` are the features normalised without
        its weight and bias, which are folded into each key/value projection instead: the same keys
        and values in exact arithmetic, but training computes no gradient for the constant features,
        only for the norm's parameters (the backward pass skips one matrix product per projection).
        """
        self._check_image_embeds(image_embeds)
        device = image_embeds.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):  # cast once, not per projection
            image_embeds = image_embeds.to(torch.get_autocast_dtype(device))
        return [layer.cross_attn.keys_values(image_embeds, norm) if layer.cross_attn is not None else None
                for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        mask: str | torch.Tensor = "itm",
        image_index: torch.Tensor | None = None,
        query_past: list[KeyValue] | None = None,
        use_queries: bool = True,
        output_attentions: bool = False,
        image_kv: list[KeyValue | None] | None = None,
    ) -> QFormerOutput:
        """Run the Q-Former.

        Args:
            input_ids: ``[B, T]`` text tokens, or None for a queries-only pass.
            text_attention_mask: ``[B, T]`` 1 for tokens, 0 for padding (default: all ones).
            image_embeds: ``[N, P, encoder_width]`` frozen image features (after the vision LayerNorm).
            mask: "itc", "itm" or "itg" (see ``masks``), or an explicit boolean
                ``[B, L, L_past + L]`` self-attention mask (True = may attend).
            image_index: ``[B]`` which of the N images each row cross-attends to; the image
                keys/values are then computed once per image (ITM's 3B pairs share B images).
            query_past: the ``query_past`` of an earlier image pass. The queries' keys/values are
                taken from it instead of running the queries again (ITG reuse); implies
                ``use_queries=False`` for this pass.
            use_queries: prepend the learned queries (False for the text-only ITC pass).
            output_attentions: also return attention weights (computed explicitly, without SDPA).
            image_kv: instead of ``image_embeds``, their ``image_keys_values`` (shared with another pass).
        """
        cfg = self.config
        if query_past is not None:
            use_queries = False
        num_queries = cfg.num_query_tokens if use_queries else 0
        if image_embeds is not None and image_kv is not None:
            raise ValueError("pass image_embeds or their image_kv, not both")
        if image_embeds is not None and use_queries:
            image_kv = self.image_keys_values(image_embeds)  # checks image_embeds
        elif image_embeds is not None:
            self._check_image_embeds(image_embeds)
        batch_size = self._validate(input_ids, text_attention_mask, image_kv, image_index, query_past, use_queries)

        if input_ids is not None and text_attention_mask is None:
            text_attention_mask = torch.ones_like(input_ids)
        self_mask = self._self_mask(mask, num_queries, text_attention_mask, query_past, batch_size)

        hidden = self.embed(input_ids, batch_size, use_queries)
        out = QFormerOutput(hidden, num_queries, query_past=[] if num_queries else None)
        for i, layer in enumerate(self.layers):
            past = query_past[i] if query_past is not None else None
            hidden, query_kv, self_w, cross_w = layer(
                hidden, num_queries, self_mask, image_kv[i] if image_kv else None, image_index, past,
                output_attentions,
            )
            if num_queries:
                out.query_past.append(query_kv)
            if output_attentions:
                out.self_attentions.append(self_w)
                if cross_w is not None:
                    out.cross_attentions.append(cross_w)
        out.last_hidden_state = hidden
        return out

    def _self_mask(self, mask, num_queries, text_attention_mask, query_past, batch_size):
        num_past = query_past[0][0].shape[2] if query_past is not None else 0
        text_len = 0 if text_attention_mask is None else text_attention_mask.shape[1]
        length = num_queries + text_len
        if isinstance(mask, torch.Tensor):
            expected = (batch_size, length, num_past + length)
            if mask.dtype != torch.bool or tuple(mask.shape) != expected:
                raise ValueError(
                    f"self-attention mask must be a bool tensor of shape {expected}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            return mask
        if text_attention_mask is None:
            return None  # queries alone attend to each other freely
        if query_past is not None:
            # The rows of the text positions; the columns cover the cached queries, then the text.
            return attention_mask(mask, num_past, text_attention_mask)[:, num_past:]
        return attention_mask(mask, num_queries, text_attention_mask)

    def _check_image_embeds(self, image_embeds: torch.Tensor) -> None:
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 \
                or image_embeds.shape[-1] != self.config.encoder_width:
            raise ValueError(
                f"image features must be [batch, tokens, {self.config.encoder_width}] (encoder_width), "
                f"got {tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds)}"
            )

    def _validate(self, input_ids, text_attention_mask, image_kv, image_index, query_past, use_queries) -> int:
        cfg = self.config
        sizes = {}
        if input_ids is not None:
            if not cfg.text_input:
                raise ValueError("this Q-Former was built with text_input=False (queries only): it takes no input_ids")
            check_token_ids(input_ids, cfg.vocab_size, "the Q-Former's")
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [batch, text_len >= 1], got shape {tuple(input_ids.shape)}")
            if input_ids.shape[1] > cfg.max_position_embeddings:
                raise ValueError(
                    f"text of length {input_ids.shape[1]} is longer than the position table "
                    f"(max_position_embeddings={cfg.max_position_embeddings}); truncate it when tokenising"
                )
            sizes["input_ids"] = input_ids.shape[0]
            if text_attention_mask is not None and text_attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"text_attention_mask shape {tuple(text_attention_mask.shape)} does not match "
                    f"input_ids shape {tuple(input_ids.shape)}"
                )
        elif text_attention_mask is not None:
            raise ValueError("text_attention_mask was given without input_ids")
        elif not use_queries:
            raise ValueError("a Q-Former pass needs input_ids, the queries, or both")
        cross_kv = [kv for kv in image_kv or [] if kv is not None]
        if use_queries and cross_kv:
            if len(image_kv) != cfg.num_layers:
                raise ValueError(f"image_kv has {len(image_kv)} layers, the Q-Former has {cfg.num_layers}")
            num_images = cross_kv[0][0].shape[0]
            if image_index is None:
                sizes["image_embeds"] = num_images
            else:
                sizes["image_index"] = check_index(image_index, num_images, "image_index", "images").shape[0]
        elif use_queries and any(cfg.has_cross_attention(i) for i in range(cfg.num_layers)):
            raise ValueError("a pass with queries needs image_embeds (the queries cross-attend to the image)")
        if query_past is not None:
            if len(query_past) != cfg.num_layers:
                raise ValueError(f"query_past has {len(query_past)} layers, the Q-Former has {cfg.num_layers}")
            sizes["query_past"] = query_past[0][0].shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"mismatched batch sizes: {sizes}")
        return next(iter(sizes.values()))
