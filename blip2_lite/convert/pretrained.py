"""``from_pretrained``: a Salesforce BLIP-2 checkpoint (a local folder, or a hub id when online) as a
blip2_lite model. Also: ``stage2.Blip2`` built from transformers' ``Blip2Config`` and filled from a
``Blip2ForConditionalGeneration`` state dict, and the published full-size architectures for readers
without the weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..encoders.eva import EvaVisionTower
from ..families import llm_family
from ..qformer import QFormer
from ..stage2 import Blip2
from .engine import SKIP, CheckpointError, convert, load_strict
from .hf import (
    BLIP2_RULES,
    convert_hf_vision,
    load_hf_retrieval,
    qformer_config_from_hf,
    read_config,
    read_hf_checkpoint,
)


def eva_from_hf(vision_config, state_dict: dict[str, torch.Tensor], prefix: str = "vision_model.") -> EvaVisionTower:
    """An EVA tower with the weights of an HF BLIP-2 checkpoint. Its ``post_layernorm`` (= ``ln_vision``)
    is not part of the tower: take it from ``convert_hf_vision(state_dict)[1]``."""
    tower = EvaVisionTower(vision_config)
    load_strict(tower.model, convert_hf_vision(state_dict, prefix)[0], what="EVA weights")
    return tower


def blip2_from_config(hf_config, with_vision: bool = True, tokenizer=None) -> Blip2:
    """A randomly initialised ``stage2.Blip2`` with the architecture of a transformers ``Blip2Config``
    (works under ``torch.device("meta")``, e.g. to count the parameters of the full-size models)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    qformer = QFormer(qformer_config_from_hf(hf_config.qformer_config, hf_config.num_query_tokens))
    if hf_config.use_decoder_only_language_model:
        language_model = AutoModelForCausalLM.from_config(hf_config.text_config)
    else:
        language_model = AutoModelForSeq2SeqLM.from_config(hf_config.text_config)
    image_encoder = EvaVisionTower(hf_config.vision_config) if with_vision else None
    return Blip2(qformer, language_model, tokenizer, image_encoder,
                 vision_layer_norm_eps=hf_config.vision_config.layer_norm_eps,
                 image_token_id=getattr(hf_config, "image_token_index", None))


def blip2_from_hf_state(hf_config, state: dict[str, torch.Tensor], with_vision: bool = True, tokenizer=None):
    """``load_hf_blip2`` for a state dict already in memory (e.g. ``Blip2ForConditionalGeneration.state_dict()``)."""
    model = blip2_from_config(hf_config, with_vision, tokenizer)
    tower, _ = convert_hf_vision(state)  # converted (and checked) even when the tower is not built
    rules = BLIP2_RULES + [(r"vision_model\.", SKIP)]
    converted = convert(state, rules, "captioning-checkpoint")
    if with_vision:
        converted.update({f"image_encoder.model.{k}": v for k, v in tower.items()})
    load_strict(model, converted)
    return model.eval()


def load_hf_blip2(path: str | Path, with_vision: bool = True):
    """A ``Blip2ForConditionalGeneration`` directory (``Salesforce/blip2-opt-*`` / ``-flan-t5-*`` layout)
    as a blip2_lite ``Blip2``: EVA ViT (timm), queries-only Q-Former, projection, and the LLM as
    transformers' own ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``.

    Strict: every tensor must find a parameter of its shape and every parameter must be loaded
    (tied embeddings count once). ``with_vision=False`` skips the image encoder (pass cached
    ``image_features`` instead).
    """
    from transformers import Blip2Config

    path = Path(path)
    config, state = read_hf_checkpoint(path)
    return blip2_from_hf_state(Blip2Config.from_dict(config), state, with_vision, _tokenizer_if_present(path))


def _tokenizer_if_present(path: Path):
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# The published architectures, for readers without the weights (the hub's config.json files hold
# the same numbers): vision and Q-Former are transformers' Blip2Config defaults (ViT-g with 39
# blocks, BERT-base Q-Former, 32 queries); the LLMs are OPT-2.7B/6.7B and FlanT5-XL/XXL.
_OPT = dict(model_type="opt", num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
            max_position_embeddings=2048, eos_token_id=50118)  # "\n": LAVIS ends captions with it
