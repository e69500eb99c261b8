"""The frozen image side of both stages: pixels through the frozen encoder (or cached features), then
the trainable vision LayerNorm that BLIP-2 puts in front of the Q-Former (LAVIS's ``ln_vision``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frozen_features(image_encoder: nn.Module | None, ln_vision: nn.LayerNorm, pixels: torch.Tensor | None,
                    image_features: torch.Tensor | None, pixels_name: str = "pixel_values") -> torch.Tensor:
    """``image_encoder(pixels)`` run without gradient, or the given features ``[B, N, D]``, checked
    against ``ln_vision``'s width and cast to its dtype and device (cached fp16 features included)."""
    width = ln_vision.normalized_shape[0]
    if (pixels is None) == (image_features is None):
        raise ValueError(f"pass exactly one of {pixels_name} or image_features")
    if pixels is not None:
        if image_encoder is None:
            raise ValueError("this model has no image_encoder: pass precomputed image_features instead")
        with torch.no_grad():
            image_features = image_encoder(pixels)
    if not isinstance(image_features, torch.Tensor):
        raise TypeError(f"image_features must be a torch tensor [batch, tokens, {width}], "
                        f"got {type(image_features).__name__}")
    if image_features.dim() != 3 or image_features.shape[-1] != width or 0 in image_features.shape[:2]:
        raise ValueError(f"image features must be [batch >= 1, tokens >= 1, {width}], "
                         f"got shape {tuple(image_features.shape)}")
    if not torch.isfinite(image_features).all():  # else NaN flows silently into losses or empty captions
        raise FloatingPointError("image_features contain NaN or Inf")
    return image_features.to(ln_vision.weight)


def vision_embeds(image_encoder: nn.Module | None, ln_vision: nn.LayerNorm, pixels: torch.Tensor | None,
                  image_features: torch.Tensor | None, pixels_name: str = "pixel_values") -> torch.Tensor:
    """``ln_vision(image_encoder(pixels))`` with the encoder run without gradient, or ``ln_vision`` of
    given features ``[B, N, D]`` (cached fp16 features on any device are cast to the LayerNorm's)."""
    return ln_vision(frozen_features(image_encoder, ln_vision, pixels, image_features, pixels_name))


def normalized_features(image_encoder: nn.Module | None, ln_vision: nn.LayerNorm, pixels: torch.Tensor | None,
                        image_features: torch.Tensor | None, pixels_name: str = "pixel_values") -> torch.Tensor:
    """As ``vision_embeds`` but without ``ln_vision``'s weight and bias: the frozen features normalised
    per token, a constant that needs no gradient. ``QFormer.image_keys_values(..., norm=ln_vision)``
    applies the weight and bias inside its key/value projections instead."""
    features = frozen_features(image_encoder, ln_vision, pixels, image_features, pixels_name)
    return F.layer_norm(features, ln_vision.normalized_shape, eps=ln_vision.eps)
