"""LAVIS's original layouts (``lavis/models/blip2_models/blip2_qformer.py``, ``lavis/models/eva_vit.py``).

LAVIS's ``blip2_pretrained.pth`` (stage 1) is the only released checkpoint with the ITG
language-modelling head: its Q-Former is a ``BertLMHeadModel`` under ``Qformer.``. Its EVA ViT
uses the names timm's ``Eva`` was ported with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..qformer import QFormerConfig
from ..stage1 import Blip2Stage1
from .engine import SKIP, CheckpointError, convert, load_strict, prefixed, read_torch_file
from .hf import QFORMER_RULES

_LAVIS_DUPLICATES = {  # saved twice by BERT's tied head: must equal the tensor they duplicate
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
_STAGE1_RULES = [
    (r"visual_encoder\.", SKIP),  # the vision tower: returned to the caller as it is
    (r"Qformer\.cls\.predictions\.decoder\.", SKIP),  # the tied copy, checked against the original
    (r".*position_ids$", SKIP),  # BERT's index buffer
    (r"query_tokens$", "qformer.query_tokens"),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"qformer.\1_embeddings."),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.embed_norm."),
    (r"Qformer\.cls\.predictions\.transform\.dense\.", "lm_head.dense."),
    (r"Qformer\.cls\.predictions\.transform\.LayerNorm\.", "lm_head.norm."),
    (r"Qformer\.cls\.predictions\.bias$", "lm_head.bias"),
    (r"(ln_vision|vision_proj|text_proj|itm_head)\.", r"\1."),
    (r"temp$", "temp"),
] + prefixed(QFORMER_RULES, r"Qformer\.bert\.", "qformer.")


def _qformer_config(state: dict[str, torch.Tensor], num_heads: int) -> QFormerConfig:
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
    checkpoint = read_torch_file(path)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors "
                              "(LAVIS saves {'model': state_dict})")
    required = ["query_tokens", "vision_proj.weight", "Qformer.bert.embeddings.word_embeddings.weight",
                "Qformer.bert.embeddings.position_embeddings.weight"]
    if missing := [k for k in required if k not in state]:
        raise CheckpointError(f"{path} is not a LAVIS BLIP-2 stage-1 checkpoint: it lacks {missing}")
    config = _qformer_config(state, num_heads)
    model = Blip2Stage1(config, dec_token_id=config.vocab_size - 1 if dec_token_id is None else dec_token_id,
                        embed_dim=state["vision_proj.weight"].shape[0], vision_layer_norm_eps=1e-5)
    for duplicate, original in _LAVIS_DUPLICATES.items():
        if duplicate in state and not torch.equal(state[duplicate], state[original]):
            raise CheckpointError(f"{duplicate} differs from {original}: the ITG head must be tied (as in BERT and LAVIS)")
    load_strict(model, convert(state, _STAGE1_RULES, "LAVIS"))
    vision = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    return model, vision


_VISION_BLOCK = r"blocks\.(\d+)\."


def convert_lavis_vision(state_dict: dict[str, torch.Tensor], prefix: str = "visual_encoder.",
                         num_blocks: int = 39) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LAVIS EVA ViT weights (the keys under ``prefix``; ``prefix=""`` for a bare ``eva_vit_g.pth``)
    -> (timm ``Eva`` state dict, ``ln_vision`` state with keys weight/bias, empty if absent).

    Blocks from ``num_blocks`` on are dropped: EVA-CLIP has 40, BLIP-2 builds 39 and LAVIS loads
    the file with ``strict=False``, silently ignoring the 40th. The top-level ``ln_vision.*`` of a
    LAVIS BLIP-2 checkpoint is the final LayerNorm (LAVIS builds it with eps 1e-5, Hugging Face's
    ``post_layernorm`` with 1e-6).
    """
    ln_vision = {k.removeprefix("ln_vision."): v for k, v in state_dict.items()
                 if k in ("ln_vision.weight", "ln_vision.bias")}

    def block(match, tensor):  # same names as timm; blocks past num_blocks are dropped
        return {match.string: tensor} if int(match[1]) < num_blocks else {}

    rules = [
        (r"(cls_token|pos_embed)$", r"\1"),
        (r"patch_embed\.proj\.(weight|bias)$", r"patch_embed.proj.\1"),
        (_VISION_BLOCK + r"(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$", block),
        (_VISION_BLOCK + r"attn\.(qkv\.weight|q_bias|v_bias)$", block),
    ]
    if not prefix:
        rules.insert(0, (r"ln_vision\.", SKIP))  # a bare file: the final LayerNorm sits among the tower's keys
    return convert(state_dict, rules, "vision", prefix), ln_vision
