"""BLIP-2's frozen image encoder at full scale: EVA-CLIP ViT-g (39 of its 40 blocks) as a timm ``Eva``.

Too big for a CPU course, but the same code runs a tiny random configuration, which the tests
check layer by layer against transformers' ``Blip2VisionModel``. Weights are loaded by
``blip2_lite.convert`` (Hugging Face and LAVIS layouts).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.eva import Eva
from torch import nn
from transformers import Blip2VisionConfig

from .images import check_pixels, unit_pixels

# the normalisation EVA-CLIP was trained with
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eva_vit(vision_config: Blip2VisionConfig | dict) -> Eva:
    """A timm ``Eva`` with the architecture of a Hugging Face ``Blip2VisionConfig`` (or its dict).

    Salesforce's config already has 39 layers (EVA's 40th block is dropped). There is no final
    norm: BLIP-2 takes the last kept block's raw output, and the LayerNorm that follows it
    (HF ``post_layernorm``, LAVIS ``ln_vision``) lives outside the encoder in blip2_lite.
    """
    # a dict from config.json may leave out keys whose value is the default
    c = Blip2VisionConfig(**vision_config) if isinstance(vision_config, dict) else vision_config
    if c.hidden_act != "gelu":
        raise ValueError(f"EVA uses exact GELU, the config asks for {c.hidden_act!r}")
    mlp_ratio = c.intermediate_size / c.hidden_size
    if int(c.hidden_size * mlp_ratio) != c.intermediate_size:  # how timm sizes the MLP
        raise ValueError(f"timm cannot express an MLP of {c.intermediate_size} for width {c.hidden_size}")
    return Eva(
        img_size=c.image_size,
        patch_size=c.patch_size,
        embed_dim=c.hidden_size,
        depth=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=c.qkv_bias,  # separate q_bias and v_bias; k has no bias
        norm_layer=partial(nn.LayerNorm, eps=c.layer_norm_eps),
        num_classes=0,
        global_pool="",
        use_post_transformer_norm=False,
        use_fc_norm=False,
    )


class EvaVisionTower(nn.Module):
    """BLIP-2's frozen image encoder at full scale: images -> tokens ``[B, 1 + (S/patch)^2, D]``.

    The output is the last block's raw output (CLS first), without the final LayerNorm
    (``ln_vision``). Weights stay frozen and in eval mode; the forward runs in the weights' dtype,
    so ``.half()`` / ``.to(torch.bfloat16)`` give the fp16/bf16 tower BLIP-2 trains with.
    """

    def __init__(self, vision_config: Blip2VisionConfig | dict):
        super().__init__()
        self.model = eva_vit(vision_config)
        self.model.requires_grad_(False)
        self.train(False)
        self.image_size = self.model.patch_embed.img_size[0]
        self.feature_dim = self.model.embed_dim
        self.num_tokens = self.model.num_prefix_tokens + self.model.patch_embed.num_patches

    def train(self, mode=True):
        return super().train(False)  # frozen: dropout never turns on

    def preprocess(self, images) -> torch.Tensor:
        """Images (paths, bytes, PIL images or arrays; one or a list) -> float32 ``[B, 3, S, S]``: bicubic
        resize to ``image_size`` (no crop), CLIP mean/std."""
        mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (CLIP_MEAN, CLIP_STD))
        return (unit_pixels(images, self.image_size) - mean) / std

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.model.patch_embed.proj.weight  # float32 pixels meet a possibly half-precision tower
        return self.model.forward_features(check_pixels(pixels, self.image_size).to(weight.device, weight.dtype))
