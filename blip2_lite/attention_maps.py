"""What the queries look at: the Q-Former's cross-attention as maps over the image, per layer, head and query.

In BLIP-2 only the learned queries attend to the image, and only in the layers with cross-attention
(0, f, 2f, ... for ``cross_attention_freq`` f: 0, 2, ..., 10 in the paper's Q-Former). Text never
attends to the image: a word reaches it only through the queries. So a cross-attention map is the
softmax weights of one layer, ``[heads, queries, image tokens]``, and turning it into a picture
takes two steps that are easy to get wrong (LAVIS issues 549 and 646):

1. drop the encoder's prefix tokens: ViT-g puts one CLS token before its patches, a CNN has none;
2. reshape the remaining tokens to the encoder's patch grid, row by row (16 x 16 for ViT-g/14 at
   224 px, 26 x 26 at 364, 7 x 7 for the lite world's EfficientNet-Lite0 at 224; not square in
   general).

``token_grid`` reads both from the encoder; ``cross_attention_maps`` runs the image side of the
Q-Former with attention weights on and returns ``[layers, heads, queries, height, width]`` maps;
``itc_best_query`` names the query that decides a caption's ITC score. For a caption, two views:
``itm_gradcam`` weighs the cross-attention by its gradient for the ITM match logit, and
``word_maps`` follows each word through its attention to the queries to the image. ``overlay``
draws a map on its image as LAVIS does (min-max normalised, bicubic upsampling, a slight Gaussian
blur, a colour map, blended).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur


@dataclass(frozen=True)
class TokenGrid:
    """How an encoder lays out its tokens: ``prefix`` tokens (CLS, registers) first, then the
    patches of a ``height x width`` grid row by row."""

    prefix: int
    height: int
    width: int

    def __post_init__(self):
        if self.prefix < 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"need prefix >= 0 and a grid of at least 1 x 1, got {self}")

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.height * self.width

    def to_maps(self, weights: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[..., tokens]`` -> patch maps ``[..., height, width]`` (prefix dropped)."""
        if weights.shape[-1] != self.num_tokens:
            raise ValueError(f"the weights cover {weights.shape[-1]} image tokens, but the grid has {self.prefix} "
                             f"prefix + {self.height} x {self.width} patch tokens = {self.num_tokens}")
        return weights[..., self.prefix:].unflatten(-1, (self.height, self.width))


def token_grid(encoder) -> TokenGrid:
    """The token layout of a frozen image encoder. A timm ViT (``EvaVisionTower``, or
    ``FrozenImageEncoder`` over a ViT) reports its prefix tokens and patch grid. A CNN's map
    (``FrozenImageEncoder``'s default) has no prefix, and its grid is square because the encoder
    resizes every image to a square."""
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "patch_embed"):
        height, width = model.patch_embed.grid_size
        return TokenGrid(getattr(model, "num_prefix_tokens", 0), height, width)
    side = math.isqrt(getattr(encoder, "num_tokens", 0))
    if side == 0 or side * side != encoder.num_tokens:
        raise TypeError(f"cannot read a token grid from {type(encoder).__name__}: give a TokenGrid instead")
    return TokenGrid(0, side, side)


