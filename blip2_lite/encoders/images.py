"""Images in: from a path, bytes or PIL image to RGB, and to the pixel tensor an encoder takes.

Every frozen encoder of blip2_lite preprocesses the same way: the whole image, resized (bicubic,
no crop) to the encoder's square input, then normalised with the statistics its weights were
trained with. Keeping the whole image means nothing a caption mentions is cropped away.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white (dropping alpha would expose
    whatever colour hides under transparent pixels, often black); 16/32-bit greyscale (I;16, I)
    is scaled from 0..65535 to 0..255 (PIL's own conversion would clip it at 255)."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        image = Image.fromarray((np.clip(np.asarray(image, dtype=np.int64), 0, 65535) // 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return image.convert("RGB")


def unit_pixels(images: list[Image.Image] | Image.Image, image_size: int) -> torch.Tensor:
    """PIL images -> RGB ``[B, 3, S, S]`` in 0..1, resized (bicubic) to ``image_size`` squared."""
    images = [images] if isinstance(images, Image.Image) else images
    size = (image_size, image_size)
    pixels = np.stack([np.asarray(to_rgb(im).resize(size, Image.BICUBIC)) for im in images])
    return rearrange(torch.from_numpy(pixels), "b h w c -> b c h w").float() / 255
