"""BLIP-2 stage 1: vision-language representation learning with a frozen image encoder.

``Blip2Stage1`` wires the frozen image encoder, the vision LayerNorm, the Q-Former and the three
heads to the losses of ``blip2_lite.losses``. Per step it runs the Q-Former three times:

1. image pass: queries + image (ITC image side). Its query keys/values are kept for ITG.
2. text pass: text alone (ITC text side).
3. ITM pass: 3B (text, image) pairs, bidirectional mask.
4. ITG pass: text only, attending to the cached query keys/values under the causal mask.

The image keys/values of every cross-attention layer are computed once per step and shared by the
image and ITM passes, with the vision LayerNorm's weight and bias folded into their projections
(``QFormer.image_keys_values``): the same losses and gradients with one forward and one backward
matrix product per projection, instead of two and four when each pass computes them from the
LayerNorm's output.

Names of the image tensors, as in transformers' BLIP-2: ``image_features`` are the frozen
encoder's output ``[B, N, D]``; ``image_embeds`` the same after the vision LayerNorm (what the
Q-Former cross-attends to); ``image_itc`` the queries' normalised ITC projections ``[B, Q, E]``
(``text_itc`` ``[B, E]`` on the text side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .encoders.frozen import normalized_features, vision_embeds
from .inputs import check_index, check_token_ids
from .qformer import QFormer, QFormerConfig


class LMHead(nn.Module):
    """BERT's prediction head (dense, GELU, LayerNorm, vocabulary projection) for ITG.

    The vocabulary projection reuses the Q-Former's word-embedding matrix (tied, as in BERT), which
    the caller passes in so that the weight is owned, and saved, once.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor, rows: torch.Tensor | None = None):
        """Logits over the vocabulary, or over the token ids ``rows`` when given (``word_embeddings``
        then holds those rows only)."""
        bias = self.bias if rows is None else self.bias[rows]
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, bias)


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor
    sim_i2t: torch.Tensor
    itm_logits: torch.Tensor


