"""Images in: from a path, bytes, PIL image or array to RGB, and to the pixel tensor an encoder takes.

Every frozen encoder of blip2_lite preprocesses the same way: the whole image, resized (bicubic,
no crop) to the encoder's square input, then normalised with the statistics its weights were
trained with. Keeping the whole image means nothing a caption mentions is cropped away.
This module is also where bad images are caught: every error names the image it is about.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageLoadError(ValueError):
    pass


def load_image(source: ImageSource) -> Image.Image:
    """A path, encoded bytes, a PIL image or an ``[H, W]`` / ``[H, W, 1|3|4]`` array -> an RGB PIL image.

    Every mode goes through ``to_rgb``: RGBA/LA/P with transparency are composited over white,
    16/32-bit greyscale (I;16, I) is scaled to 0..255 rather than clipped, float images (F) in
    [0, 1] are scaled to 0..255, L and CMYK are converted by PIL. Files and bytes are decoded fully
    here and turned upright by their EXIF orientation (phone photos are often stored sideways). A
    missing file raises ``FileNotFoundError``; anything that does not decode (corrupt, truncated,
    not an image, a folder) raises ``ImageLoadError`` naming the source.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or f"<PIL image {source.mode} {source.size}>"
        try:
            source.load()  # a lazily opened file decodes here: a corrupt one fails now, with its name
        except _DECODE_ERRORS as e:
            raise ImageLoadError(f"cannot decode image {name}: {e}") from e
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source))
    if isinstance(source, (bytes, bytearray)):
        name, data = f"<{len(source)} bytes>", bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ImageLoadError(f"{path} is a folder, not an image file")
        name, data = str(source), path.read_bytes()  # FileNotFoundError names the path
    else:
        raise TypeError(f"an image must be a path, bytes, a PIL image or a numpy array, got {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return to_rgb(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as e:
        raise ImageLoadError(f"cannot decode image {name}: {e}") from e


def _from_array(array: np.ndarray) -> Image.Image:
    """uint8 arrays as they are; float arrays in [0, 1] (matplotlib's convention) scaled to 0..255."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ImageLoadError(f"an image array must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageLoadError("a float image array must hold finite values in [0, 1]")
        array = np.round(array * 255)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ImageLoadError(f"an integer image array must hold values in 0..255, got {array.min()}..{array.max()}")
    return Image.fromarray(array.astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white (dropping alpha would expose
    whatever colour hides under transparent pixels, often black); 16/32-bit greyscale (I;16, I)
    is scaled from 0..65535 to 0..255 (PIL's own conversion would clip it at 255); float images (F)
    with values in [0, 1] are scaled to 0..255 (PIL would round them all to black)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257).astype(np.uint8))
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255 if values.size and values.max() <= 1 else 1
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def as_image_list(images) -> list[ImageSource]:
    """One image or a sequence of them -> a non-empty list (a clear error for an empty one)."""
    single = isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray))
    images = [images] if single else list(images)
    if not images:
        raise ValueError("no images given: pass at least one image")
    return images


def unit_pixels(images, image_size: int) -> torch.Tensor:
    """Images (anything ``load_image`` takes, one or a list) -> RGB ``[B, 3, S, S]`` in 0..1, resized
    (bicubic) to ``image_size`` squared."""
    size = (image_size, image_size)
    pixels = np.stack([np.asarray(load_image(im).resize(size, Image.BICUBIC)) for im in as_image_list(images)])
    return rearrange(torch.from_numpy(pixels), "b h w c -> b c h w").float() / 255


def check_pixels(pixels, image_size: int | None = None, name: str = "pixel_values") -> torch.Tensor:
    """A preprocessed pixel batch ``[B, 3, S, S]`` of finite values (S = ``image_size`` when the encoder
    needs one), or a clear error naming ``name`` (raw images go through ``preprocess`` first)."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor [batch, 3, height, width], got {type(pixels).__name__}; "
                        "pass raw images as images=... (or through the encoder's preprocess)")
    if not pixels.is_floating_point():
        raise TypeError(f"{name} must be normalised floats (the encoder's preprocess makes them), got {pixels.dtype}")
    if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise ValueError(f"{name} must be [batch >= 1, 3, height, width], got shape {tuple(pixels.shape)}")
    if image_size is not None and tuple(pixels.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"{name} must be {image_size}x{image_size} for this encoder, got "
                         f"{pixels.shape[-2]}x{pixels.shape[-1]}: preprocess the images with the encoder's preprocess")
    if not torch.isfinite(pixels).all():
        raise FloatingPointError(f"{name} contain NaN or Inf")
    return pixels