_FLAN_T5 = dict(model_type="t5", d_kv=64, num_layers=24, num_decoder_layers=24, vocab_size=32128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
SALESFORCE_TEXT_CONFIGS = {
    "Salesforce/blip2-opt-2.7b": _OPT | dict(hidden_size=2560, ffn_dim=10240, word_embed_proj_dim=2560),
    "Salesforce/blip2-opt-6.7b": _OPT | dict(hidden_size=4096, ffn_dim=16384, word_embed_proj_dim=4096),
    "Salesforce/blip2-flan-t5-xl": _FLAN_T5 | dict(d_model=2048, d_ff=5120, num_heads=32),
    "Salesforce/blip2-flan-t5-xxl": _FLAN_T5 | dict(d_model=4096, d_ff=10240, num_heads=64),
}


def salesforce_config(name: str):
    """The ``Blip2Config`` of a Salesforce BLIP-2 checkpoint (``-coco`` variants share their base's),
    or of the retrieval model ``Salesforce/blip2-itm-vit-g`` (with the Q-Former's text side)."""
    from transformers import Blip2Config, Blip2QFormerConfig

    base = name.removesuffix("-coco")
    if base == "Salesforce/blip2-itm-vit-g":
        return Blip2Config(qformer_config=Blip2QFormerConfig(use_qformer_text_input=True, vocab_size=30523).to_dict(),
                           architectures=["Blip2ForImageTextRetrieval"])
    if base not in SALESFORCE_TEXT_CONFIGS:
        raise ValueError(f"unknown checkpoint {name!r}; known: {sorted(SALESFORCE_TEXT_CONFIGS)} and "
                         "Salesforce/blip2-itm-vit-g (each also with -coco)")
    text = SALESFORCE_TEXT_CONFIGS[base]
    return Blip2Config(text_config=text, image_token_index=llm_family(text["model_type"]).image_token_index,
                       architectures=["Blip2ForConditionalGeneration"])


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub id such as ``Salesforce/blip2-opt-2.7b``, downloaded
    (safetensors, configs and tokenizer files only) when online."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith(("/", ".", "~")) or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{str(name_or_path)!r} is not a checkpoint folder (a local folder written by "
                              "save_pretrained, or a hub id such as Salesforce/blip2-opt-2.7b)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, no network: one clear message
        raise CheckpointError(
            f"{name_or_path!r} is not a local directory and could not be downloaded from the hub "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): {e}"
        ) from e


def from_pretrained(name_or_path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a Salesforce BLIP-2 checkpoint (Hugging Face layout) into blip2_lite.

    ``Blip2ForConditionalGeneration`` checkpoints (``blip2-opt-2.7b``, ``-opt-6.7b``, ``-flan-t5-xl``,
    ``-flan-t5-xxl`` and ``-coco`` variants) give a ``stage2.Blip2``; retrieval checkpoints
    (``blip2-itm-vit-g``, ``-coco``) give a ``Blip2Stage1`` with its image encoder. ``dtype`` applies
    to the frozen image encoder and LLM (fp16/bf16 on a GPU; FlanT5 needs bf16); the Q-Former and
    projection stay in fp32.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    path = resolve_checkpoint(name_or_path)
    config = read_config(path)
    architecture = (config.get("architectures") or [""])[0]
    if architecture == "Blip2ForImageTextRetrieval":
        model, vision_state = load_hf_retrieval(path)
        model.image_encoder = eva_from_hf(config["vision_config"], vision_state, prefix="").requires_grad_(False).eval()
        frozen = [model.image_encoder]
    elif architecture == "Blip2ForConditionalGeneration":
        model = load_hf_blip2(path)
        if dtype == torch.float16 and model.encoder_decoder:
            raise ValueError("FlanT5 overflows in float16 (NaN or empty output): use dtype=torch.bfloat16")
        frozen = [model.image_encoder, model.language_model]
    else:
        raise CheckpointError(f"{path}: unsupported architecture {architecture!r} (expected Blip2ForConditionalGeneration "
                              "or Blip2ForImageTextRetrieval)")
    model.to(device)
    if dtype is not None:
        for part in frozen:
            part.to(dtype)
    return model.eval()
