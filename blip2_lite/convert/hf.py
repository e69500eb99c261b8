"""Hugging Face's BLIP-2 layouts (``Salesforce/blip2-*``, transformers' ``modeling_blip_2.py``) -> blip2_lite.

Three layouts: the bare ``Blip2QFormerModel``, the retrieval model ``Blip2ForImageTextRetrieval``
(-> ``Blip2Stage1``) and the captioning model ``Blip2ForConditionalGeneration`` (-> ``stage2.Blip2``
with an OPT or FlanT5; built in ``pretrained``), plus the vision tower. Each is a table of rules
for ``engine.convert``; loading is strict (``engine.load_strict``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..qformer import QFormer, QFormerConfig
from ..stage1 import Blip2Stage1
from .engine import SKIP, CheckpointError, convert, load_strict, prefixed

# Hugging Face Q-Former key (inside ``Blip2QFormerModel``) -> blip2_lite ``QFormer`` key. BERT's
# encoder (and LAVIS's Q-Former) has the same layout, except that attention sits under ``.self``.
QFORMER_RULES = [
    (r"layernorm\.", "embed_norm."),
    (r"encoder\.layer\.(\d+)\.attention\.(?:attention|self)\.(query|key|value)\.", r"layers.\1.self_attn.\2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.self_attn.norm."),
    (r"encoder\.layer\.(\d+)\.crossattention\.(?:attention|self)\.(query|key|value)\.", r"layers.\1.cross_attn.\2."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.", r"layers.\1.cross_attn.out."),
    (r"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.", r"layers.\1.cross_attn.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.text_ffn.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.text_ffn.fc2."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.text_ffn.norm."),
    (r"encoder\.layer\.(\d+)\.intermediate_query\.dense\.", r"layers.\1.query_ffn.fc1."),
    (r"encoder\.layer\.(\d+)\.output_query\.dense\.", r"layers.\1.query_ffn.fc2."),
    (r"encoder\.layer\.(\d+)\.output_query\.LayerNorm\.", r"layers.\1.query_ffn.norm."),
]


def _split_qkv_bias(match, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF stores cat(q_bias, k_bias, v_bias) as one trainable bias; EVA (and timm's Eva) has no key
    bias. A released checkpoint's key third is zero, a fine-tuned one's need not be, and dropping it
    is exact: a key bias b adds the same q.b to every logit of a query's row, which softmax cancels."""
    q, _, v = bias.chunk(3)
    return {f"blocks.{match[1]}.attn.q_bias": q, f"blocks.{match[1]}.attn.v_bias": v}


