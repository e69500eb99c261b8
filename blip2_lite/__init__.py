"""blip2_lite: BLIP-2 (Li et al., 2023) built piece by piece, checked against transformers."""

from .masks import attention_mask, draw_mask, itc_mask, itg_mask, itm_mask
from .qformer import QFormer, QFormerConfig, QFormerOutput
from .stage1 import Blip2Stage1, Stage1Output
from .stage2 import Blip2

__all__ = [
    "Blip2",
    "Blip2Stage1",
    "QFormer",
    "QFormerConfig",
    "QFormerOutput",
    "Stage1Output",
    "attention_mask",
    "draw_mask",
    "itc_mask",
    "itg_mask",
    "itm_mask",
]