@dataclass
class CrossAttentionMaps:
    """``maps [B, layers, heads, queries, height, width]`` and the Q-Former ``layers`` they come from."""

    maps: torch.Tensor
    layers: list[int]

    def layer(self, layer: int) -> torch.Tensor:
        """The maps of Q-Former layer ``layer`` ``[B, heads, queries, H, W]``."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no cross-attention; the layers with it are {self.layers}")
        return self.maps[:, self.layers.index(layer)]


@torch.no_grad()
def cross_attention_maps(qformer, image_embeds: torch.Tensor, grid: TokenGrid) -> CrossAttentionMaps:
    """Every cross-attention map of the queries for ``image_embeds [B, tokens, width]`` (the frozen
    features after the vision LayerNorm, as the Q-Former sees them)."""
    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds must be [batch, tokens, width], got shape {tuple(image_embeds.shape)}")
    out = qformer(image_embeds=image_embeds, output_attentions=True)
    layers = [i for i in range(qformer.config.num_layers) if qformer.config.has_cross_attention(i)]
    return CrossAttentionMaps(grid.to_maps(torch.stack(out.cross_attentions, dim=1).float()), layers)


@torch.no_grad()
def itc_best_query(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """For each (image, caption) row: the query whose ITC embedding matches the caption best (ITC
    takes the maximum over queries, so this query decides the pair's score) and every query's
    cosine ``[B, queries]``."""
    image_itc, _ = model.itc_image(image_embeds)
    text_itc = model.itc_text(input_ids, attention_mask)
    cosines = torch.einsum("bqe,be->bq", image_itc, text_itc)
    return cosines.argmax(dim=-1), cosines


def itm_gradcam(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                grid: TokenGrid) -> tuple[CrossAttentionMaps, torch.Tensor]:
    """Where the image supports a caption, by gradient: Grad-CAM on the queries' cross-attention
    for the ITM match logit (as BLIP's ITM Grad-CAM, with query rows where BLIP has text rows).

    For each (image, caption) row, the ITM pass (text and queries attending to each other) runs
    with attention weights kept; the match logit (``itm_logits[:, 1]``, averaged over queries) is
    differentiated with respect to every cross-attention weight, and each weight counts as much as
    it raised the logit: ``weight * max(gradient, 0)``, averaged over heads. Returns per-query maps
    ``[B, layers, 1, queries, H, W]`` (one "head": the average) and the ITM logits ``[B, 2]``."""
    from .losses import itm_logits

    with torch.enable_grad():
        out = model.qformer(input_ids, attention_mask, image_embeds, mask="itm", output_attentions=True)
        logits = itm_logits(model.itm_head, out.query_output)
        gradients = torch.autograd.grad(logits[:, 1].sum(), out.cross_attentions)
    cams = [(w * g.clamp(min=0)).mean(dim=1, keepdim=True) for w, g in zip(out.cross_attentions, gradients)]
    layers = [i for i in range(model.config.num_layers) if model.config.has_cross_attention(i)]
    return CrossAttentionMaps(grid.to_maps(torch.stack(cams, dim=1).detach().float()), layers), logits.detach()


@torch.no_grad()
def word_maps(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              grid: TokenGrid) -> torch.Tensor:
    """Where each word of a caption looks, through the queries: ``[B, T, H, W]``.

    A word never attends to the image; in the ITM pass it attends to the queries (self-attention),
    and the queries attend to the image (cross-attention). The word's map is its attention to each
    query (averaged over layers and heads, renormalised over the queries) times that query's
    cross-attention map (averaged over the cross-attention layers and heads)."""
    out = model.qformer(input_ids, attention_mask, image_embeds, mask="itm", output_attentions=True)
    queries = model.config.num_query_tokens
    to_queries = torch.stack(out.self_attentions, dim=1)[..., queries:, :queries].float().mean(dim=(1, 2))
    to_queries = to_queries / to_queries.sum(dim=-1, keepdim=True)  # [B, T, Q]
    cross = torch.stack(out.cross_attentions, dim=1).float().mean(dim=(1, 2))  # [B, Q, tokens]
    return grid.to_maps(to_queries @ cross)


def overlay(image, heat: torch.Tensor, alpha: float = 0.5, blur_sigma: float = 1.5) -> np.ndarray:
    """``heat [H, W]`` drawn on a PIL image: min-max normalised, bicubic upsampling to the image's
    size, a slight Gaussian blur, the jet colour map, blended with weight ``alpha``. Returns an
    RGB float array in [0, 1]."""
    import matplotlib

    if heat.dim() != 2:
        raise ValueError(f"heat must be one [height, width] map, got shape {tuple(heat.shape)}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    heat = heat.float()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    heat = F.interpolate(heat[None, None], size=pixels.shape[:2], mode="bicubic", align_corners=False)
    if blur_sigma > 0:
        kernel = 2 * math.ceil(3 * blur_sigma) + 1
        heat = gaussian_blur(heat, [kernel, kernel], [blur_sigma, blur_sigma])
    heat = heat[0, 0].clamp(0, 1).numpy()
    colours = matplotlib.colormaps["jet"](heat)[..., :3]
    return (1 - alpha) * pixels + alpha * colours


def plot_maps(image, heats: torch.Tensor, titles: list[str], columns: int = 8, size: float = 1.9):
    """A row-major grid of ``overlay`` pictures, one per map ``heats [n, H, W]``. Returns the figure."""
    import matplotlib.pyplot as plt

    if len(heats) != len(titles):
        raise ValueError(f"{len(heats)} maps but {len(titles)} titles")
    rows = math.ceil(len(heats) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, heat, title in zip(axes.flat, heats, titles):
        ax.imshow(overlay(image, heat))
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def explore(image, maps: CrossAttentionMaps, index: int = 0):
    """Sliders for layer, head (-1: the mean over heads) and query over one image's maps, with
    ipywidgets in a notebook front end; without ipywidgets, the default view (first layer, mean
    over heads, query 0) drawn once."""
    import matplotlib.pyplot as plt

    heads, queries = maps.maps.shape[2], maps.maps.shape[3]

    def show(layer: int = maps.layers[0], head: int = -1, query: int = 0):
        per_head = maps.layer(layer)[index, :, query]
        heat = per_head.mean(dim=0) if head < 0 else per_head[head]
        plot_maps(image, heat[None], [f"layer {layer}, {'mean of heads' if head < 0 else f'head {head}'}, "
                                      f"query {query}"], columns=1, size=3.2)
        plt.show()

    try:
        from ipywidgets import Dropdown, IntSlider, interact
    except ImportError:
        show()
        return None
    return interact(show, layer=Dropdown(options=maps.layers, value=maps.layers[0]),
                    head=IntSlider(value=-1, min=-1, max=heads - 1), query=IntSlider(value=0, min=0, max=queries - 1))