class Blip2Stage1(nn.Module):
    """Frozen image encoder + vision LayerNorm + Q-Former + ITC/ITM/ITG heads.

    Args:
        config: Q-Former sizes.
        dec_token_id: id of the ``[DEC]`` token that starts ITG decoding.
        image_encoder: any module mapping images to ``[B, N, encoder_width]`` features; frozen here.
            Optional: ``forward`` also accepts precomputed (cached) features.
        embed_dim: width of the contrastive space (256 in the paper).
        vision_layer_norm_eps: eps of the vision LayerNorm (1e-6 in the Hugging Face layout).
        qformer: an already built (e.g. BERT-initialised) Q-Former matching ``config``.
        itg_vocab: optional token ids that ITG predicts among (default: the whole vocabulary, as in
            the paper). The lite world's captions use 56 of the 30,523 token ids: ITG over those
            only skips the 99.8% of the vocabulary projection, and of its gradient, that no caption
            needs. Labels outside it are ignored.
        itm_pairs: how many of the batch's (image, text) pairs ITM scores, each with its two hard
            negatives (default: all, as in the paper). ITM's joint pass runs 3 pairs per image; on
            2 CPU cores at batch 32 scoring 8 pairs instead of 32 cut a step from 1.18 s to 0.72 s.
            Batches are shuffled, so the first pairs are a random part of the batch; negatives are
            still drawn from the whole batch.
        itg: whether to train with ITG (default True, as in the paper; False is its ablation of
            the generative loss, whose ``loss_itg`` is then 0).
        itm: whether to train with ITM (default True, as in the paper). False leaves ITC (+ ITG),
            whose losses are defined on the global batch: k processes with batch B then train
            exactly as one process with batch kB, whereas ITM draws its hard negatives from each
            process's own B (tests/test_distributed.py checks the equivalence without it).
    """

    def __init__(
        self,
        config: QFormerConfig,
        dec_token_id: int,
        image_encoder: nn.Module | None = None,
        embed_dim: int = 256,
        vision_layer_norm_eps: float = 1e-6,
        qformer: QFormer | None = None,
        itg_vocab: torch.Tensor | None = None,
        itm_pairs: int | None = None,
        itg: bool = True,
        itm: bool = True,
    ):
        super().__init__()
        if not 0 <= dec_token_id < config.vocab_size:
            raise ValueError(f"dec_token_id {dec_token_id} is outside the vocabulary (size {config.vocab_size})")
        self.config = config
        self.dec_token_id = dec_token_id
        self.image_encoder = image_encoder
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()
        self.ln_vision = nn.LayerNorm(config.encoder_width, eps=vision_layer_norm_eps)
        if qformer is not None and qformer.config != config:
            raise ValueError("the given qformer was built with a different config")
        self.qformer = qformer if qformer is not None else QFormer(config)
        self.vision_proj = nn.Linear(config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.lm_head = LMHead(config)
        self.temp = nn.Parameter(torch.tensor(0.07))
        if itm_pairs is not None and (not isinstance(itm_pairs, int) or itm_pairs < 1):
            raise ValueError(f"itm_pairs must be a positive int or None (all pairs), got {itm_pairs!r}")
        self.itm_pairs = itm_pairs
        self.itg, self.itm = itg, itm
        self.register_buffer("itg_vocab", None)  # saved when set: a reloaded run predicts the same set
        self.register_buffer("itg_position", None, persistent=False)
        if itg_vocab is not None:
            self._restrict_itg(itg_vocab)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            nn.init.normal_(head.weight, std=config.initializer_range)
            nn.init.zeros_(head.bias)

    def _restrict_itg(self, itg_vocab) -> None:
        ids = check_index(itg_vocab, self.config.vocab_size, "itg_vocab", "token ids of the vocabulary")
        if ids.numel() == 0 or len(ids.unique()) != len(ids):
            raise ValueError(f"itg_vocab must be distinct token ids in [0, {self.config.vocab_size}), got {ids}")
        ids = ids.long().sort().values
        position = torch.full((self.config.vocab_size,), -100, dtype=torch.long)
        position[ids] = torch.arange(len(ids))
        self.itg_vocab, self.itg_position = ids, position

    def train(self, mode: bool = True):
        super().train(mode)
        if self.image_encoder is not None:
            self.image_encoder.eval()  # frozen: BatchNorm statistics and dropout stay fixed
        return self

    # -- the pieces, usable on their own (retrieval, visualisation) -------------------------------

    def image_embeds(self, images: torch.Tensor | None = None, image_features: torch.Tensor | None = None):
        """Frozen features (computed without gradient, or given) through the vision LayerNorm."""
        return vision_embeds(self.image_encoder, self.ln_vision, images, image_features, pixels_name="images")

    def itc_image(self, image_embeds: torch.Tensor | None = None, output_attentions: bool = False, image_kv=None):
        """ITC image side: normalised projections of every query output ``[B, Q, E]``, and the pass
        (of ``image_embeds``, or of their ``image_keys_values``)."""
        out = self.qformer(image_embeds=image_embeds, output_attentions=output_attentions, image_kv=image_kv)
        return F.normalize(self.vision_proj(out.query_output), dim=-1), out

    def itc_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text side: normalised projection of the text [CLS] output ``[B, E]``."""
        out = self.qformer(input_ids, attention_mask, use_queries=False)
        return F.normalize(self.text_proj(out.text_output[:, 0]), dim=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask, image_index=None, image_kv=None) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (index 1 = match) for (text row, image) pairs (``image_embeds=None``
        with their ``image_keys_values``)."""
        out = self.qformer(input_ids, attention_mask, image_embeds, mask="itm", image_index=image_index,
                           image_kv=image_kv)
        return losses.itm_logits(self.itm_head, out.query_output)

    def itg_logits(self, text_output: torch.Tensor) -> torch.Tensor:
        """ITG next-token logits ``[B, T, vocab]`` from the text outputs of a causal pass (over
        ``itg_vocab`` only, in its order, when the model was built with one)."""
        if self.itg_vocab is None:
            return self.lm_head(text_output, self.qformer.word_embeddings.weight)
        return self.lm_head(text_output, self.qformer.word_embeddings.weight[self.itg_vocab], self.itg_vocab)

    def itg_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Token-id labels as indices into ``itg_logits``' last dimension (-100 stays ignored)."""
        if self.itg_vocab is None:
            return labels
        return torch.where(labels >= 0, self.itg_position[labels.clamp(min=0)], labels)

    # -- training ----------------------------------------------------------------------------------

    def _itm(self, itc, image_kv, batch, input_ids, attention_mask, generator):
        """ITM loss and logits: the first ``itm_pairs`` pairs, hard negatives from the local block of
        the ITC similarities (this process's images and texts)."""
        if not self.itm:
            return itc.loss.new_zeros(()), itc.loss.new_zeros((0, 2))
        rank, _ = losses.distributed_world()
        local = slice(rank * batch, (rank + 1) * batch)
        pairs = min(batch, self.itm_pairs or batch)
        neg_image, neg_text = losses.sample_hard_negatives(
            itc.sim_i2t[:pairs, local], itc.sim_t2i[:pairs, local], itc.positives[:pairs, local], generator
        )
        text_index, image_index, itm_labels = losses.itm_pairs(pairs, neg_image, neg_text)
        itm_logits = self.itm_logits(None, input_ids[text_index], attention_mask[text_index], image_index, image_kv)
        return losses.itm_loss(itm_logits, itm_labels), itm_logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Stage1Output:
        """The three stage-1 losses and their sum for a batch of (image, caption) pairs.

        ``image_ids`` (optional, ``[B]``): captions of the same image are all ITC positives and are
        never drawn as ITM negatives. ``generator`` seeds the hard-negative sampling.
        """
        normalized = normalized_features(self.image_encoder, self.ln_vision, images, image_features, "images")
        batch = normalized.shape[0]
        check_token_ids(input_ids, self.config.vocab_size, "the Q-Former's")
        if input_ids.shape[0] != batch or not isinstance(attention_mask, torch.Tensor) \
                or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"mismatched batch: {batch} images, input_ids {tuple(input_ids.shape)}, attention_mask "
                f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)}"
            )
        if image_ids is not None and (not isinstance(image_ids, torch.Tensor) or tuple(image_ids.shape) != (batch,)):
            raise ValueError(f"image_ids must be a [batch] = [{batch}] tensor, one image id per caption, got "
                             f"{tuple(image_ids.shape) if isinstance(image_ids, torch.Tensor) else type(image_ids)}")

        image_kv = self.qformer.image_keys_values(normalized, norm=self.ln_vision)  # shared by both passes
        image_itc, image_pass = self.itc_image(image_kv=image_kv)
        text_itc = self.itc_text(input_ids, attention_mask)
        itc = losses.itc_loss(image_itc, text_itc, self.temp, image_ids)

        loss_itm, itm_logits = self._itm(itc, image_kv, batch, input_ids, attention_mask, generator)
        if not self.itg:
            loss_itg = itc.loss.new_zeros(())
            return Stage1Output(itc.loss + loss_itm, itc.loss, loss_itm, loss_itg, itc.sim_i2t, itm_logits)
        # ITG: text attends to the image pass's query keys/values (exact: queries never see text).
        decoder_ids, labels = losses.itg_inputs(input_ids, attention_mask, self.dec_token_id)
        text_pass = self.qformer(decoder_ids, attention_mask, mask="itg", query_past=image_pass.query_past)
        loss_itg = losses.itg_loss(self.itg_logits(text_pass.text_output), self.itg_labels(labels))

        return Stage1Output(itc.loss + loss_itm + loss_itg, itc.loss, loss_itm, loss_itg, itc.sim_i2t, itm_logits)
