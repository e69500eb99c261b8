"""The lite world, ready for training: each split's cached frozen features and tokenised captions.

``load_lite_world`` is where everything the lite world needs is generated on first use and read
back afterwards: the shapes world (``shapes_world``), the frozen EfficientNet-Lite0 features (the
feature cache, ``features``) and the captions tokenised by the Q-Former's BERT tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..convert.bert import bert_tokenizer
from ..encoders.timm_encoder import FrozenImageEncoder
from .features import cached_features
from .paths import cache_root
from .shapes_world import DATASET_VERSION, load_shapes_world

MAX_TEXT_LEN = 32  # the paper's maximum caption length
# EfficientNet-Lite0's final map tells shapes apart but hardly colours, its earlier stages read colour
# well (linear probes, ``feature_probe``; README): the lite world's tokens carry both, the earlier
# stages average-pooled onto the final 7 x 7 grid.
LITE_POOLED_STAGES = (1, 2, 3)


def lite_encoder(pretrained: bool = True) -> FrozenImageEncoder:
    """The lite world's frozen encoder: EfficientNet-Lite0 (ImageNet weights), 49 tokens of its final map
    with the stride-4, -8 and -16 stages' channels in front (``LITE_POOLED_STAGES``)."""
    return FrozenImageEncoder(pretrained=pretrained, pooled_stages=LITE_POOLED_STAGES)


@dataclass
class CaptionedImages:
    """One split, ready for training: cached frozen features and tokenised captions.

    ``features [N, P, D]`` (half precision is fine), ``input_ids`` / ``attention_mask``
    ``[N, C, T]`` with C captions per image.
    """

    features: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self):
        n, c, t = self.input_ids.shape
        if len(self.features) != n or self.attention_mask.shape != (n, c, t):
            raise ValueError(
                f"features {tuple(self.features.shape)}, input_ids {tuple(self.input_ids.shape)} and "
                f"attention_mask {tuple(self.attention_mask.shape)} disagree on the number of images/captions"
            )

    def flat_texts(self):
        """All captions as ``[N*C, T]`` ids and mask, and the image index of each."""
        n, c, t = self.input_ids.shape
        return self.input_ids.reshape(n * c, t), self.attention_mask.reshape(n * c, t), torch.arange(n).repeat_interleave(c)


def tokenize_captions(tokenizer, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, C, T]`` ids and mask, padded to the longest caption (at most ``MAX_TEXT_LEN`` tokens)."""
    n, c = len(captions), len(captions[0])
    flat = [caption for per_image in captions for caption in per_image]
    tokens = tokenizer(flat, padding="longest", truncation=True, max_length=MAX_TEXT_LEN, return_tensors="pt")
    return tokens.input_ids.reshape(n, c, -1), tokens.attention_mask.reshape(n, c, -1)


@dataclass
class LiteWorld:
    """The shapes world with cached frozen features and tokenised captions for every split."""

    dataset: object  # datasets.DatasetDict
    splits: dict[str, CaptionedImages]
    tokenizer: object
    encoder: torch.nn.Module


def load_lite_world(root: str | None = None, sizes: dict | None = None, progress: bool = True) -> LiteWorld:
    """Generate (or load) the shapes world, cache its frozen EfficientNet-Lite0 features and tokenise
    its captions with the Q-Former's BERT tokenizer. Everything is cached under ``root``."""
    root = Path(root or cache_root())
    dataset = load_shapes_world(root, sizes=sizes, progress=progress)
    encoder = lite_encoder()
    tokenizer = bert_tokenizer()
    splits = {}
    for name, split in dataset.items():
        features = cached_features(encoder, split, name, DATASET_VERSION, cache_dir=root / "features",
                                   progress=progress)
        splits[name] = CaptionedImages(features, *tokenize_captions(tokenizer, split["captions"]))
    return LiteWorld(dataset, splits, tokenizer, encoder)