# Hugging Face ``Blip2VisionModel`` key (without the ``vision_model.`` prefix) -> timm ``Eva`` key.
# ``post_layernorm`` (LAVIS's ``ln_vision``) is not part of the tower: it is claimed by the callers.
VISION_RULES = [
    (r"embeddings\.class_embedding$", "cls_token"),
    (r"embeddings\.position_embedding$", "pos_embed"),
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", _split_qkv_bias),
    (r"encoder\.layers\.(\d+)\.layer_norm(1|2)\.", r"blocks.\1.norm\2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
]


def convert_hf_vision(state_dict: dict[str, torch.Tensor], prefix: str = "vision_model.") -> tuple[dict, dict]:
    """HF ``Blip2VisionModel`` weights (the keys under ``prefix``; others are ignored) ->
    (timm ``Eva`` state dict, ``post_layernorm`` state with keys weight/bias, empty if absent)."""
    post_layernorm = {name: state_dict[f"{prefix}post_layernorm.{name}"] for name in ("weight", "bias")
                      if f"{prefix}post_layernorm.{name}" in state_dict}
    rules = [(r"post_layernorm\.", SKIP)] + VISION_RULES
    return convert(state_dict, rules, "vision", prefix), post_layernorm


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict, or a ``CheckpointError`` naming the file."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: a checkpoint folder needs the config.json that "
                              "save_pretrained writes") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the file is damaged, download it again") from e


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} cannot be read ({e}): it is truncated or damaged, download it again") from e


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` folder: one ``*.safetensors`` file, or the shards that
    ``model.safetensors.index.json`` names (every tensor of its weight map must be found). A folder
    with several weight files and no index is refused: which of them is the model would be a guess."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from e
        state = {}
        for shard in sorted(set(weight_map.values())):
            tensors = _load_safetensors(path / shard)
            state.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
        if missing := sorted(set(weight_map) - set(state)):
            raise CheckpointError(f"{index} names tensors its shards do not hold: {missing[:10]}")
        return state
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path}")
    if len(files) > 1:
        raise CheckpointError(f"{path} holds {len(files)} weight files ({[f.name for f in files]}) and no "
                              "model.safetensors.index.json saying which belong to the model: remove the extra ones")
    return _load_safetensors(files[0])


def read_hf_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a ``save_pretrained`` directory (safetensors only)."""
    return read_config(path), read_state(path)


def qformer_config_from_hf(qformer_config, num_query_tokens: int) -> QFormerConfig:
    """blip2_lite's ``QFormerConfig`` from transformers' ``Blip2QFormerConfig`` (or its dict, which may
    leave out keys at their default: transformers' class fills them in, as it does when loading)."""
    from transformers import Blip2QFormerConfig

    c = Blip2QFormerConfig.from_dict(qformer_config) if isinstance(qformer_config, dict) else qformer_config
    return QFormerConfig(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        encoder_width=c.encoder_hidden_size,
        cross_attention_freq=c.cross_attention_frequency,
        num_query_tokens=num_query_tokens,
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
        pad_token_id=c.pad_token_id,
        text_input=getattr(c, "use_qformer_text_input", False),
    )


def convert_hf_qformer(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename the keys of a Hugging Face Q-Former (those under ``prefix``) to blip2_lite's."""
    return convert(state_dict, QFORMER_RULES, "Q-Former", prefix)


def load_hf_qformer(path: str | Path, num_query_tokens: int) -> QFormer:
    """A ``Blip2QFormerModel`` directory as a blip2_lite ``QFormer``.

    That class holds neither the query tokens nor the text embeddings (they live in the parent
    model), so those stay at their initial values. Without ``use_qformer_text_input`` the
    Q-Former is built queries-only, as in the stage-2 checkpoints.
    """
    config, state = read_hf_checkpoint(path)
    qformer = QFormer(qformer_config_from_hf(config, num_query_tokens))
    load_strict(qformer, convert_hf_qformer(state), allow_missing=("query_tokens", "word_embeddings.", "position_embeddings."))
    return qformer


# Top-level keys of ``Blip2ForImageTextRetrieval`` -> ``Blip2Stage1``; the vision tower's keys are
# converted separately (they belong to the image encoder, which the caller builds).
_RETRIEVAL_RULES = [
    (r"query_tokens$", "qformer.query_tokens"),
    (r"embeddings\.(word|position)_embeddings\.", r"qformer.\1_embeddings."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
    (r"vision_projection\.", "vision_proj."),
    (r"text_projection\.", "text_proj."),
    (r"itm_head\.", "itm_head."),
    (r"vision_model\.", SKIP),
] + prefixed(QFORMER_RULES, r"qformer\.", "qformer.")


def load_hf_retrieval(path: str | Path, dec_token_id: int | None = None) -> tuple[Blip2Stage1, dict[str, torch.Tensor]]:
    """A ``Blip2ForImageTextRetrieval`` directory (``Salesforce/blip2-itm-vit-g`` layout) as ``Blip2Stage1``.

    Returns the model and the vision tower's tensors (``vision_model.*`` except the final LayerNorm,
    which becomes ``ln_vision``), for the caller's image encoder. Hugging Face retrieval checkpoints
    carry no ITG head and no temperature: those keep their initial values.
    ``dec_token_id`` defaults to the last vocabulary entry (``[DEC]`` appended to bert-base-uncased).
    """
    from transformers import Blip2Config

    config, state = read_hf_checkpoint(path)
    hf = Blip2Config.from_dict(config)  # fills in keys a hand-written config.json leaves at their default
    qcfg = qformer_config_from_hf(hf.qformer_config, hf.num_query_tokens)
    model = Blip2Stage1(
        qcfg,
        dec_token_id=qcfg.vocab_size - 1 if dec_token_id is None else dec_token_id,
        embed_dim=hf.image_text_hidden_size,
        vision_layer_norm_eps=hf.vision_config.layer_norm_eps,
    )
    load_strict(model, convert(state, _RETRIEVAL_RULES, "retrieval-checkpoint"), allow_missing=("lm_head.", "temp"))
    vision = {k[len("vision_model."):]: v for k, v in state.items()
              if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")}
    return model, vision


# ``Blip2ForConditionalGeneration`` -> ``stage2.Blip2``: the LLM and projection keep their names.
BLIP2_RULES = [
    (r"query_tokens$", "qformer.query_tokens"),
    (r"(language_projection|language_model)\.", r"\1."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
] + prefixed(QFORMER_RULES, r"qformer\.", "qformer.")
